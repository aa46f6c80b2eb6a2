"""GPU table of LDN vs DeiT in one short run: bf16 autocast, torch.compile, channels-last input, MFU.

One command (H200, < 5 min; writes eval/results/gpu_benchmark.json and prints the table):

    python eval/speed/gpu_benchmark.py

Smoke test on any machine (CPU, tiny models, dynamo capture with the eager backend, seconds; nothing is written to eval/results):

    python eval/speed/gpu_benchmark.py --dry-run

What it measures, per model pair (LDN and the DeiT of the same size, created with ``img_size`` = resolution):

* throughput (images/s) at the given batch, models alternating round by round, median and min–max over rounds
  (CUDA-event timed, after compile warm-up); the LDN/DeiT ratio is the median of the per-round ratios;
* MFU = (2 × MACs per image × images/s) / peak dense bf16 FLOP/s (``--peak-tflops``, 989 for H100/H200 SXM);
  MACs are counted on the meta device by ``timm_ldn.profiling.count_cost`` (attention matmuls included);
* peak memory: ``torch.cuda.max_memory_allocated`` during one forward, weights excluded;
* eager and compiled numbers for the headline pair (compile gain), compiled for the rest;
* a compiled-vs-eager output check (bf16 tolerance) so a fast-but-wrong compile cannot slip through.

Targets of issue 5: ldn_small ≥ 1.2× deit_small at 224 / batch 256, and ≥ 35 % MFU.
"""
import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablations import FixedMethodDiffusion  # noqa: E402
from bench_harness import PAIRS, bench_model, model_gmacs  # noqa: E402


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call, CUDA events on GPU, perf_counter elsewhere."""
    def run(fn: Callable[[], object], iters: int) -> float:
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    return run


def _peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != 'cuda':
        return float('nan')
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def prepare(name: str, res: int, batch: int, device: torch.device, compile_model: bool, channels_last: bool,
            dtype: torch.dtype, backend: str = 'inductor'):
    """A ready-to-time forward closure for ``name`` (weights fp32, autocast to ``dtype``), plus its input.

    ``name@shift`` / ``name@conv`` pick LDN's diffusion-step implementation (default: conv on GPU).
    ``backend``: torch.compile's (``'eager'`` in --dry-run: dynamo's fullgraph capture without a C++ toolchain).
    """
    name, _, method = name.partition('@')
    kwargs = dict(diffusion_layer=partial(FixedMethodDiffusion, method=method)) if method else None
    model = bench_model(name, res, device, kwargs)
    x = torch.randn(batch, 3, res, res, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fwd_model = torch.compile(model, fullgraph=True, backend=backend) if compile_model else model
    autocast = device.type == 'cuda' or dtype == torch.bfloat16

    def fwd():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return fwd_model(x)

    def eager():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return model(x)
    return eager, fwd


def measure_pair(names: List[str], res: int, batch: int, device: torch.device, compile_model: bool,
                 channels_last: bool, dtype: torch.dtype, rounds: int, iters: int, peak_tflops: float,
                 log=print, backend: str = 'inductor') -> List[dict]:
    fns, models, mem, compile_s = {}, {}, {}, {}
    for name in names:
        t0 = time.perf_counter()
        models[name], fns[name] = prepare(name, res, batch, device, compile_model, channels_last, dtype, backend)
        for _ in range(3):  # compile + autotune + allocator warm-up
            fns[name]()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        compile_s[name] = time.perf_counter() - t0
        mem[name] = _peak_mem_mb(fns[name], device)
    if compile_model:  # compiled output must match eager on the same input (bf16-level tolerance)
        for name in names:
            a, b = models[name]().float(), fns[name]().float()
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-6)
            log(f'  compiled-vs-eager rel. max err {name}: {err:.2e}')
            if err > 5e-2:
                raise RuntimeError(f'{name}: compiled output differs from eager by {err:.2e} (relative)')
    timer = _timer(device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timer(fns[name], iters))
    ref = names[-1]
    rows = []
    for name in names:
        med = statistics.median(times[name])
        gmacs = model_gmacs(name.partition('@')[0], res)
        img_s = batch / med
        ratios = [a / b for a, b in zip(times[ref], times[name])]
        rows.append(dict(
            model=name, resolution=res, batch=batch, compiled=compile_model, channels_last=channels_last,
            dtype=str(dtype).replace('torch.', ''), img_s=img_s, img_s_min=batch / max(times[name]),
            img_s_max=batch / min(times[name]), latency_ms=med * 1e3, speedup_vs_deit=statistics.median(ratios),
            speedup_min=min(ratios), speedup_max=max(ratios), gmacs=gmacs,
            tflops=2 * gmacs * img_s / 1e3, mfu=2 * gmacs * 1e9 * img_s / (peak_tflops * 1e12),
            peak_mem_mb=mem[name], warmup_s=compile_s[name],
        ))
        log(f"  {name:26s} {res:4d}px b{batch:<4d} {'compiled' if compile_model else 'eager   '} "
            f"{img_s:9.1f} img/s  x{rows[-1]['speedup_vs_deit']:.2f} vs {ref}  MFU {rows[-1]['mfu'] * 100:5.1f}%  "
            f"mem {mem[name]:8.1f} MiB  (warm-up {compile_s[name]:.0f}s)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help='CPU, tiny models, 32 px, fullgraph capture only: checks the script')
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--iters', type=int, default=10, help='forward calls per timed round')
    p.add_argument('--peak-tflops', type=float, default=989., help='dense bf16 peak of the GPU (H200/H100 SXM: 989)')
    p.add_argument('--no-compile', action='store_true')
    p.add_argument('--no-channels-last', action='store_true')
    p.add_argument('--sweep', action='store_true', help='also small at 512/1024 and tiny/base at 224 (longer)')
    p.add_argument('--out', default=os.path.join('eval', 'results', 'gpu_benchmark.json'))
    args = p.parse_args(argv)

    backend = 'inductor'
    if args.dry_run:
        backend = 'eager'  # dynamo's fullgraph capture (graph breaks raise) without a C++ toolchain
        device, dtype, compile_model = torch.device('cpu'), torch.bfloat16, True
        plan = [('tiny', 32, 2, False), ('tiny', 32, 2, True)]
        extra = {('tiny', 32, True): ['ldn_tiny@shift']}
        args.rounds, args.iters = 2, 1
    else:
        if not torch.cuda.is_available():
            print('no CUDA device: use --dry-run to check the script on CPU', file=sys.stderr)
            return 2
        device, dtype, compile_model = torch.device('cuda'), torch.bfloat16, not args.no_compile
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # headline: small at 224 / 256, eager first (the compile gain), then compiled
        plan = [('small', 224, args.batch, False), ('small', 224, args.batch, compile_model)]
        # compiled: also the shifted-add diffusion step (inductor may fuse its 13 slice updates into one kernel)
        extra = {('small', 224, compile_model): ['ldn_small@shift']} if compile_model else {}
        if args.sweep:
            plan += [('tiny', 224, args.batch, compile_model), ('base', 224, args.batch, compile_model),
                     ('small', 512, max(1, args.batch // 4), compile_model),
                     ('small', 1024, max(1, args.batch // 16), compile_model)]
    rows = []
    t0 = time.perf_counter()
    for size, res, batch, comp in plan:
        ldn, deit = PAIRS[size]
        names = [ldn] + extra.get((size, res, comp), []) + [deit]  # the reference (DeiT) goes last
        rows += measure_pair(names, res, batch, device, comp, not args.no_channels_last, dtype,
                             args.rounds, args.iters, args.peak_tflops, backend=backend)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
               peak_tflops=args.peak_tflops, wall_s=time.perf_counter() - t0,
               time_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
               command='python eval/speed/gpu_benchmark.py' + (' --sweep' if args.sweep else ''))
    result = dict(environment=env, rows=rows)
    heads = [r for r in rows if r['model'].startswith('ldn_small') and r['resolution'] == 224 and r['compiled']]
    head = max(heads, key=lambda r: r['img_s']) if heads else None  # the faster diffusion-step implementation
    if head is not None:
        result['targets'] = dict(model=head['model'], speedup_vs_deit_small=head['speedup_vs_deit'], speedup_target=1.2,
                                 mfu=head['mfu'], mfu_target=0.35)
    print(json.dumps(result.get('targets', {}), indent=1))
    if not args.dry_run:
        os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
        print('wrote', args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
