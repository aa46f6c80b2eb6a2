"""LDN on token sequences: the same three terms and time step as the image model, on a path graph 0 … L−1.

    H ← H + δt ⊙ K(H)                       multi-scale path Laplacian, offsets 1, 2, 4, …, no-flux at each real end
    H ← H + γ ⊙ W_o · A_diff(LN(H))         linear-time diffusion attention over the real tokens
    H ← H + F(LN(H))                         MLP, optionally with a depthwise conv1d on its hidden layer

Inputs are integer tokens (``vocab_size``) or continuous features (``in_features``, e.g. one pixel per step), with an
optional ``padding_mask`` ``(B, L)``, True where padded (PyTorch's ``src_key_padding_mask``). Padded positions are
not nodes of the graph: they touch no K edge, are no A_diff key, are zeroed before the conv and left out of the pool,
so a sequence's output is the same whether or not padding follows it. The operators' math is
``timm_ldn.diffusion``'s (``path_diffusion_step``, ``packed_linear_diffusion_attention``).

Weights save and load as safetensors + ``config.json`` through ``huggingface_hub``'s ``PyTorchModelHubMixin``
(``save_pretrained`` / ``from_pretrained``); :func:`load_published` verifies a published file's sha256 against the
project's manifest first.
"""
import math
from typing import Any, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from huggingface_hub import PyTorchModelHubMixin
from timm.layers import DropPath, LayerScale, trunc_normal_

from .diffusion import PATH_NEIGHBOURS_PER_SCALE, diffusion_coefficients, path_diffusion_step
from .ldn import DiffusionAttention

__all__ = ['PathDiffusion', 'TokenDepthwiseConv1d', 'DwConv1dMlp', 'LdnSequenceBlock', 'LdnSequenceEncoder', 'LdnSequenceClassifier',
           'SinusoidalPositions', 'default_offsets', 'load_published', 'sinusoidal_positions']


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


class PathDiffusion(nn.Module):
    """One primary diffusion step ``H + δt ⊙ K(H)`` on sequences ``(B, L, C)``; padded tokens are not nodes.

    ``a_s = softplus(a_raw_s)`` per scale and channel, ``δt = 0.99·sigmoid(τ) / Σ_s 2·a_s``: strictly inside the
    explicit-Euler bound, so every step is a convex average of real neighbours.
    """

    def __init__(self, dim: int, offsets: Sequence[int], drop_path: float = 0., tau_init: float = -1.):
        super().__init__()
        offsets = [int(d) for d in offsets]
        if not offsets or min(offsets) < 1 or len(set(offsets)) != len(offsets):
            raise ValueError(f'diffusion offsets must be distinct positive ints, got {offsets}.')
        self.offsets = offsets
        self.a_raw = nn.Parameter(torch.zeros(len(offsets), dim))
        self.tau = nn.Parameter(torch.full((dim,), float(tau_init)))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def coefficients(self) -> torch.Tensor:
        """``δt·a_s``, ``(S, C)``."""
        return diffusion_coefficients(self.a_raw, self.tau, PATH_NEIGHBOURS_PER_SCALE)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.drop_path(path_diffusion_step(x, self.coefficients(), self.offsets, padding_mask, 0.))


class TokenDepthwiseConv1d(nn.Module):
    """Depthwise conv1d (odd kernel, zero padding) on token-major sequences ``(B, L, C)``.

    The same weights and result as ``nn.Conv1d(C, C, k, padding=k // 2, groups=C)`` on ``x.transpose(1, 2)``
    (``weight`` ``(C, 1, k)``, ``bias`` ``(C,)``), without the layout round trip: ``(B, L, C)`` viewed as
    ``(B, C, L, 1)`` is a channels_last image, which the ``k×1`` depthwise conv2d reads and writes as is. On this CPU
    (1 thread, 32 x 245 x 256, forward + backward) that took 7-11 ms, against 53-57 ms for shifted multiply-adds and
    2.5x those for conv1d with its two transposes.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}.')
        self.kernel_size = kernel_size
        bound = 1 / math.sqrt(kernel_size)  # nn.Conv1d's default init for a depthwise kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        y = F.conv2d(x.reshape(B, L, 1, C).permute(0, 3, 1, 2), self.weight.unsqueeze(-1), self.bias,
                     padding=(self.kernel_size // 2, 0), groups=C)
        return y.permute(0, 2, 3, 1).reshape(B, L, C)


class DwConv1dMlp(nn.Module):
    """F with a depthwise conv1d (kernel 3) on the hidden layer; padded positions are zeroed before the conv, so a
    real token next to padding sees the same zero a sequence end gives it."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Type[nn.Module] = nn.GELU,
                 drop: float = 0., kernel_size: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = TokenDepthwiseConv1d(hidden_features, kernel_size)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.fc1(x)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.)
        x = self.drop1(self.act(self.dwconv(x)))
        return self.drop2(self.fc2(x))


class _Mlp(nn.Module):
    """The per-token MLP F (no conv), with the masked call signature of :class:`DwConv1dMlp`."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Type[nn.Module] = nn.GELU,
                 drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LdnSequenceBlock(nn.Module):
    """One LDN layer on sequences ``(B, L, C)``: diffusion step, then two pre-norm branches, all masked."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            offsets: Sequence[int],
            mlp_ratio: float = 4.,
            mlp_conv: bool = True,
            drop_path: float = 0.,
            proj_drop: float = 0.,
            ls_init_value: float = 1.,
            diffusion_layer: Type[nn.Module] = PathDiffusion,
            attn_layer: Type[nn.Module] = DiffusionAttention,
    ):
        super().__init__()
        self.diffusion = diffusion_layer(dim, offsets, drop_path=drop_path)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_layer(dim, num_heads=num_heads, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=ls_init_value)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        mlp_layer = DwConv1dMlp if mlp_conv else _Mlp
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.diffusion(x, padding_mask)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), padding_mask)))
        x = x + self.drop_path2(self.mlp(self.norm2(x), padding_mask))
        return x


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


class LdnSequenceEncoder(nn.Module):
    """Embedding (tokens or features) and a stack of :class:`LdnSequenceBlock`; returns ``(B, L, C)``."""

    def __init__(
            self,
            vocab_size: Optional[int] = None,
            in_features: Optional[int] = None,
            embed_dim: int = 64,
            depth: int = 4,
            num_heads: int = 4,
            mlp_ratio: float = 4.,
            mlp_conv: bool = True,
            max_len: int = 2048,
            diffusion_offsets: Optional[Sequence[int]] = None,
            drop_path_rate: float = 0.,
            proj_drop_rate: float = 0.,
            diffusion_layer: Type[nn.Module] = PathDiffusion,
            attn_layer: Type[nn.Module] = DiffusionAttention,
            pos_embed_layer: Optional[Type[nn.Module]] = None,
    ):
        """``pos_embed_layer``: e.g. :class:`SinusoidalPositions`, built as ``pos_embed_layer(embed_dim, max_len)``
        and called as ``layer(x, padding_mask)`` on the normalised embedding; None: no absolute positions."""
        super().__init__()
        if (vocab_size is None) == (in_features is None):
            raise ValueError('Give exactly one of vocab_size (integer tokens) and in_features (continuous inputs), '
                             f'got vocab_size={vocab_size}, in_features={in_features}.')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).')
        self.vocab_size = vocab_size
        self.in_features = in_features
        self.embed_dim = embed_dim
        self.offsets = tuple(int(d) for d in (diffusion_offsets or default_offsets(max_len)))
        self.embed = nn.Embedding(vocab_size, embed_dim) if vocab_size is not None else nn.Linear(in_features,
                                                                                                  embed_dim)
        # Token embeddings are normalised; continuous ones are not: LayerNorm after a linear map is invariant to the
        # input's scale (LN(W·αx) = LN(W·x) for α > 0 at zero bias), so a one-pixel-per-step embedding would keep
        # only each pixel's sign
        self.norm_embed = nn.LayerNorm(embed_dim, eps=1e-6) if vocab_size is not None else nn.Identity()
        # after the norm, where unit-scale positions meet unit-scale tokens (added to the std-0.02 raw token
        # embeddings they swamp them: the ListOps screen's ldn_sinpos_raw did not learn, 16.95 % val)
        self.pos_embed = pos_embed_layer(embed_dim, max_len) if pos_embed_layer is not None else None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            LdnSequenceBlock(embed_dim, num_heads, self.offsets, mlp_ratio, mlp_conv, dpr[i], proj_drop_rate,
                             diffusion_layer=diffusion_layer, attn_layer=attn_layer)
            for i in range(depth)])

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_sequence_batch(x, padding_mask, self.vocab_size, self.in_features)
        x = self.norm_embed(self.embed(x))
        if self.pos_embed is not None:
            x = self.pos_embed(x, padding_mask)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.)
        for blk in self.blocks:
            x = blk(x, padding_mask)
        return x


class LdnSequenceClassifier(nn.Module, PyTorchModelHubMixin, library_name='timm-ldn', tags=['ldn', 'sequence']):
    """:class:`LdnSequenceEncoder`, a masked mean pool over the real tokens, a LayerNorm and a linear head.

    ``model(x, padding_mask=None)``: ``x`` ``(B, L)`` token ids or ``(B, L, in_features)`` floats. Arguments use
    timm's vocabulary (``num_classes``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``drop_path_rate``).
    ``pos_embed=True`` adds :class:`SinusoidalPositions` (sequences up to ``max_len``): use it where *where* a token
    sits matters beyond its neighbours, as in pixel sequences (a bool, not a layer type, so ``config.json`` keeps it;
    :class:`LdnSequenceEncoder` takes any ``pos_embed_layer``).
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
            mlp_conv: bool = True,
            max_len: int = 2048,
            diffusion_offsets: Optional[Sequence[int]] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            proj_drop_rate: float = 0.,
            pos_embed: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
        self.num_classes = num_classes
        self.encoder = LdnSequenceEncoder(
            vocab_size, in_features, embed_dim, depth, num_heads, mlp_ratio, mlp_conv, max_len, diffusion_offsets,
            drop_path_rate, proj_drop_rate, pos_embed_layer=SinusoidalPositions if pos_embed else None)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            trunc_normal_(m.weight, std=.02)

    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(('diffusion.a_raw', 'diffusion.tau'))}

    def forward_features(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encoder(x, padding_mask)

    def pool(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean over the real tokens, ``(B, C)``."""
        if padding_mask is None:
            return x.mean(1)
        real = (~padding_mask).to(x.dtype).unsqueeze(-1)
        return (x * real).sum(1) / real.sum(1)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.pool(self.forward_features(x, padding_mask), padding_mask)
        return self.head(self.head_drop(self.norm(x)))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> 'LdnSequenceClassifier':
        try:
            return super()._from_pretrained(model_id=model_id, **kwargs)
        except RuntimeError as e:  # strict state-dict mismatch: one message with the fix
            raise RuntimeError(
                f'{model_id}: the weights do not fit an LdnSequenceClassifier built from its config.json ({e}). '
                'Re-export the checkpoint with save_pretrained from the model that trained it.') from None
        except TypeError as e:  # a config.json key the constructor does not take
            raise ValueError(f'{model_id}: config.json does not describe an LdnSequenceClassifier ({e}).') from None


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
