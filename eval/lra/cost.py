"""Cost scaling without training: forward + backward time and peak memory of one sequence against its length.

    python eval/lra/cost.py                       # -> eval/results/lra/cost.{json,md,png}

The three rows of the benchmark (``eval/lra/models.py``: LDN, softmax Transformer, linear-attention Transformer) at
the ListOps width (64 wide, 4 layers, 4 heads, MLP ratio 4), batch 1, all cores, wall clock, at L = 256, 1k, 4k,
16k (LRA Path-X) and 64k where it fits. Per length the models alternate round by round (median of ``--rounds``);
peak memory is the high-water mark of live tensor bytes during one forward + backward (profiler allocation events:
activations, saved tensors and workspaces; not weights or allocator caching). Exponents are least-squares slopes in
log-log over 1k-16k. A model is skipped at longer lengths once one call takes more than ``--max-seconds``.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / 'results' / 'lra'
ROWS = ('ldn', 'transformer', 'linear_transformer')
LENGTHS = (256, 1024, 4096, 16384, 65536)


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return call


def peak_mb(fn: Callable[[], None]) -> float:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2 ** 20


def slope(xs: List[float], ys: List[float]) -> float:
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lengths', nargs='+', type=int, default=list(LENGTHS))
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(models.ROWS))
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--max-seconds', type=float, default=120., help='skip longer lengths once a call takes this long')
    p.add_argument('--out', type=Path, default=RESULTS / 'cost')
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    kw = dict(num_classes=10, vocab_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4., max_len=max(args.lengths))
    torch.manual_seed(0)
    built = {r: models.build(r, **kw).train() for r in args.rows}
    results: Dict[str, Dict[int, Dict[str, float]]] = {r: {} for r in args.rows}
    alive = set(args.rows)
    for L in args.lengths:
        x = torch.randint(1, 16, (1, L))
        calls = {r: fwd_bwd(built[r], x) for r in args.rows if r in alive}
        times: Dict[str, List[float]] = {r: [] for r in calls}
        for r, fn in calls.items():  # warm-up, and the memory high-water mark of one call
            start = time.perf_counter()
            try:
                results[r][L] = dict(peak_mb=peak_mb(fn))
            except RuntimeError as e:  # out of memory
                results[r][L] = dict(error=str(e)[:200])
                alive.discard(r)
                continue
            if time.perf_counter() - start > args.max_seconds:
                alive.discard(r)  # measured once more below, then no longer lengths
        for _ in range(args.rounds):
            for r, fn in calls.items():
                if 'error' in results[r][L]:
                    continue
                start = time.perf_counter()
                fn()
                times[r].append(time.perf_counter() - start)
        for r in calls:
            if times[r]:
                results[r][L]['seconds'] = statistics.median(times[r])
                print(f'L={L} {r}: {results[r][L]["seconds"]:.3f} s, peak {results[r][L]["peak_mb"]:.0f} MiB', flush=True)
    fit = {}
    for r in args.rows:
        pts = [(L, v) for L, v in results[r].items() if 1024 <= L <= 16384 and 'seconds' in v]
        if len(pts) >= 2:
            fit[r] = dict(time=slope([L for L, _ in pts], [v['seconds'] for _, v in pts]),
                          memory=slope([L for L, _ in pts], [v['peak_mb'] for _, v in pts]))
    out = dict(threads=threads, config=kw, rounds=args.rounds, results=results, exponents_1k_16k=fit,
               date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), torch=torch.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix('.json').write_text(json.dumps(out, indent=1))
    lines = ['# Sequence cost: forward + backward of one sequence (batch 1)', '',
             f'Generated by `python eval/lra/cost.py` on {out["date"]}: {threads} threads (all cores), wall clock, '
             f'median of {args.rounds} alternating rounds; peak = live tensor bytes during one forward + backward. '
             '64 wide, 4 layers, 4 heads, MLP ratio 4.', '',
             '| L | ' + ' | '.join(f'{r} s | {r} MiB' for r in args.rows) + ' |',
             '|---' * (1 + 2 * len(args.rows)) + '|']
    for L in args.lengths:
        cells = []
        for r in args.rows:
            v = results[r].get(L, {})
            cells += [f"{v['seconds']:.3f}" if 'seconds' in v else ('OOM' if 'error' in v else '-'),
                      f"{v['peak_mb']:.0f}" if 'peak_mb' in v else '-']
        lines.append(f'| {L} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| row | time exponent (1k-16k) | memory exponent (1k-16k) |', '|---|---|---|']
    lines += [f"| {r} | {f['time']:.2f} | {f['memory']:.2f} |" for r, f in fit.items()]
    ratios = []
    for L in args.lengths:
        a, b = results.get('ldn', {}).get(L, {}), results.get('transformer', {}).get(L, {})
        if 'seconds' in a and 'seconds' in b:
            ratios.append(f"| {L} | {b['seconds'] / a['seconds']:.1f}x | {a['peak_mb'] / b['peak_mb']:.2f} |")
    if ratios:
        lines += ['', '| L | Transformer time / LDN time | LDN peak / Transformer peak |', '|---|---|---|'] + ratios
    args.out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for r in args.rows:
            pts = sorted((L, v) for L, v in results[r].items() if 'seconds' in v)
            if not pts:
                continue
            label = r + (f" (p={fit[r]['time']:.2f} / {fit[r]['memory']:.2f})" if r in fit else '')
            axes[0].loglog([L for L, _ in pts], [v['seconds'] for _, v in pts], 'o-', label=label)
            axes[1].loglog([L for L, _ in pts], [v['peak_mb'] for _, v in pts], 'o-', label=r)
        axes[0].set(xlabel='sequence length L', ylabel='forward + backward (s)', title='time (fitted exponent 1k-16k)')
        axes[1].set(xlabel='sequence length L', ylabel='peak MiB', title='peak memory')
        for ax in axes:
            ax.grid(alpha=.3, which='both')
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix('.png'), dpi=110)
    except ImportError:
        pass
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
