"""Time the two implementations of the primary-diffusion step (``diffusion_step``'s ``method``) on CPU.

    python eval/speed/diffusion_forms.py            # 1 thread and all cores -> eval/results/diffusion_forms.{md,json}

Two views, both wall clock on an idle machine (on shared cores the multi-threaded figures measure the neighbours):

* the step alone, ldn_small's shapes (C=384, offsets 1, 2, 4) at 224 px batch 8, 512 px batch 2 and 1024 px
  batch 1; forward under ``inference_mode`` and forward + backward (gradients for tokens and coefficients),
  best of 5 rounds;
* the whole ldn_small with every block on one form, the forms alternating in one process (inference at the three
  sizes, training step at 224 px batch 8), median of 5 rounds: what decides, since in the model the step's
  input and output share the caches with everything around them.

This is what ``method='auto'`` is chosen from, and why the shifted form is kept beside the conv one: it must
earn >= 5 % on the whole model. (A third, separable-conv form was deleted: in the last 3-form run it was never 5 %
better than the better of the other two; git history has that table.)
"""
import argparse
import json
import os
import sys
import time
from functools import partial
from typing import Callable, Dict, List

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from timm_ldn.diffusion import DEFAULT_OFFSETS, diffusion_coefficients, diffusion_step, stencil_basis

METHODS = ('conv', 'shift')
CASES = ((224, 8), (512, 2), (1024, 1))


def best_ms(fn: Callable[[], object], iters: int, rounds: int = 5) -> float:
    fn()
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters * 1e3)
    return min(times)


def measure(threads: int, channels: int = 384, patch: int = 16) -> List[Dict[str, object]]:
    torch.set_num_threads(threads)
    offsets = list(DEFAULT_OFFSETS)
    basis = stencil_basis(offsets)
    gen = torch.Generator().manual_seed(0)
    coef = diffusion_coefficients(0.1 * torch.randn(len(offsets), channels, generator=gen),
                                  torch.full((channels,), -1.))
    rows = []
    for res, batch in CASES:
        shape = (batch, res // patch, res // patch, channels)
        x = torch.randn(shape, generator=gen)
        grad = torch.randn(shape, generator=gen)
        xg = x.clone().requires_grad_()
        cg = coef.clone().requires_grad_()
        row: Dict[str, object] = dict(threads=threads, resolution=res, batch=batch, grid=res // patch)
        for m in METHODS:
            def fwd(m=m):
                with torch.inference_mode():
                    diffusion_step(x, coef, basis, offsets, method=m)

            def fwd_bwd(m=m):
                diffusion_step(xg, cg, basis, offsets, method=m).backward(grad)
            row[f'{m}_fwd_ms'] = round(best_ms(fwd, 20), 3)
            row[f'{m}_fwd_bwd_ms'] = round(best_ms(fwd_bwd, 10), 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def measure_model(threads: int, rounds: int = 5) -> List[Dict[str, object]]:
    """ldn_small inference (and one training step) with every block's diffusion on each form, alternating."""
    import statistics

    import timm

    import timm_ldn  # noqa: F401  registers ldn_*
    from ablations import FixedMethodDiffusion
    from bench_harness import inference_fn, train_step_fn
    torch.set_num_threads(threads)
    rows = []
    for res, batch, train in ((224, 8, False), (512, 2, False), (1024, 1, False), (224, 8, True)):
        torch.manual_seed(0)
        models = {m: timm.create_model('ldn_small', diffusion_layer=partial(FixedMethodDiffusion, method=m)).train(train)
                  for m in METHODS}
        for m in METHODS[1:]:
            models[m].load_state_dict(models[METHODS[0]].state_dict())
        x = torch.randn(batch, 3, res, res)
        # the benchmark's own step and inference calls (bench_harness): AdamW + cross-entropy, inference_mode
        calls = {m: (train_step_fn if train else inference_fn)(models[m], x) for m in METHODS}

        def call(method: str) -> None:
            calls[method]()
        for m in METHODS:
            call(m)
        times: Dict[str, List[float]] = {m: [] for m in METHODS}
        for r in range(rounds):
            for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
                start = time.perf_counter()
                call(m)
                times[m].append((time.perf_counter() - start) * 1e3)
        row: Dict[str, object] = dict(threads=threads, resolution=res, batch=batch,
                                      task='training step' if train else 'inference')
        row.update({f'{m}_ms': round(statistics.median(times[m]), 1) for m in METHODS})
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown_model(rows: List[Dict[str, object]]) -> str:
    lines = ['', '## ldn_small with every block on one form (ms per call, median of 5 alternating rounds)', '',
             '| threads | task | px | batch | ' + ' | '.join(METHODS) + ' |', '|---' * (4 + len(METHODS)) + '|']
    for r in rows:
        vals = [r[f'{m}_ms'] for m in METHODS]
        cells = [f'**{v:.1f}**' if v == min(vals) else f'{v:.1f}' for v in vals]
        lines.append(f"| {r['threads']} | {r['task']} | {r['resolution']} | {r['batch']} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def markdown(rows: List[Dict[str, object]]) -> str:
    lines = ['# Primary-diffusion step: conv vs shift (ms, best of 5, wall clock)', '',
             'Regenerate on an idle machine: `python eval/speed/diffusion_forms.py`. ldn_small shapes (C=384, offsets '
             '1, 2, 4). `auto` picks `shift` on CPU (eager and compiled), `conv` on GPU and under tracing exporters.',
             '',
             '| threads | px | batch | grid | ' + ' | '.join(f'{m} fwd' for m in METHODS) + ' | '
             + ' | '.join(f'{m} fwd+bwd' for m in METHODS) + ' |',
             '|---' * (4 + 2 * len(METHODS)) + '|']
    for r in rows:
        fwd = [r[f'{m}_fwd_ms'] for m in METHODS]
        fb = [r[f'{m}_fwd_bwd_ms'] for m in METHODS]
        cells = [f'**{v:.2f}**' if v == min(fwd) else f'{v:.2f}' for v in fwd]
        cells += [f'**{v:.2f}**' if v == min(fb) else f'{v:.2f}' for v in fb]
        lines.append(f"| {r['threads']} | {r['resolution']} | {r['batch']} | {r['grid']}×{r['grid']} | "
                     + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out-dir', default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results'))
    args = parser.parse_args()
    all_cores = len(os.sched_getaffinity(0))
    rows, model_rows = [], []
    for threads in sorted({1, all_cores}):
        rows += measure(threads)
    for threads in sorted({1, all_cores}):
        model_rows += measure_model(threads)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, 'diffusion_forms.json'), 'w') as f:
        json.dump(dict(rows=rows, model_rows=model_rows, torch=torch.__version__, cores=all_cores,
                       date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())), f, indent=1)
    with open(os.path.join(args.out_dir, 'diffusion_forms.md'), 'w') as f:
        f.write(markdown(rows) + markdown_model(model_rows))
    print('wrote', os.path.join(args.out_dir, 'diffusion_forms.md'))


if __name__ == '__main__':
    main()
