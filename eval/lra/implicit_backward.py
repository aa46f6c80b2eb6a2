"""The implicit step's unpadded backward, measured: the package's fused autograd Function against autograd through
the same forward's pieces (the form it replaced), in time and in what each saves for the backward.

    python eval/lra/implicit_backward.py            # -> eval/results/lra/implicit_backward.md (run on a quiet machine)
    python eval/lra/implicit_backward.py --padded   # -> eval/results/lra/implicit_padded.md

``timm_ldn.diffusion.path_exponential_diffusion`` without a padding mask runs ``_ExponentialDiffusionFn``:
it saves the input and the output and rebuilds the kernel, its spectrum and the row sums in the backward (one more
FFT of the input and one of the kernel). The pieces form runs the same forward ops (kernel, FFT convolution with
its hand-written backward, closed-form row sums) under autograd, which keeps the two spectra, both half-kernels,
the row sums and the numerator. Both are checked equal (values and gradients) first; then forward + backward,
all cores, the two forms alternating, median of rounds; saved MiB counts distinct storages saved for the backward
other than the input (load-independent).

``--padded``: suffix-padded batches (each sequence's real tokens, then padding: how the trainer pads), whose row sums
the package reads in closed form at each sequence's length, against the same call with that shortcut off
(``_suffix_lengths`` answering None), which takes the general masked path: the row sums as a second FFT
convolution, of the mask. Training step (forward + backward) and no-grad forward.
"""
from unittest import mock
import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from timm_ldn import diffusion

RESULTS = Path(__file__).resolve().parents[1] / 'results' / 'lra'


def pieces(x: torch.Tensor, log_scale_left: torch.Tensor, log_scale_right: torch.Tensor) -> torch.Tensor:
    """The unpadded implicit step with autograd through its forward's pieces (the form before the fused backward)."""
    L = x.shape[1]
    n = diffusion._fft_length(L)
    kernel = diffusion._circular_kernel(*diffusion.path_exponential_kernel(L, log_scale_left, log_scale_right), n)
    return diffusion._convolve(x, kernel, n) / diffusion._path_exponential_row_sums(L, log_scale_left, log_scale_right)


FORMS: Dict[str, Callable] = {'fused': diffusion.path_exponential_diffusion, 'pieces': pieces}


def inputs(L: int, B: int, C: int = 64, seed: int = 0):
    """The layer's init scales (log-uniform from one token to L) with a drift of ±0.3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g).requires_grad_()
    log_scale = torch.linspace(0., math.log(L), C)[torch.randperm(C, generator=g)]
    return x, (log_scale + 0.3).requires_grad_(), (log_scale - 0.3).requires_grad_()


def mask_convolution(x: torch.Tensor, log_scale_left: torch.Tensor, log_scale_right: torch.Tensor,
                     padding_mask: torch.Tensor) -> torch.Tensor:
    """The package's step with the suffix shortcut off: its general masked path (row sums by convolving the mask)."""
    with mock.patch.object(diffusion, '_suffix_lengths', lambda mask: None):
        return diffusion.path_exponential_diffusion(x, log_scale_left, log_scale_right, padding_mask)


PADDED_FORMS: Dict[str, Callable] = {'closed form': diffusion.path_exponential_diffusion,
                                     'mask convolution': mask_convolution}


def suffix_mask(L: int, B: int, seed: int = 0) -> torch.Tensor:
    """Lengths uniform in [L/2, L], one sequence of the full length (a length-window batch, as the trainer draws)."""
    lengths = torch.randint(L // 2, L + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = L
    return torch.arange(L)[None, :] >= lengths[:, None]


def check_padded() -> None:
    for L, B in ((1, 2), (37, 3), (784, 4)):
        x, left, right = inputs(L, B, C=8)
        mask = suffix_mask(L, B)
        w = torch.randn_like(x)
        out = {}
        for name, f in PADDED_FORMS.items():
            y = f(x, left, right, mask)
            out[name] = (y, *torch.autograd.grad((y * w).sum(), (x, left, right)))
        for a, b in zip(out['closed form'], out['mask convolution']):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def bench_padded(L: int, B: int, rounds: int) -> List[str]:
    x, left, right = inputs(L, B)
    mask = suffix_mask(L, B)
    row = []
    for grad in (True, False):
        times: Dict[str, List[float]] = {k: [] for k in PADDED_FORMS}
        for r in range(rounds + 1):  # round 0 warms up
            for name in (PADDED_FORMS if r % 2 == 0 else reversed(list(PADDED_FORMS))):
                t = time.perf_counter()
                if grad:
                    PADDED_FORMS[name](x, left, right, mask).square().sum().backward()
                else:
                    with torch.no_grad():
                        PADDED_FORMS[name](x, left, right, mask)
                if r:
                    times[name].append(time.perf_counter() - t)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        row.append(f"{med['closed form']:.1f} | {med['mask convolution']:.1f} | "
                   f"{med['mask convolution'] / med['closed form']:.2f}")
    mb = {k: saved_mb(lambda *a, f=f: f(*a, mask), x, left, right) for k, f in PADDED_FORMS.items()}
    real = int((~mask).sum())
    return [f"| {L} | {B} | {100 * real / mask.numel():.0f} % | {row[0]} | {row[1]} | {mb['closed form']:.1f} | "
            f"{mb['mask convolution']:.1f} |"]


def check() -> None:
    for L, B in ((1, 2), (37, 3), (784, 2)):
        x, left, right = inputs(L, B, C=8)
        w = torch.randn_like(x)
        out = {}
        for name, f in FORMS.items():
            y = f(x, left, right)
            out[name] = (y, *torch.autograd.grad((y * w).sum(), (x, left, right)))
        for a, b in zip(out['fused'], out['pieces']):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def saved_mb(f: Callable, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x, left, right)
    storages.pop(x.untyped_storage().data_ptr(), None)
    return sum(storages.values()) / 2 ** 20


def bench(L: int, B: int, rounds: int) -> List[str]:
    x, left, right = inputs(L, B)
    times: Dict[str, List[float]] = {k: [] for k in FORMS}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (FORMS if r % 2 == 0 else reversed(list(FORMS))):
            t = time.perf_counter()
            FORMS[name](x, left, right).square().sum().backward()
            if r:
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    mb = {k: saved_mb(f, x, left, right) for k, f in FORMS.items()}
    return [f"| {L} | {B} | {med['fused']:.1f} | {med['pieces']:.1f} | {med['fused'] / med['pieces']:.2f} | "
            f"{mb['fused']:.1f} | {mb['pieces']:.1f} |"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=0, help='0: all cores')
    p.add_argument('--padded', action='store_true', help='suffix-padded batches: closed-form row sums vs the mask\'s')
    p.add_argument('--out', type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.padded:  # suffix-padded batches: closed-form row sums against convolving the mask
        check_padded()
        title = 'The implicit step on suffix-padded batches: closed-form row sums against convolving the mask'
        how = ('forms alternating, median of {rounds} rounds; both checked equal first, values and gradients). '
               'Lengths uniform in [L/2, L]')
        header = ['L', 'batch', 'real tokens', 'train ms, closed form', 'train ms, mask conv.', 'speed-up',
                  'no-grad ms, closed form', 'no-grad ms, mask conv.', 'speed-up', 'saved MiB, closed form',
                  'saved MiB, mask conv.']
        cases, bench_case, name = ((400, 32), (1024, 32), (4096, 8)), bench_padded, 'implicit_padded.md'
    else:
        check()
        title = 'The implicit step\'s unpadded backward: fused Function against autograd through its pieces'
        how = 'forward + backward, forms alternating, median of {rounds} rounds; both checked equal first)'
        header = ['L', 'batch', 'fused ms', 'pieces ms', 'fused / pieces', 'fused saved MiB', 'pieces saved MiB']
        cases, bench_case, name = ((784, 32), (4096, 1), (16384, 1), (65536, 1)), bench, 'implicit_backward.md'
    load = os.getloadavg()[0]
    command = 'python eval/lra/implicit_backward.py' + (' --padded' if args.padded else '')
    lines = [f'# {title}', '',
             f'Generated by `{command}` (64 channels, {torch.get_num_threads()} thread(s), '
             f'{how.format(rounds=args.rounds)}. Load average when it started: {load:.1f} on {os.cpu_count()} cores. '
             'Saved MiB: what autograd keeps for the backward besides the input (one layer).', '',
             '| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    for L, B in cases:
        lines += bench_case(L, B, args.rounds)
        print(lines[-1], flush=True)
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
