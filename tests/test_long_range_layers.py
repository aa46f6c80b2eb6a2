"""The long-range layers of the sequence model (issue 27) keep the contract's properties.

* ``ImplicitPathDiffusion``: the diffusion step solved implicitly, a masked, normalised two-sided exponential
  convolution (``timm_ldn.diffusion.path_exponential_diffusion``) against its dense reference; convex rows over the
  real tokens, ``max|H|`` never grows, interior mass conservation, Theorem 1 at depth 1, fp16 / bf16 stacks finite,
  no ``L×L`` tensor.
* ``ImplicitGridDiffusion``: its 2-D port (ADI: rows, then columns) against the dense normalised 2-D kernel;
  convex, global after one step, no padding, in a timm model at any size and in every autograd mode.
* ``TaylorDiffusionAttention``: ``w_ij = 1 + s + s²/2 > 0``, rows of ``D⁻¹W − I`` sum to zero, padded keys ignored.
* ``ChunkedSoftmaxDiffusionAttention``: the softmax kernel within chunks, against its dense block-diagonal form; rows
  sum to zero, padded keys ignored, no ``L×L`` tensor.
* ``LdnSequenceClassifier``: layer types and ``weight_init`` round-trip through ``config.json``.
"""
import json
import math
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from timm_ldn.diffusion import (
    chunked_softmax_diffusion_attention_reference, diffusion_attention_reference, grid_exponential_diffusion,
    grid_exponential_diffusion_reference, path_exponential_diffusion, path_exponential_diffusion_reference,
    selective_path_diffusion, selective_path_diffusion_reference,
    taylor_feature_map,
)
from timm_ldn.ldn import ImplicitGridDiffusion
from timm_ldn.sequence import (
    ChunkedSoftmaxDiffusionAttention, ImplicitPathDiffusion, LdnSequenceClassifier, SelectivePathDiffusion,
    TaylorDiffusionAttention,
    layer_path, resolve_layer,
)

DT = torch.float64


def _mask(lengths, L):
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]


def _scattered_mask(L):
    """Padding before and between real tokens (left-padded, gaps): the masks whose row sums are a convolution."""
    mask = _mask((L, L), L)
    mask[0, :L // 3] = True
    mask[1, 2:5] = mask[1, L - 1] = True
    return mask


def _scales(C, seed=0, spread=2.):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, generator=g, dtype=DT) * spread, torch.randn(C, generator=g, dtype=DT) * spread


EXACT_LAYERS = [ImplicitPathDiffusion, SelectivePathDiffusion]


def _layer(dim=6, adaptive_step=True, drift=True, seed=0, offsets=(1, 2, 4, 8), layer_type=ImplicitPathDiffusion):
    torch.manual_seed(seed)
    layer = layer_type(dim, offsets, drift=drift, adaptive_step=adaptive_step).to(DT)
    with torch.no_grad():  # off the init values: drift, token-dependent steps
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return layer


@pytest.mark.parametrize('lengths', [(23, 23), (23, 9), (5, 1), (0, 23), 'scattered'])
def test_implicit_step_equals_its_dense_operator_whose_rows_are_convex_averages_of_real_tokens(lengths):
    L, C = 23, 5
    left, right = _scales(C, spread=1.)  # ℓ ≥ e^-3: exp(-22/ℓ) stays above float64's underflow
    mask = _scattered_mask(L) if lengths == 'scattered' else _mask(lengths, L)
    x = torch.randn(2, L, C, dtype=DT)
    y = path_exponential_diffusion(x, left, right, mask)
    for b in range(2):
        real = ~mask[b]
        P = path_exponential_diffusion_reference(left, right, real)  # (C, L, L)
        torch.testing.assert_close(y[b], torch.einsum('cij,jc->ic', P, x[b]), rtol=1e-10, atol=1e-10)
        if not real.any():
            continue  # an empty sequence: all padding, returned as it came
        rows = P[:, real]
        assert (rows >= 0).all()
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)))  # K·1 = 0
        assert (rows[:, :, ~real] == 0).all()  # padding is no node
        assert (rows[:, :, real] > 0).all()  # every real token reaches every real token in one step
    const = torch.full((2, L, C), 3.5, dtype=DT)
    torch.testing.assert_close(path_exponential_diffusion(const, left, right, mask), const)
    if not mask.any():  # no mask at all: the denominator from the kernel's partial sums, the same operator
        torch.testing.assert_close(path_exponential_diffusion(x, left, right), y, rtol=1e-10, atol=1e-10)
        x32, left32, right32 = x.float(), (left * 7).float(), (right * 7).float()  # ℓ from e^-14 to e^14
        torch.testing.assert_close(path_exponential_diffusion(x32, left32, right32),
                                   path_exponential_diffusion(x32, left32, right32, mask), rtol=2e-6, atol=2e-6)


def test_fft_length_is_the_smallest_5_smooth_length_without_wrap_around():
    """The implicit step's FFT length: at least 2L − 1 (a linear convolution, no wrap-around), a product of 2, 3 and 5
    only, and no such length fits between the two."""
    from timm_ldn.diffusion import _fft_length

    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1
    for L in range(1, 1200):
        n = _fft_length(L)
        assert n >= 2 * L - 1 and smooth(n) and not any(smooth(m) for m in range(2 * L - 1, n))
    assert (_fft_length(784), _fft_length(1024), _fft_length(16384)) == (1600, 2048, 32768)


@pytest.mark.parametrize('dtype', [torch.float32, DT])
def test_implicit_step_limits_are_the_identity_and_the_plain_mean_with_no_nan(dtype):
    """ℓ far below one token leaves every token as it is; ℓ far past the sequence (even past the point where 1/ℓ
    underflows) averages the whole sequence uniformly; the unpadded denominator's closed form stays finite at both."""
    L, C = 300, 4
    x = torch.randn(2, L, C, dtype=dtype)
    tiny, huge = torch.full((C,), -60., dtype=dtype), torch.full((C,), 200., dtype=dtype)
    torch.testing.assert_close(path_exponential_diffusion(x, tiny, tiny), x)
    mean = x.mean(1, keepdim=True).expand_as(x)
    torch.testing.assert_close(path_exponential_diffusion(x, huge, huge), mean, rtol=1e-5, atol=1e-5)
    mixed = torch.tensor([-60., 200., 0., 5.], dtype=dtype)
    assert torch.isfinite(path_exponential_diffusion(x, mixed, mixed.flip(0))).all()


@pytest.mark.parametrize('lengths', [(23, 23), (23, 9), (5, 1)])
def test_selective_step_equals_its_dense_operator_whose_rows_are_convex_averages_of_real_tokens(lengths):
    """Token-dependent rates, walls (rates past the cap of 10) included: the scans equal the dense product-form
    kernel; rows are convex over the real tokens; padding is no node; a constant stays constant."""
    L, C = 23, 5
    g = torch.Generator().manual_seed(1)
    left, right = (torch.rand(2, L, C, generator=g, dtype=DT) * 3 for _ in range(2))
    left[0, 10:12] = 40.  # walls, clamped to the cap
    mask = _mask(lengths, L)
    x = torch.randn(2, L, C, dtype=DT, generator=g)
    y = selective_path_diffusion(x, left, right, mask)
    for b in range(2):
        real = ~mask[b]
        P = selective_path_diffusion_reference(left[b], right[b], real)
        torch.testing.assert_close(y[b], torch.einsum('cij,jc->ic', P, x[b]), rtol=1e-10, atol=1e-10)
        rows = P[:, real]
        assert (rows >= 0).all() and (rows[:, :, real] > 0).all() and (rows[:, :, ~real] == 0).all()
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)))  # K·1 = 0
    const = torch.full((2, L, C), -2.5, dtype=DT)
    torch.testing.assert_close(selective_path_diffusion(const, left, right, mask), const)
    # a wall: the averages on its two sides barely mix (one capped edge: weight e^-10 across it)
    P0 = selective_path_diffusion_reference(left[0], right[0], ~mask[0])
    assert P0[:, 12, :10].sum(-1).max() < 1e-4  # token 12 looking left across edges 10 and 11


def test_selective_step_with_the_same_rate_everywhere_is_the_stationary_kernel():
    """One rate per channel on every edge, λ = 1/ℓ: the scans give the FFT layer's exponential kernel."""
    L, C = 41, 4
    left_scale, right_scale = _scales(C, spread=1.)
    x = torch.randn(2, L, C, dtype=DT)
    mask = _mask((41, 13), L)
    rates = [torch.exp(-s).expand(2, L, C) for s in (left_scale, right_scale)]
    torch.testing.assert_close(selective_path_diffusion(x, *rates, mask),
                               path_exponential_diffusion(x, left_scale, right_scale, mask))


@pytest.mark.parametrize('lengths', [None, (21, 6)], ids=['unpadded', 'padded'])
def test_selective_step_hand_written_backward_is_the_gradient(lengths):
    """The scans' adjoint recurrences against finite differences, through the tokens and both rates."""
    L, C = 21, 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, L, C, dtype=DT, generator=g).requires_grad_()
    left, right = ((torch.rand(2, L, C, generator=g, dtype=DT) * 3).requires_grad_() for _ in range(2))
    mask = None if lengths is None else _mask(lengths, L)
    assert torch.autograd.gradcheck(lambda h, a, b: selective_path_diffusion(h, a, b, mask), (x, left, right))
    grad_x = torch.func.grad(lambda h: selective_path_diffusion(h, left, right, mask).square().sum())(x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(
        selective_path_diffusion(x, left, right, mask).square().sum(), x)[0])


def test_selective_layer_starts_as_the_stationary_layer_and_learns_its_walls():
    """W_up starts at zero: the same output as ImplicitPathDiffusion with the same scales; the wall projection
    gets a gradient from the first step."""
    torch.manual_seed(0)
    stationary, selective = ImplicitPathDiffusion(6, (1, 8)).to(DT), SelectivePathDiffusion(6, (1, 8)).to(DT)
    selective.load_state_dict(stationary.state_dict(), strict=False)
    x = torch.randn(2, 30, 6, dtype=DT)
    mask = _mask((30, 11), 30)
    torch.testing.assert_close(selective(x, mask), stationary(x, mask))
    selective(x, mask).square().sum().backward()
    assert selective.wall_up.weight.grad.abs().sum() > 0


def test_implicit_step_interior_conserves_each_channels_total_and_drift_makes_it_one_sided():
    """Away from the ends (several length scales) every column of P sums to one, drift or not: the total is moved,
    never made. Near an end the renormalised rows do not conserve it (stated in the layer's docs)."""
    L, C = 200, 3
    left = torch.log(torch.tensor([1., 2., 3.], dtype=DT))
    right = torch.log(torch.tensor([1., 0.5, 3.], dtype=DT))  # channel 1: a drift (looks further left)
    P = path_exponential_diffusion_reference(left, right, torch.ones(L, dtype=torch.bool))
    interior = P.sum(1)[:, 80:120]  # ≥ 80 tokens (26 scales) from either end
    torch.testing.assert_close(interior, torch.ones_like(interior), rtol=0, atol=1e-9)
    mid = L // 2
    assert P[1, mid, mid - 3] > 10 * P[1, mid, mid + 3]  # the drift channel weighs its left side more
    torch.testing.assert_close(P[0, mid, mid - 3], P[0, mid, mid + 3])  # symmetric channel


@pytest.mark.parametrize('lengths', [None, (12, 7), (5, 0), 'scattered'],
                         ids=['unpadded', 'padded', 'padded-empty', 'scattered'])
def test_implicit_step_hand_written_backward_is_the_gradient(lengths):
    """The FFT convolutions' backward (written as two more convolutions) against finite differences, through the
    tokens and both length scales: unpadded and suffix-padded (the fused step, closed-form row sums read at each
    sequence's length) and padding elsewhere (the row sums a convolution of the mask)."""
    L, C = 12, 3
    left, right = (t.requires_grad_() for t in _scales(C, spread=1.))
    x = torch.randn(2, L, C, dtype=DT, requires_grad=True)
    mask = None if lengths is None else _scattered_mask(L) if lengths == 'scattered' else _mask(lengths, L)
    assert torch.autograd.gradcheck(lambda h, a, b: path_exponential_diffusion(h, a, b, mask), (x, left, right))
    # torch.func transforms take the autograd-traced form: the same gradient
    grad_x = torch.func.grad(lambda h: path_exponential_diffusion(h, left, right, mask).square().sum())(x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(
        path_exponential_diffusion(x, left, right, mask).square().sum(), x)[0])


@pytest.mark.parametrize('lengths', [None, (784, 300)], ids=['unpadded', 'padded'])
def test_implicit_step_float32_gradients_are_as_precise_as_autograds(lengths):
    """The fused backward (rebuilding the kernel and row sums from the scales) against float64, next to autograd
    through the same forward (torch.func): no worse than 2x its error, with length scales from a third of a token
    to 400x the sequence, where the row sums' derivative cancels hardest."""
    torch.manual_seed(0)
    L, C = 784, 8
    x, w = torch.randn(2, L, C), torch.randn(2, L, C)
    left = torch.linspace(-1., math.log(L) + 6., C)
    right = left.flip(0) + 0.3
    mask = None if lengths is None else _mask(lengths, L)

    def loss(h, a, b):
        return (path_exponential_diffusion(h, a, b, mask) * w).sum()

    args = [t.clone().requires_grad_() for t in (x, left, right)]
    fused = torch.autograd.grad(loss(*args), args)
    plain = torch.func.grad(loss, argnums=(0, 1, 2))(x, left, right)
    exact = torch.func.grad(loss, argnums=(0, 1, 2))(x.double(), left.double(), right.double())
    for f, p, e in zip(fused, plain, exact):
        scale = e.abs().max()
        assert (f.double() - e).abs().max() / scale <= max(2 * (p.double() - e).abs().max() / scale, 1e-6)


@pytest.mark.parametrize('layer_type', EXACT_LAYERS)
def test_implicit_layer_gives_the_same_answer_in_every_autograd_mode(layer_type):
    layer = _layer(layer_type=layer_type)
    mask = _mask((30, 11), 30)
    x = torch.randn(2, 30, 6, dtype=DT, requires_grad=True)
    outs = {}
    for mode, ctx in (('grad', torch.enable_grad), ('no_grad', torch.no_grad), ('inference', torch.inference_mode)):
        with ctx():
            outs[mode] = (layer(x, mask).detach().clone(), layer(x).detach().clone(),
                          layer(x, _scattered_mask(30)).detach().clone())
    for mode in ('no_grad', 'inference'):
        for a, b in zip(outs[mode], outs['grad']):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('layer_type', EXACT_LAYERS)
@pytest.mark.parametrize('adaptive_step', [True, False])
def test_implicit_layer_never_grows_the_max_norm_whatever_the_scales(adaptive_step, layer_type):
    layer = _layer(adaptive_step=adaptive_step, layer_type=layer_type)
    with torch.no_grad():
        layer.log_scale.mul_(10.)  # ℓ from e^-15 to e^15: no stability bound is needed
    mask = _mask((40, 17), 40)
    x = torch.randn(2, 40, 6, dtype=DT) * 5
    y = layer(x, mask)
    real = ~mask
    for b in range(2):
        assert y[b][real[b]].abs().amax(0).max() <= x[b][real[b]].abs().max() * (1 + 1e-9)
    torch.testing.assert_close(y[1][mask[1]], x[1][mask[1]])  # padded positions untouched


@pytest.mark.parametrize('layer_type', EXACT_LAYERS)
@pytest.mark.parametrize('adaptive_step', [True, False])
def test_theorem1_every_output_depends_on_every_real_input_after_one_layer(adaptive_step, layer_type):
    # scales up to 16 tokens on a 24-token sequence (selective: walls of at most 10 per edge, e^-230 end to end)
    layer = _layer(adaptive_step=adaptive_step, offsets=(8,), layer_type=layer_type)
    mask = _mask((17,), 24)
    x = torch.randn(1, 24, 6, dtype=DT)
    jac = torch.autograd.functional.jacobian(lambda h: layer(h, mask), x)  # (1, L, C, 1, L, C)
    dep = jac[0, :, :, 0].abs().sum((1, 3))  # (L, L): |∂y_i/∂x_j| summed over channels
    assert (dep[:17, :17] > 0).all()
    assert (dep[:17, 17:] == 0).all()  # padding reaches no real token


@pytest.mark.parametrize('layer_type', EXACT_LAYERS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_deep_implicit_stack_stays_finite_and_bounded_in_half_precision(dtype, layer_type):
    torch.manual_seed(0)
    layers = [layer_type(8, (1, 2, 4, 64)).to(dtype) for _ in range(12)]
    with torch.no_grad():
        for layer in layers:
            layer.log_scale.mul_(8.)
            layer.tau.fill_(20.)  # β → 1: the full step, every layer
    x = (torch.randn(2, 128, 8) * 6e4 / 4).clamp(-6e4, 6e4).to(dtype)
    h = x
    with torch.no_grad():
        for layer in layers:
            h = layer(h, _mask((128, 50), 128))
    assert torch.isfinite(h).all()
    assert h.float().abs().max() <= x.float().abs().max() * 1.01


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize('attn_layer, diffusion_layer', [(TaylorDiffusionAttention, ImplicitPathDiffusion),
                                                          (ChunkedSoftmaxDiffusionAttention, SelectivePathDiffusion)])
def test_no_tensor_grows_with_the_square_of_the_length(attn_layer, diffusion_layer):
    """Forward and backward of the implicit step and a linear-cost A_diff at L = 4096: the largest intermediate is
    linear in L (far below the L² = 16.8 M an attention matrix would hold)."""
    L = 4096
    torch.manual_seed(0)
    model = LdnSequenceClassifier(num_classes=3, vocab_size=8, embed_dim=8, depth=1, num_heads=2, max_len=L,
                                  diffusion_layer=diffusion_layer, attn_layer=attn_layer)
    x = torch.randint(0, 8, (1, L))
    with _LargestTensor() as probe:
        model(x, _mask((L - 100,), L)).sum().backward()
    # B·heads·L·(Taylor features), or B·heads·L·chunk (128) for the chunked softmax, at most
    assert probe.numel < 300 * L, probe.numel


def _grid_layer(dim=5, adaptive_step=True, seed=0, offsets=(1, 2, 4)):
    torch.manual_seed(seed)
    layer = ImplicitGridDiffusion(dim, offsets, adaptive_step=adaptive_step).to(DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return layer


@pytest.mark.parametrize('size', [(5, 7), (1, 6), (4, 1)])
def test_grid_step_equals_its_dense_operator_whose_rows_are_convex_averages_of_the_grid(size):
    """Rows then columns (ADI) is exactly the normalised 2-D kernel exp(−(|Δi| + |Δj|)/ℓ) over the whole grid."""
    h, w = size
    C = 4
    log_scale = torch.randn(C, generator=torch.Generator().manual_seed(1), dtype=DT)
    x = torch.randn(3, h, w, C, dtype=DT)
    P = grid_exponential_diffusion_reference(log_scale, h, w)  # (C, N, N)
    y = grid_exponential_diffusion(x, log_scale)
    torch.testing.assert_close(y.reshape(3, h * w, C), torch.einsum('cpq,bqc->bpc', P, x.reshape(3, h * w, C)),
                               rtol=1e-10, atol=1e-10)
    assert (P > 0).all()  # every token reaches every token in one step
    torch.testing.assert_close(P.sum(-1), torch.ones(C, h * w, dtype=DT))
    assert torch.autograd.gradcheck(grid_exponential_diffusion, (x[:1].requires_grad_(), log_scale.requires_grad_()))


@pytest.mark.parametrize('adaptive_step', [True, False])
def test_grid_layer_never_grows_the_max_norm_is_global_after_one_step_and_refuses_padding(adaptive_step):
    layer = _grid_layer(adaptive_step=adaptive_step)
    x = torch.randn(2, 6, 9, 5, dtype=DT) * 5
    with torch.no_grad():
        layer.log_scale.mul_(10.)  # any length scale: no stability bound
        assert layer(x).abs().amax() <= x.abs().amax() * (1 + 1e-9)
        layer.log_scale.div_(10.)
    jac = torch.autograd.functional.jacobian(layer, x[:1])  # (1, h, w, C, 1, h, w, C)
    assert (jac[0, :, :, :, 0].abs().sum((2, 5)) > 0).all()  # Theorem 1 at depth 1: every token on every token
    with pytest.raises(ValueError, match='padding_mask must be None'):
        layer(x, torch.zeros(2, 54, dtype=torch.bool))


def test_grid_layer_in_a_timm_model_same_answer_in_every_autograd_mode_at_any_size():
    """``diffusion_layer=ImplicitGridDiffusion`` on a registered model: non-square inputs, intermediates, and the
    same logits with and without autograd."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('ldn_nano_convtok_28', diffusion_layer=ImplicitGridDiffusion).eval()
    x = torch.randn(2, 1, 28, 36)
    outs = {}
    for mode, ctx in (('grad', torch.enable_grad), ('no_grad', torch.no_grad), ('inference', torch.inference_mode)):
        with ctx():
            outs[mode] = model(x).detach().clone()
    for mode in ('no_grad', 'inference'):
        torch.testing.assert_close(outs[mode], outs['grad'], rtol=0, atol=0)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.blocks) and inter[-1].shape[-2:] == (7, 9)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('chunk_size', [4, 6, 64])
def test_chunked_softmax_attention_matches_its_dense_form_rows_sum_to_zero_and_ignores_padded_keys(chunk_size):
    torch.manual_seed(0)
    attn = ChunkedSoftmaxDiffusionAttention(16, num_heads=2, chunk_size=chunk_size).to(DT).eval()
    mask = _mask((11, 6), 11)
    x = torch.randn(2, 11, 16, dtype=DT)
    with torch.no_grad():
        q, k, v = attn.qkv(x).view(2, 11, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        for m in (mask, None):
            ref = chunked_softmax_diffusion_attention_reference(q, k, v, chunk_size, m)
            torch.testing.assert_close(attn(x, m), attn.proj(ref.transpose(1, 2).reshape(2, 11, 16)))
        # the dense form is block-diagonal: within a chunk it is softmax attention minus the identity
        w = torch.softmax(q[..., :4, :] @ k[..., :4, :].transpose(-2, -1) / 8 ** 0.5, -1)
        ref = chunked_softmax_diffusion_attention_reference(q, k, v, 4)
        torch.testing.assert_close(ref[..., :4, :], w @ v[..., :4, :] - v[..., :4, :])
        other = x.clone()
        other[1, 6:] = torch.randn(5, 16, dtype=DT) * 9  # new padding content: no real token changes
        torch.testing.assert_close(attn(other, mask)[1, :6], attn(x, mask)[1, :6])
        attn.proj.weight.copy_(torch.eye(16, dtype=DT))
        attn.proj.bias.zero_()
        attn.qkv.weight[32:].zero_()
        attn.qkv.bias[32:].fill_(2.)  # V constant: A_diff(const) = 0
        torch.testing.assert_close(attn(x, mask), torch.zeros_like(x))
    with pytest.raises(ValueError, match='chunk_size must be a positive'):
        ChunkedSoftmaxDiffusionAttention(16, num_heads=2, chunk_size=0)


def test_taylor_kernel_is_the_second_order_form_of_exp_and_positive():
    torch.manual_seed(0)
    q, k = torch.randn(5, 16, dtype=DT) * 3, torch.randn(7, 16, dtype=DT) * 3
    s = q @ k.t() / 4.
    torch.testing.assert_close(taylor_feature_map(q) @ taylor_feature_map(k).t(), 1 + s + s * s / 2)
    assert (1 + s + s * s / 2 >= 0.5).all()


@pytest.mark.parametrize('qk_dim', [4, None])
def test_taylor_attention_matches_dense_kernel_rows_sum_to_zero_and_ignores_padded_keys(qk_dim):
    torch.manual_seed(0)
    attn = TaylorDiffusionAttention(16, num_heads=2, qk_dim=qk_dim).to(DT).eval()
    e = qk_dim or 8
    mask = _mask((11, 6), 11)
    x = torch.randn(2, 11, 16, dtype=DT)
    with torch.no_grad():
        B, N, C = x.shape
        qkv = attn.qkv(x)
        q, k = qkv[..., :4 * e].view(B, N, 2, 2, e).permute(2, 0, 3, 1, 4).unbind(0)
        v = qkv[..., 4 * e:].view(B, N, 2, 8).transpose(1, 2)
        ref = diffusion_attention_reference(q, k, v, phi=taylor_feature_map, key_padding_mask=mask)
        expected = attn.proj(ref.transpose(1, 2).reshape(B, N, C))
        torch.testing.assert_close(attn(x, mask), expected)
        other = x.clone()
        other[1, 6:] = torch.randn(5, 16, dtype=DT) * 9  # new padding content: no real token changes
        torch.testing.assert_close(attn(other, mask)[1, :6], attn(x, mask)[1, :6])
        attn.proj.weight.copy_(torch.eye(16, dtype=DT))
        attn.proj.bias.zero_()
        attn.qkv.weight[4 * e:].zero_()
        attn.qkv.bias[4 * e:].fill_(2.)  # V constant: A_diff(const) = 0
        torch.testing.assert_close(attn(x, mask), torch.zeros_like(x))


def test_layer_types_and_init_round_trip_through_config_json(tmp_path):
    torch.manual_seed(0)
    m = LdnSequenceClassifier(num_classes=4, vocab_size=9, embed_dim=16, depth=2, num_heads=2, max_len=64,
                              diffusion_layer=ImplicitPathDiffusion, attn_layer=TaylorDiffusionAttention,
                              weight_init='torch').eval()
    m.save_pretrained(tmp_path / 'm')
    cfg = json.loads((tmp_path / 'm' / 'config.json').read_text())
    assert cfg['diffusion_layer'] == 'timm_ldn.sequence:ImplicitPathDiffusion'
    assert cfg['attn_layer'] == 'timm_ldn.sequence:TaylorDiffusionAttention' and cfg['weight_init'] == 'torch'
    loaded = LdnSequenceClassifier.from_pretrained(str(tmp_path / 'm')).eval()
    assert isinstance(loaded.blocks[0].diffusion, ImplicitPathDiffusion)
    x = torch.randint(0, 9, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert resolve_layer(layer_path(ImplicitPathDiffusion)) is ImplicitPathDiffusion
    with pytest.raises(ValueError, match='cannot be saved in config.json'):
        layer_path(partial(ImplicitPathDiffusion, drift=False))
    with pytest.raises(ValueError, match='cannot be imported'):
        resolve_layer('timm_ldn.sequence:NoSuchLayer')
    with pytest.raises(ValueError, match='not an nn.Module class'):
        resolve_layer('timm_ldn.sequence:default_offsets')


def test_weight_init_modes_differ_as_documented_and_bad_modes_are_refused():
    torch.manual_seed(0)
    trunc = LdnSequenceClassifier(num_classes=4, vocab_size=9, embed_dim=64, depth=1, num_heads=2,
                                  weight_init='trunc_normal')
    torch.manual_seed(0)
    plain = LdnSequenceClassifier(num_classes=4, vocab_size=9, embed_dim=64, depth=1, num_heads=2, weight_init='torch')
    assert abs(trunc.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert plain.blocks[0].attn.qkv.weight.std().item() > 0.05  # kaiming-uniform, 1/sqrt(3·64) ≈ 0.072
    assert plain.blocks[0].attn.qkv.bias.abs().max() > 0 and (trunc.blocks[0].attn.qkv.bias == 0).all()
    with pytest.raises(ValueError, match='weight_init must be one of'):
        LdnSequenceClassifier(num_classes=4, vocab_size=9, weight_init='jax')
