"""The block study's ablations and alternative forms, as layer types for ``LinearDiffusionNet``.

Each class plugs into one of the model's layer-type arguments (``diffusion_layer``, ``attn_layer``, ``embed_layer``,
``mlp_layer``), so the shipped model carries no study switch. ``eval/fmnist/study_models.py`` builds every study row from
these. The operators' math is ``timm_ldn.diffusion``'s; only the wiring differs.
"""
from functools import partial
from typing import Callable, List, Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import LayerNorm2d

from timm_ldn.diffusion import DEFAULT_OFFSETS, diffusion_coefficients, diffusion_step, feature_diffusion_attention
from timm_ldn.ldn import DiffusionAttention, LdnBlock, PrimaryDiffusion, _check_no_padding, pad_to_patch_multiple

__all__ = ['NoDiffusion', 'BranchDiffusion', 'InputTimeStepDiffusion', 'NoAttention', 'FeatureMapAttention',
           'SoftmaxDiffusionAttention', 'OverlapConvStem', 'FEATURE_MAPS', 'NoAttentionBlock',
           'FixedMethodDiffusion']


class NoDiffusion(nn.Module):
    """Ablation: the primary diffusion K removed (the stream passes through); grids and sequences."""

    def __init__(self, dim: int, offsets: Sequence[int] = DEFAULT_OFFSETS, drop_path: float = 0., **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x


class BranchDiffusion(PrimaryDiffusion):
    """K as a pre-norm residual branch, ``H + δt·K(LN(H))``: the step averages the normalised branch input, not the
    stream (its stability statement is about the branch: ``‖δt·K(LN(H))‖∞ ≤ 2·‖LN(H)‖∞``). The norm is the model's
    default (LayerNorm, eps 1e-6), as the pre-norms of the other two branches."""

    def __init__(self, dim: int, offsets: Sequence[int] = DEFAULT_OFFSETS, drop_path: float = 0.,
                 norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6), device=None, dtype=None, **kwargs):
        super().__init__(dim, offsets, drop_path=drop_path, device=device, dtype=dtype, **kwargs)
        self.norm = norm_layer(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_padding(padding_mask)
        return x + self.drop_path(self.update(self.norm(x)))


class InputTimeStepDiffusion(PrimaryDiffusion):
    """δt from ``τ`` plus a linear map of the token-averaged input, per sample. Only ``sigmoid(τ)`` changes, so every
    sample's step keeps the same bound. The samples' stencils run as one grouped conv over ``B·C`` channels."""

    def __init__(self, dim: int, offsets: Sequence[int] = DEFAULT_OFFSETS, drop_path: float = 0., device=None,
                 dtype=None, **kwargs):
        super().__init__(dim, offsets, drop_path=drop_path, device=device, dtype=dtype, **kwargs)
        self.tau_proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def per_sample_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, C)``: each sample's ``δt·a_s``."""
        tau = self.tau + self.tau_proj(x.mean((1, 2)))
        return torch.stack([diffusion_coefficients(self.a_raw, t) for t in tau.unbind(0)])

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_padding(padding_mask)
        B, H, W, C = x.shape
        coef = self.per_sample_coefficients(x)  # (B, S, C) -> (S, B·C): samples become channel groups
        coef = coef.permute(1, 0, 2).reshape(coef.shape[1], B * C)
        grouped = x.permute(1, 2, 0, 3).reshape(1, H, W, B * C)
        # basis.to: a model built with dtype=... keeps the float32 basis buffer (PrimaryDiffusion registers it so)
        update = diffusion_step(grouped, coef, self.basis.to(coef.dtype), self.offsets, self_weight=0., method='conv')
        return x + self.drop_path(update.reshape(H, W, B, C).permute(2, 0, 1, 3))


class FixedMethodDiffusion(PrimaryDiffusion):
    """The shipped step with one implementation forced (``'conv'`` or ``'shift'``) instead of the per-device rule:
    what ``eval/speed/diffusion_forms.py`` and ``eval/speed/gpu_benchmark.py`` time against each other. Same math."""

    def __init__(self, dim: int, offsets: Sequence[int] = DEFAULT_OFFSETS, drop_path: float = 0.,
                 method: str = 'conv', **kwargs):
        super().__init__(dim, offsets, drop_path=drop_path, **kwargs)
        self.method = method

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_padding(padding_mask)
        if self.training and self.has_drop_path:
            return x + self.drop_path(diffusion_step(x, self.coefficients(), self.basis, self.offsets, 0., self.method))
        return diffusion_step(x, self.coefficients(), self.basis, self.offsets, method=self.method)


class NoAttention(nn.Module):
    """Ablation: A_diff removed (the branch adds zero; no parameters)."""

    def __init__(self, dim: int, num_heads: int = 1, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.zeros_like(x)


class NoAttentionBlock(LdnBlock):
    """Ablation: the block without its A_diff branch (no attention, norm or layer scale parameters)."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        kwargs['attn_layer'] = NoAttention
        super().__init__(dim, num_heads, **kwargs)
        self.norm1 = nn.Identity()
        self.ls1 = nn.Identity()


# φ alternatives; all strictly positive, so D⁻¹W stays a row-stochastic averaging operator
FEATURE_MAPS = {
    'relu': lambda x: F.relu(x) + 1e-3,  # the floor keeps every w_ij, and so the normaliser, strictly positive
    'softplus': F.softplus,
}


class _SplitHeadsAttention(DiffusionAttention):
    """A_diff with another kernel: ``attend(q, k, v, padding_mask)`` on ``(B, heads, N, d)``; grids and sequences."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.attend(q, k, v, padding_mask).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)).reshape(shape)


class FeatureMapAttention(_SplitHeadsAttention):
    """Linear A_diff with another positive feature map φ (``'relu'`` or ``'softplus'``) than the shipped elu+1."""
    phi: torch.jit.Final[str]

    def __init__(self, dim: int, num_heads: int = 8, phi: str = 'relu', **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if phi not in FEATURE_MAPS:
            raise ValueError(f'phi must be one of {list(FEATURE_MAPS)}, got {phi!r}.')
        self.phi = phi

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        # FEATURE_MAPS[self.phi] spelled out: TorchScript compiles neither the dict of lambdas nor a Callable argument
        if self.phi == 'relu':
            return F.relu(x) + 1e-3
        return F.softplus(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # φ applied here: TorchScript compiles no Callable argument
        return feature_diffusion_attention(self.feature_map(q), self.feature_map(k), v, padding_mask)


class SoftmaxDiffusionAttention(_SplitHeadsAttention):
    """Exact kernel ``w_ij = exp(q_i·k_j/√d)``: softmax attention minus the identity (``O(N²)``, fused SDPA; a
    diagnostic, not a shipped option). Padded tokens are no keys; rows still sum to zero."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = None if padding_mask is None else (~padding_mask)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) - v


class OverlapConvStem(nn.Module):
    """Overlapping conv stem of total stride ``patch_size``: log2(p) 3×3 stride-2 convs (LayerNorm2d + GELU
    between), widths doubling up to ``embed_dim``, then LayerNorm; output channels-last ``(B, h, w, C)``."""

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Optional[Callable] = None, act_layer: Type[nn.Module] = nn.GELU,
                 dynamic_img_pad: bool = False, device=None, dtype=None, **kwargs):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        num_convs = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2 ** num_convs != patch_size:
            raise ValueError(f'OverlapConvStem needs a power-of-two patch_size >= 2, got {patch_size}.')
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
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_pad:
            x = pad_to_patch_multiple(x, self.patch_size)
        x = self.convs(self.proj(x))
        return self.norm(x.permute(0, 2, 3, 1))
