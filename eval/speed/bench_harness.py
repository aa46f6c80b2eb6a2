"""The measurement pieces of ``python eval/speed/benchmark.py``: LDN vs timm peers, side by side in one process.

Design (why each choice):

* **Alternating rounds.** The machine is shared, so absolute timings drift by 2x within a minute. Every case
  (resolution, batch) times all its models round-robin, one round after another; the LDN/DeiT ratio is taken per
  round (the two timings are seconds apart) and the median of those paired ratios is reported with its min–max.
* **What users see is the default.** All cores and the wall clock, as a user running the model sees it.
  Multi-threaded timings on shared cores are noisy (an OpenMP team waits at every barrier for a descheduled
  sibling), so rounds are many and short and only paired per-round ratios are reported, with their spread.
* **Second view, one thread.** The ``'cpu'`` clock (process CPU time) does not charge a model for the time the
  process waited while another job held the core (the compute each model needs).
* **Modes.** ``'eager'`` (fp32), ``'compile'`` (``torch.compile``, inductor, both models, fp32) and ``'bf16'``
  (``torch.autocast`` bfloat16, both models, eager). ``model_kwargs`` are constructor overrides for the LDN
  models, so a candidate block is benchmarked the same way as the registered default.
* **Peak memory.** CPU: the high-water mark of live ATen tensor bytes during one batch-1 forward, from the
  profiler's allocation/free events (``profile_memory=True``), i.e. activations and workspaces, not weights,
  input or allocator caching. This is the CPU analogue of ``torch.cuda.max_memory_allocated`` (which is used on
  GPU, measured after ``reset_peak_memory_stats`` with weights already resident).
* **GMACs.** The project's one counter, ``timm_ldn.profiling.count_cost``, on the meta device (no compute;
  attention matmuls counted). MACs are counted as executed: LDN's stencil conv counts its full k×k kernel.
* **Exponents.** Time per image (at each case's batch) and batch-1 peak memory are fitted as ``c·N^p`` over the
  token count ``N`` by least squares in log-log; ``p ≈ 1`` is linear.

Nothing here holds state between calls: the clock and the model overrides are arguments.
"""
import contextlib
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_ldn.profiling import count_cost

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from builder import build_model  # noqa: E402  eval/builder.py: the one builder

__all__ = ['Case', 'plan_cases', 'bench_model', 'ldn_kwargs', 'model_gmacs', 'peak_memory_mb', 'time_round_robin',
           'train_step_round_robin', 'fit_exponent', 'run_benchmark', 'write_results', 'markdown_table',
           'run_profiles', 'kwargs_to_args', 'memory_table']

PAIRS = {  # size -> (LDN model, its DeiT reference)
    'tiny': ('ldn_tiny', 'deit_tiny_patch16_224'),
    'small': ('ldn_small', 'deit_small_patch16_224'),
    'base': ('ldn_base', 'deit_base_patch16_224'),
}
PEERS = ('vit_small_patch16_224', 'convnext_tiny', 'mambaout_small')
PATCH = 16
MODES = ('eager', 'compile', 'bf16')
# 'cpu': process CPU time. Single-threaded, it is the compute the model needed, minus the time this process
# sat descheduled behind other jobs on the shared cores (wall time would charge that waiting to whichever
# model happened to be running). 'wall': elapsed time (always used on GPU).
CLOCKS: Mapping[str, Callable[[], float]] = {'cpu': time.process_time, 'wall': time.perf_counter}

Clock = Callable[[], float]


@dataclass
class Case:
    size: str  # 'tiny' | 'small' | 'base'
    resolution: int
    batch: int
    models: List[str]
    rounds: int
    reference: str = ''  # the DeiT every other model's ratio is taken against

    def __post_init__(self):
        self.reference = self.reference or PAIRS[self.size][1]


def plan_cases(quick: bool = False, sizes: Sequence[str] = ('tiny', 'small', 'base'), peers: bool = True,
               rounds: int = 5, mode: str = 'eager') -> List[Case]:
    """The measurement plan. The full eager plan is sized to finish in ~15 min on this 2-core machine;
    compiled and bf16 runs take the issue's three cases per size (224 b8, 512 b2, 1024 b1)."""
    if quick:  # smoke test: seconds, not meaningful numbers
        return [Case('tiny', r, 1, list(PAIRS['tiny']), 2) for r in (64, 128)]
    res_batch = {
        'tiny': [(224, 8), (512, 2), (1024, 1)],
        'small': [(224, 8), (384, 4), (512, 2), (768, 1), (1024, 1)],
        'base': [(224, 4), (512, 1), (1024, 1)],
    }
    if mode != 'eager':
        res_batch['small'] = [(224, 8), (512, 2), (1024, 1)]
        peers = False
    cases = []
    for size in sizes:
        for res, batch in res_batch[size]:
            models = list(PAIRS[size])
            if size == 'small' and res == 224 and peers:
                models += list(PEERS)
            # base at 1024 is ~1 TMAC per round: fewer rounds keep the plan inside its time budget
            n_rounds = max(2, rounds - 2) if (size == 'base' and res >= 1024) else rounds
            cases.append(Case(size, res, batch, models, n_rounds))
    return cases


def ldn_kwargs(name: str, model_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``model_kwargs`` go to the LDN models only, never to the peers they are compared to."""
    return dict(model_kwargs or {}) if name.startswith('ldn_') else {}


def bench_model(name: str, resolution: int, device: Any = 'cpu',
                model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """``name`` from the one builder (``eval/builder.py``) for ``resolution`` px, in eval mode: ViTs get ``img_size``
    so their pos-embed fits (timm's own benchmark.py cannot run a DeiT at another resolution without re-creating it
    this way; LDN needs nothing)."""
    return build_model(name, registered=True, img_size=resolution, device=device,
                       **ldn_kwargs(name, model_kwargs)).eval()


def model_gmacs(name: str, resolution: int, model_kwargs: Optional[Mapping[str, Any]] = None) -> float:
    """GMACs of one ``resolution`` px image, by ``timm_ldn.profiling.count_cost`` on a meta-device model."""
    model = bench_model(name, resolution, 'meta', model_kwargs)
    return count_cost(model, (3, resolution, resolution))['gmacs']


def kwargs_to_args(kwargs: Mapping[str, Any]) -> List[str]:
    """``{'mlp_dwconv': True, 'kernel': 'relu'}`` -> ``['mlp_dwconv=True', 'kernel=relu']``: what
    ``--model-kwargs`` (``timm.utils.ParseKwargs``) reads back as the same dict."""
    import ast
    out = []
    for key, value in kwargs.items():
        text = repr(value)
        if isinstance(value, str):
            try:
                ast.literal_eval(value)
            except (ValueError, SyntaxError):
                text = value  # ParseKwargs falls back to the plain string
        out.append(f'{key}={text}')
    return out


def peak_memory_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Peak extra memory (MiB) of one inference forward: CPU via profiler allocation events, CUDA via the allocator."""
    if x.device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    def forward() -> None:
        with torch.inference_mode():
            model(x)
    return live_peak_mb(forward)


def memory_table(cases: Sequence[Case], device: torch.device,
                 model_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[List[Dict[str, Any]], str]:
    """Batch-1 peak live memory of each LDN / DeiT pair of the plan, and the ratio (rows, markdown table). Allocation
    counts do not depend on load or timing, so this table can be regenerated on a busy machine."""
    rows = []
    for case in cases:
        ldn, deit = PAIRS[case.size]
        x = torch.randn(1, 3, case.resolution, case.resolution, device=device)
        mem = {name: peak_memory_mb(bench_model(name, case.resolution, device, model_kwargs), x)
               for name in (ldn, deit)}
        rows.append(dict(model=ldn, peer=deit, resolution=case.resolution, peak_mem_mb_b1=mem[ldn],
                         peer_peak_mem_mb_b1=mem[deit], ratio=mem[ldn] / mem[deit]))
    lines = ['| model | res | peak live MiB, batch 1 | DeiT peer | ratio |', '|---|---|---|---|---|']
    lines += [f"| {r['model']} | {r['resolution']} | {r['peak_mem_mb_b1']:.2f} | {r['peer_peak_mem_mb_b1']:.2f} | "
              f"**{r['ratio']:.3f}×** |" for r in rows]
    return rows, '\n'.join(lines)


def live_peak_mb(fn: Callable[[], object]) -> float:
    """High-water mark (MiB) of live tensor bytes during one call of ``fn`` on CPU, from the profiler's allocation
    and free events: activations, saved tensors and workspaces, not weights or allocator caching."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # nbytes > 0: allocation, < 0: free
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2 ** 20


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], iters: int, device: torch.device, clock: Clock) -> float:
    """Seconds per call of ``fn`` averaged over ``iters`` back-to-back calls."""
    _sync(device)
    t0 = clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return (clock() - t0) / iters


def time_round_robin(
        fns: Dict[str, Callable[[], object]],
        rounds: int,
        device: torch.device,
        min_round_s: float = 0.3,
        warmup: int = 1,
        clock: Clock = time.perf_counter,
) -> Dict[str, List[float]]:
    """Seconds per call for every function and round; functions alternate within each round.

    ``iters`` per round is chosen per function from a warm-up call so each timed chunk lasts ≥ ``min_round_s``
    (a single call when it already does), which keeps timer and dispatch noise out of small models.
    """
    iters = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t = _timed(fn, 1, device, clock)
        iters[name] = max(1, math.ceil(min_round_s / max(t, 1e-6)))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        # alternate the order too, so neither model always runs right after the other's cache footprint
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            times[name].append(_timed(fns[name], iters[name], device, clock))
    return times


def _autocast(device: torch.device, mode: str):
    if mode == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_fn(model: nn.Module, x: torch.Tensor, mode: str = 'eager') -> Callable[[], object]:
    """One inference call of ``model`` on ``x`` in ``mode`` (compiled models run under no_grad)."""
    if mode == 'compile':
        compiled = torch.compile(model)

        def fwd():
            with torch.no_grad():
                return compiled(x)
        return fwd

    def fwd():
        with torch.inference_mode(), _autocast(x.device, mode):
            return model(x)
    return fwd


def train_step_fn(model: nn.Module, x: torch.Tensor, mode: str = 'eager',
                  num_classes: int = 1000) -> Callable[[], None]:
    """One training step of ``model`` (train mode) on ``x``: forward, cross-entropy, backward, AdamW."""
    model.train()
    y = torch.randint(0, num_classes, (x.shape[0],), device=x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    run_model = torch.compile(model) if mode == 'compile' else model

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, mode):
            loss = F.cross_entropy(run_model(x), y)
        loss.backward()
        opt.step()
    return step


def train_step_round_robin(
        names: Sequence[str],
        resolution: int,
        batch: int,
        rounds: int,
        device: torch.device,
        mode: str = 'eager',
        clock: Clock = time.perf_counter,
        model_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict[str, List[float]]:
    """Seconds per training step (forward, cross-entropy, backward, AdamW) for each model, alternating."""
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    fns = {name: train_step_fn(bench_model(name, resolution, device, model_kwargs), x, mode) for name in names}
    return time_round_robin(fns, rounds, device, min_round_s=0.0, warmup=2, clock=clock)


def fit_exponent(tokens: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope ``p`` of ``log(value) = p·log(tokens) + c``."""
    lx = [math.log(t) for t in tokens]
    ly = [math.log(v) for v in values]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den > 0 else float('nan')


def _summary(values: Sequence[float]) -> Tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_benchmark(
        cases: List[Case],
        device: torch.device,
        train: Optional[Tuple[str, int, int, int]] = None,
        log: Callable[[str], None] = print,
        mode: str = 'eager',
        min_round_s: float = 0.3,
        clock: Clock = time.perf_counter,
        model_kwargs: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Run every case (and the optional training comparison) and return the results as a JSON-able dict."""
    rows = []
    gmacs_cache: Dict[Tuple[str, int], float] = {}
    t_start = time.time()
    for case in cases:
        models, fns, mem = {}, {}, {}
        for name in case.models:
            try:
                models[name] = bench_model(name, case.resolution, device, model_kwargs)
            except Exception as e:  # a peer that does not construct here is reported and skipped
                log(f'  skip {name}: {type(e).__name__}: {e}')
        x = torch.randn(case.batch, 3, case.resolution, case.resolution, device=device)
        x1 = x[:1].clone()
        for name, model in models.items():
            with _autocast(device, mode):
                mem[name] = peak_memory_mb(model, x1)  # eager, in the mode's precision
            if (name, case.resolution) not in gmacs_cache:
                gmacs_cache[name, case.resolution] = model_gmacs(name, case.resolution, model_kwargs)
            fns[name] = inference_fn(model, x, mode)
        # warm-up call per model inside (compiles under mode 'compile'), then alternating rounds
        times = time_round_robin(fns, case.rounds, device, min_round_s=min_round_s, warmup=2, clock=clock)
        ref_times = times.get(case.reference)
        for name in models:
            med, lo, hi = _summary(times[name])
            row = dict(
                size=case.size, model=name, resolution=case.resolution, tokens=(case.resolution // PATCH) ** 2,
                batch=case.batch, rounds=case.rounds, latency_ms=med * 1e3, latency_min_ms=lo * 1e3,
                latency_max_ms=hi * 1e3, img_s=case.batch / med, img_s_min=case.batch / hi,
                img_s_max=case.batch / lo, peak_mem_mb_b1=mem[name],
                gmacs=gmacs_cache[name, case.resolution], reference=case.reference,
            )
            if ref_times is not None:
                # paired per-round ratio of throughputs = reference time / model time
                ratios = [r / t for r, t in zip(ref_times, times[name])]
                row['speedup_vs_ref'], row['speedup_min'], row['speedup_max'] = _summary(ratios)
                row['mem_ratio_vs_ref'] = mem[name] / mem[case.reference] if mem[case.reference] > 0 else float('nan')
            rows.append(row)
            log(f"  {case.size:5s} {case.resolution:4d}px b{case.batch} {name:28s} {row['img_s']:8.2f} img/s "
                f"x{row.get('speedup_vs_ref', float('nan')):.2f} vs ref  mem {mem[name]:7.1f} MiB  "
                f"{row['gmacs']:7.2f} GMACs  [{time.time() - t_start:5.0f}s]")
        del models, fns
        if mode == 'compile':
            torch._dynamo.reset()  # drop the compiled graphs of this case
    result = dict(rows=rows, exponents=_exponents(rows))
    if train is not None:
        size, resolution, batch, rounds = train
        names = list(PAIRS[size])
        times = train_step_round_robin(names, resolution, batch, rounds, device, mode, clock, model_kwargs)
        ldn, ref = names
        ratios = [r / t for r, t in zip(times[ref], times[ldn])]
        result['train'] = dict(
            size=size, resolution=resolution, batch=batch, rounds=rounds,
            step_ms={n: _summary([t * 1e3 for t in times[n]]) for n in names},
            speedup=_summary(ratios),
        )
        log(f"  train {size} {resolution}px b{batch}: {ldn} {result['train']['step_ms'][ldn][0]:.0f} ms/step, "
            f"{ref} {result['train']['step_ms'][ref][0]:.0f} ms/step, x{result['train']['speedup'][0]:.2f}")
    return result


def _exponents(rows: List[dict]) -> Dict[str, Dict[str, float]]:
    """Fitted exponents of time per image and batch-1 peak memory vs tokens, per model with ≥ 2 resolutions."""
    out = {}
    for name in sorted({r['model'] for r in rows}):
        rs = sorted((r for r in rows if r['model'] == name), key=lambda r: r['tokens'])
        if len(rs) < 2:
            continue
        tokens = [r['tokens'] for r in rs]
        out[name] = dict(
            time_per_image=fit_exponent(tokens, [r['latency_ms'] / r['batch'] for r in rs]),
            peak_memory=fit_exponent(tokens, [r['peak_mem_mb_b1'] for r in rs]),
            tokens_range=[tokens[0], tokens[-1]],
        )
    return out


def environment(device: torch.device) -> dict:
    import timm
    env = dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
               device=device.type, threads=torch.get_num_threads(), machine=platform.machine(),
               time_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    try:
        env['load_avg'] = os.getloadavg()
    except OSError:
        pass
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    return env


def write_results(result: dict, out_dir: str, stem: str) -> List[str]:
    """JSON (everything), CSV (one row per model and case) and the log-log PNG; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    json_path = os.path.join(out_dir, stem + '.json')
    with open(json_path, 'w') as f:
        json.dump(result, f, indent=1)
    paths.append(json_path)
    csv_path = os.path.join(out_dir, stem + '.csv')
    keys = list(dict.fromkeys(k for r in result['rows'] for k in r))
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in result['rows']:
            writer.writerow({k: (f'{v:.4g}' if isinstance(v, float) else v) for k, v in r.items()})
    paths.append(csv_path)
    png = plot_results(result, os.path.join(out_dir, stem + '.png'))
    if png:
        paths.append(png)
    return paths


def plot_results(result: dict, path: str) -> Optional[str]:
    """Log-log time per image and peak memory vs tokens, one line per model with ≥ 2 resolutions."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result['rows']
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({r['model'] for r in rows}):
        rs = sorted((r for r in rows if r['model'] == name), key=lambda r: r['resolution'])
        if len(rs) < 2:
            continue
        style = '-' if name.startswith('ldn') else '--'
        tokens = [r['tokens'] for r in rs]
        axes[0].plot(tokens, [r['latency_ms'] / r['batch'] for r in rs], style, marker='o', label=name)
        axes[1].plot(tokens, [r['peak_mem_mb_b1'] for r in rs], style, marker='o', label=name)
    env = result.get('environment', {})
    axes[0].set_title(f"time per image ({env.get('device', '?')}, {env.get('threads', '?')} thr, "
                      f"{env.get('clock', '?')} clock, {env.get('mode', 'eager')})", fontsize=9)
    axes[0].set_ylabel('ms / image (batch per point in CSV)')
    axes[1].set_title('peak activation memory, batch 1', fontsize=9)
    axes[1].set_ylabel('MiB')
    for ax in axes:
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('tokens N (resolution / 16)²')
        ax.grid(True, which='both', alpha=.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(result: dict) -> str:
    """The LDN-vs-DeiT ratio table that README / MODEL_CARD quote."""
    env = result.get('environment', {})
    lines = [f"`{result.get('command', 'python eval/speed/benchmark.py')}`: {env.get('threads', '?')} thread(s), "
             f"{env.get('clock', '?')} clock, mode {env.get('mode', 'eager')}, load average "
             f"{', '.join(f'{v:.1f}' for v in env.get('load_avg', ()))} at the end; 'vs DeiT' is the median of "
             'per-round ratios of DeiT time / model time (min–max over rounds).', '',
             '| model | res | batch | img/s | vs DeiT (median, min–max) | peak mem b1 (MiB) | mem vs DeiT | GMACs |',
             '|---|---|---|---|---|---|---|---|']
    for r in result['rows']:
        sp = (f"{r['speedup_vs_ref']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f})"
              if 'speedup_vs_ref' in r else '')
        mr = f"{r['mem_ratio_vs_ref']:.2f}" if 'mem_ratio_vs_ref' in r else ''
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['img_s']:.2f} | {sp} | "
                     f"{r['peak_mem_mb_b1']:.1f} | {mr} | {r['gmacs']:.2f} |")
    if 'train' in result:
        t = result['train']
        lines.append('')
        lines.append(f"Training step ({t['size']}, {t['resolution']} px, batch {t['batch']}, fwd+bwd+AdamW): "
                     + ', '.join(f"{n} {v[0]:.0f} ms" for n, v in t['step_ms'].items())
                     + f"; LDN speed vs DeiT {t['speedup'][0]:.2f}× ({t['speedup'][1]:.2f}–{t['speedup'][2]:.2f}).")
    if result.get('exponents'):
        lines.append('')
        lines.append('| model | tokens | exponent: time/image | exponent: peak memory |')
        lines.append('|---|---|---|---|')
        for name, e in result['exponents'].items():
            lines.append(f"| {name} | {e['tokens_range'][0]}–{e['tokens_range'][1]} | {e['time_per_image']:.2f} | "
                         f"{e['peak_memory']:.2f} |")
    return '\n'.join(lines)


def profile_top_ops(name: str, resolution: int, batch: int, device: torch.device, train: bool = False,
                    calls: int = 2, top: int = 12, model_kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """Markdown table of the ``top`` ops by self CPU time (``torch.profiler``) for inference or a training step."""
    from torch.profiler import profile
    model = bench_model(name, resolution, device, model_kwargs)
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    fn = train_step_fn(model, x) if train else inference_fn(model, x)
    fn()
    fn()
    with profile() as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"### {name} {resolution}px batch {batch} {'training step' if train else 'inference'}: "
             f"{total / calls / 1e3:.0f} ms self CPU per call", '',
             '| op | share | ms per call | calls per call |', '|---|---|---|---|']
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(f'| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | '
                     f'{e.self_cpu_time_total / calls / 1e3:.1f} | {e.count // calls} |')
    return '\n'.join(lines)


def run_profiles(device: torch.device, out_path: str, model_kwargs: Optional[Mapping[str, Any]] = None,
                 plan: Sequence[Tuple[int, int, bool]] = ((224, 8, False), (512, 2, False), (1024, 1, False),
                                                          (224, 8, True)),
                 size: str = 'small') -> None:
    """Where the time goes for the issue-5 targets: LDN-S vs DeiT-S at 224/512/1024 and the training step."""
    parts = [f'# torch.profiler top ops, {torch.get_num_threads()} CPU thread(s), '
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", '',
             'Regenerate: `python eval/speed/benchmark.py --profile`.', '']
    for res, batch, train in plan:
        for name in PAIRS[size]:
            parts += [profile_top_ops(name, res, batch, device, train, model_kwargs=model_kwargs), '']
            print(parts[-2].splitlines()[0])
    with open(out_path, 'w') as f:
        f.write('\n'.join(parts))
    print('wrote', out_path)
