"""``ldn benchmark MODEL``: time one model (any timm name, ``ldn_small`` or ``deit_small_patch16_224``) here.

Randomly initialised weights, one input batch, ``--warmup`` untimed calls then ``--iters`` timed ones (wall clock,
synchronised on GPU); prints the median ms per call, its min–max and images/s. ``--train`` times a training step
(forward, cross-entropy, backward, AdamW) instead of an inference forward. ``--model-kwargs key=value ...`` is
timm's convention (``timm.utils.ParseKwargs``, values read as Python literals). Nothing is written unless
``--json PATH`` is given (``--json`` alone prints the result as JSON instead of the text line).

The LDN-vs-DeiT tables of the README (round-robin timing, peak memory, exponents, timm's benchmark.py
cross-check) come from ``python eval/speed/benchmark.py`` in a source checkout.
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['add_arguments', 'run', 'build_model', 'time_calls']


def resolve_layer_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Layer-type arguments given on the command line as dotted paths (``mlp_layer=timm.layers.Mlp``) -> the class."""
    import importlib
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith(('_layer', '_fn')) and isinstance(value, str) and '.' in value:
            module, _, attr = value.rpartition('.')
            try:
                out[key] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f'--model-kwargs {key}={value}: cannot import {value} ({e}).') from e
    return out


def build_model(name: str, img_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                device: Any = 'cpu') -> nn.Module:
    """``timm.create_model(name, **model_kwargs)`` with random weights, in eval mode, on ``device``.

    With ``img_size`` the model is created for that size when its constructor takes one (a ViT's position
    embedding is fixed at creation; LDN only records it); models without the argument run any size as they are.
    """
    import timm
    import timm_ldn  # noqa: F401  registers ldn_*
    kwargs = resolve_layer_kwargs(model_kwargs or {})
    with torch.device(device):
        if img_size and 'img_size' not in kwargs:
            try:
                return timm.create_model(name, img_size=img_size, **kwargs).eval()
            except TypeError as e:
                if 'img_size' not in str(e):
                    raise
        return timm.create_model(name, **kwargs).eval()


def time_calls(fn: Callable[[], object], iters: int, warmup: int = 2, device: Any = 'cpu') -> List[float]:
    """Seconds of each of ``iters`` calls of ``fn`` (wall clock) after ``warmup`` untimed calls."""
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from timm.utils import ParseKwargs
    parser.add_argument('model', metavar='MODEL', help='any timm model name, e.g. ldn_small, deit_small_patch16_224')
    parser.add_argument('--img-size', type=int, default=None, help="input size (default: the model's pretrained cfg)")
    parser.add_argument('--batch-size', '-b', type=int, default=8)
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (default 0: all cores)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--train', action='store_true', help='time a training step instead of an inference forward')
    parser.add_argument('--iters', type=int, default=10, help='timed calls (default 10)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls first (default 2)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='create_model overrides, e.g. mlp_ratio=3.5 depth=4')
    parser.add_argument('--json', nargs='?', const='-', default=None, metavar='PATH',
                        help='write the result as JSON to PATH (without PATH: print it instead of the text line)')


def run(args: argparse.Namespace) -> int:
    import timm
    if args.iters < 1 or args.batch_size < 1:
        print('ldn benchmark: --iters and --batch-size must be at least 1', file=sys.stderr)
        return 2
    try:
        all_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        all_cores = os.cpu_count() or 1
    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or all_cores)
    try:
        try:
            model = build_model(args.model, args.img_size, args.model_kwargs, device)
        except RuntimeError as e:  # timm: 'Unknown model (...)'
            print(f'ldn benchmark: {e}', file=sys.stderr)
            return 2
        chans, height, width = timm.data.resolve_model_data_config(model)['input_size']
        if args.img_size:
            height = width = args.img_size
        x = torch.randn(args.batch_size, chans, height, width, device=device)
        if args.train:
            model.train()
            y = torch.randint(0, max(1, getattr(model, 'num_classes', 1)), (args.batch_size,), device=device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def fn():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        else:
            def fn():
                with torch.inference_mode():
                    model(x)
        times = time_calls(fn, args.iters, args.warmup, device)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    med = statistics.median(times)
    result = dict(
        model=args.model, mode='train' if args.train else 'inference', img_size=[height, width], in_chans=chans,
        batch_size=args.batch_size, device=device.type, threads=threads, iters=args.iters, warmup=args.warmup,
        model_kwargs=args.model_kwargs, ms_per_iter=med * 1e3, ms_min=min(times) * 1e3, ms_max=max(times) * 1e3,
        img_s=args.batch_size / med, torch=torch.__version__, timm=timm.__version__,
    )
    line = (f"{args.model} {result['mode']} {height}x{width} batch {args.batch_size} ({device.type}, {threads} "
            f"thread{'s' if threads > 1 else ''}): {result['ms_per_iter']:.2f} ms/iter "
            f"(min {result['ms_min']:.2f}, max {result['ms_max']:.2f}), {result['img_s']:.1f} img/s")
    if args.json == '-':
        print(json.dumps(result, default=str))
        return 0
    print(line)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
        print('wrote', args.json)
    return 0
