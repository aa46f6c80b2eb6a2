""" Linear Diffusion Networks (LDN) for timm

Each block is one explicit-Euler step of ``dH/dt = K·H + A_diff(H) + F(H)`` over the grid of patch tokens:

    H ← H + δt ⊙ K(H)                      primary diffusion (multi-scale no-flux Laplacian, learned δt)
    H ← H + γ ⊙ W_o · A_diff(LN(H))        diffusion-based attention, linear in the token count
    H ← H + F(LN(H))                        local update (MLP, 3×3 depthwise conv on its hidden layer)

The operators live in ``timm_ldn.diffusion``; this file assembles them into a timm model.
Tokens stay channels-last (``B×h×w×C``) through every block: linear layers act on the last dim and the
depthwise stencil sees a channels_last view, so no layout copies happen inside a block.

Paper: 'Linear Diffusion Networks', Jacob Fein-Ashley. Architecture contract: ``LDN_SPEC.md``.

The default block is parameter layout v2 (``LDN_LAYOUT_VERSION``), picked by the Fashion-MNIST block study
(``eval/block_study.py``): F carries the depthwise conv and an MLP ratio of 3.875, K acts on the residual stream,
δt starts at 27 % of the stability bound. Other forms the spec allows remain constructor options.
"""
import warnings
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm2d, LayerScale, Mlp, NormMlpClassifierHead, PatchEmbed, calculate_drop_path_rates,
    register_notrace_function, to_2tuple, trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq

from .diffusion import (
    DEFAULT_OFFSETS, FEATURE_MAPS, diffusion_coefficients, diffusion_step, linear_diffusion_attention,
    packed_linear_diffusion_attention, per_sample_diffusion_coefficients, per_sample_diffusion_step,
    softmax_diffusion_attention, stencil_basis,
)
from ._checkpoint import architecture_pre_hook
from .hub import hub_id, resolve_pretrained_overlay, tag_model_args  # noqa: F401  hub_id: Hub repos of cfgs

__all__ = ['LinearDiffusionNet', 'LdnBlock', 'PrimaryDiffusion', 'DiffusionAttention']

# token chunk of the fused inference MLP: bounds its N×4C hidden tensor at large N (see LdnBlock)
MLP_CHUNK_TOKENS = 2048
ATTN_KERNELS = ('linear', 'softmax', 'none')  # 'none': A_diff removed (ablation only)
# where the primary diffusion acts: 'stream' = H + δt·K(H) on the residual stream (a convex average of the whole
# stream), 'branch' = H + δt·K(LN(H)) as a pre-norm residual branch, 'none' = K removed (ablation only)
DIFFUSION_FORMS = ('stream', 'branch', 'none')
DT_MODES = ('param', 'input')  # δt from a learned τ per channel, or τ + a pooled projection of the input
STEM_TYPES = ('patch', 'overlap')
# The local update F of the default block (parameter layout v2, chosen by the Fashion-MNIST block study,
# eval/results/block_study/): a 3×3 depthwise conv on the hidden layer, and an MLP ratio of 3.875 instead of 4
# that pays for it, so every variant stays within the params / MACs of the DeiT (or ViT) of its size.
MLP_RATIO = 3.875


class PrimaryDiffusion(nn.Module):
    """``δt ⊙ K(H)``: learned multi-scale grid Laplacian with an adaptive, provably stable time step.

    Parameters per channel: ``a_raw`` (``S×C``, ``a_s = softplus(a_raw) ≥ 0``) and ``tau`` (``δt`` through
    ``sigmoid(τ)`` inside the explicit-Euler bound). Both are excluded from weight decay. With
    ``dt_mode='input'`` a linear map of the token-averaged input is added to ``τ`` per sample (``tau_proj``):
    only ``sigmoid(τ)`` changes, so every sample's step stays inside the same bound.
    """
    input_dt: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            offsets: Sequence[int] = DEFAULT_OFFSETS,
            tau_init: float = -1.,
            dt_mode: str = 'param',
            device=None,
            dtype=None,
    ):
        super().__init__()
        offsets = [int(d) for d in offsets]
        if not offsets or min(offsets) < 1 or len(set(offsets)) != len(offsets):
            raise ValueError(f'diffusion offsets must be distinct positive ints, got {offsets}.')
        if dt_mode not in DT_MODES:
            raise ValueError(f'dt_mode must be one of {DT_MODES}, got {dt_mode!r}.')
        self.offsets: List[int] = offsets
        self.tau_init = tau_init
        self.a_raw = nn.Parameter(torch.zeros(len(offsets), dim, device=device, dtype=dtype))
        self.tau = nn.Parameter(torch.full((dim,), tau_init, device=device, dtype=dtype))
        self.input_dt = dt_mode == 'input'
        self.tau_proj = nn.Linear(dim, dim, device=device, dtype=dtype) if self.input_dt else nn.Identity()
        self.register_buffer('basis', stencil_basis(offsets, device=device), persistent=False)
        # implementation of the fused step ('auto' | 'conv' | 'shift' | 'sep', see diffusion_step);
        # not in the state dict
        self.method: str = 'auto'

    def init_non_persistent_buffers(self) -> None:
        self.basis.copy_(stencil_basis(self.offsets, device=self.basis.device, dtype=self.basis.dtype))

    def coefficients(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``δt·a_s`` per scale and channel, ``(S, C)``; ``(B, S, C)`` for an input-dependent step (needs ``x``)."""
        if self.input_dt:
            if x is None:
                raise ValueError('dt_mode="input": coefficients(x) needs the token map x (B, h, w, C).')
            return per_sample_diffusion_coefficients(self.a_raw, self.tau + self.tau_proj(x.mean((1, 2))))
        return diffusion_coefficients(self.a_raw, self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the update δt·K(H) alone (drop-path / pre-norm branch); same math as primary_diffusion, faster on CPU
        if self.input_dt:
            return per_sample_diffusion_step(x, self.coefficients(x), self.offsets, 0.)
        return diffusion_step(x, self.coefficients(), self.basis, self.offsets, self.method, 0.)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """``x + forward(x)`` in fewer passes (same math, see :func:`diffusion_step`)."""
        if self.input_dt:
            return per_sample_diffusion_step(x, self.coefficients(x), self.offsets)
        return diffusion_step(x, self.coefficients(), self.basis, self.offsets, self.method)


class DiffusionAttention(nn.Module):
    """``W_o · A_diff(U)`` per head: global content-dependent diffusion ``(D⁻¹W − I)·V`` on ``(B, N, C)``."""
    use_linear: torch.jit.Final[bool]
    use_packed: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            kernel: str = 'linear',
            feature_map: str = 'elu',
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'embed_dim ({dim}) must be divisible by num_heads ({num_heads}).')
        if kernel not in ATTN_KERNELS or kernel == 'none':
            raise ValueError(f'attn_kernel must be one of {ATTN_KERNELS[:2]}, got {kernel!r}.')
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f'attn_feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.use_linear = kernel == 'linear'
        self.feature_map = feature_map
        self.use_packed = self.use_linear and feature_map == 'elu'  # the fast packed path implements elu+1
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.use_packed:
            # fast path: φ, normaliser and head layout handled on the packed projection (same math)
            # without autograd the fresh projection is overwritten in place (fewer CPU temporaries)
            x = packed_linear_diffusion_attention(self.qkv(x), self.num_heads, inplace=not torch.is_grad_enabled())
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if self.use_linear:
                x = linear_diffusion_attention(q, k, v, self.feature_map)
            else:
                x = softmax_diffusion_attention(q, k, v)
            x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class DwConvMlp(nn.Module):
    """The local update F with a 3×3 depthwise conv on the hidden layer: ``fc2(act(dwconv(fc1(x))))``.

    On a channels-last ``(B, h, w, C)`` map. The conv sees each token's 3×3 grid neighbourhood (zero padding: F is
    a local update, not part of the row-sum-zero operators), adding ``9·hidden`` weights and MACs per token.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # NHWC -> NCHW view is channels_last in memory: the depthwise conv runs without a layout copy
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.drop1(self.act(x))
        return self.drop2(self.fc2(x))


class LdnBlock(nn.Module):
    """One LDN layer on a channels-last token map ``(B, h, w, C)``; drop-path on every branch.

    ``diffusion_form`` places the primary diffusion: ``'stream'`` (``H + δt·K(H)``, the step averages the whole
    residual stream), ``'branch'`` (``H + δt·K(LN(H))``, a pre-norm residual branch like the other two terms) or
    ``'none'`` (ablation). ``attn_kernel='none'`` removes A_diff (ablation); ``mlp_dwconv`` adds a 3×3 depthwise
    conv to F's hidden layer.
    """
    has_drop_path: torch.jit.Final[bool]
    diffuse_stream: torch.jit.Final[bool]
    diffuse_branch: torch.jit.Final[bool]
    use_attn: torch.jit.Final[bool]
    plain_mlp: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = MLP_RATIO,
            qkv_bias: bool = True,
            diffusion_offsets: Sequence[int] = DEFAULT_OFFSETS,
            diffusion_form: str = 'stream',
            dt_mode: str = 'param',
            attn_kernel: str = 'linear',
            attn_feature_map: str = 'elu',
            mlp_dwconv: bool = True,
            tau_init: float = -1.,
            ls_init_value: float = 1.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f'diffusion_form must be one of {DIFFUSION_FORMS}, got {diffusion_form!r}.')
        if attn_kernel not in ATTN_KERNELS:
            raise ValueError(f'attn_kernel must be one of {ATTN_KERNELS}, got {attn_kernel!r}.')
        self.diffuse_stream = diffusion_form == 'stream'
        self.diffuse_branch = diffusion_form == 'branch'
        self.norm0 = norm_layer(dim, **dd) if self.diffuse_branch else nn.Identity()
        self.diffusion = PrimaryDiffusion(
            dim, diffusion_offsets, tau_init=tau_init, dt_mode=dt_mode, **dd) if diffusion_form != 'none' \
            else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.use_attn = attn_kernel != 'none'
        if self.use_attn:
            self.norm1 = norm_layer(dim, **dd)
            self.attn = DiffusionAttention(
                dim, num_heads, qkv_bias=qkv_bias, kernel=attn_kernel, feature_map=attn_feature_map,
                proj_drop=proj_drop, **dd)
            self.ls1 = LayerScale(dim, init_values=ls_init_value, **dd)
        else:
            self.norm1 = self.attn = self.ls1 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.norm2 = norm_layer(dim, **dd)
        hidden = int(dim * mlp_ratio)
        self.plain_mlp = not mlp_dwconv
        if mlp_dwconv:
            self.mlp = DwConvMlp(dim, hidden, act_layer=act_layer, drop=proj_drop, **dd)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.training and self.has_drop_path:  # stochastic depth needs each branch on its own
            if self.diffuse_stream:
                x = x + self.drop_path1(self.diffusion(x))
            elif self.diffuse_branch:
                x = x + self.drop_path1(self.diffusion(self.norm0(x)))
            if self.use_attn:
                x = x + self.drop_path2(self.ls1(self.attn(self.norm1(x).reshape(B, H * W, C)))).reshape(B, H, W, C)
            x = x + self.drop_path3(self.mlp(self.norm2(x)))
            return x
        # same math with fewer passes over the tokens: the residual of the diffusion step rides in its stencil,
        # layer scale and residual add are one addcmul, and the MLP residual is added in place into the fresh
        # MLP output (a Linear's backward never reads its output, so this is autograd-safe).
        if self.diffuse_stream:
            x = self.diffusion.step(x)
        elif self.diffuse_branch:
            x = x + self.diffusion(self.norm0(x))
        if self.use_attn:
            a = self.attn(self.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C)
            if torch.is_grad_enabled():
                x = torch.addcmul(x, a, self.ls1.gamma)
            else:  # no graph to protect: reuse the attention output's buffer (one CPU temporary fewer)
                x = torch.addcmul(x, a, self.ls1.gamma, out=a)
                if not torch.jit.is_scripting() and self._fused_mlp_ok(x):  # x is this block's own buffer: the MLP adds into it in place
                    return self._mlp_residual_no_grad(x)
        return self._mlp(self.norm2(x)).add_(x)

    @torch.jit.unused
    def _fused_mlp_ok(self, x: torch.Tensor) -> bool:
        mlp = self.mlp
        return (type(mlp.act) is nn.GELU and mlp.act.approximate == 'none'
                and (not hasattr(mlp, 'norm') or isinstance(mlp.norm, nn.Identity))  # DwConvMlp has no norm
                and (not self.training or (mlp.drop1.p == 0 and mlp.drop2.p == 0))
                and x.is_contiguous() and x.dtype == mlp.fc1.weight.dtype
                and x.device.type in ('cpu', 'cuda') and not torch.is_autocast_enabled(x.device.type))

    @torch.jit.unused
    def _mlp_residual_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``x + F(LN(x))`` accumulated into ``x`` itself, over chunks of at most ``MLP_CHUNK_TOKENS`` tokens.

        Same math as ``self._mlp(self.norm2(x)).add_(x)`` without autograd: fc2's GEMM accumulates straight into
        the residual stream (no ``N×C`` output buffer, no bias broadcast copy, no separate residual pass), and at
        large N the ``N×4C`` hidden tensor (the block's memory peak) is one chunk's worth, reused across chunks.
        """
        mlp = self.mlp
        fc1, fc2 = mlp.fc1, mlp.fc2
        C = x.shape[-1]
        flat = x.view(-1, C)
        if not self.plain_mlp:  # depthwise conv in F: it needs whole token maps, so no chunking over tokens
            h = mlp.dwconv(fc1(self.norm2(x)).permute(0, 3, 1, 2))  # channels_last in and out: no layout copy
            torch.ops.aten.gelu_(h)  # in place on the fresh conv output: one N×hidden buffer fewer
            if fc2.bias is not None:
                flat.add_(fc2.bias)
            return flat.addmm_(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), fc2.weight.t()).view_as(x)
        rows = flat.shape[0]
        chunk = min(rows, MLP_CHUNK_TOKENS)
        hidden = torch.empty(chunk, fc1.out_features, dtype=x.dtype, device=x.device)
        for i in range(0, rows, chunk):
            xc = flat[i:i + chunk]
            h = hidden[:xc.shape[0]]
            u = self.norm2(xc)  # read before xc is updated below
            if fc1.bias is not None:
                torch.addmm(fc1.bias, u, fc1.weight.t(), out=h)
            else:
                torch.mm(u, fc1.weight.t(), out=h)
            torch.ops.aten.gelu_(h)
            if fc2.bias is not None:
                xc.add_(fc2.bias)
            xc.addmm_(h, fc2.weight.t())
        return x

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.is_grad_enabled() or not self.plain_mlp:
            return self.mlp(x)
        return self._mlp_no_grad(x)

    @torch.jit.unused
    def _mlp_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(x)`` with GELU applied in place on the fresh fc1 output (no autograd graph to protect).

        The ``N×4C`` hidden activation is the block's memory peak; an out-of-place GELU holds two of them at
        once. In place, the peak drops by one hidden tensor and the largest CPU temporary (page faults) is gone.
        """
        mlp = self.mlp
        act = mlp.act
        if type(act) is not nn.GELU or act.approximate != 'none':  # anything else: the module as is
            return mlp(x)
        h = torch.ops.aten.gelu_(mlp.fc1(x))
        return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))


class OverlapConvStem(nn.Module):
    """Overlapping conv stem of total stride ``patch_size``: log2(p) 3×3 stride-2 convs (LayerNorm2d + GELU
    between), widths doubling up to ``embed_dim``, then LayerNorm; output channels-last ``(B, h, w, C)``.

    Drop-in for the patch-embedding conv: same token grid ``H/p × W/p``; the first conv is ``proj`` so timm's
    ``first_conv`` adaptation (``in_chans``) finds it.
    """

    def __init__(
            self,
            patch_size: int,
            in_chans: int,
            embed_dim: int,
            norm_layer: Callable,
            act_layer: Type[nn.Module] = nn.GELU,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        num_convs = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2 ** num_convs != patch_size:
            raise ValueError(f'stem_type="overlap" needs a power-of-two patch_size >= 2, got {patch_size}.')
        widths = [max(embed_dim // 2 ** (num_convs - 1 - i), 8) for i in range(num_convs)]
        widths[-1] = embed_dim
        self.patch_size = (patch_size, patch_size)
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, widths[0], 3, stride=2, padding=1, **dd)
        layers: List[nn.Module] = []
        for i in range(1, num_convs):
            layers += [LayerNorm2d(widths[i - 1], **dd), act_layer(),
                       nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1, **dd)]
        self.convs = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_pad:
            pad_h = (self.patch_size[0] - x.shape[-2] % self.patch_size[0]) % self.patch_size[0]
            pad_w = (self.patch_size[1] - x.shape[-1] % self.patch_size[1]) % self.patch_size[1]
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        x = self.convs(self.proj(x))
        return self.norm(x.permute(0, 2, 3, 1))


@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int, patch_size: Tuple[int, int], dynamic_img_pad: bool) -> None:
    """Reject inputs the model cannot process with a message that names the problem and the fix."""
    if x.dim() != 4:
        raise ValueError(
            'LDN expects an image batch of shape (B, C, H, W), got a ' + str(x.dim()) + '-D tensor of shape '
            + str(list(x.shape)) + '. For a single image use x.unsqueeze(0).')
    B, C, H, W = x.shape
    if C != in_chans:
        raise ValueError(
            'LDN was created with in_chans=' + str(in_chans) + ' but the input has ' + str(C)
            + ' channels (shape ' + str(list(x.shape)) + '). Convert the images, or create the model with in_chans='
            + str(C) + '.')
    if B == 0:
        raise ValueError('Empty batch (B=0): LDN needs at least one image per forward call.')
    if H < patch_size[0] or W < patch_size[1]:
        raise ValueError(
            'Image ' + str(H) + 'x' + str(W) + ' is smaller than one ' + str(patch_size[0]) + 'x'
            + str(patch_size[1]) + ' patch. Resize it to at least one patch (e.g. to the pretrained input size).')
    if not dynamic_img_pad and (H % patch_size[0] != 0 or W % patch_size[1] != 0):
        raise ValueError(
            'Image ' + str(H) + 'x' + str(W) + ' is not a multiple of the patch size ' + str(patch_size[0]) + 'x'
            + str(patch_size[1]) + '. Resize or crop to a multiple, or create the model with dynamic_img_pad=True.')


class LinearDiffusionNet(nn.Module):
    """ Linear Diffusion Network: an isotropic stack of LDN blocks on a patch-token grid.

    The same weights run at any input whose sides are multiples of the patch size (no position embedding;
    the diffusion stencil is position-aware). ``forward_features`` returns an NCHW map of ``num_features``.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = MLP_RATIO,
            qkv_bias: bool = True,
            diffusion_offsets: Sequence[int] = DEFAULT_OFFSETS,
            diffusion_form: str = 'stream',
            dt_mode: str = 'param',
            attn_kernel: str = 'linear',
            attn_feature_map: str = 'elu',
            mlp_dwconv: bool = True,
            stem_type: str = 'patch',
            tau_init: float = -1.,
            ls_init_value: float = 1.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_pad: bool = False,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Type[nn.Module]] = None,
            drop_block_rate: Optional[float] = None,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Default input size, only recorded in the config: any multiple of the patch size runs.
            patch_size: Patch (token) size of the stem.
            in_chans: Number of input image channels.
            num_classes: Number of classes, 0 for a pooled-feature model.
            global_pool: '' (spatial output), 'avg', 'max' or 'avgmax'.
            embed_dim: Token width C.
            depth: Number of LDN blocks (diffusion steps).
            num_heads: Heads of the diffusion-based attention.
            mlp_ratio: Hidden ratio of the local update MLP (3.875 by default: pays for the depthwise conv).
            diffusion_offsets: Grid offsets of the multi-scale diffusion stencil.
            diffusion_form: 'stream' (H + δt·K(H)), 'branch' (H + δt·K(LN(H))) or 'none' (ablation).
            dt_mode: 'param' (δt from a learned τ per channel) or 'input' (τ plus a pooled projection of the input).
            attn_kernel: 'linear' (φ(Q)φ(K)ᵀ, linear cost), 'softmax' (exact exp kernel via SDPA, quadratic) or
                'none' (A_diff removed, ablation).
            attn_feature_map: φ of the linear kernel: 'elu' (elu+1), 'relu' (relu+1e-3) or 'softplus'.
            mlp_dwconv: 3×3 depthwise conv on the hidden layer of the local update F (default; False with
                mlp_ratio=4 is the block of parameter layout v1).
            stem_type: 'patch' (non-overlapping patch conv) or 'overlap' (stride-2 3×3 convs, same total stride).
            tau_init: Initial τ of the time step, ``δt = sigmoid(τ) / Σ|N_s|a_s``.
            ls_init_value: Initial per-channel scale γ of the attention branch.
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout after the attention projection and inside the MLP.
            drop_path_rate: Stochastic depth rate (linear over blocks, applied to every branch).
            dynamic_img_pad: Pad inputs to a multiple of the patch size instead of rejecting them.
            drop_block_rate, bn_momentum, bn_eps: Accepted because timm's ``train.py`` may pass them. LDN has
                no BatchNorm, so ``bn_*`` are ignored with a warning; DropBlock is not supported and a
                non-zero ``drop_block_rate`` raises (use ``drop_path_rate``).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if drop_block_rate:
            raise ValueError(
                f'drop_block_rate={drop_block_rate}: LDN has no DropBlock (it has no conv stages). '
                'Use drop_path_rate for stochastic depth instead.')
        if bn_momentum is not None or bn_eps is not None:
            warnings.warn('LDN has no BatchNorm layers: bn_momentum / bn_eps are ignored.', stacklevel=2)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size = to_2tuple(patch_size)
        self.dynamic_img_pad = dynamic_img_pad
        self.grad_checkpointing = False

        if stem_type not in STEM_TYPES:
            raise ValueError(f'stem_type must be one of {STEM_TYPES}, got {stem_type!r}.')
        if stem_type == 'overlap':
            self.patch_embed = OverlapConvStem(
                patch_size, in_chans, embed_dim, norm_layer, act_layer, dynamic_img_pad=dynamic_img_pad, **dd)
        else:
            # stem: non-overlapping patch conv + LayerNorm, emitted channels-last
            self.patch_embed = PatchEmbed(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dim,
                norm_layer=norm_layer,
                output_fmt='NHWC',
                strict_img_size=False,
                dynamic_img_pad=dynamic_img_pad,
                **dd,
            )
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            LdnBlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                diffusion_offsets=diffusion_offsets,
                diffusion_form=diffusion_form,
                dt_mode=dt_mode,
                attn_kernel=attn_kernel,
                attn_feature_map=attn_feature_map,
                mlp_dwconv=mlp_dwconv,
                tau_init=tau_init,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                **dd,
            )
            for i in range(depth)])
        reduction = self.patch_size[0]
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]

        # head: global average pool over tokens -> LayerNorm -> dropout -> Linear
        self.head = NormMlpClassifierHead(
            embed_dim,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-6),
            **dd,
        )
        self.apply(self._init_weights)
        # a checkpoint of another architecture / LDN size fails with one clear message, not hundreds of keys
        self._register_load_state_dict_pre_hook(architecture_pre_hook, with_module=True)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        # diffusion coefficients and time steps set the stability margin; decaying them biases δt, not capacity
        return {'blocks.*.diffusion.a_raw', 'blocks.*.diffusion.tau'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^head\.norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans, self.patch_size, self.dynamic_img_pad)
        return self.patch_embed(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor
            indices: Take last n blocks if int, all if None, select matching indices if sequence
            norm: Apply the head's LayerNorm (per token) to the intermediates
            stop_early: Stop iterating over blocks when last desired intermediate hit
            output_fmt: Shape of intermediate feature outputs, 'NCHW' or 'NHWC'
            intermediates_only: Only return intermediate features
        Returns:
            List of intermediate features or tuple of (final features, intermediates).
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be one of NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        x = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                y = x.permute(0, 3, 1, 2)
                if norm:
                    y = self.head.norm(y)
                intermediates.append(y.contiguous() if output_fmt == 'NCHW' else y.permute(0, 2, 3, 1))

        if intermediates_only:
            return intermediates
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Prune blocks (and optionally the head / its norm) not required for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.head.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)  # NCHW view of the channels-last map

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# Version of the parameter layout (state-dict names, shapes and parameterisation). Bump it whenever that layout
# changes and register a converter from the previous version in _LAYOUT_CONVERTERS, so published weights and old
# train.py checkpoints keep loading. `ldn export` records it in the manifest and config.json.
# v1: F = MLP ratio 4. v2: F = MLP ratio 3.875 with a 3×3 depthwise conv on the hidden layer (mlp.dwconv.*).
LDN_LAYOUT_VERSION = 2
LAYOUT_VERSION_KEY = 'ldn_layout_version'
# version v -> fn(state_dict) returning the same weights in the layout of version v + 1
_LAYOUT_CONVERTERS: Dict[int, Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {
    # same names and shapes: a v1 model is still built by mlp_dwconv=False, mlp_ratio=4 (checked in the filter)
    1: lambda state_dict: state_dict,
}
# timm adapts these itself after the filter (classifier reset for a new num_classes, stem for a new in_chans)
_ADAPTED_KEYS = ('head.fc.weight', 'head.fc.bias', 'patch_embed.proj.weight')
V1_MODEL_ARGS = dict(mlp_dwconv=False, mlp_ratio=4.)


def _layout_version(checkpoint: dict, state_dict: dict) -> int:
    """Explicit version (a key in the checkpoint wrapper or the state dict), else read from the keys: MLP weights
    without a depthwise conv are layout v1 (or a model built with mlp_dwconv=False), anything else the current."""
    version = state_dict.pop(LAYOUT_VERSION_KEY, checkpoint.get(LAYOUT_VERSION_KEY, None))
    if version is None:
        has_mlp = any(k.endswith('.mlp.fc1.weight') for k in state_dict)
        has_dwconv = any('.mlp.dwconv.' in k for k in state_dict)
        return 1 if has_mlp and not has_dwconv else LDN_LAYOUT_VERSION
    return int(version.item() if isinstance(version, torch.Tensor) else version)


def layout_mismatch_message(checkpoint_has_dwconv: bool) -> str:
    """What to do when a checkpoint's local update F (with / without depthwise conv) differs from the model's."""
    if checkpoint_has_dwconv:
        return ('the checkpoint has LDN parameter layout v2 (3x3 depthwise conv in F, mlp.dwconv.*) but the model '
                'was created without it: drop mlp_dwconv=False / mlp_ratio from the create_model arguments.')
    return ('the checkpoint has LDN parameter layout v1 (F without depthwise conv, MLP ratio 4: timm-ldn < 0.2) and '
            'the model has the v2 block. Create the model with the v1 block to load it: '
            "timm.create_model(<arch>, mlp_dwconv=False, mlp_ratio=4.0, ...). Published v1 tags do this by "
            'themselves (manifest model_args).')


def _format_keys(keys: List[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f' … (+{len(keys) - limit} more)' if len(keys) > limit else '')


def unwrap_checkpoint(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The model weights inside a train.py checkpoint (EMA preferred), without DDP / torch.compile prefixes."""
    state = checkpoint
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    out = {}
    for k, v in state.items():
        while k.startswith(('module.', '_orig_mod.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: dict, model: LinearDiffusionNet) -> dict:
    """Turn any LDN checkpoint into a state dict of the current layout for ``model``.

    Accepts a bare state dict (safetensors / ``torch.save(model.state_dict())``) or a checkpoint as timm's
    train.py writes it (``checkpoint-*.pth.tar``, ``model_best.pth.tar``: ``state_dict_ema`` preferred over
    ``state_dict``, also ``model``/``model_ema``), strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
    prefixes, converts older parameter layouts, and refuses a checkpoint of another architecture with an
    error naming the missing / unexpected / mis-shaped keys (timm would otherwise load it non-strictly
    when the head is reset, leaving random weights behind).
    """
    checkpoint = state_dict
    state_dict = unwrap_checkpoint(checkpoint)

    version = _layout_version(checkpoint, state_dict)
    if version > LDN_LAYOUT_VERSION:
        raise RuntimeError(
            f'Checkpoint has LDN parameter layout v{version}, this timm-ldn reads up to v{LDN_LAYOUT_VERSION}. '
            'Upgrade timm-ldn.')
    for v in range(version, LDN_LAYOUT_VERSION):
        if v not in _LAYOUT_CONVERTERS:
            raise RuntimeError(f'No converter from LDN parameter layout v{v} to v{v + 1}.')
        state_dict = _LAYOUT_CONVERTERS[v](state_dict)

    expected = model.state_dict()
    ckpt_dwconv = any('.mlp.dwconv.' in k for k in state_dict)
    model_dwconv = any('.mlp.dwconv.' in k for k in expected)
    if any(k.endswith('.mlp.fc1.weight') for k in state_dict) and ckpt_dwconv != model_dwconv:
        raise RuntimeError(f'Checkpoint does not fit this {type(model).__name__}: '
                           + layout_mismatch_message(ckpt_dwconv))
    missing = sorted(k for k in expected if k not in state_dict and k not in _ADAPTED_KEYS)
    unexpected = sorted(k for k in state_dict if k not in expected and k not in _ADAPTED_KEYS)
    mis_shaped = sorted(
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}' for k in expected
        if k in state_dict and k not in _ADAPTED_KEYS
        and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        arch = checkpoint.get('arch')
        problems = [
            f'{len(missing)} missing keys ({_format_keys(missing)})' if missing else '',
            f'{len(unexpected)} unexpected keys ({_format_keys(unexpected)})' if unexpected else '',
            f'{len(mis_shaped)} shape mismatches ({_format_keys(mis_shaped, 3)})' if mis_shaped else '',
        ]
        raise RuntimeError(
            f'Checkpoint does not fit this {type(model).__name__} '
            f'(embed_dim={getattr(model, "embed_dim", "?")}, depth={len(getattr(model, "blocks", []))})'
            + (f', it was saved for arch={arch!r}' if isinstance(arch, str) else '') + ': '
            + '; '.join(p for p in problems if p)
            + '. Is it a checkpoint of another architecture or model size?')
    return state_dict


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_name': 'Linear Diffusion Networks',
        **kwargs,
    }


# Published weights: one '<arch>.<tag>' entry per weight file, each with hf_hub_id=hub_id('<arch>.<tag>') (the Hub
# namespace lives in timm_ldn.hub) and a matching weights/manifest.json entry written by `ldn export`; loading
# verifies the file's sha256 against that entry. Untagged entries below have no weights: pretrained=True on them
# raises NoPretrainedWeightsError listing the tags that do.
_FMNIST_CFG = dict(
    num_classes=10, input_size=(1, 28, 28), pool_size=(7, 7), crop_pct=1.0, interpolation='bilinear',
    mean=(0.2859,), std=(0.3529,),
    label_names=('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'),
)
default_cfgs = generate_default_cfgs({
    'ldn_tiny': _cfg(),
    'ldn_small': _cfg(),
    'ldn_base': _cfg(),
    # 28 px grayscale (Fashion-MNIST): patch 4 -> 7x7 tokens; mean/std of the Fashion-MNIST training pixels,
    # crop_pct 1.0 so the eval transform is the identity on 28x28 images. Weights in weights/ (shipped copies).
    # fmnist_v2: the v2 block, 40 epochs of the block study (eval/block_study.py); first, so the default tag
    'ldn_nano_patch4_28.fmnist_v2': _cfg(hf_hub_id=hub_id('ldn_nano_patch4_28.fmnist_v2'), **_FMNIST_CFG),
    # fmnist: the v1 block (its manifest model_args rebuild it), 8 epochs of the earlier driver
    'ldn_nano_patch4_28.fmnist': _cfg(hf_hub_id=hub_id('ldn_nano_patch4_28.fmnist'), **_FMNIST_CFG),
})


def _create_ldn(variant: str, pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    out_indices = kwargs.pop('out_indices', 3)
    # a published tag of an earlier default block (layout v1) is built with the arguments it was trained with;
    # an untagged name without weights is the current default block (a fresh model to train)
    if pretrained or kwargs.get('pretrained_cfg') is not None:
        for key, value in tag_model_args(variant, kwargs.get('pretrained_cfg')).items():
            kwargs.setdefault(key, value)
    if pretrained:
        # timm downloads and loads; first refuse tags without weights (never silently random) and swap a
        # published Hub file for its sha256-verified cached copy (see timm_ldn.hub)
        kwargs['pretrained_cfg_overlay'] = resolve_pretrained_overlay(
            variant,
            pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
            cache_dir=kwargs.get('cache_dir'),
        )
    return build_model_with_cfg(
        LinearDiffusionNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def ldn_tiny(pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    """ LDN-Tiny, 224 px, patch 16, C=192, 12 blocks, 3 heads (DeiT-Ti budget: 5.67 M params, 1.16 GMACs)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_ldn('ldn_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ldn_small(pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    """ LDN-Small, 224 px, patch 16, C=384, 12 blocks, 6 heads (DeiT-S budget: 21.73 M params, 4.36 GMACs)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_ldn('ldn_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ldn_base(pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    """ LDN-Base, 224 px, patch 16, C=768, 12 blocks, 12 heads (DeiT-B budget: 85.05 M params, 16.86 GMACs)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_ldn('ldn_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ldn_nano_patch4_28(pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    """ LDN-Nano for 28 px grayscale (Fashion-MNIST), patch 4, C=64, 6 blocks, 2 heads.

    0.31 M params, 16.6 MMACs: within the same-size ViT's 16.7 MMACs (``eval/results/block_study/``).

    7x7 token grid: offsets (1, 2) give graph diameter 6 = depth (Theorem 1: every output token sees every
    input token through diffusion alone) with a 5x5 stencil; (1, 2, 4) would need 9x9 taps on a 7x7 grid.
    """
    model_args = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=2,
        diffusion_offsets=(1, 2))
    return _create_ldn('ldn_nano_patch4_28', pretrained=pretrained, **dict(model_args, **kwargs))
