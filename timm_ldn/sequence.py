"""LDN on token sequences: the same three terms and time step as the image model, on a path graph 0 … L−1.

    H ← H + β ⊙ (P·H − H)                   diffusion step, P = (I − δt·K)⁻¹ solved exactly (default,
                                             ImplicitPathDiffusion), or H ← H + δt ⊙ K(H), the paper's explicit step
                                             (PathDiffusion: offsets 1, 2, 4, …, no-flux at each real end)
    H ← H + γ ⊙ W_o · A_diff(LN(H))         linear-time diffusion attention over the real tokens
    H ← H + F(LN(H))                         MLP, optionally with a depthwise conv1d on its hidden layer

The defaults are the form the long-range study chose by measurement (eval/lra/README.md, issue 27): the implicit
step, sinusoidal positions and PyTorch's Linear init; ``diffusion_layer=PathDiffusion, pos_embed=False,
weight_init='trunc_normal'`` is the paper's form (and that of every model published before 2026-12-07, whose
config.json rebuilds it).

Inputs are integer tokens (``vocab_size``) or continuous features (``in_features``, e.g. one pixel per step), with an
optional ``padding_mask`` ``(B, L)``, True where padded (PyTorch's ``src_key_padding_mask``). Padded positions are
not nodes of the graph: they touch no K edge, are no A_diff key, are zeroed before the conv and left out of the pool,
so a sequence's output is the same whether or not padding follows it. The operators' math is
``timm_ldn.diffusion``'s (``path_exponential_diffusion``, ``path_diffusion_step``,
``packed_linear_diffusion_attention``).

Weights save and load as safetensors + ``config.json`` through ``huggingface_hub``'s ``PyTorchModelHubMixin``
(``save_pretrained`` / ``from_pretrained``); :func:`load_published` verifies a published file's sha256 against the
project's manifest first.
"""
import importlib
import math
from functools import partial
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from huggingface_hub import PyTorchModelHubMixin
from timm.layers import Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models._manipulate import checkpoint

from .diffusion import (
    PATH_NEIGHBOURS_PER_SCALE, SELECTIVE_MAX_RATE, chunked_softmax_diffusion_attention, feature_diffusion_attention,
    path_diffusion_step, path_exponential_diffusion, selective_path_diffusion, taylor_feature_map,
)
from .ldn import DiffusionAttention, DiffusionParams, DwConvMlp, ImplicitDiffusionParams, LdnBlock

__all__ = ['PathDiffusion', 'ImplicitPathDiffusion', 'SelectivePathDiffusion', 'TaylorDiffusionAttention', 'ChunkedSoftmaxDiffusionAttention',
           'TokenDepthwiseConv1d', 'DwConv1dMlp', 'LdnSequenceClassifier', 'SinusoidalPositions', 'default_offsets',
           'load_published', 'sinusoidal_positions', 'layer_path', 'resolve_layer']


def default_offsets(max_len: int) -> Tuple[int, ...]:
    """Powers of two 1, 2, 4, … below ``max_len``: the path graph's diameter is then ``O(log L)`` hops, at
    ``log2 L`` shifted adds per step (the cost stays linear in L)."""
    offsets, d = [], 1
    while d < max(max_len, 2):
        offsets.append(d)
        d *= 2
    return tuple(offsets)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed sinusoidal table ``(length, dim)``: sin on even channels, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[:dim // 2])
    return pe


class SinusoidalPositions(nn.Module):
    """Adds fixed sinusoidal positions to ``(B, L, C)``; a token's position is its rank among its sequence's real
    tokens, so padding (before, inside or after a sequence) shifts no real token's position.

    K and A_diff give LDN no absolute position: K and the conv are shift-equivariant and A_diff is
    permutation-equivariant, so after the mean pool a model without positions hardly knows *where* a token was.
    On permuted pixel sequences that cost 28.7 test points (psFMNIST seed 0: 37.81 % without, 66.50 % with;
    eval/lra/README.md). No parameters, and the table is not saved, so checkpoints with and without positions
    have the same keys.
    """

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer('table', sinusoidal_positions(max_len, dim), persistent=False)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        L, max_len = x.shape[1], self.table.shape[0]
        if L > max_len:
            raise ValueError(f'Sequence length {L} exceeds the position table (max_len={max_len}). Create the model '
                             f'with max_len >= {L}.')
        if padding_mask is None:
            return x + self.table[:L].to(x.dtype)
        rank = ((~padding_mask).cumsum(1) - 1).clamp(min=0)
        return x + self.table[rank].to(x.dtype)


class PathDiffusion(DiffusionParams):
    """One primary diffusion step ``H + δt ⊙ K(H)`` on sequences ``(B, L, C)``; padded tokens are not nodes.

    The path graph's K (offsets ``i ± d``) with the coefficients of :class:`~timm_ldn.ldn.DiffusionParams`:
    ``δt = 0.99·sigmoid(τ) / Σ_s 2·a_s``, strictly inside the explicit-Euler bound, so every step is a convex
    average of real neighbours.
    """
    graph_neighbours = PATH_NEIGHBOURS_PER_SCALE

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.drop_path(path_diffusion_step(x, self.coefficients(), self.offsets, padding_mask, 0.))


class ImplicitPathDiffusion(ImplicitDiffusionParams):
    """The diffusion step solved implicitly, ``H ← H + β ⊙ (P·H − H)``, on sequences ``(B, L, C)``.

    ``P = (I − δt·K)⁻¹`` is the implicit-Euler step of diffusion (with ``drift=True``, advection–diffusion) on the
    path graph, per channel: a two-sided exponential kernel over the sequence's real tokens, renormalised per row
    (:func:`~timm_ldn.diffusion.path_exponential_diffusion`). It is a convex average for every ``δt > 0``, so the
    length scale ``ℓ`` (``δt·a = r/(1 − r)²``, ``r = exp(−1/ℓ)``) is learned with no upper bound, initialised
    log-uniform across channels from one token to ``2·max(offsets)`` (the default offsets reach ``max_len / 2``):
    one layer mixes at every scale, and every output depends on every real input (Theorem 1 at depth 1). The
    length scales and the (token-adaptive) step fraction ``β``: :class:`~timm_ldn.ldn.ImplicitDiffusionParams`.

    * ``drift``: the left and right halves get their own scales, ``log ℓ ± drift`` (an upwind drift, so a channel
      can look mostly left or right; rows stay convex, the channel mean is no longer conserved).

    Cost ``O(L log L)`` per channel (two FFT convolutions), parallel over tokens, never an ``L×L`` tensor.
    """

    def __init__(
            self,
            dim: int,
            offsets: Sequence[int] = (1,),
            drop_path: float = 0.,
            drift: bool = True,
            adaptive_step: bool = True,
            step_rank: int = 8,
            tau_init: float = -1.,
            device=None,
            dtype=None,
    ):
        super().__init__(dim, offsets, drop_path=drop_path, adaptive_step=adaptive_step, step_rank=step_rank,
                         tau_init=tau_init, device=device, dtype=dtype)
        self.drift = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if drift else None

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        left = right = self.log_scale
        if self.drift is not None:
            left, right = left + self.drift, right - self.drift
        avg = path_exponential_diffusion(x, left, right, padding_mask)
        return x + self.drop_path(self.step_fraction(x) * (avg - x))


class SelectivePathDiffusion(ImplicitPathDiffusion):
    """The implicit step with token-dependent conductances, ``H ← H + β ⊙ (P·H − H)``, on sequences ``(B, L, C)``.

    :class:`ImplicitPathDiffusion` with a length scale per token as well as per channel: the edge between tokens
    ``i − 1`` and ``i`` decays the average by ``exp(−λ_i)``, ``log λ_i = v_i − log ℓ`` with ``v = W_up·W_down·LN(H_i)``
    (rank ``wall_rank``, ``W_up`` starting at zero: at init the layer is :class:`ImplicitPathDiffusion`). A token
    can raise a wall before itself (``λ`` up to 10: the average barely crosses it, so a bracket can close a
    span) or bridge a long stretch (``λ → 0``): the paper's adaptive time step made selective inside the kernel, as
    Mamba makes its decay. The kernel ``exp(−Σ λ over the edges between i and j)`` is the resolvent of a path
    Laplacian with those conductances (:func:`~timm_ldn.diffusion.selective_path_diffusion`); every row stays a
    convex average of the real tokens, padding is no node. Two scans per layer, ``O(L)`` per channel.
    """

    def __init__(self, dim: int, offsets: Sequence[int] = (1,), wall_rank: int = 8, device=None, dtype=None,
                 **kwargs: Any):
        """``kwargs``: :class:`ImplicitPathDiffusion`'s (``drop_path``, ``drift``, ``adaptive_step``, ``step_rank``,
        ``tau_init``)."""
        super().__init__(dim, offsets, device=device, dtype=dtype, **kwargs)
        self.wall_down = nn.Linear(dim, wall_rank, bias=False, device=device, dtype=dtype)
        self.wall_up = nn.Linear(wall_rank, dim, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.wall_up.weight)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        left = right = self.log_scale
        if self.drift is not None:
            left, right = left + self.drift, right - self.drift
        v = self.wall_up(self.wall_down(F.layer_norm(x, x.shape[-1:])))
        # λ = e^{v − log ℓ}, capped where the scan caps it (log 10) before the exp: no inf, no 0·inf gradient
        cap = math.log(SELECTIVE_MAX_RATE)
        rate_left, rate_right = (torch.exp((v - s).clamp(max=cap)) for s in (left, right))
        avg = selective_path_diffusion(x, rate_left, rate_right, padding_mask)
        return x + self.drop_path(self.step_fraction(x) * (avg - x))


class TaylorDiffusionAttention(DiffusionAttention):
    """A_diff with the Taylor kernel ``w_ij = 1 + s_ij + s_ij²/2``, ``s_ij = q_i·k_j/√d``: the second-order form of
    softmax's ``exp(s_ij)`` (as in Based), positive for every ``s`` (``≥ 1/2``), in linear time through the feature
    map ``[1, q, q⊗q/√2]``. Rows of ``D⁻¹W − I`` sum to zero; padded tokens are no keys. (elu + 1 gives each
    query's largest weight only ~1.07x the uniform one at init; this kernel, like softmax, is sharper.)

    ``qk_dim``: width of each head's q and k (8; None: the head width). The map has ``1 + qk_dim + qk_dim²``
    features per head, so, as Based does, a narrow q / k keeps the cost near the elu + 1 form's: at width 64 with
    4 heads, ``qk_dim=8`` gives 73 features where 16 would give 273.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.,
                 qk_dim: Optional[int] = 8, device=None, dtype=None):
        super().__init__(dim, num_heads, qkv_bias, proj_drop, device=device, dtype=dtype)
        self.qk_dim = qk_dim or self.head_dim
        # [q | k | v] with narrow q and k: the parent's validation, heads and projection, a projection of this width
        self.qkv = nn.Linear(dim, 2 * num_heads * self.qk_dim + dim, bias=qkv_bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        B, N, C = x.shape
        h, e = self.num_heads, self.qk_dim
        qk, v = self.qkv(x).split([2 * h * e, C], -1)
        q, k = qk.view(B, N, 2, h, e).permute(2, 0, 3, 1, 4).unbind(0)
        v = v.view(B, N, h, self.head_dim).transpose(1, 2)
        y = feature_diffusion_attention(taylor_feature_map(q), taylor_feature_map(k), v, padding_mask)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, C))).reshape(shape)


class ChunkedSoftmaxDiffusionAttention(DiffusionAttention):
    """A_diff with the softmax kernel inside fixed chunks of ``chunk_size`` tokens:
    ``(softmax(QKᵀ/√d) − I)·V`` over each chunk's real tokens (:func:`~timm_ldn.diffusion.chunked_softmax_diffusion_attention`).
    Rows sum to zero; ``O(L·chunk_size)``, never an ``L×L`` tensor. Selective as softmax (elu + 1 and the Taylor
    kernel start near uniform), local by construction: pair it with a diffusion layer that is global after one
    step (``ImplicitPathDiffusion``), as Mega pairs chunked attention with an EMA. Appended padding moves no real
    token between chunks.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.,
                 chunk_size: int = 128, device=None, dtype=None):
        super().__init__(dim, num_heads, qkv_bias, proj_drop, device=device, dtype=dtype)
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be a positive number of tokens, got {chunk_size}.')
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = chunked_softmax_diffusion_attention(q, k, v, self.chunk_size, padding_mask)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, C))).reshape(shape)


class TokenDepthwiseConv1d(nn.Module):
    """Depthwise conv1d (odd kernel, zero padding) on token-major sequences ``(B, L, C)``.

    The same weights and result as ``nn.Conv1d(C, C, k, padding=k // 2, groups=C)`` on ``x.transpose(1, 2)``
    (``weight`` ``(C, 1, k)``, ``bias`` ``(C,)``), without the layout round trip: ``(B, L, C)`` viewed as
    ``(B, C, L, 1)`` is a channels_last image, which the ``k×1`` depthwise conv2d reads and writes as is. On this CPU
    (1 thread, 32 x 245 x 256, forward + backward) that took 7-11 ms, against 53-57 ms for shifted multiply-adds and
    2.5x those for conv1d with its two transposes.
    """

    def __init__(self, channels: int, kernel_size: int = 3, device=None, dtype=None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}.')
        self.kernel_size = kernel_size
        bound = 1 / math.sqrt(kernel_size)  # nn.Conv1d's default init for a depthwise kernel
        dd = {'device': device, 'dtype': dtype}
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, **dd).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels, **dd).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        y = F.conv2d(x.reshape(B, L, 1, C).permute(0, 3, 1, 2), self.weight.unsqueeze(-1), self.bias,
                     padding=(self.kernel_size // 2, 0), groups=C)
        return y.permute(0, 2, 3, 1).reshape(B, L, C)


class DwConv1dMlp(DwConvMlp):
    """F with a depthwise conv1d (kernel 3) on the hidden layer: :class:`~timm_ldn.ldn.DwConvMlp` on sequences
    ``(B, L, C)`` (padded positions zeroed before the conv)."""

    @staticmethod
    def make_conv(channels: int, device=None, dtype=None) -> nn.Module:
        return TokenDepthwiseConv1d(channels, 3, device=device, dtype=dtype)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)  # already token-major


def check_sequence_batch(x: torch.Tensor, padding_mask: Optional[torch.Tensor], vocab_size: Optional[int],
                         in_features: Optional[int]) -> None:
    """Reject inputs the encoder cannot process with a ``ValueError`` naming the problem and the fix."""
    if vocab_size is not None:
        if x.dim() != 2:
            raise ValueError(f'A token model expects token ids of shape (B, L), got {tuple(x.shape)}. '
                             'For one sequence use x.unsqueeze(0).')
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f'This model was created with vocab_size={vocab_size} and takes integer token ids, got '
                             f'a {x.dtype} tensor. Pass ids as torch.long, or create the model with in_features=... '
                             'for continuous inputs.')
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
            raise ValueError(f'Token ids must lie in [0, {vocab_size}), got ids in [{int(x.min())}, {int(x.max())}]. '
                             'Map them into the vocabulary, or create the model with a larger vocab_size.')
    else:
        if x.dim() == 2 and in_features == 1 and x.is_floating_point():
            raise ValueError(f'A feature model expects (B, L, in_features={in_features}), got {tuple(x.shape)}: '
                             'add the feature axis with x.unsqueeze(-1).')
        if x.dim() != 3 or x.shape[-1] != in_features:
            raise ValueError(f'This model was created with in_features={in_features} and expects (B, L, '
                             f'{in_features}), got {tuple(x.shape)}.')
        if not x.is_floating_point():
            raise ValueError(f'This model was created with in_features={in_features} and takes float features, got a '
                             f'{x.dtype} tensor. Convert with x.float(), or create the model with vocab_size=... for '
                             'token ids.')
    B, L = x.shape[:2]
    if B == 0 or L == 0:
        raise ValueError(f'Empty batch or sequence (shape {tuple(x.shape)}): pass at least one token per sequence.')
    if padding_mask is not None:
        if padding_mask.shape != (B, L):
            raise ValueError(f'padding_mask must have shape (B, L) = {(B, L)} like the input, got '
                             f'{tuple(padding_mask.shape)}.')
        if padding_mask.dtype != torch.bool:
            raise ValueError(f'padding_mask must be a bool tensor (True where padded), got {padding_mask.dtype}. '
                             'Convert with mask.bool().')
        empty = padding_mask.all(1)
        if bool(empty.any()):
            raise ValueError(f'Sequence(s) {empty.nonzero().flatten().tolist()} are all padding: every sequence needs '
                             'at least one real token. Drop them from the batch.')


LayerType = Union[str, Type[nn.Module]]


def layer_path(layer: type) -> str:
    """``'module:QualName'`` of a layer type: how ``config.json`` records it (see :func:`resolve_layer`)."""
    if not isinstance(layer, type) or '<' in layer.__qualname__:
        raise ValueError(f'{layer!r} cannot be saved in config.json: pass an importable class (a module-level '
                         'subclass instead of a functools.partial or a local class).')
    return f'{layer.__module__}:{layer.__qualname__}'


def resolve_layer(layer: LayerType) -> Type[nn.Module]:
    """A layer type, or the ``'module:QualName'`` that ``config.json`` stores for one, as the class."""
    if not isinstance(layer, str):
        return layer
    module, _, qualname = layer.partition(':')
    try:
        obj = importlib.import_module(module)
        for part in qualname.split('.'):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f'Layer type {layer!r} (from config.json?) cannot be imported ({e}); install the package '
                         'that defines it, or pass the class itself.') from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f'{layer!r} is not an nn.Module class.')
    return obj


WEIGHT_INITS = ('trunc_normal', 'torch')


class LdnSequenceClassifier(
        nn.Module, PyTorchModelHubMixin, library_name='timm-ldn', tags=['ldn', 'sequence'],
        coders={type: (layer_path, resolve_layer)}):
    """LDN on sequences, shaped like a timm model: embedding, a stack of :class:`~timm_ldn.ldn.LdnBlock`, a masked
    mean pool over the real tokens, LayerNorm, dropout and a linear head.

    ``model(x, padding_mask=None)``: ``x`` ``(B, L)`` token ids or ``(B, L, in_features)`` floats, ``padding_mask``
    ``(B, L)`` bool, True where padded. ``forward_features`` returns the tokens ``(B, L, C)``, ``forward_head`` pools
    and classifies; ``num_classes=0`` gives pooled features.

    Every term is a layer-type argument, as in timm's ``vision_transformer.py`` (``block_fn``, ``diffusion_layer``,
    ``attn_layer``, ``mlp_layer``, ``norm_layer``); ``save_pretrained`` records each by its import path in
    ``config.json``, so ``from_pretrained`` rebuilds the model that trained (a layer given as a
    ``functools.partial`` runs but cannot be saved: give it a module-level subclass).
    """

    def __init__(
            self,
            num_classes: int = 10,
            vocab_size: Optional[int] = None,
            in_features: Optional[int] = None,
            embed_dim: int = 64,
            depth: int = 4,
            num_heads: int = 4,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            max_len: int = 2048,
            diffusion_offsets: Optional[Sequence[int]] = None,
            ls_init_value: Optional[float] = 1.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            pos_embed: bool = True,
            weight_init: str = 'torch',
            block_fn: LayerType = LdnBlock,
            diffusion_layer: LayerType = ImplicitPathDiffusion,
            attn_layer: LayerType = DiffusionAttention,
            mlp_layer: LayerType = DwConv1dMlp,
            norm_layer: Optional[LayerType] = None,
            act_layer: Optional[LayerType] = None,
    ):
        """
        Args:
            num_classes: Classes of the head (0: no head, pooled features).
            vocab_size: Token vocabulary (integer inputs); exactly one of ``vocab_size`` and ``in_features``.
            in_features: Features per step (continuous inputs, e.g. 1 for one pixel per step).
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias: Width, blocks, A_diff heads, F's ratio, qkv bias.
            max_len: Longest sequence of the position table; sets the default diffusion offsets.
            diffusion_offsets: Offsets of K (default 1, 2, 4, … below ``max_len``).
            ls_init_value: Initial layer scale γ of the A_diff branch (None: none).
            drop_rate, proj_drop_rate, drop_path_rate: Head dropout, projection / MLP dropout, stochastic depth
                (linear over blocks, every branch).
            pos_embed: Add :class:`SinusoidalPositions` after the embedding (where a token sits matters beyond its
                neighbours, as in pixel sequences); sequences may then be at most ``max_len`` long.
            weight_init: ``'trunc_normal'`` (every Linear and the embedding trunc-normal std 0.02, biases 0: timm's
                ViT init) or ``'torch'`` (Linears keep PyTorch's default init; the embedding trunc-normal 0.02).
            block_fn, diffusion_layer, attn_layer, mlp_layer, norm_layer, act_layer: Layer types of the block
                (diffusion: :class:`ImplicitPathDiffusion`, the exact step; :class:`PathDiffusion` is the paper's
                explicit one; norm: LayerNorm eps 1e-6, act: GELU).
        """
        super().__init__()
        if (vocab_size is None) == (in_features is None):
            raise ValueError('Give exactly one of vocab_size (integer tokens) and in_features (continuous inputs), '
                             f'got vocab_size={vocab_size}, in_features={in_features}.')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).')
        if num_classes < 0:
            raise ValueError(f'num_classes must be >= 0 (0: no head), got {num_classes}.')
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f'weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}.')
        norm_layer = resolve_layer(norm_layer) if norm_layer is not None else partial(nn.LayerNorm, eps=1e-6)
        act_layer = resolve_layer(act_layer) if act_layer is not None else nn.GELU
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.in_features = in_features
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.offsets = tuple(int(d) for d in (diffusion_offsets or default_offsets(max_len)))

        self.embed = nn.Embedding(vocab_size, embed_dim) if vocab_size is not None else nn.Linear(in_features,
                                                                                                  embed_dim)
        # Token embeddings are normalised; continuous ones are not: LayerNorm after a linear map is invariant to the
        # input's scale (LN(W·αx) = LN(W·x) for α > 0 at zero bias), so a one-pixel-per-step embedding would keep
        # only each pixel's sign
        self.norm_embed = norm_layer(embed_dim) if vocab_size is not None else nn.Identity()
        # after the norm, where unit-scale positions meet unit-scale tokens (added to the std-0.02 raw token
        # embeddings they swamp them: the ListOps screen's ldn_sinpos_raw did not learn, 16.95 % val)
        self.pos_embed = SinusoidalPositions(embed_dim, max_len) if pos_embed else None
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            resolve_layer(block_fn)(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                diffusion_offsets=self.offsets,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                diffusion_layer=resolve_layer(diffusion_layer),
                attn_layer=resolve_layer(attn_layer),
                mlp_layer=resolve_layer(mlp_layer),
            )
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights(weight_init)
        # checkpoints saved before the encoder folded into the classifier ('encoder.blocks.0...') load unchanged
        self._register_load_state_dict_pre_hook(_strip_encoder_prefix)

    def init_weights(self, mode: str = 'trunc_normal') -> None:
        """(Re-)initialise the Linears and the embedding as ``weight_init`` describes."""
        for m in self.modules():
            if isinstance(m, nn.Embedding) or (isinstance(m, nn.Linear) and mode == 'trunc_normal'):
                trunc_normal_(m.weight, std=.02)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> Set[str]:
        # K's coefficients and time steps set the stability margin; decaying them biases δt, not capacity
        return {n for n, _ in self.named_parameters()
                if n.endswith(('diffusion.a_raw', 'diffusion.tau', 'diffusion.log_scale', 'diffusion.drift'))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's forward in the backward instead of saving its activations (timm's API): training
        memory falls to the block inputs plus one block's, for about one more forward of compute."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``(B, L, C)`` after the last block (padded positions carry no information)."""
        check_sequence_batch(x, padding_mask, self.vocab_size, self.in_features)
        x = self.norm_embed(self.embed(x))
        if self.pos_embed is not None:
            x = self.pos_embed(x, padding_mask)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, padding_mask)
            else:
                x = blk(x, padding_mask)
        return x

    def pool(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean over the real tokens, ``(B, C)``."""
        if padding_mask is None:
            return x.mean(1)
        real = (~padding_mask).to(x.dtype).unsqueeze(-1)
        return (x * real).sum(1) / real.sum(1)

    def forward_head(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                     pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.norm(self.pool(x, padding_mask)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, padding_mask), padding_mask)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> 'LdnSequenceClassifier':
        if 'mlp_conv' in kwargs:  # config.json of the first published weights: F's conv was a bool
            kwargs['mlp_layer'] = DwConv1dMlp if kwargs.pop('mlp_conv') else Mlp
        for key, value in _FIRST_PUBLISHED_FORM.items():  # a key config.json lacks predates it: the form of then
            kwargs.setdefault(key, value)
        try:
            return super()._from_pretrained(model_id=model_id, **kwargs)
        except RuntimeError as e:  # strict state-dict mismatch: one message with the fix
            raise RuntimeError(
                f'{model_id}: the weights do not fit an LdnSequenceClassifier built from its config.json ({e}). '
                'Re-export the checkpoint with save_pretrained from the model that trained it.') from None
        except TypeError as e:  # a config.json key the constructor does not take
            raise ValueError(f'{model_id}: config.json does not describe an LdnSequenceClassifier ({e}).') from None


# What the model was before each of these arguments existed (the first published weights' form): a config.json
# without the key was written then, so it rebuilds the model that trained, whatever the defaults become.
_FIRST_PUBLISHED_FORM: Dict[str, Any] = dict(
    diffusion_layer=PathDiffusion, attn_layer=DiffusionAttention, block_fn=LdnBlock, pos_embed=False,
    weight_init='trunc_normal', ls_init_value=1., qkv_bias=True)


def _strip_encoder_prefix(state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + 'encoder.')]:
        state_dict[prefix + key[len(prefix) + len('encoder.'):]] = state_dict.pop(key)


def load_published(name: str, cache_dir: Optional[str] = None, **kwargs: Any) -> LdnSequenceClassifier:
    """A published sequence model by manifest name (``weights/manifest.json``): the file's sha256 is verified
    before loading (from the Hub, or from the copy shipped in ``weights/`` when the Hub cannot be reached)."""
    from pathlib import Path

    from .hub import NoPretrainedWeightsError, WeightsError, load_manifest, local_weight_file, verified_snapshot
    entry = load_manifest().get('weights', {}).get(name)
    if entry is None:
        raise NoPretrainedWeightsError(f'No published sequence model {name!r} in the weights manifest.')
    try:
        folder = verified_snapshot(name, cache_dir=cache_dir)
    except WeightsError:
        local = local_weight_file(name)
        if local is None:
            raise
        folder = Path(local).parent
    return LdnSequenceClassifier.from_pretrained(str(folder), **kwargs)
