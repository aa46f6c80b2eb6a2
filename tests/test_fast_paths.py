"""Every fast form equals the contract's reference formulation (fp32, 1e-5), forward and backward, borders included.

References: the dense ``laplacian_reference`` / ``diffusion_attention_reference`` of ``timm_ldn.diffusion``, and
the block written out below with dense operators.
"""
import copy
from typing import List

import pytest
import torch

from timm_ldn.diffusion import (
    diffusion_attention_reference, diffusion_coefficients, diffusion_step, laplacian_reference,
    linear_diffusion_attention, packed_linear_diffusion_attention, positive_feature_map, stencil_basis,
)
from timm.layers import Mlp

from timm_ldn.ldn import DiffusionAttention, LdnBlock

TOL = dict(atol=1e-5, rtol=1e-5)
OFFSETS = [1, 2, 4]


def _dense_step(x: torch.Tensor, coef: torch.Tensor, offsets: List[int]) -> torch.Tensor:
    """``(I + δt·K)·H`` with ``K`` built densely per channel from the spec's definition."""
    B, H, W, C = x.shape
    flat = x.reshape(B, H * W, C)
    out = torch.empty_like(flat)
    for c in range(C):
        K = laplacian_reference(coef[:, c], offsets, H, W)
        out[:, :, c] = flat[:, :, c] + flat[:, :, c] @ K.t()
    return out.reshape(B, H, W, C)


def _grads(fn, *inputs: torch.Tensor):
    """Output and input gradients of ``fn`` against a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, cot)
    return out.detach(), grads


# grids: square, non-square, and grids smaller than the largest offset (4) along one or both axes
GRIDS = [(6, 6), (5, 9), (3, 7), (2, 3), (1, 5), (9, 4)]


@pytest.mark.parametrize('method', ['conv', 'shift', 'auto'])
@pytest.mark.parametrize('height,width', GRIDS)
def test_diffusion_step_equals_dense_laplacian(height: int, width: int, method: str) -> None:
    g = torch.Generator().manual_seed(height * 31 + width)
    C = 5
    x = torch.randn(2, height, width, C, generator=g)
    a_raw = torch.randn(len(OFFSETS), C, generator=g)
    tau = torch.randn(C, generator=g)
    basis = stencil_basis(OFFSETS)

    def fast(x, a_raw, tau):
        return diffusion_step(x, diffusion_coefficients(a_raw, tau), basis, OFFSETS, method=method)

    def dense(x, a_raw, tau):
        return _dense_step(x, diffusion_coefficients(a_raw, tau), OFFSETS)

    out_f, grads_f = _grads(fast, x, a_raw, tau)
    out_r, grads_r = _grads(dense, x, a_raw, tau)
    torch.testing.assert_close(out_f, out_r, **TOL)
    for gf, gr in zip(grads_f, grads_r):  # d/dx, d/da_raw, d/dtau
        torch.testing.assert_close(gf, gr, **TOL)

    # self_weight=0: the update δt·K(H) alone (the drop-path branch), forward and backward
    def update(x, a_raw, tau):
        return diffusion_step(x, diffusion_coefficients(a_raw, tau), basis, OFFSETS, 0., method=method)

    def update_ref(x, a_raw, tau):
        return dense(x, a_raw, tau) - x

    out_u, grads_u = _grads(update, x, a_raw, tau)
    out_ur, grads_ur = _grads(update_ref, x, a_raw, tau)
    torch.testing.assert_close(out_u, out_ur, **TOL)
    for gu, gr in zip(grads_u, grads_ur):
        torch.testing.assert_close(gu, gr, **TOL)


@pytest.mark.parametrize('method', ['conv', 'shift'])
def test_diffusion_step_keeps_constants_and_is_not_the_zero_padded_stencil(method: str) -> None:
    """Guards the border handling: a constant field is a fixed point, which zero padding would break."""
    C = 3
    coef = diffusion_coefficients(torch.randn(len(OFFSETS), C), torch.randn(C))
    x = torch.full((1, 7, 5, C), 2.5)
    torch.testing.assert_close(diffusion_step(x, coef, stencil_basis(OFFSETS), OFFSETS, method=method), x, **TOL)


def test_positive_feature_map_is_elu_plus_one() -> None:
    x = torch.linspace(-30, 30, 1001, dtype=torch.float64)
    out, (g,) = _grads(positive_feature_map, x)
    ref, (g_ref,) = _grads(lambda t: torch.nn.functional.elu(t) + 1, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j w_ij (v_j − v_i) / Σ_j w_ij with explicit loops over tokens (the spec's sum, no matrix algebra)."""
    fq, fk = positive_feature_map(q), positive_feature_map(k)
    out = torch.empty_like(v)
    for i in range(q.shape[-2]):
        w = (fq[..., i:i + 1, :] * fk).sum(-1, keepdim=True)  # (B, heads, N, 1)
        out[..., i, :] = (w * (v - v[..., i:i + 1, :])).sum(-2) / w.sum(-2)
    return out


# batch ≤ heads and batch > heads: the matmuls run per sample or per head
@pytest.mark.parametrize('batch,tokens,heads,head_dim', [(2, 12, 3, 4), (1, 7, 1, 8), (3, 20, 2, 5), (4, 6, 1, 3)])
def test_packed_attention_equals_reference(batch: int, tokens: int, heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    C = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * C, generator=g)

    def split(qkv):
        return qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def packed(qkv):
        return packed_linear_diffusion_attention(qkv, heads)

    def dense(qkv):
        return diffusion_attention_reference(*split(qkv)).transpose(1, 2).reshape(batch, tokens, C)

    def naive(qkv):
        return _naive_attention(*split(qkv)).transpose(1, 2).reshape(batch, tokens, C)

    def unpacked(qkv):
        return linear_diffusion_attention(*split(qkv)).transpose(1, 2).reshape(batch, tokens, C)

    out_p, (g_p,) = _grads(packed, qkv)
    for ref in (dense, naive, unpacked):
        out_r, (g_r,) = _grads(ref, qkv)
        torch.testing.assert_close(out_p, out_r, **TOL)
        torch.testing.assert_close(g_p, g_r, **TOL)
    # the output is token-major and contiguous: what the projection reads without a copy
    assert out_p.is_contiguous()


def test_packed_attention_of_constant_values_is_zero() -> None:
    C, heads = 8, 2
    qkv = torch.randn(2, 9, 3 * C)
    qkv[..., 2 * C:] = torch.randn(2, 1, C)  # every token carries the same V
    torch.testing.assert_close(packed_linear_diffusion_attention(qkv, heads), torch.zeros(2, 9, C), **TOL)


def _dense_diffusion(d, x: torch.Tensor) -> torch.Tensor:
    return _dense_step(x, d.coefficients(), d.offsets)


def _reference_block(blk: LdnBlock, x: torch.Tensor) -> torch.Tensor:
    """The block as the contract writes it: three residual terms, each a separate add, dense operators."""
    B, H, W, C = x.shape
    x = _dense_diffusion(blk.diffusion, x)
    a = blk.attn
    u = blk.norm1(x).reshape(B, H * W, C)
    q, k, v = a.qkv(u).reshape(B, H * W, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    att = diffusion_attention_reference(q, k, v).transpose(1, 2).reshape(B, H * W, C)
    x = x + (blk.ls1.gamma * a.proj(att)).reshape(B, H, W, C)
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize('height,width', [(6, 5), (3, 2)])
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('mlp_layer', [None, Mlp], ids=['dwconv', 'plain'])  # the default F and a plain MLP
def test_block_equals_reference(height: int, width: int, training: bool, mlp_layer) -> None:
    torch.manual_seed(height + width)
    kwargs = dict(mlp_layer=mlp_layer, mlp_ratio=4.) if mlp_layer else {}
    blk = LdnBlock(dim=12, num_heads=3, **kwargs).train(training)  # no drop-path, no dropout: deterministic
    with torch.no_grad():  # move off the init values so every parameter matters
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, height, width, 12)
    cot = torch.randn(2, height, width, 12)
    # reference in float64: the fp32 block must sit within 1e-5 of the exact value
    ref = copy.deepcopy(blk).double()

    def value_and_grads(fn, module, x):
        x = x.detach().clone().requires_grad_(True)
        out = fn(x)
        grads = torch.autograd.grad((out * cot.to(out.dtype)).sum(), [x] + list(module.parameters()))
        return out.detach().float(), [g.float() for g in grads]

    out_f, grads_f = value_and_grads(blk, blk, x)
    out_r, grads_r = value_and_grads(lambda t: _reference_block(ref, t), ref, x.double())
    torch.testing.assert_close(out_f, out_r, **TOL)
    names = ['input'] + [n for n, _ in blk.named_parameters()]
    for name, gf, gr in zip(names, grads_f, grads_r):
        torch.testing.assert_close(gf, gr, **TOL, msg=lambda m: f'{name}: {m}')
    with torch.inference_mode():  # the same values without autograd
        torch.testing.assert_close(blk(x), out_f, **TOL)


def test_block_leaves_its_input_alone() -> None:
    """In-place steps write only into tensors the block allocated: the caller's tensor is untouched."""
    blk = LdnBlock(dim=8, num_heads=2).eval()
    x = torch.randn(1, 4, 4, 8)
    before = x.clone()
    for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with ctx():
            blk(x)
        torch.testing.assert_close(x, before, atol=0, rtol=0)


def test_drop_path_block_matches_in_eval_and_drops_whole_terms_in_training() -> None:
    """With stochastic depth configured, eval is the deterministic block; training drops each term per sample."""
    torch.manual_seed(0)
    blk = LdnBlock(dim=8, num_heads=2, drop_path=0.5).eval()
    x = torch.randn(2, 5, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_block(blk, x), **TOL)
    blk.train()
    outs = {tuple(blk(x).flatten()[:4].tolist()) for _ in range(20)}
    assert len(outs) > 1  # stochastic in training


def test_attention_module_matches_reference_on_maps_and_sequences() -> None:
    torch.manual_seed(1)
    attn = DiffusionAttention(12, num_heads=3).eval()
    x = torch.randn(2, 10, 12)
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 3, 4).permute(2, 0, 3, 1, 4).unbind(0)
    ref = attn.proj(diffusion_attention_reference(q, k, v).transpose(1, 2).reshape(2, 10, 12))
    torch.testing.assert_close(attn(x), ref, **TOL)
    # a (B, h, w, C) map is the same tokens in row-major order, and comes back as a map
    torch.testing.assert_close(attn(x.reshape(2, 2, 5, 12)), ref.reshape(2, 2, 5, 12), **TOL)


@pytest.mark.parametrize('padding_mask', [False, True])
def test_conv_mlp_holds_at_most_two_hidden_tensors(padding_mask: bool) -> None:
    """F's inference forward keeps at most two hidden-width tensors alive at once (conv input + output, then conv
    output + activation), as timm's ``Mlp`` does: holding fc1's output through the activation cost LDN 1.3x DeiT's
    peak memory."""
    from timm_ldn.ldn import DwConvMlp
    from timm_ldn.sequence import DwConv1dMlp
    dim, hidden = 32, 256
    if padding_mask:
        mlp, x = DwConv1dMlp(dim, hidden).eval(), torch.randn(1, 256, dim)
        mask = torch.zeros(1, 256, dtype=torch.bool)
        mask[:, -16:] = True
    else:
        mlp, x, mask = DwConvMlp(dim, hidden).eval(), torch.randn(1, 16, 16, dim), None

    def forward() -> None:
        with torch.inference_mode():
            mlp(x, mask)
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'speed'))
    from bench_harness import live_peak_mb  # the benchmark's own peak-memory measurement
    hidden_bytes = 256 * hidden * 4
    peak = live_peak_mb(forward) * 2 ** 20
    assert 2 * hidden_bytes <= peak < 2.5 * hidden_bytes, (peak, hidden_bytes)
