"""The implicit path diffusion's two forms, measured: FFT (the package's ``path_exponential_diffusion``) against a
chunked scan (two-sided exponential sums as a (T x T) decay matrix inside chunks and a (nc x nc) one across chunk ends,
all batched matmuls, O(L*sqrt(L)) per channel), which issue 27 listed as a candidate.

    python eval/lra/exponential_forms.py      # -> eval/results/lra/exponential_forms.md

Both are checked against the dense reference first; then forward + backward, one thread, the two forms alternating
in one process, median of rounds. The package keeps the form this shows faster.
"""
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from timm_ldn.diffusion import path_exponential_diffusion as fft
from timm_ldn.diffusion import path_exponential_diffusion_reference as ref

RESULTS = Path(__file__).resolve().parents[1] / 'results' / 'lra'

def causal_exponential_sum(z: torch.Tensor, log_scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """y_i = sum_{j<=i} exp(-(i-j)/l) z_j per channel, z (N, L, C), in chunks: a (T x T) decay matrix inside each
    chunk (one batched matmul), a (nc x nc) one across chunk ends."""
    N, L, C = z.shape
    T = chunk
    nc = -(-L // T)
    if nc * T != L:
        z = torch.nn.functional.pad(z, (0, 0, 0, nc * T - L))
    rate = torch.exp(-log_scale)  # 1 / l, (C,)
    t = torch.arange(T, device=z.device, dtype=z.dtype)
    d = t[:, None] - t[None, :]  # (T, T)
    intra = torch.where(d >= 0, torch.exp(-d.clamp_min(0)[None] * rate[:, None, None]), z.new_zeros(()))  # (C, T, T)
    zc = z.view(N, nc, T, C).permute(3, 0, 1, 2).reshape(C, N * nc, T)  # (C, N*nc, T)
    y = torch.bmm(zc, intra.transpose(1, 2)).view(C, N, nc, T)  # y[..., t] = sum_s intra[t, s] z[s]
    if nc > 1:
        ends = y[..., -1]  # (C, N, nc): each chunk's sum decayed to its last token
        k = torch.arange(nc, device=z.device, dtype=z.dtype)
        dk = k[:, None] - k[None, :] - 1  # chunk k receives chunk k' < k decayed by T*(k-1-k') to its start - 1
        across = torch.where(dk >= 0, torch.exp(-(T * dk.clamp_min(0))[None] * rate[:, None, None]), z.new_zeros(()))
        state = torch.bmm(ends, across.transpose(1, 2))  # (C, N, nc): sum at the last token before chunk k
        carry = torch.exp(-(t + 1)[None, :] * rate[:, None])  # (C, T): decay from that token to t
        y = y + state.unsqueeze(-1) * carry[:, None, None, :]
    return y.reshape(C, N, nc * T).permute(1, 2, 0)[:, :L]

def scan(x: torch.Tensor, log_scale_left: torch.Tensor, log_scale_right: torch.Tensor,
         padding_mask: Optional[torch.Tensor] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """The chunked-scan form of ``path_exponential_diffusion`` (same arguments and result)."""
    B, L, C = x.shape
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    real = xf.new_ones(B, L, 1) if padding_mask is None else (~padding_mask).to(compute).unsqueeze(-1)
    z = torch.cat([xf * real, real.expand(B, L, C)], 0)  # numerator and denominator in one pass
    T = chunk or max(16, 1 << round(math.log2(max(L, 1)) / 2))
    left = causal_exponential_sum(z, log_scale_left.to(compute), T)
    right = causal_exponential_sum(z.flip(1), log_scale_right.to(compute), T).flip(1) - z
    num, den = (left + right).chunk(2)
    out = num / den.clamp_min(1e-6)
    if padding_mask is not None:
        out = torch.where(padding_mask.unsqueeze(-1), xf, out)
    return out.to(x.dtype)


def check() -> None:
    torch.manual_seed(0)
    B, L, C = 3, 37, 5
    x = torch.randn(B, L, C, dtype=torch.float64)
    ll = torch.randn(C, dtype=torch.float64) * 2
    lr = ll + torch.randn(C, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 30:] = True
    mask[2, 5:] = True
    for T in (4, 8, 64):
        out = scan(x, ll, lr, mask, chunk=T)
        for b in range(B):
            torch.testing.assert_close(out[b], torch.einsum('cij,jc->ic', ref(ll, lr, ~mask[b]), x[b]))
        torch.testing.assert_close(out, fft(x, ll, lr, mask))


def bench(L: int, B: int, C: int = 64, rounds: int = 5) -> str:
    x = torch.randn(B, L, C, requires_grad=True)
    ll = torch.linspace(0, 6, C).requires_grad_()
    lr = (ll.detach() + 0.3).requires_grad_()
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, L // 2:] = True
    res = {'fft': [], 'scan': []}
    for r in range(rounds):
        for name, f in (('fft', fft), ('scan', scan)) if r % 2 == 0 else (('scan', scan), ('fft', fft)):
            t = time.perf_counter()
            f(x, ll, lr, mask).square().sum().backward()
            res[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in res.items()}
    return f"| {L} | {B} | {med['fft']:.1f} | {med['scan']:.1f} | {med['scan'] / med['fft']:.2f} |"


def main() -> int:
    check()
    torch.set_num_threads(1)
    lines = ['# Implicit path diffusion: FFT against a chunked scan (forward + backward)', '',
             'Generated by `python eval/lra/exponential_forms.py` (64 channels, one thread, forms alternating, median of '
             f'rounds; both match the dense reference first). Load average when it started: {os.getloadavg()[0]:.1f} on '
             f'{os.cpu_count()} cores (above 1: other jobs shared the machine, so only the ratio is meaningful).', '',
             '| L | batch | FFT ms | scan ms | scan / FFT |', '|---|---|---|---|---|']
    for L, B, rounds in ((245, 32, 5), (784, 32, 5), (1024, 32, 5), (4096, 1, 5), (16384, 1, 5), (65536, 1, 3)):
        lines.append(bench(L, B, rounds=rounds))
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'exponential_forms.md').write_text('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
