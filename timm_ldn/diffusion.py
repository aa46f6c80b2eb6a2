"""Diffusion operators of Linear Diffusion Networks (the math of ``LDN_SPEC.md`` in one place).

One LDN layer is one explicit-Euler step of ``dH/dt = K·H + A_diff(H) + F(H)`` over the token grid.
This module holds the two diffusion operators and their dense reference forms:

* ``K``: a learned, multi-scale, no-flux graph Laplacian on the ``h×w`` grid (rows and columns sum to zero).
  ``primary_diffusion`` is the readable form (one depthwise stencil conv plus an exact border correction);
  the model runs ``diffusion_step``: the same sum as 13 shifted multiply-adds on CPU, or the conv with the
  residual folded in elsewhere (and under tracing exporters).
* ``A_diff``: content-dependent global diffusion ``(D⁻¹W − I)·V`` with ``w_ij = φ(q_i)·φ(k_j)``, computed in
  linear time as ``φ(Q)(φ(K)ᵀV)`` — the ``N×N`` matrix ``W`` is never formed. ``linear_diffusion_attention``
  is the readable form; the model runs ``packed_linear_diffusion_attention`` (same math on the fused qkv).

Token maps are channels-last (``B×h×w×C``) throughout, the layout the linear layers of a block want.
The dense ``*_reference`` functions build the spec's matrices explicitly; they exist for tests and are
``O(N²)`` in memory, never use them in a model.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from timm.layers import register_notrace_function

__all__ = [
    'DEFAULT_OFFSETS', 'MAX_STEP_FRACTION', 'stencil_basis', 'diffusion_coefficients', 'time_step', 'border_correction',
    'primary_diffusion', 'laplacian_reference', 'positive_feature_map', 'linear_diffusion_attention',
    'softmax_diffusion_attention', 'diffusion_attention_reference', 'grid_diameter',
    'diffusion_step', 'packed_linear_diffusion_attention', 'per_sample_diffusion_step',
    'per_sample_diffusion_coefficients', 'FEATURE_MAPS', 'feature_map', 'DIFFUSION_METHODS',
]

# Dilated 4-neighbourhoods at offsets 1, 2, 4: the 14×14 grid of a 224 px image has diameter 8 (Theorem 1).
DEFAULT_OFFSETS: Tuple[int, ...] = (1, 2, 4)
NEIGHBOURS_PER_SCALE = 4  # ±d along each of the two grid axes
MAX_STEP_FRACTION = 0.99  # largest δt as a fraction of the explicit-Euler limit
DIFFUSION_METHODS: Tuple[str, ...] = ('auto', 'conv', 'shift', 'sep')  # implementations of diffusion_step


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


def diffusion_coefficients(a_raw: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Per-scale edge weights of one diffusion step, ``δt·a_s``, shape ``(S, C)``.

    ``a_s = softplus(a_raw_s) ≥ 0``; the result is non-negative and ``Σ_s |N_s|·δt·a_s = 0.99·sigmoid(τ) < 1``.
    """
    a = F.softplus(a_raw)
    return a * time_step(a, tau)


def per_sample_diffusion_coefficients(a_raw: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """:func:`diffusion_coefficients` for a per-sample ``τ`` of shape ``(B, C)`` (input-dependent time step):
    ``(B, S, C)``. Only ``sigmoid(τ)`` varies between samples, so every sample's step keeps the same bound."""
    a = F.softplus(a_raw)
    return a.unsqueeze(0) * time_step(a, tau).unsqueeze(1)


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


def primary_diffusion(
        x: torch.Tensor,
        coef: torch.Tensor,
        basis: torch.Tensor,
        offsets: List[int],
) -> torch.Tensor:
    """The update ``δt·K(H)`` of one primary diffusion step on a channels-last token map.

    ``K(H)_i = Σ_s Σ_{j∈N_s(i)} a_s ⊙ (H_j − H_i)`` over in-grid neighbours only. All scales are folded
    into one depthwise ``k×k`` convolution (one pass over the tokens) plus the border correction.

    Args:
        x: Token map ``(B, h, w, C)``.
        coef: ``δt·a_s`` from :func:`diffusion_coefficients`, ``(S, C)``.
        basis: :func:`stencil_basis` for ``offsets``, ``(S, k, k)``.
        offsets: Grid offsets of the scales.
    Returns:
        ``δt·K(H)``, same shape as ``x``.
    """
    B, H, W, C = x.shape
    radius = (basis.shape[-1] - 1) // 2
    size = basis.shape[-1]
    weight = (coef.t() @ basis.reshape(basis.shape[0], -1)).reshape(C, 1, size, size).to(x.dtype)
    # NHWC -> NCHW view is channels_last in memory: the depthwise conv runs without a layout copy
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, padding=radius, groups=C).permute(0, 2, 3, 1)
    return torch.addcmul(y, x, border_correction(coef, offsets, H, W).to(x.dtype))


@register_notrace_function  # device-dependent branch: an FX leaf
def diffusion_step(
        x: torch.Tensor,
        coef: torch.Tensor,
        basis: torch.Tensor,
        offsets: List[int],
        method: str = 'auto',
        self_weight: float = 1.,
) -> torch.Tensor:
    """The whole primary-diffusion update ``H + δt·K(H)`` (fast path; same math as ``x + primary_diffusion``).

    ``self_weight`` scales the identity: ``1`` (default) gives the step, ``0`` the update ``δt·K(H)`` alone
    (what drop-path training needs as a separate branch).

    Three implementations of the same sum:

    * ``'conv'``: the identity is folded into the stencil's centre tap, so one depthwise ``k×k`` conv yields
      ``(I + δt·K_zero-padded)·H`` and the border correction is added in place on the fresh conv output (conv's
      backward needs only its input and weight, so the in-place add is autograd-safe). One library kernel on GPU,
      but ``k² = 81`` taps where the stencil has 13: the slowest form on CPU.
    * ``'shift'``: ``centre ⊙ H`` then one in-place ``addcmul_`` per neighbour direction on shifted slices,
      13 taps. Out-of-grid neighbours simply have no slice, and the centre weight
      ``1 − Σ_s (#in-grid neighbours)·δt·a_s`` carries the no-flux rule. Fastest on one CPU thread, with a
      hand-written backward; each pass is its own OpenMP region, though.
    * ``'sep'``: the plus-shaped stencil as a ``1×k`` conv (with the centre tap) plus a ``k×1`` conv, then the
      border correction: ``2k`` taps in 4 parallel regions.

    ``'auto'`` picks ``'conv'`` on GPU and for compiled CPU inference, ``'shift'`` otherwise on CPU. Measured on an
    idle 2-core machine (``python eval/diffusion_forms.py`` -> ``eval/results/diffusion_forms.md``): ``'conv'`` is
    the slowest eager CPU form (forward + backward 3–6× the others); ``'shift'`` is the fastest forward + backward
    at 1 and 2 threads, and in the whole ldn_small it ties ``'sep'`` at 224 / 1024 px inference and wins the
    training step. (An earlier rule sent 2+ threads to ``'conv'``: on busy shared cores each of the shifted
    step's passes waits at a barrier for a descheduled thread, but on an idle machine that rule was the slowest.)
    Tracing exporters get ``'conv'`` for ``'shift'``.
    """
    # tracing exporters (ONNX, jit.trace, torch.export) would freeze the shifted slices' bounds to the example
    # grid and silently give wrong results at other sizes: they always get the shape-generic conv form
    if method not in ('auto', 'conv', 'shift', 'sep'):  # = DIFFUSION_METHODS (TorchScript takes no global tuple)
        raise ValueError('diffusion method must be one of auto, conv, shift, sep; got ' + method + '.')
    if method == 'auto':
        method = _auto_method(x)
    if method == 'shift' and not _exporting():
        return _shifted_diffusion_step(x, coef, offsets, self_weight)
    if method == 'sep':
        return _separable_diffusion_step(x, coef, basis, offsets, self_weight)
    B, H, W, C = x.shape
    size = basis.shape[-1]
    radius = (size - 1) // 2
    weight = coef.t() @ basis.reshape(basis.shape[0], -1)  # (C, k·k)
    centre = radius * size + radius
    identity = (torch.arange(size * size, device=x.device) == centre).to(weight.dtype)  # one-hot centre tap
    weight = (weight + self_weight * identity).reshape(C, 1, size, size).to(x.dtype)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, padding=radius, groups=C).permute(0, 2, 3, 1)
    return y.addcmul_(x, border_correction(coef, offsets, H, W).to(x.dtype))


def _separable_diffusion_step(
        x: torch.Tensor,
        coef: torch.Tensor,
        basis: torch.Tensor,
        offsets: List[int],
        self_weight: float,
) -> torch.Tensor:
    """The plus-shaped stencil as a ``1×k`` and a ``k×1`` depthwise conv: ``2k`` taps instead of ``k²``."""
    B, H, W, C = x.shape
    size = basis.shape[-1]
    radius = (size - 1) // 2
    weight = (coef.t() @ basis.reshape(basis.shape[0], -1)).reshape(C, size, size)
    centre = (torch.arange(size, device=x.device) == radius).to(weight.dtype)
    # the centre tap (identity and −4Σδt·a_s) rides in the row conv; the column conv skips it
    row = (weight[:, radius, :] + self_weight * centre).reshape(C, 1, 1, size).to(x.dtype)
    col = (weight[:, :, radius] * (1. - centre)).reshape(C, 1, size, 1).to(x.dtype)
    xc = x.permute(0, 3, 1, 2)  # channels_last view: no layout copy
    y = F.conv2d(xc, row, padding=(0, radius), groups=C)
    y = y + F.conv2d(xc, col, padding=(radius, 0), groups=C)
    return y.permute(0, 2, 3, 1).addcmul_(x, border_correction(coef, offsets, H, W).to(x.dtype))


def per_sample_diffusion_step(
        x: torch.Tensor,
        coef: torch.Tensor,
        offsets: List[int],
        self_weight: float = 1.,
) -> torch.Tensor:
    """``self_weight·H + δt·K(H)`` with per-sample coefficients ``coef`` of shape ``(B, S, C)``.

    Same sum as :func:`diffusion_step` (centre weight carries the no-flux rule, one shifted multiply-add per
    neighbour direction), for a time step that depends on the input; plain autograd.
    """
    B, H, W, C = x.shape
    coef = coef.to(x.dtype)
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    d = torch.tensor(offsets, device=x.device)
    row_missing = (rows[:, None] < d).to(x.dtype) + (rows[:, None] >= H - d).to(x.dtype)  # (h, S)
    col_missing = (cols[:, None] < d).to(x.dtype) + (cols[:, None] >= W - d).to(x.dtype)  # (w, S)
    missing = (row_missing @ coef).unsqueeze(2) + (col_missing @ coef).unsqueeze(1)  # (B, h, w, C)
    centre = missing + (self_weight - 4. * coef.sum(1)).view(B, 1, 1, C)
    y = x * centre
    for s, dd in enumerate(offsets):
        c = coef[:, s].view(B, 1, 1, C)
        y[:, dd:] += x[:, :-dd] * c
        y[:, :-dd] += x[:, dd:] * c
        y[:, :, dd:] += x[:, :, :-dd] * c
        y[:, :, :-dd] += x[:, :, dd:] * c
    return y


def _auto_method(x: torch.Tensor) -> str:
    """GPU: the dense conv (one library kernel). CPU: the shifted step, except compiled inference, which takes the
    conv: inductor's loop for the 13 in-place slice updates ran slower than eager (one check, ldn_small 224 px b8,
    1 thread on a busy machine: compiled shift 1637 ms, sep 1386, conv 1348, eager 1522; the compile table in
    ``eval/results/benchmark_cpu_compile.md`` is with this rule). Eager forms: ``eval/results/diffusion_forms.md``."""
    if x.device.type != 'cpu':
        return 'conv'
    if _compiling() and not torch.is_grad_enabled():
        return 'conv'
    return 'shift'


@torch.jit.unused
def _functorch_active() -> bool:
    """True inside torch.func transforms (vmap, jacrev, grad): the hand-written autograd Functions below have no
    functorch rules, so those transforms take the plain autograd path (same values)."""
    return torch._C._are_functorch_transforms_active()


def _shifted_diffusion_step(x: torch.Tensor, coef: torch.Tensor, offsets: List[int], self_weight: float) -> torch.Tensor:
    if (not torch.jit.is_scripting() and torch.is_grad_enabled() and (x.requires_grad or coef.requires_grad)
            and not _functorch_active()):
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
    """Hop diameter of the multi-scale neighbourhood graph on an ``h×w`` grid (breadth-first search)."""
    def axis_diameter(n: int) -> int:
        worst = 0
        for start in range(n):
            dist = {start: 0}
            frontier = [start]
            while frontier:
                nxt = []
                for p in frontier:
                    for d in offsets:
                        for q in (p - d, p + d):
                            if 0 <= q < n and q not in dist:
                                dist[q] = dist[p] + 1
                                nxt.append(q)
                frontier = nxt
            worst = max(worst, max(dist.values()))
        return worst
    # moves change one axis at a time, so the grid's hop distance is the sum of the axis distances
    return axis_diameter(height) + axis_diameter(width)


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
    if not torch.jit.is_scripting() and torch.is_grad_enabled() and x.requires_grad and not _functorch_active():
        return _positive_feature_map_autograd(x)
    if torch.is_grad_enabled() and x.requires_grad:  # plain autograd: no in-place ops on tensors autograd saves
        return x.clamp_min(0.) + x.clamp_max(0.).exp()
    return _positive_feature_map_forward(x)


# φ choices: 'elu' = elu+1 (default, fast packed path), 'relu' = relu + 1e-3 (sparse, strictly positive),
# 'softplus' (smooth, positive). All keep w_ij > 0, so D⁻¹W is a row-stochastic averaging operator.
FEATURE_MAPS: Tuple[str, ...] = ('elu', 'relu', 'softplus')


def feature_map(x: torch.Tensor, name: str = 'elu') -> torch.Tensor:
    """The positive feature map φ named ``name`` (one of :data:`FEATURE_MAPS`)."""
    if name == 'elu':
        return positive_feature_map(x)
    if name == 'relu':
        return F.relu(x) + 1e-3  # the floor keeps every w_ij, and so the normaliser, strictly positive
    if name == 'softplus':
        return F.softplus(x)
    raise ValueError('unknown feature map ' + name + ', use one of elu, relu, softplus.')


def linear_diffusion_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: str = 'elu') -> torch.Tensor:
    """``A_diff(U) = (D⁻¹W − I)·V`` with ``w_ij = φ(q_i)·φ(k_j)``, in ``O(N·d²)`` per head.

    Args:
        q, k, v: ``(B, heads, N, d)``.
        phi: Name of the positive feature map φ (:data:`FEATURE_MAPS`).
    Returns:
        ``Σ_j w_ij (v_j − v_i) / Σ_j w_ij`` for every token, ``(B, heads, N, d)``. Rows of ``D⁻¹W − I`` sum to
        zero, so a constant ``V`` gives exactly ``0`` up to rounding.
    """
    q = feature_map(q, phi)
    # 1/N keeps φ(K)ᵀV and Σφ(K) O(1) at any resolution (fp16 range); it cancels in the ratio
    k = feature_map(k, phi) * (1. / k.shape[-2])
    kv = k.transpose(-2, -1) @ v  # (B, heads, d, d): the only global summary, never N×N
    normalizer = q @ k.sum(-2).unsqueeze(-1)  # (B, heads, N, 1) = (W·1)_i, strictly positive
    return (q @ kv) / normalizer - v


def _exporting() -> bool:
    """True under ONNX export, ``torch.jit.trace`` or ``torch.export`` (never while scripting)."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _compiling() -> bool:
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_compiling()


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` that TorchScript can compile (the call itself is not scriptable)."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.onnx.is_in_onnx_export()


@register_notrace_function  # φ branches on requires_grad: keep the whole op an FX leaf
def packed_linear_diffusion_attention(qkv: torch.Tensor, num_heads: int, inplace: bool = False) -> torch.Tensor:
    """:func:`linear_diffusion_attention` straight from the fused qkv projection, ``(B, N, 3C) -> (B, N, C)``.

    Same math, fewer passes and layout round trips (the fast path the model uses):

    * φ runs once over the contiguous ``[q | k]`` half of the projection, before any head permute;
    * the normaliser ``φ(K)ᵀ1`` rides along as an extra column of ``φ(K)ᵀV`` (a ``d×(d+1)`` matrix per head),
      so ``φ(Q)`` is read by a single batched matmul that yields numerator and denominator together;
    * the ``1/N`` scale is applied to that tiny matrix instead of to ``φ(K)``;
    * q, k and v stay strided views of the projection: the batched matmuls run per sample (or per head), where
      each matrix is one BLAS-readable stride, instead of a 4-D matmul that would copy all three first;
    * the last elementwise op writes ``v − num/den`` token-major, into its slice of the ``(B, N, C)`` output
      without autograd (one stack assembles it with autograd), and one in-place negation flips the sign: exact,
      and far cheaper than a transposing copy.

    Args:
        qkv: ``(B, N, 3C)`` output of the qkv projection, ``[q | k | v]`` with heads contiguous in each third.
        num_heads: Number of heads ``h``, ``d = C / h``.
        inplace: Overwrite the ``[q | k]`` part of ``qkv`` with φ(q), φ(k) instead of allocating (only without
            autograd, and only when the caller owns ``qkv``): large CPU temporaries cost page faults in glibc.
    Returns:
        ``A_diff`` in token-major layout ``(B, N, C)``, contiguous, heads concatenated along channels.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qk = qkv[..., :2 * C]
    if inplace:
        e = qk.clamp_max(0.).exp_()
        qk = qk.clamp_min_(0.).add_(e)  # = positive_feature_map(qk), written over the projection
    else:
        qk = positive_feature_map(qk)
    q = qk[..., :C].view(B, N, num_heads, d)  # token-major views: (b, h) is not one stride, so no 4-D matmul
    k = qk[..., C:].view(B, N, num_heads, d)
    v = qkv[..., 2 * C:].view(B, N, num_heads, d)
    k_sum = k.sum(1)  # (B, heads, d): φ(K)ᵀ1 of every head at once
    # Each (sample, head) matrix is a strided view the BLAS reads as is; a 4-D matmul would first flatten (b, h)
    # into one batch dim, which these strides do not allow, and so copy q, k and v. Batched matmuls over the
    # smaller of the two dims take the views directly (one bmm per sample, or per head).
    # traced or compiled graphs unroll this loop: there it runs over heads, which the batch size cannot change
    # (graphs also get no out= into strided views, which dynamo does not take)
    eager = not _exporting() and not _compiling()
    per_sample = eager and B <= num_heads  # no batch-size guard in graphs
    groups = B if per_sample else num_heads
    onnx = _in_onnx_export()
    out: Optional[torch.Tensor] = None
    if eager and not torch.is_grad_enabled():
        out = torch.empty(B, N, C, dtype=qkv.dtype, device=qkv.device)
    parts: List[torch.Tensor] = []
    for i in range(groups):
        if per_sample:  # (heads, N, d) views of sample i
            q_g, k_g, v_g, ks_g = q[i].transpose(0, 1), k[i].transpose(0, 1), v[i].transpose(0, 1), k_sum[i]
        else:  # (B, N, d) views of head i
            q_g, k_g, v_g, ks_g = q[:, :, i], k[:, :, i], v[:, :, i], k_sum[:, i]
        # [φ(K)ᵀV | φ(K)ᵀ1] / N: (G, d, d+1); the normaliser rides along as an extra column
        kv = torch.cat([torch.bmm(k_g.transpose(1, 2), v_g), ks_g.unsqueeze(-1)], dim=-1) * (1. / N)
        y = torch.bmm(q_g, kv)  # (G, N, d+1): numerator and denominator of every token in one matmul
        if out is not None:  # no autograd: written straight into its slice of the token-major output
            o = out.view(B, N, num_heads, d)
            o_g = o[i].transpose(0, 1) if per_sample else o[:, :, i]
            torch.addcdiv(v_g, y[..., :d], y[..., d:], value=-1., out=o_g)  # v − num/den = −A_diff
        else:
            if onnx:  # TorchScript ONNX exporter (timm's onnx_export.py default) lacks addcdiv
                a = y[..., :d] / y[..., d:] - v_g  # A_diff itself
            else:
                a = torch.addcdiv(v_g, y[..., :d], y[..., d:], value=-1.)
            parts.append(a.transpose(0, 1) if per_sample else a)
    if out is None:  # autograd: one stack assembles (B, N, heads, d) token-major
        out = torch.stack(parts, dim=0 if per_sample else 2).reshape(B, N, C)
        if onnx:
            return out
    # −A_diff → A_diff in place: exact, one pass (addcdiv's backward never reads its output: autograd-safe)
    return out.neg_()


def softmax_diffusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact variant ``w_ij = exp(q_i·k_j/√d)``: softmax attention minus identity (``O(N²)``, fused SDPA)."""
    return F.scaled_dot_product_attention(q, k, v) - v


def diffusion_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel: str = 'linear',
        phi: str = 'elu',
) -> torch.Tensor:
    """Dense ``(D⁻¹W − I)·V`` with the ``N×N`` matrix built explicitly (tests only)."""
    if kernel == 'linear':
        w = feature_map(q, phi) @ feature_map(k, phi).transpose(-2, -1)
    else:
        w = torch.exp((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5)
    degree = w.sum(-1, keepdim=True)
    return (w / degree) @ v - v
