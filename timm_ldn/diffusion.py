"""Diffusion operators of Linear Diffusion Networks: the math of the architecture contract in one place.

One LDN layer is one explicit-Euler step of ``dH/dt = K·H + A_diff(H) + F(H)`` over the tokens. This module holds
the two diffusion operators, each as the fast form the model runs beside a dense reference form for the tests:

* ``K``: a learned, multi-scale, no-flux graph Laplacian on the ``h×w`` grid (rows and columns sum to zero).
  :func:`diffusion_step` runs it (a depthwise stencil conv, or shifted multiply-adds on CPU);
  :func:`laplacian_reference` builds the dense matrix.
* ``A_diff``: content-dependent global diffusion ``(D⁻¹W − I)·V`` with ``w_ij = φ(q_i)·φ(k_j)``, computed in linear
  time as ``φ(Q)(φ(K)ᵀV)``: the ``N×N`` matrix ``W`` is never formed. :func:`linear_diffusion_attention` is the
  readable form, :func:`packed_linear_diffusion_attention` the one the model runs (same math on the fused qkv),
  :func:`diffusion_attention_reference` the dense one.

Token maps are channels-last (``B×h×w×C``) throughout, the layout the linear layers of a block want. The dense
``*_reference`` functions are ``O(N²)`` in memory: tests only. Where each property of the contract is tested:
``docs/contract.md``.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from timm.layers import register_notrace_function

__all__ = [
    'DEFAULT_OFFSETS', 'MAX_STEP_FRACTION', 'stencil_basis', 'time_step', 'diffusion_coefficients', 'border_correction',
    'diffusion_step', 'laplacian_reference', 'grid_diameter', 'positive_feature_map', 'linear_diffusion_attention',
    'packed_linear_diffusion_attention', 'feature_diffusion_attention', 'diffusion_attention_reference',
    'NEIGHBOURS_PER_SCALE', 'PATH_NEIGHBOURS_PER_SCALE',
    'path_diffusion_step', 'path_laplacian_reference', 'path_diameter', 'path_exponential_kernel',
    'path_exponential_diffusion', 'path_exponential_diffusion_reference', 'grid_exponential_diffusion',
    'grid_exponential_diffusion_reference', 'taylor_feature_map',
    'chunked_softmax_diffusion_attention', 'chunked_softmax_diffusion_attention_reference',
    'SELECTIVE_MAX_RATE', 'selective_path_diffusion', 'selective_path_diffusion_reference',
]

# Dilated 4-neighbourhoods at offsets 1, 2, 4: the 14×14 grid of a 224 px image has diameter 8 (Theorem 1).
DEFAULT_OFFSETS: Tuple[int, ...] = (1, 2, 4)
NEIGHBOURS_PER_SCALE = 4  # ±d along each of the two grid axes
MAX_STEP_FRACTION = 0.99  # largest δt as a fraction of the explicit-Euler limit


def stencil_basis(
        offsets: Sequence[int],
        device: torch.device = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-scale Laplacian stencils, ``(S, k, k)`` with ``k = 2·max(offsets) + 1``.

    Stencil ``s`` has ``+1`` at the four grid neighbours ``(±d, 0), (0, ±d)`` and ``−4`` at the centre,
    so any non-negative combination of them sums to zero (``K·1 = 0`` away from the border).
    """
    radius = max(offsets)
    size = 2 * radius + 1
    basis = torch.zeros(len(offsets), size, size, device=device, dtype=dtype)
    for s, d in enumerate(offsets):
        basis[s, radius, radius] = -float(NEIGHBOURS_PER_SCALE)
        basis[s, radius - d, radius] = 1.
        basis[s, radius + d, radius] = 1.
        basis[s, radius, radius - d] = 1.
        basis[s, radius, radius + d] = 1.
    return basis


def time_step(
        a: torch.Tensor,
        tau: torch.Tensor,
        neighbours_per_scale: int = NEIGHBOURS_PER_SCALE,
        max_step_fraction: float = MAX_STEP_FRACTION,
) -> torch.Tensor:
    """Adaptive time step ``δt = 0.99·sigmoid(τ) / Σ_s |N_s|·a_s`` per channel, ``(C,)``.

    ``0.99·sigmoid(τ) < 1`` keeps ``δt`` strictly inside the explicit-Euler bound ``1 / Σ_s |N_s|·a_s``, so
    ``I + δt·K`` is a convex averaging operator for every value of the parameters.
    """
    # the floor only matters when every a_s underflows to 0; it shrinks δt further, never past the bound
    rate = (neighbours_per_scale * a.sum(0)).clamp_min(1e-6)
    # sigmoid(τ) rounds to exactly 1 for τ ≳ 17 (fp32) or ≳ 6 (bf16); the margin keeps δt strictly inside the
    # bound there too, so the diagonal of I + δt·K stays positive (needed by Theorem 1), with gradients intact
    return (max_step_fraction * torch.sigmoid(tau)) / rate


def diffusion_coefficients(
        a_raw: torch.Tensor,
        tau: torch.Tensor,
        neighbours_per_scale: int = NEIGHBOURS_PER_SCALE,
) -> torch.Tensor:
    """Per-scale edge weights of one diffusion step, ``δt·a_s``, shape ``(S, C)``.

    ``a_s = softplus(a_raw_s) ≥ 0``; the result is non-negative and ``Σ_s |N_s|·δt·a_s = 0.99·sigmoid(τ) < 1``
    (``|N_s| = 4`` on the grid, ``2`` on a sequence).
    """
    a = F.softplus(a_raw)
    return a * time_step(a, tau, neighbours_per_scale)


@register_notrace_function
def border_correction(coef: torch.Tensor, offsets: List[int], height: int, width: int) -> torch.Tensor:
    """``Σ_s (#out-of-grid neighbours of i at scale s)·coef_s``, shape ``(h, w, C)``.

    A zero-padded stencil convolution still subtracts ``coef_s·H_i`` for a neighbour that lies outside the
    grid. Adding this term back removes exactly those edges: the no-flux rule, ``K·1 = 0`` on the border
    too. (Replicate padding is *not* equivalent for offsets > 1: it would pair a token with the border
    token ``d − 1`` cells away instead of dropping the edge.) Zero in the interior.
    """
    rows = torch.arange(height, device=coef.device)
    cols = torch.arange(width, device=coef.device)
    d = torch.tensor(offsets, device=coef.device)
    row_missing = (rows[:, None] < d).to(coef.dtype) + (rows[:, None] >= height - d).to(coef.dtype)  # (h, S)
    col_missing = (cols[:, None] < d).to(coef.dtype) + (cols[:, None] >= width - d).to(coef.dtype)  # (w, S)
    return (row_missing @ coef)[:, None, :] + (col_missing @ coef)[None, :, :]


@register_notrace_function  # device-dependent branch: an FX leaf
def diffusion_step(
        x: torch.Tensor,
        coef: torch.Tensor,
        basis: torch.Tensor,
        offsets: List[int],
        self_weight: float = 1.,
        method: str = 'auto',
) -> torch.Tensor:
    """One primary-diffusion step ``self_weight·H + δt·K(H)`` on a channels-last token map.

    ``K(H)_i = Σ_s Σ_{j∈N_s(i)} a_s ⊙ (H_j − H_i)`` over in-grid neighbours only (no-flux border). ``self_weight``
    ``1`` (default) gives the step, ``0`` the update ``δt·K(H)`` alone (a drop-path branch).

    Args:
        x: Token map ``(B, h, w, C)``.
        coef: ``δt·a_s`` from :func:`diffusion_coefficients`, ``(S, C)``.
        basis: :func:`stencil_basis` for ``offsets``, ``(S, k, k)``.
        offsets: Grid offsets of the scales.
        self_weight: Weight of the identity.
        method: ``'auto'`` (below), ``'conv'`` or ``'shift'`` (benchmarks and tests).

    Two implementations of the same sum, one per execution mode (never per autograd mode):

    * ``'conv'``: all scales and the identity folded into one depthwise ``k×k`` stencil conv, then the border
      correction added in place on the fresh conv output (conv's backward needs only its input and weight).
      One library kernel: GPUs, and tracing exporters (shape-generic, where shifted slices would freeze the grid).
    * ``'shift'``: ``centre ⊙ H`` plus one in-place multiply-add per neighbour direction on shifted slices,
      13 taps where the conv has ``k² = 81``; out-of-grid neighbours have no slice, and the centre weight carries
      the no-flux rule. A hand-written backward (the step is symmetric). CPU, eager and compiled.

    Measured on this 2-core CPU in the whole ldn_small (``python eval/speed/diffusion_forms.py``): see
    ``eval/results/diffusion_forms.md``.
    """
    if method == 'auto':
        method = 'shift' if x.device.type == 'cpu' and not _exporting() else 'conv'
    if method == 'shift':
        return _shifted_diffusion_step(x, coef, offsets, self_weight)
    if method != 'conv':
        raise ValueError('diffusion method must be auto, conv or shift; got ' + method + '.')
    B, H, W, C = x.shape
    size = basis.shape[-1]
    radius = (size - 1) // 2
    weight = coef.t() @ basis.reshape(basis.shape[0], -1).to(coef.dtype)  # (C, k·k)
    centre = radius * size + radius
    identity = (torch.arange(size * size, device=x.device) == centre).to(weight.dtype)  # one-hot centre tap
    weight = (weight + self_weight * identity).reshape(C, 1, size, size).to(x.dtype)
    # NHWC -> NCHW view is channels_last in memory: the depthwise conv runs without a layout copy
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, padding=radius, groups=C).permute(0, 2, 3, 1)
    return y.addcmul_(x, border_correction(coef, offsets, H, W).to(x.dtype))


@torch.jit.unused
def _functorch_active() -> bool:
    """True inside torch.func transforms (vmap, jacrev, grad): the hand-written autograd Functions below have no
    functorch rules, so those transforms take the plain autograd path (same values)."""
    return torch._C._are_functorch_transforms_active()


def _custom_backward(x: torch.Tensor, coef: Optional[torch.Tensor] = None) -> bool:
    """Whether an op runs its hand-written autograd Function: a gradient is wanted for ``x`` (or ``coef``), and
    neither TorchScript (which compiles the plain form) nor a torch.func transform (no functorch rules) is active.
    Either path gives the same values."""
    if torch.jit.is_scripting() or not torch.is_grad_enabled():
        return False
    wanted = x.requires_grad or (coef is not None and coef.requires_grad)
    return wanted and not _functorch_active()


def _shifted_diffusion_step(x: torch.Tensor, coef: torch.Tensor, offsets: List[int], self_weight: float) -> torch.Tensor:
    if _custom_backward(x, coef):
        return _shifted_diffusion_step_autograd(x, coef, offsets, self_weight)
    return _shifted_diffusion_step_impl(x, coef, offsets, self_weight)


class _ShiftedDiffusionFn(torch.autograd.Function):
    """Hand-written backward of the shifted-add step.

    ``I + δt·K`` is symmetric, so ``∂L/∂H`` is the same step applied to the incoming gradient (13 passes), and
    ``∂L/∂(δt·a_s) = Σ_i g_i·((S_s H)_i − n_s(i)·H_i)`` (``S_s``: sum of in-grid neighbours at scale s,
    ``n_s``: their count). Autograd through the 12 in-place slice updates instead clones and zero-fills the
    full gradient once per update (CopySlices): ~2x the work.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, coef: torch.Tensor, offsets: List[int], self_weight: float) -> torch.Tensor:
        ctx.offsets = offsets
        ctx.self_weight = self_weight
        ctx.save_for_backward(x, coef)
        return _shifted_diffusion_step_impl(x, coef, offsets, self_weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # the gradient can arrive in another layout (the head's NCHW view of the channels-last map): every pass
        # below reads shifted slices of it, several times slower on a permuted tensor than one copy
        g = g.contiguous()
        x, coef = ctx.saved_tensors
        offsets: List[int] = ctx.offsets
        grad_x = grad_coef = None
        if ctx.needs_input_grad[0]:
            grad_x = _shifted_diffusion_step_impl(g, coef, offsets, ctx.self_weight)
        if ctx.needs_input_grad[1]:
            B, H, W, C = x.shape
            dims = (0, 1, 2)
            rows = []
            for d in offsets:  # Σ over directed in-grid edges of g_i·H_j (empty slices: no edges)
                rows.append((g[:, d:] * x[:, :-d]).sum(dims) + (g[:, :-d] * x[:, d:]).sum(dims)
                            + (g[:, :, d:] * x[:, :, :-d]).sum(dims) + (g[:, :, :-d] * x[:, :, d:]).sum(dims))
            eye = torch.eye(len(offsets), device=x.device, dtype=x.dtype)
            in_grid = 4. - border_correction(eye, offsets, H, W)  # (h, w, S): n_s(i)
            centre_term = in_grid.reshape(H * W, -1).t() @ (g * x).sum(0).reshape(H * W, C)  # (S, C); vmap-able
            grad_coef = (torch.stack(rows) - centre_term).to(coef.dtype)
        return grad_x, grad_coef, None, None


@torch.jit.unused
def _shifted_diffusion_step_autograd(
        x: torch.Tensor, coef: torch.Tensor, offsets: List[int], self_weight: float) -> torch.Tensor:
    return _ShiftedDiffusionFn.apply(x, coef, offsets, self_weight)


def _shifted_diffusion_step_impl(
        x: torch.Tensor, coef: torch.Tensor, offsets: List[int], self_weight: float = 1.) -> torch.Tensor:
    """``H + δt·K(H)`` as centre scaling plus one shifted multiply-add per neighbour direction (see above)."""
    B, H, W, C = x.shape
    coef = coef.to(x.dtype)
    # every scale has 4 neighbours minus those outside the grid: border_correction counts the missing ones
    centre = border_correction(coef, offsets, H, W).to(x.dtype) + (self_weight - 4. * coef.sum(0))  # 4 = |N_s|
    y = x * centre
    for s, d in enumerate(offsets):
        c = coef[s]
        # slices are empty when d >= the grid side: those edges do not exist (no-flux)
        y[:, d:].addcmul_(x[:, :-d], c)
        y[:, :-d].addcmul_(x[:, d:], c)
        y[:, :, d:].addcmul_(x[:, :, :-d], c)
        y[:, :, :-d].addcmul_(x[:, :, d:], c)
    return y


def laplacian_reference(
        a_s: torch.Tensor,
        offsets: Sequence[int],
        height: int,
        width: int,
) -> torch.Tensor:
    """Dense ``K`` for one channel, ``(N, N)`` with ``N = h·w`` (tests only).

    ``K_ij = a_s`` for every in-grid pair at grid offset ``±d_s`` along one axis, ``K_ii = −Σ_j K_ij``.
    """
    n = height * width
    K = torch.zeros(n, n, dtype=a_s.dtype, device=a_s.device)
    for s, d in enumerate(offsets):
        for y in range(height):
            for x in range(width):
                i = y * width + x
                for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < height and 0 <= xx < width:
                        K[i, yy * width + xx] += a_s[s]
    K -= torch.diag(K.sum(1))
    return K


def grid_diameter(height: int, width: int, offsets: Sequence[int]) -> int:
    """Hop diameter of the multi-scale neighbourhood graph on an ``h×w`` grid."""
    # moves change one axis at a time, so the grid's hop distance is the sum of the axis (path) distances
    return path_diameter(height, offsets) + path_diameter(width, offsets)


def _positive_feature_map_forward(x: torch.Tensor) -> torch.Tensor:
    out = x.clamp_min(0.)
    return out.add_(x.clamp_max(0.).exp_())


class _PositiveFeatureMapFn(torch.autograd.Function):
    """φ with the one-pass derivative ``φ'(x) = min(φ(x), 1)`` (``1`` for ``x > 0``, ``exp(x)`` otherwise).

    Autograd through the clamp/exp form costs two compare + ``where`` passes and a multiply per element; in
    ldn_small's CPU training step those ``where`` calls alone took ~4% of the time.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = _positive_feature_map_forward(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad * out.clamp_max(1.)  # differentiable in turn: double backward sees exp(x) for x < 0


@torch.jit.unused
def _positive_feature_map_autograd(x: torch.Tensor) -> torch.Tensor:
    return _PositiveFeatureMapFn.apply(x)


@register_notrace_function  # branches on requires_grad: an FX leaf
def positive_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1 > 0``: smooth, strictly positive, linear for large inputs (no overflow).

    Written as ``exp(min(x, 0)) + max(x, 0)`` (identical values): ATen's CPU ``elu`` kernel is ~10x slower
    than ``exp`` and took 12% of ``ldn_small``'s CPU forward. Two of the four passes run in place: two fresh
    buffers instead of four (large CPU temporaries cost page faults). When a gradient is needed, a custom
    autograd function supplies the one-pass derivative (TorchScript takes the plain, autograd-traced form).
    """
    if _custom_backward(x):
        return _positive_feature_map_autograd(x)
    if torch.is_grad_enabled() and x.requires_grad:  # plain autograd: no in-place ops on tensors autograd saves
        return x.clamp_min(0.) + x.clamp_max(0.).exp()
    return _positive_feature_map_forward(x)


def linear_diffusion_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        phi: Callable[[torch.Tensor], torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A_diff(U) = (D⁻¹W − I)·V`` with ``w_ij = φ(q_i)·φ(k_j)``, in ``O(N·d²)`` per head (the readable form).

    Args:
        q, k, v: ``(B, heads, N, d)``.
        phi: Positive feature map φ (default :func:`positive_feature_map`, elu + 1).
        key_padding_mask: ``(B, N)`` bool, True where padded: those tokens are no keys (``w_ij = 0``).
    Returns:
        ``Σ_j w_ij (v_j − v_i) / Σ_j w_ij`` for every token, ``(B, heads, N, d)``. Rows of ``D⁻¹W − I`` sum to
        zero, so a constant ``V`` gives exactly ``0`` up to rounding.
    """
    phi = phi or positive_feature_map
    return feature_diffusion_attention(phi(q), phi(k), v, key_padding_mask)


def feature_diffusion_attention(
        q_feat: torch.Tensor,
        k_feat: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`linear_diffusion_attention` on features already mapped, ``q_feat = φ(Q)``, ``k_feat = φ(K)``
    (``(B, heads, N, f)``, any feature size ``f``, every ``φ(q_i)·φ(k_j) > 0``), ``v`` ``(B, heads, N, d)``."""
    # [V | 1] carries the normaliser as one more column, so one matmul over φ(Q) gives numerator and denominator;
    # the 1/N (over real tokens; padded keys get weight 0) and the mask go on that narrow tensor, not on φ(K) (wide
    # for Taylor maps). 1/N keeps φ(K)ᵀV O(1) at any length (fp16 range); it cancels in the ratio.
    d = v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, heads, N, d+1)
    if key_padding_mask is None:
        v1 = v1 * (1. / v.shape[-2])
    else:
        real = (~key_padding_mask).to(v.dtype)[:, None, :, None]  # (B, 1, N, 1)
        v1 = v1 * (real / real.sum(2, keepdim=True))
    y = q_feat @ (k_feat.transpose(-2, -1) @ v1)  # (B, heads, N, d+1) through (B, heads, f, d+1): never N×N
    return y[..., :d] / y[..., d:] - v


def _exporting() -> bool:
    """True under ONNX export, ``torch.jit.trace`` or ``torch.export`` (never while scripting)."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


@register_notrace_function  # φ branches on requires_grad: keep the whole op an FX leaf
def packed_linear_diffusion_attention(
        qkv: torch.Tensor,
        num_heads: int,
        key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`linear_diffusion_attention` straight from the fused qkv projection, ``(B, N, 3C) -> (B, N, C)``.

    Same math, fewer passes and layout copies (the form the model runs):

    * φ runs once over the contiguous ``[q | k]`` part of the projection, before any head split;
    * the normaliser ``φ(K)ᵀ1`` rides along as an extra column of ``φ(K)ᵀV`` (``d×(d+1)`` per head), so one
      batched matmul over ``φ(Q)`` yields numerator and denominator together;
    * the ``1/N`` scale is applied to that tiny matrix instead of to ``φ(K)``;
    * q, k and v stay strided ``(B, N, d)`` views of the projection, one head at a time: each is a matrix the BLAS
      reads as is, where a 4-D ``(B, heads, N, d)`` matmul would first copy all three (when a gradient is wanted,
      v is one copy, so that the saved tensors do not hold the spent q and k parts of the projection).

    Args:
        qkv: ``(B, N, 3C)`` output of the qkv projection, ``[q | k | v]`` with heads contiguous in each third.
        num_heads: Number of heads ``h``, ``d = C / h``.
        key_padding_mask: ``(B, N)`` bool, True where padded: those tokens are no keys (sequences).
    Returns:
        ``A_diff`` token-major ``(B, N, C)``, heads concatenated along channels.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qk = positive_feature_map(qkv[..., :2 * C])
    q = qk[..., :C].view(B, N, num_heads, d)
    k = qk[..., C:].view(B, N, num_heads, d)
    v = qkv[..., 2 * C:]
    if torch.is_grad_enabled() and qkv.requires_grad:
        # the matmuls save v for the backward: a view would keep the whole projection alive (q and k are spent
        # once φ has run), a copy keeps a third of it (16k tokens, 4 layers of 64: 32 of 97 MiB saved by A_diff)
        v = v.contiguous()
    v = v.view(B, N, num_heads, d)
    if key_padding_mask is None:
        scale = torch.full((1, 1, 1), 1. / N, dtype=qkv.dtype, device=qkv.device)
    else:  # padded tokens are no keys; 1/N over each sequence's real tokens
        real = (~key_padding_mask).to(qkv.dtype)  # (B, N)
        k = k * real[:, :, None, None]
        scale = (1. / real.sum(1)).view(B, 1, 1)
    k_sum = k.sum(1)  # (B, heads, d): φ(K)ᵀ1 of every head at once
    heads: List[torch.Tensor] = []
    for i in range(num_heads):
        q_i, k_i, v_i = q[:, :, i], k[:, :, i], v[:, :, i]  # (B, N, d) strided views
        # [φ(K)ᵀV | φ(K)ᵀ1] / N: (B, d, d+1)
        kv = torch.cat([torch.bmm(k_i.transpose(1, 2), v_i), k_sum[:, i].unsqueeze(-1)], dim=-1) * scale
        y = torch.bmm(q_i, kv)  # (B, N, d+1): numerator and denominator of every token
        heads.append(y[..., :d] / y[..., d:] - v_i)
    return torch.stack(heads, dim=2).reshape(B, N, C)


def diffusion_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        phi: Callable[[torch.Tensor], torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense ``(D⁻¹W − I)·V`` with the ``N×N`` matrix ``W = φ(Q)φ(K)ᵀ`` built explicitly (tests only); padded keys
    (``key_padding_mask`` True) get ``w_ij = 0``."""
    phi = phi or positive_feature_map
    w = phi(q) @ phi(k).transpose(-2, -1)
    if key_padding_mask is not None:
        w = w * (~key_padding_mask).to(w.dtype)[:, None, None, :]
    degree = w.sum(-1, keepdim=True)
    return (w / degree) @ v - v


# --- 1-D: a token sequence is a path graph 0 … L−1 ----------------------------------------------------------------
# The same two operators on sequences (timm_ldn.sequence). Padded positions (``padding_mask`` True, as PyTorch's
# ``src_key_padding_mask``) are not nodes: no K edge touches them and A_diff sums over real keys only, so a sequence's
# output does not depend on what, or how much, padding follows it.

PATH_NEIGHBOURS_PER_SCALE = 2  # i ± d


def path_diffusion_step(
        x: torch.Tensor,
        coef: torch.Tensor,
        offsets: List[int],
        padding_mask: Optional[torch.Tensor] = None,
        self_weight: float = 1.,
) -> torch.Tensor:
    """One primary-diffusion step ``self_weight·H + δt·K(H)`` on sequences ``(B, L, C)``.

    ``K(H)_i = Σ_s Σ_{j = i ± d_s real} a_s ⊙ (H_j − H_i)``: the multi-scale path-graph Laplacian with no-flux ends at
    the sequence's borders and next to padding (an edge exists only between two real tokens). Each scale's edges
    carry one flux ``c_s ⊙ (H_{i+d} − H_i)``, added at ``i`` and subtracted at ``i + d``: ``K`` is symmetric, rows and
    columns sum to zero. Padded positions get a zero update. With autograd, a hand-written backward: the step is
    symmetric, so ``∂L/∂H`` is the same step on the gradient, and ``∂L/∂c_s`` sums ``(g_i − g_{i+d})·(H_{i+d} − H_i)``
    over the scale's edges (autograd through the in-place slice updates would copy the gradient once per update).

    Args:
        x: ``(B, L, C)``.
        coef: ``δt·a_s``, ``(S, C)`` (:func:`diffusion_coefficients` with ``neighbours_per_scale=2``).
        offsets: Path offsets of the scales.
        padding_mask: ``(B, L)`` bool, True where padded; None: every position is real.
        self_weight: Weight of the identity (``0``: the update alone).
    """
    edges = None if padding_mask is None else (~padding_mask).to(x.dtype).unsqueeze(-1)  # (B, L, 1) real tokens
    if _custom_backward(x, coef):
        return _PathDiffusionFn.apply(x, coef, offsets, edges, self_weight)
    return _path_diffusion_step_impl(x, coef, offsets, edges, self_weight)


def _edge_weights(real: Optional[torch.Tensor], d: int) -> Optional[torch.Tensor]:
    """``(B, L − d, 1)``: 1 where both ends of the edge ``(i, i + d)`` are real tokens."""
    return None if real is None else real[:, d:] * real[:, :-d]


def _path_diffusion_step_impl(x: torch.Tensor, coef: torch.Tensor, offsets: List[int], real: Optional[torch.Tensor],
                              self_weight: float) -> torch.Tensor:
    L = x.shape[1]
    coef = coef.to(x.dtype)
    y = x * self_weight
    for s, d in enumerate(offsets):
        if d >= L:  # no edge at this scale
            continue
        flux = (x[:, d:] - x[:, :-d]) * coef[s]  # (B, L − d, C): from i + d into i
        w = _edge_weights(real, d)
        if w is not None:
            flux = flux * w
        y[:, :-d] += flux
        y[:, d:] -= flux
    return y


class _PathDiffusionFn(torch.autograd.Function):
    """Hand-written backward of :func:`path_diffusion_step` (see there)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coef: torch.Tensor, offsets: List[int], real: Optional[torch.Tensor],
                self_weight: float) -> torch.Tensor:
        ctx.offsets, ctx.self_weight = offsets, self_weight
        ctx.save_for_backward(x, coef, real)
        return _path_diffusion_step_impl(x, coef, offsets, real, self_weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, coef, real = ctx.saved_tensors
        g = g.contiguous()
        grad_x = grad_coef = None
        if ctx.needs_input_grad[0]:
            grad_x = _path_diffusion_step_impl(g, coef, ctx.offsets, real, ctx.self_weight)
        if ctx.needs_input_grad[1]:
            L = x.shape[1]
            rows = []
            for d in ctx.offsets:
                if d >= L:
                    rows.append(torch.zeros_like(coef[0]))
                    continue
                prod = (g[:, :-d] - g[:, d:]) * (x[:, d:] - x[:, :-d])
                w = _edge_weights(real, d)
                rows.append((prod if w is None else prod * w).sum((0, 1)))
            grad_coef = torch.stack(rows).to(coef.dtype)
        return grad_x, grad_coef, None, None, None


def path_laplacian_reference(a_s: torch.Tensor, offsets: Sequence[int], real: torch.Tensor) -> torch.Tensor:
    """Dense 1-D ``K`` for one channel and one sequence, ``(L, L)`` (tests only): ``K_ij = a_s`` for every pair of
    real tokens at offset ``±d_s``, ``K_ii = −Σ_j K_ij``; rows and columns of padded positions are zero."""
    n = real.shape[0]
    K = torch.zeros(n, n, dtype=a_s.dtype, device=a_s.device)
    for s, d in enumerate(offsets):
        for i in range(n):
            for j in (i - d, i + d):
                if 0 <= j < n and real[i] and real[j]:
                    K[i, j] += a_s[s]
    K -= torch.diag(K.sum(1))
    return K


def path_diameter(length: int, offsets: Sequence[int]) -> int:
    """Hop diameter of the multi-scale path graph on ``length`` tokens (breadth-first search from every token)."""
    worst = 0
    for start in range(length):
        dist = {start: 0}
        frontier = [start]
        while frontier:
            nxt = []
            for p in frontier:
                for d in offsets:
                    for q in (p - d, p + d):
                        if 0 <= q < length and q not in dist:
                            dist[q] = dist[p] + 1
                            nxt.append(q)
            frontier = nxt
        worst = max(worst, max(dist.values()))
    return worst


# --- 1-D, solved implicitly: the resolvent of an advection-diffusion step on the path -------------------------------
# (I − δt·K)⁻¹ for K = nearest-neighbour diffusion plus an upwind drift, on the infinite path, is a two-sided
# geometric kernel: g(d) = exp(−d/ℓ_left) on the tokens d steps to the left, exp(−d/ℓ_right) on those to the right
# (ℓ = −1/log r, and δt·a = r/(1 − r)² for the symmetric case: any δt > 0 is one finite ℓ, no stability bound).
# On a finite sequence the kernel is restricted to the real tokens and each row renormalised (a masked, normalised
# convolution): every row is a convex average of the sequence's real tokens, K·1 = 0 holds, padding is no node.


def path_exponential_kernel(length: int, log_scale_left: torch.Tensor, log_scale_right: torch.Tensor,
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g_left, g_right)``, each ``(length, C)``: ``g(d) = exp(−d/ℓ)`` for ``d = 0 … length − 1`` per channel,
    ``ℓ = exp(log_scale)``; row ``d`` weighs the token ``d`` steps to the left / right (``g(0) = 1``, the token).
    Weights are floored at ``e^-60`` (:func:`_decay`)."""
    d = torch.arange(length, device=log_scale_left.device, dtype=log_scale_left.dtype)[:, None]
    return _decay(-d * torch.exp(-log_scale_left)), _decay(-d * torch.exp(-log_scale_right))


# e^-60 ≈ 9e-27: a kernel weight below it moves no average (every row holds its own weight 1), while an exp that
# underflows takes x86's slow path (4x the time of the whole op) and seeds subnormals in the FFTs after it
_DECAY_FLOOR = -60.


def _decay(exponent: torch.Tensor) -> torch.Tensor:
    """``exp(exponent)`` for ``exponent ≤ 0``, floored at ``e^-60``."""
    return torch.exp(exponent.clamp_min(_DECAY_FLOOR))


def _geometric_sums(log_scale: torch.Tensor, length: int) -> torch.Tensor:
    """``S``, ``(length, C)``: ``S[m − 1] = Σ_{d=0}^{m−1} e^{−ad} = expm1(−am) / expm1(−a)`` for ``m = 1 … length``
    terms, with ``a = 1/ℓ = exp(−log_scale)`` (expm1 keeps ``ℓ ≫ length`` exact to rounding). ``a`` is floored at
    1e-30: past ~1e30 tokens the kernel is flat anyway, and ``expm1(−a)`` must not underflow (0/0)."""
    rate = torch.exp(-log_scale).clamp_min(1e-30)
    m = torch.arange(1, length + 1, device=rate.device, dtype=rate.dtype)[:, None]
    return torch.expm1(-rate * m) / torch.expm1(-rate)


def _geometric_sums_and_grad(log_scale: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``S`` (:func:`_geometric_sums`) and ``∂S/∂log_scale``, both ``(length, C)``, from one ``expm1`` of the
    ``(length, C)`` exponents (the backward needs both; ATen's float32 ``expm1`` has no vectorised CPU kernel and
    runs ~8x slower than ``exp``: it took a quarter of the implicit layer's 16k-token training step).
    ``∂S/∂a = (N·e^{−a} − m·e^{−am}·D) / D²`` (``N = expm1(−am)``, ``D = expm1(−a)``) times ``∂a/∂log_scale = −a``
    (zero where ``a`` sits on its floor). ``N`` and ``e^{−am}`` are computed afresh: rebuilt from ``S`` they lose
    two orders of precision when ``ℓ`` exceeds the length."""
    raw = torch.exp(-log_scale)
    rate = raw.clamp_min(1e-30)
    m = torch.arange(1, length + 1, device=rate.device, dtype=rate.dtype)[:, None]
    num, den = torch.expm1(-rate * m), torch.expm1(-rate)
    d_rate = (num * torch.exp(-rate) - m * _decay(-rate * m) * den) / den.square()
    return num / den, d_rate * torch.where(raw >= 1e-30, -rate, torch.zeros_like(rate))


def _row_sums(sums_left: torch.Tensor, sums_right: torch.Tensor, lengths: Optional[torch.Tensor] = None,
              ) -> torch.Tensor:
    """Row ``i``'s kernel mass ``Σ_{d ≤ i} g_left(d) + Σ_{1 ≤ d < L_b − i} g_right(d)`` from the two sides' ``S``:
    ``(L, C)`` over whole sequences of length ``L``, or ``(B, L, C)`` for sequences of ``lengths`` real tokens
    followed by padding (rows past a sequence's end are ≥ 1 and unused)."""
    if lengths is None:
        return sums_left + (sums_right.flip(0) - 1.)
    return sums_left + (sums_right[_tokens_to_the_end(lengths, sums_left.shape[0])] - 1.)


def _tokens_to_the_end(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, L)``: ``L_b − 1 − i`` (clamped at 0 past the end), the index of row ``i``'s right-hand sum in ``S``."""
    return (lengths[:, None] - 1 - torch.arange(length, device=lengths.device)).clamp_min(0)


def _path_exponential_row_sums(length: int, log_scale_left: torch.Tensor, log_scale_right: torch.Tensor,
                               lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row ``i``'s kernel mass over whole sequences (``(length, C)``) or over the ``lengths`` real tokens of
    suffix-padded ones (``(B, length, C)``), from closed-form geometric sums (:func:`_geometric_sums`): no
    cumulative sum (float64 cumulative sums of the kernel took 6 % of the CPU time of a 16k-token training step in
    the profiler) and no second convolution for the mask."""
    return _row_sums(_geometric_sums(log_scale_left, length), _geometric_sums(log_scale_right, length), lengths)


def _padding_of(lengths: Optional[torch.Tensor], length: int) -> Optional[torch.Tensor]:
    """``(B, L, 1)`` True past each sequence's ``lengths`` real tokens (the suffix mask back from its lengths)."""
    if lengths is None:
        return None
    return (torch.arange(length, device=lengths.device) >= lengths[:, None]).unsqueeze(-1)


def _suffix_lengths(padding_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The real lengths ``(B,)`` when every sequence's padding comes after its real tokens (how batches are padded),
    else None: then a row's kernel mass is a closed form of its length, not a convolution of the mask."""
    lengths = (~padding_mask).sum(1)
    suffix = torch.arange(padding_mask.shape[1], device=padding_mask.device)[None, :] >= lengths[:, None]
    return lengths if bool((suffix == padding_mask).all()) else None


def _fft_length(length: int) -> int:
    """The smallest ``n = 2^a·3^b·5^c ≥ 2L − 1``: a linear (not circular) convolution of ``L`` points on a length
    the FFT factors into small radices, up to a third fewer points than the next power of two (784 tokens: 1,600
    instead of 2,048)."""
    need = 2 * length - 1
    best = 1 << max(need - 1, 0).bit_length()
    for c in range(best.bit_length()):  # each 3^b·5^c, completed with the smallest power of two reaching `need`
        odd = 5 ** c
        while odd < best:
            n = odd
            while n < need:
                n *= 2
            best = min(best, n)
            odd *= 3
    return best


def _circular_convolution(x: torch.Tensor, spectrum: torch.Tensor, n: int) -> torch.Tensor:
    """First ``L`` points of the ``n``-point circular convolution of ``x`` ``(B, L, C or 1)`` with the kernel whose
    ``rfft`` is ``spectrum`` ``(n/2 + 1, C)``; ``n ≥ 2L − 1`` makes it the linear one."""
    return torch.fft.irfft(torch.fft.rfft(x, n=n, dim=1) * spectrum, n=n, dim=1)[:, :x.shape[1]]


class _CircularConvolutionFn(torch.autograd.Function):
    """:func:`_circular_convolution` of ``x`` with a time-domain kernel ``(n, C)``, with the backward written as two
    more convolutions (the correlation theorem): ``∂x = g ⋆ k``, ``∂k = Σ_b g ⋆ x``. Autograd through ``rfft`` runs a
    full complex transform per input; this backward needs half-size real ones only (the implicit layer's training
    step at 784 tokens and its 16k-token cost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, n: int) -> torch.Tensor:
        spectrum = torch.fft.rfft(kernel, n=n, dim=0)
        x_spectrum = torch.fft.rfft(x, n=n, dim=1)
        ctx.n, ctx.x_channels = n, x.shape[-1]
        ctx.save_for_backward(x_spectrum, spectrum)
        return torch.fft.irfft(x_spectrum * spectrum, n=n, dim=1)[:, :x.shape[1]]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_spectrum, spectrum = ctx.saved_tensors
        n, L = ctx.n, g.shape[1]
        g_spectrum = torch.fft.rfft(g, n=n, dim=1)  # g is zero past L: the padding of the forward's output slice
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft(g_spectrum * spectrum.conj(), n=n, dim=1)[:, :L]
            if ctx.x_channels == 1 and grad_x.shape[-1] != 1:  # x was broadcast over the channels
                grad_x = grad_x.sum(-1, keepdim=True)
        if ctx.needs_input_grad[1]:
            grad_kernel = torch.fft.irfft((g_spectrum * x_spectrum.conj()).sum(0), n=n, dim=0)
        return grad_x, grad_kernel, None


def _convolve(x: torch.Tensor, kernel: torch.Tensor, n: int) -> torch.Tensor:
    """The linear convolution of ``x`` with a time-domain circular ``kernel`` ``(n, C)``; its hand-written backward
    where autograd would run (the same values in every autograd mode)."""
    if _custom_backward(x, kernel):
        return _CircularConvolutionFn.apply(x, kernel, n)
    return _circular_convolution(x, torch.fft.rfft(kernel, n=n, dim=0), n)


def _circular_kernel(left: torch.Tensor, right: torch.Tensor, n: int) -> torch.Tensor:
    """The two halves in circular layout, ``(n, C)``: index ``d`` holds the weight of ``j = i − d`` (left), index
    ``n − d`` that of ``j = i + d`` (right)."""
    L, C = left.shape
    return torch.cat([left, left.new_zeros(n - 2 * L + 1, C), right[1:].flip(0)], 0)


class _ExponentialDiffusionFn(torch.autograd.Function):
    """:func:`path_exponential_diffusion` of whole or suffix-padded sequences (``lengths`` real tokens, then
    padding), ``y = (g ∗ x) / S`` on real tokens and ``y = x`` on padding, with a backward that rebuilds the kernel,
    its spectrum and the row sums from the ``(C,)`` scales and saves only ``x`` and ``y``: autograd through the
    pieces keeps two spectra, both kernel halves, the row sums and the full-length convolution output, ~9
    activations per layer (eval/results/lra/cost_saved_tensors.md). The backward pays one more FFT of ``x`` and
    one of the kernel.

    Gradients: ``∂x = g̃ ⋆ k`` and ``∂k = Σ_b g̃ ⋆ x`` (correlations, ``g̃ = ∂y / S`` on real tokens); each half's
    weight ``e^{−da}`` gives ``∂/∂log ℓ = d·a·e^{−da}``; the row sums give ``∂S = −∂y·y / S``, summed over the rows
    that read each entry of ``S``, through :func:`_geometric_sums_and_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, log_scale_left: torch.Tensor, log_scale_right: torch.Tensor,
                lengths: Optional[torch.Tensor]) -> torch.Tensor:
        L = x.shape[1]
        n = _fft_length(L)
        spectrum = torch.fft.rfft(_circular_kernel(*path_exponential_kernel(L, log_scale_left, log_scale_right), n),
                                  n=n, dim=0)
        padded = _padding_of(lengths, L)
        x_real = x if padded is None else x.masked_fill(padded, 0.)
        num = torch.fft.irfft(torch.fft.rfft(x_real, n=n, dim=1) * spectrum, n=n, dim=1)[:, :L]
        y = num / _path_exponential_row_sums(L, log_scale_left, log_scale_right, lengths)
        if padded is not None:
            y = torch.where(padded, x, y)
        ctx.n = n
        ctx.save_for_backward(x, log_scale_left, log_scale_right, y, lengths)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, log_scale_left, log_scale_right, y, lengths = ctx.saved_tensors
        n, L, C = ctx.n, x.shape[1], x.shape[2]
        left, right = path_exponential_kernel(L, log_scale_left, log_scale_right)
        spectrum = torch.fft.rfft(_circular_kernel(left, right, n), n=n, dim=0)
        (sums_left, d_sums_left), (sums_right, d_sums_right) = (_geometric_sums_and_grad(log_scale_left, L),
                                                                _geometric_sums_and_grad(log_scale_right, L))
        den = _row_sums(sums_left, sums_right, lengths)
        padded = _padding_of(lengths, L)
        g_real = g if padded is None else g.masked_fill(padded, 0.)  # padding's y is its x: no kernel behind it
        g_spectrum = torch.fft.rfft(g_real / den, n=n, dim=1)  # zero past L (the output slice)
        grad_x = grad_left = grad_right = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft(g_spectrum * spectrum.conj(), n=n, dim=1)[:, :L]
            if padded is not None:
                grad_x = torch.where(padded, g, grad_x)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x_real = x if padded is None else x.masked_fill(padded, 0.)
            grad_kernel = torch.fft.irfft((g_spectrum * torch.fft.rfft(x_real, n=n, dim=1).conj()).sum(0), n=n, dim=0)
            if lengths is None:
                grad_den = -(g * y).sum(0) / den  # (L, C)
                grad_sums_left, grad_sums_right = grad_den, grad_den.flip(0)
            else:  # row i of sequence b reads S_right at L_b − 1 − i
                grad_den = -(g_real * y) / den  # (B, L, C)
                grad_sums_left = grad_den.sum(0)
                grad_sums_right = grad_den.new_zeros(L, C).index_add_(
                    0, _tokens_to_the_end(lengths, L).reshape(-1), grad_den.reshape(-1, C))
            d = torch.arange(L, device=x.device, dtype=x.dtype)[:, None]
            # kernel index n − d holds right[d] for d = 1 … L − 1; right[0] is not in the kernel
            grad_right_kernel = torch.cat([grad_kernel.new_zeros(1, grad_kernel.shape[1]),
                                           grad_kernel[n - L + 1:].flip(0)], 0)
            grad_left = ((grad_kernel[:L] * left * d).sum(0) * torch.exp(-log_scale_left)
                         + (grad_sums_left * d_sums_left).sum(0))
            grad_right = ((grad_right_kernel * right * d).sum(0) * torch.exp(-log_scale_right)
                          + (grad_sums_right * d_sums_right).sum(0))
        return grad_x, grad_left, grad_right, None


def path_exponential_diffusion(
        x: torch.Tensor,
        log_scale_left: torch.Tensor,
        log_scale_right: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``P·H``: every token replaced by the ``g``-weighted average of its sequence's real tokens, ``(B, L, C)``.

    ``(P·H)_i = Σ_j g(i − j)·m_j·H_j / Σ_j g(i − j)·m_j`` with the two-sided kernel of
    :func:`path_exponential_kernel` and ``m_j = 1`` on real tokens. The numerator is one linear convolution, done by
    FFT on ``n ≥ 2L − 1`` points (no wrap-around), with a hand-written backward: ``O(L log L)`` per channel, never an
    ``L×L`` tensor. The denominator is the kernel's partial sums over the real tokens, ``Σ_{d ≤ i} g_left(d) +
    Σ_{1 ≤ d < L_b − i} g_right(d)``, in closed form when the padding follows the real tokens (or there is none); a
    mask with padding elsewhere takes a second convolution, of the mask. The kernel
    depends only on ``i − j``, so appended padding changes nothing. Computed in at least float32 (FFT has no
    half-precision CPU kernels; the result is a convex average, cast back to the input's dtype). Padded positions
    return their input.

    Args:
        x: ``(B, L, C)``.
        log_scale_left, log_scale_right: ``(C,)`` log length scales of the left / right halves (equal: symmetric,
            pure diffusion; unequal: a drift).
        padding_mask: ``(B, L)`` bool, True where padded; None: every token is real.
    """
    B, L, C = x.shape
    n = _fft_length(L)
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    log_scale_left, log_scale_right = log_scale_left.to(compute), log_scale_right.to(compute)
    lengths = None if padding_mask is None else _suffix_lengths(padding_mask)
    if padding_mask is None or lengths is not None:  # whole or suffix-padded sequences: closed-form row sums
        if _custom_backward(xf, log_scale_left) or _custom_backward(xf, log_scale_right):
            return _ExponentialDiffusionFn.apply(xf, log_scale_left, log_scale_right, lengths).to(x.dtype)
        kernel = _circular_kernel(*path_exponential_kernel(L, log_scale_left, log_scale_right), n)
        if lengths is None:
            return (_convolve(xf, kernel, n) / _path_exponential_row_sums(L, log_scale_left, log_scale_right)
                    ).to(x.dtype)
        padded = padding_mask.unsqueeze(-1)
        num = _convolve(xf.masked_fill(padded, 0.), kernel, n)
        out = num / _path_exponential_row_sums(L, log_scale_left, log_scale_right, lengths)
        return torch.where(padded, xf, out).to(x.dtype)
    # padding anywhere else: the row sums are a second convolution, of the mask
    kernel = _circular_kernel(*path_exponential_kernel(L, log_scale_left, log_scale_right), n)
    real = (~padding_mask).to(xf.dtype).unsqueeze(-1)  # (B, L, 1)
    num = _convolve(xf * real, kernel, n)
    den = _convolve(real, kernel, n)
    # a real token's own weight is 1, so den ≥ 1 up to rounding there; padded rows (den may be ~0) keep x
    out = torch.where(padding_mask.unsqueeze(-1), xf, num / den.clamp_min(1e-6))
    return out.to(x.dtype)


def path_exponential_diffusion_reference(
        log_scale_left: torch.Tensor,
        log_scale_right: torch.Tensor,
        real: torch.Tensor,
) -> torch.Tensor:
    """Dense ``P`` per channel, ``(C, L, L)``, for one sequence with real tokens ``real`` ``(L,)`` (tests only):
    ``P_ij ∝ g(i − j)`` over real ``j``, rows of real tokens summing to one; padded rows are the identity."""
    L = real.shape[0]
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    d = (i - j).to(log_scale_left.dtype)  # > 0: j left of i
    scale = torch.where(d[None] >= 0, torch.exp(log_scale_left)[:, None, None], torch.exp(log_scale_right)[:, None, None])
    g = torch.exp(-d.abs()[None] / scale) * real.to(d.dtype)[None, None, :]
    P = g / g.sum(-1, keepdim=True)
    eye = torch.eye(L, dtype=P.dtype)
    return torch.where(real[None, :, None], P, eye[None])


# --- 1-D, selective: the implicit step with token-dependent conductances ---------------------------------------------
# With a conductance per edge that depends on the tokens, the path graph's resolvent (I − δt·K)⁻¹ is no longer a
# convolution, but its kernel keeps a product form: the weight of token j in row i is the product of per-edge decays
# between them, exp(−Σ_{edges e between i and j} λ_e) (a semiseparable matrix, the inverse of a tridiagonal one). A
# large λ_e is a wall the average does not cross; λ_e = 1/ℓ on every edge is the stationary kernel above. Each side
# is a first-order linear recurrence, h_i = e^{−λ_i}·h_{i−1} + z_i: a scan, O(L) per channel.

# λ ≤ 10 per edge (a weight of 5e-5 across one such edge, 2e-9 across two: a wall) keeps a chunk's cumulative
# exponent within 80, and centring it on the chunk's middle keeps every factor within e^±40 in float32
SELECTIVE_MAX_RATE = 10.
_SCAN_CHUNK = 8


def _decayed_scan_forward(z: torch.Tensor, rate: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``h_i = e^{−rate_i}·h_{i−1} + z_i`` along dim 1 (``h_{−1} = 0``), ``(B, L, C)``, ``0 ≤ rate ≤ 10``;
    ``reverse``: ``h_i = e^{−rate_{i+1}}·h_{i+1} + z_i`` (``rate`` still indexed by the edge's right token). Inside
    chunks of 8 tokens, ``h_i = e^{−G_i}·(h_start + Σ_{j ≤ i} e^{G_j}·z_j)`` with ``G`` the chunk's cumulative rate,
    centred on its middle (parallel over tokens); across chunks one step per chunk carries the state."""
    if reverse:  # the reversed sequence's edge into token i' is the original edge L − i'
        rate = torch.cat([rate.new_zeros(rate.shape[0], 1, rate.shape[2]), rate.flip(1)[:, :-1]], 1)
        return _decayed_scan_forward(z.flip(1), rate).flip(1)
    B, L, C = z.shape
    c = _SCAN_CHUNK
    n = -(-L // c)
    if n * c != L:
        z, rate = F.pad(z, (0, 0, 0, n * c - L)), F.pad(rate, (0, 0, 0, n * c - L))
    g = rate.reshape(B, n, c, C).cumsum(2)
    g_mid = g[:, :, c // 2 - 1:c // 2]
    decay_to = torch.exp(g_mid - g)  # e^{−(G_i − G_mid)}
    local = decay_to * (torch.exp(g - g_mid) * z.reshape(B, n, c, C)).cumsum(2)  # the chunk's own tokens
    decay_to = decay_to * torch.exp(-g_mid)  # e^{−G_i}: from the state before the chunk to token i
    through, own = decay_to[:, :, -1].unbind(1), local[:, :, -1].unbind(1)
    states, state = [], z.new_zeros(B, C)
    for k in range(n):  # the state entering chunk k
        states.append(state)
        state = through[k] * state + own[k]
    h = local + decay_to * torch.stack(states, 1).unsqueeze(2)
    return h.reshape(B, n * c, C)[:, :L]


class _DecayedScanFn(torch.autograd.Function):
    """:func:`_decayed_scan_forward` with the adjoint recurrence as its backward: ``∂z`` is the same scan run the
    other way over the incoming gradient, ``∂rate_i = −e^{−rate_i}·∂z_i·h_{i−1}`` (``h_{i+1}`` when reversed).
    Saves ``h`` and the rates; autograd through the chunked form kept a dozen full-size tensors and zero-filled one
    per chunk in its backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, rate: torch.Tensor, reverse: bool) -> torch.Tensor:
        h = _decayed_scan_forward(z, rate, reverse)
        ctx.reverse = reverse
        ctx.save_for_backward(h, rate)
        return h

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, rate = ctx.saved_tensors
        grad_z = _decayed_scan_forward(g, rate, not ctx.reverse)
        grad_rate = None
        if ctx.needs_input_grad[1]:
            zero = h.new_zeros(h.shape[0], 1, h.shape[2])
            if ctx.reverse:  # edge i joins h_i to h_{i−1}, which received it: h_{i−1} = a_i·h_i + z_{i−1}
                grad_rate = torch.cat([zero, -torch.exp(-rate[:, 1:]) * grad_z[:, :-1] * h[:, 1:]], 1)
            else:
                grad_rate = torch.cat([zero, -torch.exp(-rate[:, 1:]) * grad_z[:, 1:] * h[:, :-1]], 1)
        return grad_z, grad_rate, None


def _decayed_scan(z: torch.Tensor, rate: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """:func:`_decayed_scan_forward`, with its hand-written backward where autograd would run (same values)."""
    if _custom_backward(z, rate):
        return _DecayedScanFn.apply(z, rate, reverse)
    return _decayed_scan_forward(z, rate, reverse)


def selective_path_diffusion(
        x: torch.Tensor,
        rate_left: torch.Tensor,
        rate_right: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``P·H`` with a token-dependent kernel: every token replaced by a weighted average of its sequence's real
    tokens, ``(B, L, C)``.

    ``(P·H)_i = Σ_j w_ij·m_j·H_j / Σ_j w_ij·m_j``, ``w_ij = exp(−Σ_{k=j+1}^{i} λ^left_k)`` for ``j ≤ i`` and
    ``exp(−Σ_{k=i+1}^{j} λ^right_k)`` for ``j > i``: ``λ_k`` belongs to the edge between tokens ``k − 1`` and
    ``k`` (``rate_*[:, k]``; ``rate_*[:, 0]`` is unused). Rates are clamped to ``[0, 10]``. One scan per side (numerator and
    denominator run as one), at least float32, with a hand-written backward; never an ``L×L`` tensor. A real row never reaches past padding it cannot see: padded tokens weigh zero, and appended
    padding changes nothing. Padded positions return their input.

    Args:
        x: ``(B, L, C)``.
        rate_left, rate_right: ``(B, L, C)`` non-negative decay rates per edge for looking left / right (equal:
            a symmetric kernel).
        padding_mask: ``(B, L)`` bool, True where padded; None: every token is real.
    """
    B, L, C = x.shape
    compute = torch.promote_types(x.dtype, torch.float32)
    real = x.new_ones(B, L, 1, dtype=compute) if padding_mask is None else (~padding_mask).to(compute).unsqueeze(-1)
    z = torch.cat([x.to(compute) * real, real.expand(B, L, C)], -1)  # numerator and denominator, one scan
    left = _decayed_scan(z, rate_left.to(compute).clamp(0., SELECTIVE_MAX_RATE).repeat(1, 1, 2))
    right = _decayed_scan(z, rate_right.to(compute).clamp(0., SELECTIVE_MAX_RATE).repeat(1, 1, 2), reverse=True)
    num, den = (left + right - z).split(C, -1)  # the right scan includes the token itself: count it once
    out = num / den.clamp_min(1e-30)
    if padding_mask is not None:
        out = torch.where(padding_mask.unsqueeze(-1), x.to(compute), out)
    return out.to(x.dtype)


def selective_path_diffusion_reference(rate_left: torch.Tensor, rate_right: torch.Tensor,
                                       real: torch.Tensor) -> torch.Tensor:
    """Dense ``P`` per channel, ``(C, L, L)``, for one sequence (``rate_*`` ``(L, C)``, ``real`` ``(L,)``; tests
    only): ``P_ij ∝ exp(−Σ rates of the edges between i and j)`` over real ``j``; padded rows are the identity."""
    L = real.shape[0]
    cl = torch.cat([rate_left.new_zeros(1, rate_left.shape[1]), rate_left[1:].clamp(0., SELECTIVE_MAX_RATE)]).cumsum(0)
    cr = torch.cat([rate_right.new_zeros(1, rate_right.shape[1]), rate_right[1:].clamp(0., SELECTIVE_MAX_RATE)]).cumsum(0)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    # Σ_{k=j+1}^{i} λ_k = C_i − C_j (left, j ≤ i); Σ_{k=i+1}^{j} λ_k = C_j − C_i (right, j > i)
    expo = torch.where((j <= i)[None], (cl.T[:, :, None] - cl.T[:, None, :]), (cr.T[:, None, :] - cr.T[:, :, None]))
    w = torch.exp(-expo) * real.to(expo.dtype)[None, None, :]
    P = w / w.sum(-1, keepdim=True)
    eye = torch.eye(L, dtype=P.dtype)
    return torch.where(real[None, :, None], P, eye[None])


# --- 2-D: the implicit step along rows, then along columns (ADI) ----------------------------------------------------
# (I − δt·K_cols)⁻¹(I − δt·K_rows)⁻¹ on the token grid: the 1-D resolvent above along each axis. Its kernel is the
# product g(Δi)·g(Δj) = exp(−(|Δi| + |Δj|)/ℓ), and the normalisation factorises with it, so the two 1-D passes are
# exactly the masked, normalised 2-D convolution: every token a convex average of the whole grid after one step.


def grid_exponential_diffusion(x: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``P·H`` on a channels-last token grid ``(B, h, w, C)``: every token replaced by its ``g``-weighted average
    over the grid, ``g = exp(−(|Δi| + |Δj|)/ℓ)`` per channel (``ℓ = exp(log_scale)``, ``(C,)``), renormalised at
    the borders. Two passes of :func:`path_exponential_diffusion`, along the rows then along the columns:
    ``O(N log N)`` per channel for ``N = h·w`` tokens, never an ``N×N`` (or ``h×h``) tensor."""
    B, h, w, C = x.shape
    rows = path_exponential_diffusion(x.reshape(B * h, w, C), log_scale, log_scale)
    cols = rows.reshape(B, h, w, C).transpose(1, 2).reshape(B * w, h, C)
    return path_exponential_diffusion(cols, log_scale, log_scale).reshape(B, w, h, C).transpose(1, 2)


def grid_exponential_diffusion_reference(log_scale: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Dense ``P`` per channel, ``(C, N, N)`` over the row-major tokens (tests only): ``P_pq ∝ g(p − q)`` over the
    whole grid, rows summing to one."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    d = ((i.reshape(-1, 1) - i.reshape(1, -1)).abs() + (j.reshape(-1, 1) - j.reshape(1, -1)).abs())
    g = torch.exp(-d.to(log_scale.dtype)[None] / torch.exp(log_scale)[:, None, None])
    return g / g.sum(-1, keepdim=True)


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = [1, x', x'⊗x'/√2]`` with ``x' = x / d^¼``, ``(…, d) -> (…, 1 + d + d²)``: then
    ``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q·k/√d``, the second-order Taylor form of ``exp(s)`` (as in Based), which
    is ``≥ 1/2`` for every ``s``: a positive kernel for A_diff, as selective as softmax where ``|s|`` is small."""
    x = x * x.shape[-1] ** -0.25
    # the outer product as a matmul of (d, 1) by (1, d): its backward is two matmuls, where a broadcast multiply's
    # is a multiply and a reduction per operand (fwd + bwd of the map 337 -> 256 ms at 32 x 4 heads x 1024 x 8)
    outer = (x.unsqueeze(-1) @ (x * 0.5 ** 0.5).unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], -1)


# --- A_diff with the softmax kernel inside fixed chunks: selective like attention, linear in L -----------------------
# Global mixing comes from the exact diffusion step (one layer reaches every token); A_diff adds the content-selective
# part within a chunk, as Mega pairs its EMA with chunked attention. Chunks are fixed from position 0, so appended
# padding moves no real token between chunks.


def chunked_softmax_diffusion_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk_size: int,
        key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(D⁻¹W − I)·V`` with ``w_ij = exp(q_i·k_j/√d)`` when ``i`` and ``j`` share a chunk of ``chunk_size`` tokens
    (``⌊i/c⌋ = ⌊j/c⌋``) and ``j`` is real, else ``0``: rows sum to zero, ``O(L·c)`` time and memory.

    Args:
        q, k, v: ``(B, heads, L, d)``.
        chunk_size: Tokens per chunk ``c`` (the last chunk is padded inside; those keys get no weight).
        key_padding_mask: ``(B, L)`` bool, True where padded: those tokens are no keys (a padded query attends to
            itself only, so no row is empty; its output is ``0``).
    """
    B, H, L, d = q.shape
    c = min(chunk_size, L)
    pad = (-L) % c
    n = (L + pad) // c
    padded = key_padding_mask
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if padded is None:
            padded = torch.zeros(B, L, dtype=torch.bool, device=q.device)
        padded = F.pad(padded, (0, pad), value=True)

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (B, H, n·c, d) -> (B·n, H, c, d)
        return t.view(B, H, n, c, d).transpose(1, 2).reshape(B * n, H, c, d)

    mask = None
    if padded is not None:
        own = torch.eye(c, dtype=torch.bool, device=q.device)
        mask = (~padded).view(B * n, 1, 1, c) | own  # (B·n, 1, c, c)
    y = F.scaled_dot_product_attention(chunks(q), chunks(k), chunks(v), attn_mask=mask) - chunks(v)
    return y.view(B, n, H, c, d).transpose(1, 2).reshape(B, H, n * c, d)[:, :, :L]


def chunked_softmax_diffusion_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk_size: int,
        key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense form of :func:`chunked_softmax_diffusion_attention` with the ``L×L`` matrix built explicitly (tests
    only)."""
    L, d = q.shape[-2:]
    chunk = torch.arange(L, device=q.device) // chunk_size
    allowed = (chunk[:, None] == chunk[None, :])[None, None]  # (1, 1, L, L)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=q.device)
    w = torch.exp((q @ k.transpose(-2, -1)) / d ** 0.5) * allowed
    return (w / w.sum(-1, keepdim=True)) @ v - v
