"""The sequence benchmark's rows under one recipe: LDN, a softmax Transformer, a linear-attention Transformer and
LDN variants. Same width, depth, heads and MLP ratio; the same embedding, masked mean pool, norm and head. Every LDN
row is a set of constructor arguments of ``LdnSequenceClassifier`` (``LDN_ROWS``): layer types from the package or
``eval/ablations.py``, never modules replaced after construction.

* ``ldn``: ``timm_ldn.sequence.LdnSequenceClassifier`` (no position embedding: K's stencil is position-aware).
* ``transformer``: PyTorch's own ``nn.TransformerEncoderLayer`` (pre-norm, GELU, ``src_key_padding_mask``) with
  fixed sinusoidal positions (no parameters, so the rows' parameter counts stay within a few % of each other).
* ``linear_transformer``: the same pre-norm layer with linear attention ``φ(Q)(φ(K)ᵀV) / φ(Q)φ(K)ᵀ1``, ``φ = elu+1``
  (Katharopoulos et al. 2020): the known-fail control on ListOps (LRA: 16.1 %).
* ``ldn_no_adiff`` / ``ldn_no_k``: LDN with the A_diff branch (``NoAttentionBlock``) / the K step (``NoDiffusion``)
  removed.
* ``ldn_k_local``: LDN with K's offsets cut to 1, 2, 4, 8 (the offset screen: how far K itself should reach).
* ``ldn_sinpos``: LDN with the Transformer's sinusoidal positions added after the embedding's LayerNorm, where
  tokens and positions have the same scale (does LDN lack a position signal that K alone does not give?). Since
  the package's ``LdnSequenceClassifier(pos_embed=True)``; the same math as the wrapper its first runs used.
* (``ldn_sinpos_raw``, screened once, is no longer a row: the same positions added *before* that LayerNorm, to the
  std-0.02 token embeddings, are ~50x the token signal and did not learn, 16.95 % val; its log stays in the screen.)
* ``ldn_softmax_adiff`` / ``ldn_softmax_adiff_sinpos``: LDN whose A_diff uses the softmax kernel,
  ``(softmax(QKᵀ/√d) − I)·V`` (rows still sum to zero; quadratic, so a diagnostic, not a shipped option), without
  and with positions: is a more selective kernel what LDN's ListOps gap needs?
* ``ldn_softmax_sinpos_no_k_no_conv``: ``ldn_softmax_adiff_sinpos`` without F's conv1d and without K, walking LDN
  towards the ``transformer`` row to find which part holds it back;
  ``ldn_softmax_sinpos_torch_init``: ``ldn_softmax_adiff_sinpos`` with PyTorch's default Linear init (the
  Transformer row's, ``weight_init='torch'``) in place of trunc-normal 0.02; ``ldn_torch_init`` / ``ldn_sinpos_torch_init``: the shipped LDN
  (linear A_diff) with that init, without / with positions.
* ``ldn_k_weak``: LDN with K's first step 1/10 as strong (τ init −4 instead of −1: δt·Σa = 1.8 % instead of 27 %
  of each token replaced by its neighbours at init), to test whether K's blur at init is what holds it back.
* ``ldn_implicit*`` (issue 27): K's step solved implicitly (``ImplicitPathDiffusion``: drift, token-adaptive step),
  ``_taylor``: the Taylor-kernel A_diff. The ablations of ``ldn_implicit_sinpos_torch_init`` remove one lever each:
  ``_fixed_step`` (one step fraction per channel, not per token), ``_no_drift`` (symmetric kernel),
  ``ldn_implicit_sinpos`` (trunc-normal init); ``ldn_sinpos_torch_init`` is it with the Euler step.
  ``ldn_implicit_chunk_sinpos_torch_init``: A_diff with the softmax kernel inside 128-token chunks
  (``ChunkedSoftmaxDiffusionAttention``, linear cost), global mixing left to the exact step (Mega's pairing).
* ``ldn_selective_sinpos_torch_init``: the default with token-dependent conductances in the exact step
  (``SelectivePathDiffusion``: a token can wall off or bridge the average, as Mamba's selective decay; at init it
  is the default).
"""
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.layers import Mlp
from timm.models._manipulate import checkpoint

from timm_ldn.diffusion import positive_feature_map
from timm_ldn.sequence import (
    ChunkedSoftmaxDiffusionAttention, ImplicitPathDiffusion, LdnSequenceClassifier, PathDiffusion,
    SelectivePathDiffusion,
    TaylorDiffusionAttention, check_sequence_batch,
    sinusoidal_positions,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ablations import NoAttentionBlock, NoDiffusion, SoftmaxDiffusionAttention  # noqa: E402


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
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()  # 0: pooled features
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward (timm's API, as LDN's): the peer gets the same memory knob."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_sequence_batch(x, padding_mask, self.vocab_size, self.in_features)
        L = x.shape[1]
        if L > self.pos.shape[0]:
            raise ValueError(f'Sequence length {L} exceeds max_len={self.pos.shape[0]} of the position table.')
        h = self.embed(x) + self.pos[:L]
        for layer in self.layers:
            if self.grad_checkpointing:
                h = checkpoint(layer, h, src_key_padding_mask=padding_mask)
            else:
                h = layer(h, src_key_padding_mask=padding_mask)
        if padding_mask is None:
            pooled = h.mean(1)
        else:
            real = (~padding_mask).to(h.dtype).unsqueeze(-1)
            pooled = (h * real).sum(1) / real.sum(1)
        return self.head(self.norm(pooled))


class DualEncoderClassifier(nn.Module):
    """LRA's two-tower retrieval model: one shared encoder (any row built with ``num_classes=0``, so it returns its
    pooled, normed features) reads both documents; ``[u, v, u·v, u − v]`` goes through a small MLP to the classes.

    The pair travels as one batch, ``x`` ``(2B, L)``: the first ``B`` rows are the first documents, the last ``B`` the
    second, with their padding mask, so a trainer's ``model(x, padding_mask)`` stays as it is for every task.
    """

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int = 2, hidden: int = 128):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(4 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f'a pair batch holds both documents of each pair, 2B rows; got {x.shape[0]} rows.')
        u, v = self.encoder(x, padding_mask).chunk(2)
        return self.head(torch.cat([u, v, u * v, u - v], -1))

    def no_weight_decay(self) -> set:
        inner = getattr(self.encoder, 'no_weight_decay', lambda: set())()
        return {f'encoder.{n}' for n in inner}


class WeakPathDiffusion(PathDiffusion):
    """K's first step 1/10 as strong: τ starts at −4 (δt·Σ2a = 1.8 % of each token replaced by its neighbours at
    init, instead of 27 %)."""

    def __init__(self, dim: int, offsets: Sequence[int], drop_path: float = 0., tau_init: float = -4., **kwargs):
        super().__init__(dim, offsets, drop_path=drop_path, tau_init=tau_init, **kwargs)


class FixedStepImplicitDiffusion(ImplicitPathDiffusion):
    """The exact step with one step fraction per channel, ``β = sigmoid(τ)``, the same for every token: the ablation
    of the token-adaptive time step (issue 27, item 2)."""

    def __init__(self, dim: int, offsets: Sequence[int] = (1,), drop_path: float = 0., **kwargs):
        super().__init__(dim, offsets, drop_path=drop_path, adaptive_step=False, **kwargs)


class SymmetricImplicitDiffusion(ImplicitPathDiffusion):
    """The exact step without the drift: one length scale per channel for both sides (pure diffusion, the channel
    mean conserved), the ablation of the advection term."""

    def __init__(self, dim: int, offsets: Sequence[int] = (1,), drop_path: float = 0., **kwargs):
        super().__init__(dim, offsets, drop_path=drop_path, drift=False, **kwargs)


# The paper's form, spelled out, so that no row moves when the package's defaults do: the explicit-Euler K step,
# no positions, trunc-normal init (the defaults every run before 2026-12-07 was trained with)
PAPER_FORM: Dict[str, Any] = dict(diffusion_layer=PathDiffusion, pos_embed=False, weight_init='trunc_normal')

# LDN rows: constructor arguments of LdnSequenceClassifier (layer types from eval/ablations.py or the package), each
# given on top of PAPER_FORM
_LDN_ARGS: Dict[str, Dict[str, Any]] = {
    'ldn': {},
    'ldn_no_adiff': dict(block_fn=NoAttentionBlock),
    'ldn_no_k': dict(diffusion_layer=NoDiffusion),
    # K's reach, chosen by measurement (short screens): only local offsets, so K's path diameter (65 hops at
    # L = 512; 6 with the default 1, 2, ..., 256) is far beyond the depth and long-range paths run through A_diff
    'ldn_k_local': dict(diffusion_offsets=(1, 2, 4, 8)),
    'ldn_sinpos': dict(pos_embed=True),
    'ldn_k_weak': dict(diffusion_layer=WeakPathDiffusion),
    'ldn_softmax_adiff': dict(attn_layer=SoftmaxDiffusionAttention),
    'ldn_softmax_adiff_sinpos': dict(attn_layer=SoftmaxDiffusionAttention, pos_embed=True),
    'ldn_softmax_sinpos_no_k_no_conv': dict(attn_layer=SoftmaxDiffusionAttention, pos_embed=True,
                                            diffusion_layer=NoDiffusion, mlp_layer=Mlp),
    'ldn_softmax_sinpos_torch_init': dict(attn_layer=SoftmaxDiffusionAttention, pos_embed=True, weight_init='torch'),
    'ldn_torch_init': dict(weight_init='torch'),
    'ldn_sinpos_torch_init': dict(pos_embed=True, weight_init='torch'),
    # the long-range study (issue 27): K solved implicitly (drift, token-adaptive step), a Taylor-kernel A_diff
    'ldn_implicit': dict(diffusion_layer=ImplicitPathDiffusion),
    'ldn_implicit_taylor': dict(diffusion_layer=ImplicitPathDiffusion, attn_layer=TaylorDiffusionAttention),
    'ldn_implicit_torch_init': dict(diffusion_layer=ImplicitPathDiffusion, weight_init='torch'),
    # every lever that has helped a row so far: positions and PyTorch's init (ldn_softmax_sinpos_torch_init, 38.28)
    # with the linear-cost kernel and the exact step in place of the softmax kernel and the Euler step
    'ldn_implicit_sinpos_torch_init': dict(diffusion_layer=ImplicitPathDiffusion, pos_embed=True, weight_init='torch'),
    'ldn_selective_sinpos_torch_init': dict(diffusion_layer=SelectivePathDiffusion, pos_embed=True,
                                            weight_init='torch'),
    'ldn_implicit_taylor_sinpos_torch_init': dict(diffusion_layer=ImplicitPathDiffusion,
                                                  attn_layer=TaylorDiffusionAttention, pos_embed=True,
                                                  weight_init='torch'),
    # ablations of ldn_implicit_sinpos_torch_init (the psFMNIST winner), one lever each; the Euler step in place of
    # the exact one is ldn_sinpos_torch_init, the Taylor kernel added is ldn_implicit_taylor_sinpos_torch_init
    'ldn_implicit_fixed_step_sinpos_torch_init': dict(diffusion_layer=FixedStepImplicitDiffusion, pos_embed=True,
                                                      weight_init='torch'),
    'ldn_implicit_no_drift_sinpos_torch_init': dict(diffusion_layer=SymmetricImplicitDiffusion, pos_embed=True,
                                                    weight_init='torch'),
    'ldn_implicit_sinpos': dict(diffusion_layer=ImplicitPathDiffusion, pos_embed=True),
    # Mega's pairing: the exact step mixes globally, A_diff selects with the softmax kernel inside 128-token chunks
    'ldn_implicit_chunk_sinpos_torch_init': dict(diffusion_layer=ImplicitPathDiffusion,
                                                 attn_layer=ChunkedSoftmaxDiffusionAttention, pos_embed=True,
                                                 weight_init='torch'),
}

LDN_ROWS: Dict[str, Dict[str, Any]] = {row: {**PAPER_FORM, **args} for row, args in _LDN_ARGS.items()}

# Issue 27's ablation: the long-range winner, then one row per lever taken out of it (or, for A_diff, put in), so
# that each lever's worth is a difference of two runs under one recipe (study.py report -> ablation.md)
ABLATION_WINNER = 'ldn_implicit_sinpos_torch_init'
ABLATION: Tuple[Tuple[str, str], ...] = (
    ('exact step (`ImplicitPathDiffusion`) -> explicit-Euler step', 'ldn_sinpos_torch_init'),
    ('token-adaptive step -> one step per channel', 'ldn_implicit_fixed_step_sinpos_torch_init'),
    ('drift -> symmetric kernel', 'ldn_implicit_no_drift_sinpos_torch_init'),
    ("`weight_init='torch'` -> trunc-normal 0.02", 'ldn_implicit_sinpos'),
    ('positions -> none', 'ldn_implicit_torch_init'),
    ('+ Taylor-kernel A_diff (selective, linear cost)', 'ldn_implicit_taylor_sinpos_torch_init'),
    ('+ chunked-softmax A_diff (selective, linear cost)', 'ldn_implicit_chunk_sinpos_torch_init'),
    ("all of it -> the paper's form (`ldn`)", 'ldn'),
)

ROWS: Dict[str, Callable[..., nn.Module]] = {
    **{row: partial(LdnSequenceClassifier, **args) for row, args in LDN_ROWS.items()},
    'transformer': TransformerClassifier,
    'linear_transformer': partial(TransformerClassifier, linear=True),
}
