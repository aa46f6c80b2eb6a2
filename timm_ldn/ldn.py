""" Linear Diffusion Networks (LDN) for timm

Each block is one explicit-Euler step of ``dH/dt = K·H + A_diff(H) + F(H)`` over the grid of patch tokens:

    H ← H + δt ⊙ K(H)                      primary diffusion (multi-scale no-flux Laplacian, learned δt)
    H ← H + γ ⊙ W_o · A_diff(LN(H))        diffusion-based attention, linear in the token count
    H ← H + F(LN(H))                        local update (MLP with a 3×3 depthwise conv on its hidden layer)

The operators' math lives in ``timm_ldn.diffusion``; this file assembles them into a timm model. Tokens stay
channels-last (``B×h×w×C``) through every block: linear layers act on the last dim and the depthwise convs see a
channels_last view, so no layout copies happen inside a block. Each term is a layer-type argument of the model
(``diffusion_layer``, ``attn_layer``, ``mlp_layer``, ``embed_layer``), as ``mlp_layer`` / ``embed_layer`` are in
timm's ``vision_transformer.py``; the block study's alternatives are such layers, in ``eval/ablations.py``.

Paper: 'Linear Diffusion Networks', Jacob Fein-Ashley. Where each property of the contract is tested:
``docs/contract.md``.
"""
import inspect
import math
import warnings
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm2d, LayerScale, NormMlpClassifierHead, PatchEmbed, calculate_drop_path_rates,
    register_notrace_function, to_2tuple, trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq

from ._checkpoint import architecture_pre_hook, checkpoint_filter_fn
from .diffusion import (
    DEFAULT_OFFSETS, NEIGHBOURS_PER_SCALE, diffusion_coefficients, diffusion_step, grid_exponential_diffusion,
    packed_linear_diffusion_attention, stencil_basis,
)
from .hub import hub_id, resolve_pretrained_overlay

__all__ = ['LinearDiffusionNet', 'LdnBlock', 'DiffusionParams', 'PrimaryDiffusion', 'ImplicitDiffusionParams',
           'ImplicitGridDiffusion', 'DiffusionAttention', 'DwConvMlp', 'ConvTokenizer']

# MLP ratio of the default local update F (parameter layout v2, chosen by the Fashion-MNIST block study): 3.875
# instead of 4 pays for the 3×3 depthwise conv, so every variant stays within the params / MACs of its DeiT.
MLP_RATIO = 3.875


class DiffusionParams(nn.Module):
    """The learned coefficients of a primary-diffusion step, shared by the grid (2-D) and path (1-D) layers.

    ``a_s = softplus(a_raw_s) ≥ 0`` per scale and channel and ``δt = 0.99·sigmoid(τ) / Σ_s |N_s|·a_s``: every step
    stays strictly inside the explicit-Euler bound, a convex average of neighbours for any parameter value.
    ``|N_s|`` is the subclass's ``graph_neighbours`` (4 on the grid, 2 on a path). ``a_raw`` and ``tau`` are
    excluded from weight decay.
    """
    graph_neighbours: int = NEIGHBOURS_PER_SCALE
    neighbours_per_scale: torch.jit.Final[int]
    has_drop_path: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            offsets: Sequence[int] = DEFAULT_OFFSETS,
            drop_path: float = 0.,
            tau_init: float = -1.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Channels C.
            offsets: Offsets of the scales (distinct positive ints).
            drop_path: Stochastic depth rate of the update.
            tau_init: Initial ``τ``: ``sigmoid(-1)`` starts δt at 27 % of the bound (the block study's choice).
        """
        super().__init__()
        offsets = [int(d) for d in offsets]
        if not offsets or min(offsets) < 1 or len(set(offsets)) != len(offsets):
            raise ValueError(f'diffusion offsets must be distinct positive ints, got {offsets}.')
        self.offsets: List[int] = offsets
        self.neighbours_per_scale = self.graph_neighbours  # an instance constant: TorchScript sees no class attributes
        self.a_raw = nn.Parameter(torch.zeros(len(offsets), dim, device=device, dtype=dtype))
        self.tau = nn.Parameter(torch.full((dim,), float(tau_init), device=device, dtype=dtype))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def coefficients(self) -> torch.Tensor:
        """``δt·a_s`` per scale and channel, ``(S, C)``."""
        return diffusion_coefficients(self.a_raw, self.tau, self.neighbours_per_scale)


class PrimaryDiffusion(DiffusionParams):
    """One primary diffusion step ``H + δt ⊙ K(H)`` on a channels-last token map ``(B, h, w, C)``.

    ``K`` is the learned multi-scale no-flux grid Laplacian (:class:`DiffusionParams`). With stochastic depth
    (training) the update is a drop-path branch, ``H + drop(δt·K(H))``. A grid has no padding: ``padding_mask``
    exists for the shared block signature and must be None.
    """

    def __init__(self, dim: int, offsets: Sequence[int] = DEFAULT_OFFSETS, drop_path: float = 0.,
                 tau_init: float = -1., device=None, dtype=None):
        super().__init__(dim, offsets, drop_path=drop_path, tau_init=tau_init, device=device, dtype=dtype)
        self.register_buffer('basis', stencil_basis(self.offsets, device=device, dtype=dtype or torch.float32),
                             persistent=False)

    def init_non_persistent_buffers(self) -> None:
        self.basis.copy_(stencil_basis(self.offsets, device=self.basis.device, dtype=self.basis.dtype))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The update ``δt·K(x)`` alone."""
        return diffusion_step(x, self.coefficients(), self.basis, self.offsets, 0.)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_padding(padding_mask)
        if self.training and self.has_drop_path:
            return x + self.drop_path(self.update(x))
        # the identity rides in the stencil: the step in one pass, no separate residual add
        return diffusion_step(x, self.coefficients(), self.basis, self.offsets)


class ImplicitDiffusionParams(nn.Module):
    """The learned parameters of an implicit diffusion step ``H ← H + β ⊙ (P·H − H)``, shared by the path (1-D) and
    grid (2-D) layers: per-channel length scales and the step fraction ``β``.

    ``P`` is a convex average at every length scale ``ℓ`` (no stability bound), so ``log ℓ`` is learned unbounded,
    initialised log-uniform across channels from one token to ``2·max(offsets)``: one layer mixes at every scale.
    ``adaptive_step``: ``β = sigmoid(τ + W_up·W_down·LN(H_i))`` per token and channel (rank ``step_rank``, the
    paper's adaptive time step with Mamba-style selectivity; ``W_up`` starts at zero, so every token starts at
    ``sigmoid(τ)``); else ``β = sigmoid(τ)`` per channel. Every row ``(1 − β_i)·e_i + β_i·P_i`` stays convex.
    """

    def __init__(
            self,
            dim: int,
            offsets: Sequence[int] = (1,),
            drop_path: float = 0.,
            adaptive_step: bool = True,
            step_rank: int = 8,
            tau_init: float = -1.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        max_scale = 2. * max(int(d) for d in offsets)
        log_scale = torch.linspace(0., math.log(max(max_scale, 2.)), dim, **dd)
        self.log_scale = nn.Parameter(log_scale[torch.randperm(dim, device=device)])
        self.tau = nn.Parameter(torch.full((dim,), float(tau_init), **dd))
        if adaptive_step:
            self.step_down = nn.Linear(dim, step_rank, bias=False, **dd)
            self.step_up = nn.Linear(step_rank, dim, bias=False, **dd)
            nn.init.zeros_(self.step_up.weight)
        else:
            self.step_down = self.step_up = None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def step_fraction(self, x: torch.Tensor) -> torch.Tensor:
        """``β``, shaped as ``x`` or ``(C,)``, strictly inside (0, 1)."""
        if self.step_up is None:
            return torch.sigmoid(self.tau)
        u = F.layer_norm(x, x.shape[-1:])
        return torch.sigmoid(self.tau + self.step_up(self.step_down(u)))


class ImplicitGridDiffusion(ImplicitDiffusionParams):
    """The diffusion step solved implicitly on a channels-last token grid ``(B, h, w, C)``, a ``diffusion_layer``
    in place of :class:`PrimaryDiffusion`: ``H ← H + β ⊙ (P·H − H)``.

    ``P = (I − δt·K_cols)⁻¹(I − δt·K_rows)⁻¹`` (ADI: the 1-D resolvent along the rows, then along the columns), per
    channel: every token becomes an ``exp(−(|Δi| + |Δj|)/ℓ)``-weighted average of the whole grid
    (:func:`~timm_ldn.diffusion.grid_exponential_diffusion`), so one layer is global (Theorem 1 at depth 1) and
    ``max|H|`` cannot grow for any ``ℓ``. Parameters: :class:`ImplicitDiffusionParams`. ``O(N log N)`` per channel.
    """

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_padding(padding_mask)
        avg = grid_exponential_diffusion(x, self.log_scale)
        return x + self.drop_path(self.step_fraction(x) * (avg - x))


def _check_no_padding(padding_mask: Optional[torch.Tensor]) -> None:
    if padding_mask is not None:
        raise ValueError('A token grid has no padding: padding_mask must be None for 2-D layers. Use the sequence '
                         'layers (timm_ldn.sequence) for padded sequences.')


class DiffusionAttention(nn.Module):
    """``W_o · A_diff(U)`` per head: global, content-dependent diffusion ``(D⁻¹W − I)·V``, linear in the tokens.

    ``w_ij = φ(q_i)·φ(k_j)`` with ``φ = elu + 1``; rows of ``D⁻¹W − I`` sum to zero. Takes tokens of any layout
    ``(B, ..., C)`` (a channels-last map or a sequence) and returns the same shape; ``padding_mask`` ``(B, N)``
    (True where padded) removes padded tokens from the keys.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'embed_dim ({dim}) must be divisible by num_heads ({num_heads}).')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        x = self.qkv(x.reshape(shape[0], -1, shape[-1]))
        x = packed_linear_diffusion_attention(x, self.num_heads, padding_mask)
        x = self.proj(x)
        return self.proj_drop(x).reshape(shape)


class DwConvMlp(nn.Module):
    """The local update F: ``fc2(act(dwconv(fc1(x))))`` on a channels-last map ``(B, h, w, C)``.

    The 3×3 depthwise conv on the hidden layer sees each token's grid neighbourhood (zero padding: F is a local
    update, not one of the row-sum-zero operators), adding ``9·hidden`` weights and MACs per token. On sequences
    (``timm_ldn.sequence.DwConv1dMlp``, which changes only the conv) padded positions (``padding_mask`` True) are
    zeroed before the conv, so a real token next to padding sees the zero a sequence end gives it.
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
        self.dwconv = self.make_conv(hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)

    @staticmethod
    def make_conv(channels: int, device=None, dtype=None) -> nn.Module:
        return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, device=device, dtype=dtype)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """The depthwise conv on token-major input: the NHWC -> NCHW view is channels_last in memory, so the conv
        runs without a layout copy."""
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # one statement per op (timm's Mlp order): each hidden-width tensor is released as soon as the next one
        # exists, so at most two are alive (nesting conv inside act kept fc1's output alive: +1 hidden tensor)
        x = self.fc1(x)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.)
        x = self.conv(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.fc2(x)
        return self.drop2(x)


class LdnBlock(nn.Module):
    """One LDN layer, on a channels-last token map ``(B, h, w, C)`` or a sequence ``(B, L, C)``: the diffusion
    step, then two pre-norm branches.

    The terms are layer types (``diffusion_layer``, ``attn_layer``, ``mlp_layer``, ``norm_layer``), as in timm's
    ``vision_transformer.py``; the 2-D and 1-D models differ only in the layers they pass. ``padding_mask``
    ``(B, L)`` (sequences, True where padded) goes to the diffusion and attention layers, and to the MLP when its
    ``forward`` takes one (a conv MLP must not mix padding into real tokens; timm's ``Mlp`` is per token).
    """
    mlp_takes_mask: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = MLP_RATIO,
            qkv_bias: bool = True,
            diffusion_offsets: Sequence[int] = DEFAULT_OFFSETS,
            ls_init_value: Optional[float] = 1.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            act_layer: Type[nn.Module] = nn.GELU,
            diffusion_layer: Type[nn.Module] = PrimaryDiffusion,
            attn_layer: Type[nn.Module] = DiffusionAttention,
            mlp_layer: Type[nn.Module] = DwConvMlp,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.diffusion = diffusion_layer(dim, diffusion_offsets, drop_path=drop_path, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, init_values=ls_init_value, **dd) if ls_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.mlp_takes_mask = 'padding_mask' in inspect.signature(self.mlp.forward).parameters
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.diffusion(x, padding_mask)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), padding_mask)))
        if self.mlp_takes_mask:
            x = x + self.drop_path2(self.mlp(self.norm2(x), padding_mask))
        else:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def pad_to_patch_multiple(x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad an image batch at the bottom / right to a multiple of the patch size (``dynamic_img_pad``)."""
    pad_h = (patch_size[0] - x.shape[-2] % patch_size[0]) % patch_size[0]
    pad_w = (patch_size[1] - x.shape[-1] % patch_size[1]) % patch_size[1]
    return nn.functional.pad(x, (0, pad_w, 0, pad_h))


class ConvTokenizer(nn.Module):
    """Convolutional tokenizer (Compact Convolutional Transformers, Hassani et al. 2021) as LDN's ``embed_layer``.

    ``log2(patch_size)`` stages of ``3×3 conv -> act -> 3×3 max-pool stride 2``, so the token grid is the patch
    stem's ``H/p × W/p``; widths ``widths[i]`` for the inner stages and ``embed_dim`` for the last, then ``norm``.
    Output channels-last ``(B, h, w, C)``. Unlike a linear patch projection, every token starts from overlapping
    conv features. The first conv is ``stages.0`` (the ``first_conv`` timm adapts for another ``in_chans``).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            embed_dim: int = 64,
            widths: Sequence[int] = (32,),
            norm_layer: Optional[Callable] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
            **kwargs,  # the PatchEmbed keywords the model passes (output_fmt, strict_img_size): fixed here
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        num_stages = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2 ** num_stages != patch_size:
            raise ValueError(f'ConvTokenizer needs a power-of-two patch_size >= 2, got {patch_size}.')
        widths = [int(w) for w in widths]
        if len(widths) != num_stages - 1:
            raise ValueError(
                f'ConvTokenizer with patch_size={patch_size} has {num_stages} stages: give {num_stages - 1} inner '
                f'width(s) in widths, got {widths}.')
        chans = [in_chans] + widths + [embed_dim]
        self.patch_size = to_2tuple(patch_size)
        self.dynamic_img_pad = dynamic_img_pad
        layers: List[nn.Module] = []
        for i in range(num_stages):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, **dd), act_layer(),
                       nn.MaxPool2d(3, stride=2, padding=1)]
        self.stages = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_pad:
            x = pad_to_patch_multiple(x, self.patch_size)
        return self.norm(self.stages(x).permute(0, 2, 3, 1))


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
            ls_init_value: Optional[float] = 1.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_pad: bool = False,
            embed_layer: Callable = PatchEmbed,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Type[nn.Module]] = None,
            block_fn: Type[nn.Module] = LdnBlock,
            diffusion_layer: Type[nn.Module] = PrimaryDiffusion,
            attn_layer: Type[nn.Module] = DiffusionAttention,
            mlp_layer: Type[nn.Module] = DwConvMlp,
            drop_block_rate: Optional[float] = None,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            weight_init: str = 'trunc_normal',
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
            mlp_ratio: Hidden ratio of the local update F (3.875 by default: pays for the depthwise conv).
            qkv_bias: Bias of the attention's qkv projection.
            diffusion_offsets: Grid offsets of the multi-scale diffusion stencil.
            ls_init_value: Initial per-channel scale γ of the attention branch (None: no layer scale).
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout after the attention projection and inside the MLP.
            drop_path_rate: Stochastic depth rate (linear over blocks, applied to every branch).
            dynamic_img_pad: Pad inputs to a multiple of the patch size instead of rejecting them.
            embed_layer: Stem, called like timm's ``PatchEmbed`` and returning a channels-last ``(B, h, w, C)``
                map: ``PatchEmbed`` (default) or :class:`ConvTokenizer`.
            norm_layer: Norm of the stem and the blocks (LayerNorm, eps 1e-6).
            act_layer: Activation of F (GELU).
            block_fn: The block.
            diffusion_layer: The primary diffusion step (:class:`PrimaryDiffusion`).
            attn_layer: The attention branch (:class:`DiffusionAttention`).
            mlp_layer: The local update F (:class:`DwConvMlp`; timm's ``Mlp`` gives the plain MLP of layout v1).
            drop_block_rate, bn_momentum, bn_eps: Accepted because timm's ``train.py`` may pass them. LDN has
                no BatchNorm, so ``bn_*`` are ignored with a warning; DropBlock is not supported and a
                non-zero ``drop_block_rate`` raises (use ``drop_path_rate``).
            weight_init: ``'trunc_normal'`` (every Linear ~ N(0, 0.02), biases 0: ViT's) or ``'torch'`` (PyTorch's
                own Linear init, uniform with bound ``1/sqrt(fan_in)``; the sequence model's option of the same name).
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

        # stem: patch conv (or a conv tokenizer) + LayerNorm, emitted channels-last
        self.patch_embed = embed_layer(
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
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                diffusion_offsets=diffusion_offsets,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                diffusion_layer=diffusion_layer,
                attn_layer=attn_layer,
                mlp_layer=mlp_layer,
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
        if weight_init not in ('trunc_normal', 'torch'):
            raise ValueError(f"weight_init must be 'trunc_normal' (ViT's, the default) or 'torch' (PyTorch's own "
                             f"Linear init), got {weight_init!r}.")
        if weight_init == 'trunc_normal':
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
    # fmnist_v2: 40 epochs of the block study (eval/fmnist/block_study.py)
    'ldn_nano_patch4_28.fmnist_v2': _cfg(hf_hub_id=hub_id('ldn_nano_patch4_28.fmnist_v2'), **_FMNIST_CFG),
    # the conv-tokenizer variant (tokenizer study, eval/fmnist/study_models.py); its first conv is the tokenizer's.
    # fmnist: 40 epochs of the tokenizer finals (eval/fmnist/block_study.py, row ldn_convtok, seed 2)
    'ldn_nano_convtok_28.fmnist': _cfg(
        hf_hub_id=hub_id('ldn_nano_convtok_28.fmnist'), first_conv='patch_embed.stages.0', **_FMNIST_CFG),
})


def _create_ldn(variant: str, pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    out_indices = kwargs.pop('out_indices', 3)
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


@register_model
def ldn_nano_convtok_28(pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    """ LDN-Nano for 28 px grayscale with a CCT-style conv tokenizer (3×3 conv 1→32, ReLU, max-pool; 32→64, ReLU,
    max-pool: 7x7 tokens, total stride 4) in place of the patch-4 projection, then the ldn_nano blocks with MLP
    ratio 3.625 (0.32 M params, 19.7 MMACs: the tokenizer study's budget of 0.35 M / 20 MMACs).
    """
    model_args = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=2,
        diffusion_offsets=(1, 2), mlp_ratio=3.625, embed_layer=partial(ConvTokenizer, widths=(32,)))
    return _create_ldn('ldn_nano_convtok_28', pretrained=pretrained, **dict(model_args, **kwargs))
