"""Same-run A/B of two builds of timm-ldn: ldn_small wall clock and peak memory, builds alternating as subprocesses.

    git worktree add /tmp/ldn_old <old commit>
    python eval/ab_speed.py --old /tmp/ldn_old --new . --rounds 7      # -> eval/results/ab_speed.{json,md}

Each round runs every case once per build, in a fresh process each (the order of the two builds alternates from round
to round), so both builds see the same machine state within a round. A process imports ``timm_ldn`` from its build's
tree (``PYTHONPATH``), builds ``ldn_small`` with fixed weights, warms up, then times ``--iters`` calls, all cores,
wall clock; it reports the median call time and its peak resident memory (``ru_maxrss``: weights + activations +
allocator, the same for both builds except what the builds do differently). The table gives, per case, the median of
the per-round new/old time ratios, with their range, and the median peak memory of each build.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

CASES = {  # name -> (resolution, batch, training step?)
    'infer_224_b8': (224, 8, False),
    'infer_512_b2': (512, 2, False),
    'infer_1024_b1': (1024, 1, False),
    'train_224_b8': (224, 8, True),
}
RESULTS = Path(__file__).resolve().parent / 'results'


def worker(case: str, iters: int) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F
    import timm
    import timm_ldn
    res, batch, train = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model('ldn_small').train(train)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def call() -> None:
        if train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.inference_mode():
                model(x)

    call()
    call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return dict(ms=1e3 * statistics.median(times), peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                package=str(Path(timm_ldn.__file__).resolve().parent), threads=torch.get_num_threads())


def _run(build: Path, case: str, iters: int) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(build))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--worker', case, '--iters', str(iters)],
                          cwd=str(build), env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f'{build} {case} failed:\n{proc.stderr[-3000:]}')
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(out['package']) != (build / 'timm_ldn').resolve():
        raise RuntimeError(f'{build}: the worker imported timm_ldn from {out["package"]}, not from the build')
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--old', type=Path)
    p.add_argument('--new', type=Path, default=Path('.'))
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    p.add_argument('--worker', choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument('--out', type=Path, default=RESULTS / 'ab_speed')
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.iters)))
        return 0
    if args.old is None:
        p.error('--old is required')
    builds = {'old': args.old.resolve(), 'new': args.new.resolve()}
    commits = {k: subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=v, capture_output=True,
                                 text=True).stdout.strip() for k, v in builds.items()}
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=builds['new'],
                           capture_output=True, text=True).stdout.strip()
    runs: Dict[str, Dict[str, List[Dict[str, float]]]] = {c: {'old': [], 'new': []} for c in args.cases}
    for r in range(args.rounds):
        for case in args.cases:
            for name in (('old', 'new') if r % 2 == 0 else ('new', 'old')):
                runs[case][name].append(_run(builds[name], case, args.iters))
            o, n = runs[case]['old'][-1], runs[case]['new'][-1]
            print(f'round {r + 1}/{args.rounds} {case}: old {o["ms"]:.0f} ms, new {n["ms"]:.0f} ms, '
                  f'new/old {n["ms"] / o["ms"]:.3f}', flush=True)
    rows = []
    for case, by in runs.items():
        ratios = [n['ms'] / o['ms'] for o, n in zip(by['old'], by['new'])]
        rows.append(dict(case=case, old_ms=statistics.median(x['ms'] for x in by['old']),
                         new_ms=statistics.median(x['ms'] for x in by['new']),
                         ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                         old_peak_mb=statistics.median(x['peak_mb'] for x in by['old']),
                         new_peak_mb=statistics.median(x['peak_mb'] for x in by['new'])))
    threads = runs[args.cases[0]]['new'][0]['threads']
    out = dict(commits=commits, new_tree_dirty=bool(dirty), rounds=args.rounds, iters=args.iters, threads=threads,
               rows=rows, runs=runs, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix('.json').write_text(json.dumps(out, indent=1))
    new_label = commits['new'] + (' + working tree' if dirty else '')
    lines = [f'# ldn_small A/B: new ({new_label}) against old ({commits["old"]})', '',
             f'Generated by `python eval/ab_speed.py --old <worktree of {commits["old"]}> --new .` on {out["date"]}: '
             f'{args.rounds} rounds, builds alternating as fresh processes, {threads} threads (all cores), wall clock, '
             f'median of {args.iters} timed calls per process after 2 warm-up calls; peak = the process\'s max RSS.', '',
             '| case | old ms | new ms | new/old (median of rounds) | range | old peak MB | new peak MB |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['case']} | {r['old_ms']:.0f} | {r['new_ms']:.0f} | {r['ratio']:.3f} | "
                     f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['old_peak_mb']:.0f} | {r['new_peak_mb']:.0f} |")
    args.out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
