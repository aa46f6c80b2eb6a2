"""The sequence benchmark's rows under one recipe: LDN, a softmax Transformer, a linear-attention Transformer and
two LDN ablations. Same width, depth, heads and MLP ratio; the same embedding, masked mean pool, norm and head.

* ``ldn``: ``timm_ldn.sequence.LdnSequenceClassifier`` (no position embedding: K's stencil is position-aware).
* ``transformer``: PyTorch's own ``nn.TransformerEncoderLayer`` (pre-norm, GELU, ``src_key_padding_mask``) with
  fixed sinusoidal positions (no parameters, so the rows' parameter counts stay within a few % of each other).
* ``linear_transformer``: the same pre-norm layer with linear attention ``φ(Q)(φ(K)ᵀV) / φ(Q)φ(K)ᵀ1``, ``φ = elu+1``
  (Katharopoulos et al. 2020): the known-fail control on ListOps (LRA: 16.1 %).
* ``ldn_no_adiff`` / ``ldn_no_k``: LDN with the A_diff branch / the K step removed (the block's modules replaced).
* ``ldn_k_local``: LDN with K's offsets cut to 1, 2, 4, 8 (the offset screen: how far K itself should reach).
* ``ldn_sinpos``: LDN with the Transformer's sinusoidal positions added after the embedding's LayerNorm, where
  tokens and positions have the same scale (does LDN lack a position signal that K alone does not give?). Since
  the package's ``LdnSequenceClassifier(pos_embed=True)``; the same math as the wrapper its first runs used.
* ``ldn_sinpos_raw``: the same positions added *before* that LayerNorm, to the std-0.02 token embeddings: positions
  are then ~50x the token signal (kept because the screen ran it: it does not learn).
* ``ldn_softmax_adiff`` / ``ldn_softmax_adiff_sinpos``: LDN whose A_diff uses the softmax kernel,
  ``(softmax(QKᵀ/√d) − I)·V`` (rows still sum to zero; quadratic, so a diagnostic, not a shipped option), without
  and with positions: is a more selective kernel what LDN's ListOps gap needs?
* ``ldn_softmax_sinpos_no_k_no_conv``: ``ldn_softmax_adiff_sinpos`` without F's conv1d and without K, walking LDN
  towards the ``transformer`` row to find which part holds it back;
  ``ldn_softmax_sinpos_torch_init``: ``ldn_softmax_adiff_sinpos`` with PyTorch's default Linear init (the
  Transformer row's) in place of trunc-normal 0.02; ``ldn_torch_init`` / ``ldn_sinpos_torch_init``: the shipped LDN
  (linear A_diff) with that init, without / with positions.
* ``ldn_k_weak``: LDN with K's first step 1/10 as strong (τ init −4 instead of −1: δt·Σa = 1.8 % instead of 27 %
  of each token replaced by its neighbours at init), to test whether K's blur at init is what holds it back.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_ldn.diffusion import positive_feature_map
from timm_ldn.ldn import DiffusionAttention
from timm_ldn.sequence import LdnSequenceClassifier, check_sequence_batch, sinusoidal_positions


class LinearAttention(nn.Module):
    """Multi-head linear attention (elu+1 feature map) with a key padding mask; ``(B, L, C) -> (B, L, C)``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = positive_feature_map(q), positive_feature_map(k)
        if key_padding_mask is not None:
            k = k * (~key_padding_mask).to(k.dtype)[:, None, :, None]
        k = k / L  # keeps the sums O(1); cancels in the ratio
        out = (q @ (k.transpose(-2, -1) @ v)) / (q @ k.sum(-2, keepdim=True).transpose(-2, -1))
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class LinearTransformerLayer(nn.Module):
    """Pre-norm Transformer layer with :class:`LinearAttention` (the layout of ``nn.TransformerEncoderLayer``)."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, src_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), src_key_padding_mask)
        return x + self.mlp(self.norm2(x))


class TransformerClassifier(nn.Module):
    """Embedding + sinusoidal positions + pre-norm encoder layers + masked mean pool + LayerNorm + head."""

    def __init__(self, num_classes: int, vocab_size: Optional[int] = None, in_features: Optional[int] = None,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4., max_len: int = 2048,
                 linear: bool = False, dropout: float = 0.):
        super().__init__()
        self.vocab_size, self.in_features = vocab_size, in_features
        self.embed = nn.Embedding(vocab_size, embed_dim) if vocab_size is not None else nn.Linear(in_features,
                                                                                                  embed_dim)
        self.register_buffer('pos', sinusoidal_positions(max_len, embed_dim), persistent=False)
        ff = int(embed_dim * mlp_ratio)
        if linear:
            layers = [LinearTransformerLayer(embed_dim, num_heads, ff, dropout) for _ in range(depth)]
        else:
            layers = [nn.TransformerEncoderLayer(embed_dim, num_heads, ff, dropout, activation='gelu',
                                                 batch_first=True, norm_first=True) for _ in range(depth)]
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_sequence_batch(x, padding_mask, self.vocab_size, self.in_features)
        L = x.shape[1]
        if L > self.pos.shape[0]:
            raise ValueError(f'Sequence length {L} exceeds max_len={self.pos.shape[0]} of the position table.')
        h = self.embed(x) + self.pos[:L]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding_mask)
        if padding_mask is None:
            pooled = h.mean(1)
        else:
            real = (~padding_mask).to(h.dtype).unsqueeze(-1)
            pooled = (h * real).sum(1) / real.sum(1)
        return self.head(self.norm(pooled))


class _ZeroAttention(nn.Module):
    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.zeros_like(x)


class _NoDiffusion(nn.Module):
    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x


def ldn_without(term: str, **kwargs) -> LdnSequenceClassifier:
    """LDN with one term removed: ``'adiff'`` (the attention branch, its norm and layer scale) or ``'k'``."""
    model = LdnSequenceClassifier(**kwargs)
    for blk in model.encoder.blocks:
        if term == 'adiff':
            blk.attn, blk.norm1, blk.ls1 = _ZeroAttention(), nn.Identity(), nn.Identity()
        elif term == 'k':
            blk.diffusion = _NoDiffusion()
        else:
            raise ValueError(f"term must be 'adiff' or 'k', got {term!r}.")
    return model


class AddPositions(nn.Module):
    """Runs ``layer`` and adds fixed sinusoidal positions ``(L, C)`` to its output ``(B, L, C)``."""

    def __init__(self, layer: nn.Module, dim: int, max_len: int):
        super().__init__()
        self.layer = layer
        self.register_buffer('pos', sinusoidal_positions(max_len, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        return h + self.pos[:h.shape[1]]


def ldn_positions_before_norm(**kwargs) -> LdnSequenceClassifier:
    """LDN with sinusoidal positions added to the raw embedding, before its LayerNorm. The encoder masks padded
    positions to zero after this, so padding still carries nothing."""
    model = LdnSequenceClassifier(**kwargs)
    enc = model.encoder
    enc.embed = AddPositions(enc.embed, enc.embed_dim, kwargs.get('max_len', 2048))
    return model


class SoftmaxDiffusionAttention(DiffusionAttention):
    """``W_o·(softmax(QKᵀ/√d) − I)·V``: A_diff with the softmax kernel ``w_ij = exp(q_i·k_j/√d)`` in place of
    ``φ(q_i)·φ(k_j)``; padded tokens are no keys. Same parameters as :class:`DiffusionAttention`."""

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) - v
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, C)))


def ldn_softmax_adiff(pos_embed: bool = False, mlp_conv: bool = True, k: bool = True, torch_init: bool = False,
                      **kwargs) -> LdnSequenceClassifier:
    """LDN with the softmax-kernel A_diff; ``mlp_conv=False`` drops F's conv1d, ``k=False`` the K step (what is left
    of LDN then differs from the ``transformer`` row only by A_diff's −V, LayerScale, the embedding norm and init);
    ``torch_init=True`` initialises every Linear as PyTorch does, as in the ``transformer`` row."""
    model = LdnSequenceClassifier(pos_embed=pos_embed, mlp_conv=mlp_conv, **kwargs)
    for blk in model.encoder.blocks:  # a fresh layer per block, initialised as the classifier initialises Linears
        attn = SoftmaxDiffusionAttention(model.encoder.embed_dim, num_heads=blk.attn.num_heads)
        attn.load_state_dict(blk.attn.state_dict())
        blk.attn = attn
        if not k:
            blk.diffusion = _NoDiffusion()
    return with_torch_init(model) if torch_init else model


def with_torch_init(model: nn.Module) -> nn.Module:
    """Every Linear re-initialised as PyTorch initialises it (the ``transformer`` row's init: uniform with std
    ~0.07 at width 64), in place of the classifier's trunc-normal 0.02."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return model


def ldn_tau_init(tau: float, **kwargs) -> LdnSequenceClassifier:
    model = LdnSequenceClassifier(**kwargs)
    with torch.no_grad():
        for blk in model.encoder.blocks:
            blk.diffusion.tau.fill_(tau)
    return model


ROWS: Dict[str, Callable[..., nn.Module]] = {
    'ldn': lambda **kw: LdnSequenceClassifier(**kw),
    'transformer': lambda **kw: TransformerClassifier(**kw),
    'linear_transformer': lambda **kw: TransformerClassifier(linear=True, **kw),
    'ldn_no_adiff': lambda **kw: ldn_without('adiff', **kw),
    'ldn_no_k': lambda **kw: ldn_without('k', **kw),
    # K's reach, chosen by measurement (short screens): only local offsets, so K's path diameter (65 hops at
    # L = 512; 6 with the default 1, 2, ..., 256) is far beyond the depth and long-range paths run through A_diff
    'ldn_k_local': lambda **kw: LdnSequenceClassifier(diffusion_offsets=(1, 2, 4, 8), **kw),
    'ldn_sinpos': lambda **kw: LdnSequenceClassifier(pos_embed=True, **kw),
    'ldn_sinpos_raw': lambda **kw: ldn_positions_before_norm(**kw),
    'ldn_k_weak': lambda **kw: ldn_tau_init(-4., **kw),
    'ldn_softmax_adiff': lambda **kw: ldn_softmax_adiff(**kw),
    'ldn_softmax_adiff_sinpos': lambda **kw: ldn_softmax_adiff(pos_embed=True, **kw),
    'ldn_softmax_sinpos_no_k_no_conv': lambda **kw: ldn_softmax_adiff(pos_embed=True, mlp_conv=False, k=False, **kw),
    'ldn_softmax_sinpos_torch_init': lambda **kw: ldn_softmax_adiff(pos_embed=True, torch_init=True, **kw),
    'ldn_torch_init': lambda **kw: with_torch_init(LdnSequenceClassifier(**kw)),
    'ldn_sinpos_torch_init': lambda **kw: with_torch_init(LdnSequenceClassifier(pos_embed=True, **kw)),
}


def build(row: str, **kwargs) -> nn.Module:
    """A row by name with the shared architecture arguments (``num_classes``, ``vocab_size`` / ``in_features``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``max_len``)."""
    if row not in ROWS:
        raise ValueError(f'unknown row {row!r}; rows: {list(ROWS)}.')
    return ROWS[row](**kwargs)
