"""Same-run A/B of two builds of timm-ldn, each against a fixed peer in its own process: ldn_small against DeiT-S,
and the sequence model (``seq_*`` cases) against a same-size softmax Transformer (PyTorch's own layers, identical
in both builds). Wall clock, all cores, builds alternating as subprocesses.

    git worktree add /tmp/ldn_old <old commit>
    python eval/speed/ab_speed.py --old /tmp/ldn_old --new . --rounds 5      # -> eval/results/ab_speed.{json,md}
    python eval/speed/ab_speed.py --new . --rounds 5 --out eval/results/speed_vs_deit   # one build against its peer

Each round runs every case once per build, in a fresh process each (the order of the builds alternates from round
to round). A process imports ``timm_ldn`` from its build's tree (``PYTHONPATH``), builds the LDN model and the
peer with fixed weights, warms both up, then times ``--iters`` calls of each, alternating LDN and peer call by
call, so both see the same process and machine state (allocator, page cache, clock speed, neighbours).

Why the peer: a fresh process's few calls carry that process's own state (first-touch page faults, allocator
growth, where its pages landed), which moves a build's time by 10-20 % from process to process; the 2026-12-07
A/B of the refactor read 1.11x (1.08-1.21) at 224 px from bare times in fresh processes. The peer in the same process
sees the same state, so ``peer ms / LDN ms`` -- the figure users compare -- and the A/B taken on it
(``new/old, peer-normalised``) are what this page reports, beside the bare ratio.
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

import torch
import torch.nn as nn

CASES = {  # name -> (resolution, batch, training step?)
    'infer_224_b8': (224, 8, False),
    'infer_512_b2': (512, 2, False),
    'infer_1024_b1': (1024, 1, False),
    'train_224_b8': (224, 8, True),
    # the sequence model (timm_ldn.sequence) at the ListOps benchmark's size: 'resolution' is the token count
    'seq_train_L256_b32': (256, 32, True),
    'seq_infer_L4096_b1': (4096, 1, False),
}
PEER = 'deit_small_patch16_224'  # ldn_small's peer: the same-size DeiT (timm), resized by img_size
RESULTS = Path(__file__).resolve().parents[1] / 'results'
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import inference_fn, live_peak_mb, train_step_fn  # noqa: E402


class SeqTransformer(nn.Module):
    """The sequence cases' peer: embedding, 4 pre-norm softmax layers (PyTorch's own, the same in every build),
    mean pool, head; the LDN sequence model's width, depth, heads and MLP ratio."""

    def __init__(self, vocab_size: int = 16, num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0., activation='gelu', batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def worker(case: str, iters: int, peak_only: bool = False) -> Dict[str, float]:
    import timm
    import timm_ldn
    res, batch, train = CASES[case]
    torch.manual_seed(0)
    if case.startswith('seq_'):
        from timm_ldn.sequence import LdnSequenceClassifier, PathDiffusion
        # the paper's form spelled out: builds from before and after the defaults moved (2026-12-07) build one model
        models = {'ldn': LdnSequenceClassifier(num_classes=10, vocab_size=16, embed_dim=64, depth=4, num_heads=4,
                                               max_len=max(res, 512), diffusion_layer=PathDiffusion,
                                               pos_embed=False, weight_init='trunc_normal'),
                  'peer': SeqTransformer()}
        x = torch.randint(0, 16, (batch, res))
        num_classes = 10
    else:
        models = {'ldn': timm.create_model('ldn_small'), 'peer': timm.create_model(PEER, img_size=res)}
        x = torch.randn(batch, 3, res, res)
        num_classes = 1000

    # the benchmark's own calls (bench_harness): a training step is AdamW + cross-entropy, inference runs under
    # inference_mode
    calls = {name: train_step_fn(m, x, num_classes=num_classes) if train else inference_fn(m.eval(), x)
             for name, m in models.items()}
    for _ in range(2):
        for call in calls.values():
            call()
    package = str(Path(timm_ldn.__file__).resolve().parent)
    if peak_only:
        return dict(package=package, **{f'{name}_live_peak_mb': live_peak_mb(call) for name, call in calls.items()})
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for i in range(iters):
        for name in (('ldn', 'peer') if i % 2 == 0 else ('peer', 'ldn')):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return dict(ms=ms['ldn'], peer_ms=ms['peer'], peer_over_ldn=ms['peer'] / ms['ldn'],
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, package=package,
                threads=torch.get_num_threads())


def _run(build: Path, case: str, iters: int, peak_only: bool = False) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(build))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--worker', case, '--iters', str(iters)]
                          + (['--peak'] if peak_only else []),
                          cwd=str(build), env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f'{build} {case} failed:\n{proc.stderr[-3000:]}')
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(out['package']) != (build / 'timm_ldn').resolve():
        raise RuntimeError(f'{build}: the worker imported timm_ldn from {out["package"]}, not from the build')
    return out


def _label(commits: Dict[str, str], dirty: bool) -> Dict[str, str]:
    return {k: v + (' + working tree' if k == 'new' and dirty else '') for k, v in commits.items()}


def peak_table(builds: Dict[str, Path], labels: Dict[str, str], cases: List[str], out: Path) -> int:
    rows = {case: {name: _run(build, case, 1, peak_only=True) for name, build in builds.items()} for case in cases}
    names = list(builds)
    lines = ['# Live-tensor peak of one call: ' + ', '.join(f'{n} ({labels[n]})' for n in names) + ', and each peer', '',
             'Generated by `python eval/speed/ab_speed.py ' + ('--old <worktree> ' if 'old' in builds else '')
             + '--new . --peak`: the high-water mark of live tensor bytes during one call (profiler allocation events: '
             'activations, saved tensors, workspaces; not weights or allocator caching), after two warm-up calls.', '',
             '| case | ' + ' | '.join(f'{n} LDN MiB' for n in names) + ' | peer MiB | LDN / peer |',
             '|---|' + '---|' * (len(names) + 2)]
    for case, r in rows.items():
        ldn = [r[n]['ldn_live_peak_mb'] for n in names]
        peer = r[names[-1]]['peer_live_peak_mb']
        lines.append(f'| {case} | ' + ' | '.join(f'{v:.1f}' for v in ldn) + f' | {peer:.1f} | {ldn[-1] / peer:.2f} |')
    out.with_suffix('.json').write_text(json.dumps(dict(builds=labels, rows=rows), indent=1))
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--old', type=Path, help='worktree of the old build (without it: the new build against its peer)')
    p.add_argument('--new', type=Path, default=Path('.'))
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    p.add_argument('--worker', choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument('--peak', action='store_true',
                   help='instead of timing: live-tensor peak of one call per case, build and peer (1 run)')
    p.add_argument('--out', type=Path, default=RESULTS / 'ab_speed')
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.iters, args.peak)))
        return 0
    builds = {**({'old': args.old.resolve()} if args.old else {}), 'new': args.new.resolve()}
    commits = {k: subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=v, capture_output=True,
                                 text=True).stdout.strip() for k, v in builds.items()}
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', 'timm_ldn'],
                           cwd=builds['new'], capture_output=True, text=True).stdout.strip()
    labels = _label(commits, bool(dirty))
    if args.peak:
        return peak_table(builds, labels, args.cases, args.out.with_name(args.out.name + '_peak'))
    names = list(builds)
    runs: Dict[str, Dict[str, List[Dict[str, float]]]] = {c: {n: [] for n in names} for c in args.cases}
    for r in range(args.rounds):
        for case in args.cases:
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[case][name].append(_run(builds[name], case, args.iters))
            print(f'round {r + 1}/{args.rounds} {case}: ' + ', '.join(
                f'{n} LDN {runs[case][n][-1]["ms"]:.0f} ms, peer {runs[case][n][-1]["peer_ms"]:.0f} ms, peer/LDN '
                f'{runs[case][n][-1]["peer_over_ldn"]:.3f}' for n in names), flush=True)
    rows = []
    for case, by in runs.items():
        row = dict(case=case)
        for n in names:
            speedups = [x['peer_over_ldn'] for x in by[n]]
            row.update({f'{n}_ms': statistics.median(x['ms'] for x in by[n]),
                        f'{n}_peer_ms': statistics.median(x['peer_ms'] for x in by[n]),
                        f'{n}_peer_over_ldn': statistics.median(speedups),
                        f'{n}_peer_over_ldn_range': [min(speedups), max(speedups)],
                        f'{n}_peak_mb': statistics.median(x['peak_mb'] for x in by[n])})
        if 'old' in by:
            bare = [nw['ms'] / o['ms'] for o, nw in zip(by['old'], by['new'])]
            normalised = [o['peer_over_ldn'] / nw['peer_over_ldn'] for o, nw in zip(by['old'], by['new'])]
            row.update(new_over_old=statistics.median(bare), new_over_old_range=[min(bare), max(bare)],
                       new_over_old_normalised=statistics.median(normalised),
                       new_over_old_normalised_range=[min(normalised), max(normalised)])
        rows.append(row)
    threads = runs[args.cases[0]]['new'][0]['threads']
    out = dict(builds=labels, rounds=args.rounds, iters=args.iters, threads=threads, peer=PEER, rows=rows, runs=runs,
               date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix('.json').write_text(json.dumps(out, indent=1))
    command = 'python eval/speed/ab_speed.py ' + (f'--old <worktree of {commits["old"]}> ' if 'old' in builds else '') \
        + f'--new . --rounds {args.rounds} --iters {args.iters}' \
        + (f' --cases {" ".join(args.cases)}' if args.cases != list(CASES) else '')
    lines = ['# ' + ' against '.join(f'{n} ({labels[n]})' for n in names[::-1]) + ': each build against its peer', '',
             f'Generated by `{command}` on {out["date"]}: {args.rounds} rounds, builds alternating as fresh processes, '
             f'{threads} threads (all cores), wall clock. In each process the LDN model and its peer ({PEER} for '
             'ldn_small, a same-size softmax Transformer for the sequence model) run alternately, 2 warm-up calls '
             f'each, then the median of {args.iters} timed calls each. **peer / LDN** > 1: LDN faster (median of rounds, '
             'range); peak = the process\'s max RSS (both models).', '']
    head = '| case | ' + ' | '.join(f'{n} LDN ms | {n} peer ms | {n} peer / LDN' for n in names)
    sep = '|---|' + '---|---|---|' * len(names)
    if 'old' in builds:
        head += ' | new/old, bare | new/old, peer-normalised'
        sep += '---|---|'
    lines += [head + ' |', sep]
    for r in rows:
        cells = [f"{r[f'{n}_ms']:.0f} | {r[f'{n}_peer_ms']:.0f} | **{r[f'{n}_peer_over_ldn']:.2f}** "
                 f"({r[f'{n}_peer_over_ldn_range'][0]:.2f}-{r[f'{n}_peer_over_ldn_range'][1]:.2f})" for n in names]
        line = f"| {r['case']} | " + ' | '.join(cells)
        if 'old' in builds:
            line += (f" | {r['new_over_old']:.3f} ({r['new_over_old_range'][0]:.2f}-{r['new_over_old_range'][1]:.2f})"
                     f" | **{r['new_over_old_normalised']:.3f}** ({r['new_over_old_normalised_range'][0]:.2f}-"
                     f"{r['new_over_old_normalised_range'][1]:.2f})")
        lines.append(line + ' |')
    args.out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
