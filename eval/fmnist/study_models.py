"""Every model the Fashion-MNIST studies train: the rows of the block and tokenizer studies and the baselines.

The one builder, ``eval/builder.py:build_model``, turns these names into models for every script and test.
A row is a registered timm model plus architecture overrides; overrides are plain values or layer types (the
ablations in ``eval/ablations.py``, the conv tokenizer of ``timm_ldn``), never switches on the shipped model.
"""
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

from timm.layers import Mlp
from timm.models.vision_transformer import Block

import timm_ldn  # noqa: F401  registers ldn_* with timm
from timm_ldn.ldn import ConvTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: the layers shared with eval/lra/
import ablations  # noqa: E402
from builder import build_model  # noqa: E402

LDN = 'ldn_nano_patch4_28'
# the block the study started from (parameter layout v1): a plain MLP of ratio 4 as F
V1 = dict(mlp_layer=Mlp, mlp_ratio=4.)
V2 = dict(mlp_ratio=3.875)  # the default block: F with the 3x3 depthwise conv (MLP ratio pays for it)
# the tokenizer study's budget, held by every row (tests/test_study_rows.py): params and MACs at 28x28
TOKENIZER_BUDGET = dict(params=350_000, gmacs=0.020)


@dataclass(frozen=True)
class Row:
    model: str  # a registered timm model or a key of BASELINES
    overrides: Dict[str, Any] = field(default_factory=dict)
    what: str = ''


def conv_tokenizer(*widths: int):
    return partial(ConvTokenizer, widths=widths)


ROWS: Dict[str, Row] = {
    # block study (issue 9): one term changed at a time from the v1 block, then candidates from the winners
    'ldn_base': Row(LDN, V1, "the v1 block: K on the stream, elu+1 A_diff, MLP F, patch stem, dt at 27% of the bound"),
    'ldn_dwconv': Row(LDN, dict(mlp_ratio=4.), 'F with a 3x3 depthwise conv on the hidden layer'),
    'ldn_overlap_stem': Row(LDN, dict(V1, embed_layer=ablations.OverlapConvStem),
                            'overlapping conv stem (two 3x3 stride-2 convs)'),
    'ldn_dt_small_init': Row(LDN, dict(V1, diffusion_layer=partial(timm_ldn.ldn.PrimaryDiffusion, tau_init=-6.)),
                             'dt starts near 0 (0.25% of the bound) instead of 27%'),
    'ldn_dt_large_init': Row(LDN, dict(V1, diffusion_layer=partial(timm_ldn.ldn.PrimaryDiffusion, tau_init=2.)),
                             'dt starts at 88% of the bound instead of 27%'),
    'ldn_dt_input': Row(LDN, dict(V1, diffusion_layer=ablations.InputTimeStepDiffusion),
                        'input-dependent dt (tau + pooled projection)'),
    'ldn_k_branch': Row(LDN, dict(V1, diffusion_layer=ablations.BranchDiffusion),
                        'primary diffusion as a pre-norm branch H + dt*K(LN(H))'),
    'ldn_phi_relu': Row(LDN, dict(V1, attn_layer=partial(ablations.FeatureMapAttention, phi='relu')),
                        'A_diff with phi = relu + 1e-3'),
    'ldn_phi_softplus': Row(LDN, dict(V1, attn_layer=partial(ablations.FeatureMapAttention, phi='softplus')),
                            'A_diff with phi = softplus'),
    'ldn_softmax': Row(LDN, dict(V1, attn_layer=ablations.SoftmaxDiffusionAttention),
                       'A_diff with the exact softmax kernel (quadratic)'),
    'ldn_no_adiff': Row(LDN, dict(V1, block_fn=ablations.NoAttentionBlock), 'ablation: A_diff removed'),
    'ldn_no_k': Row(LDN, dict(V1, diffusion_layer=ablations.NoDiffusion), 'ablation: primary diffusion K removed'),
    'ldn_v2': Row(LDN, V2, 'candidate: dwconv in F, MLP ratio 3.875'),
    'ldn_v2_branch': Row(LDN, dict(V2, diffusion_layer=ablations.BranchDiffusion),
                         'candidate: dwconv in F, MLP ratio 3.875, K as a pre-norm branch'),
    'ldn_v2_overlap': Row(LDN, dict(V2, embed_layer=ablations.OverlapConvStem),
                          'candidate: dwconv in F, MLP ratio 3.875, overlapping stem (over the MAC budget)'),
    'vit': Row('vit_nano_patch4_28', {}, 'baseline: timm ViT, same patch/width/depth/heads'),
    'resnet': Row('resnet_nano_28', {}, 'baseline: timm ResNet-10-T narrowed to the same params'),
    # tokenizer study (issue 19): the v2 blocks behind a CCT-style conv tokenizer, within TOKENIZER_BUDGET
    'ldn_tok32': Row(LDN, dict(embed_layer=conv_tokenizer(32), mlp_ratio=3.625),
                     'conv tokenizer 1-32-64 (conv3x3, ReLU, max-pool x2), MLP ratio 3.625 (MAC budget)'),
    'ldn_tok24': Row(LDN, dict(embed_layer=conv_tokenizer(24), mlp_ratio=3.875),
                     'conv tokenizer 1-24-64, MLP ratio 3.875'),
    'ldn_tok16': Row(LDN, dict(embed_layer=conv_tokenizer(16), mlp_ratio=3.875),
                     'conv tokenizer 1-16-64, MLP ratio 3.875'),
    'ldn_tok48': Row(LDN, dict(embed_layer=conv_tokenizer(48), mlp_ratio=2.875),
                     'conv tokenizer 1-48-64, MLP ratio 2.875 (MAC budget)'),
    # the finals: the screening winner (ldn_tok32 on validation) as the registered variant, and its CCT peer
    'ldn_convtok': Row('ldn_nano_convtok_28', {}, 'ldn_nano_convtok_28: the ldn_tok32 row as a registered variant'),
    # issue 27's init screen in 2-D: the sequence model's init question (trunc-normal 0.02 vs PyTorch's) on images
    'ldn_convtok_torch_init': Row('ldn_nano_convtok_28', dict(weight_init='torch'),
                                  'ldn_convtok with PyTorch\'s own Linear init (weight_init=\'torch\')'),
    # issue 27's 2-D port: K's step solved implicitly on the token grid (ADI), global after one step
    'ldn_convtok_implicit': Row('ldn_nano_convtok_28', dict(diffusion_layer=timm_ldn.ldn.ImplicitGridDiffusion),
                                'ldn_convtok with the implicit (exact) diffusion step, ImplicitGridDiffusion'),
    'cct_tok32': Row('cct_nano_28', dict(widths=(32,), mlp_ratio=3.75),
                     'baseline: the same conv tokenizer (1-32-64), 6 timm ViT blocks 64 wide, 2 heads, MLP ratio 3.75 (MAC budget)'),
}


class CompactConvTransformer(nn.Module):
    """CCT-style baseline: LDN's conv tokenizer, learned positions, timm ViT blocks, mean pool, LayerNorm, head.

    The tokenizer study's transformer peer: the same tokens as the LDN rows, attention blocks in place of LDN's.
    """

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10,
                 embed_dim: int = 64, depth: int = 6, num_heads: int = 2, mlp_ratio: float = 4.,
                 widths=(32,), drop_path_rate: float = 0.):
        super().__init__()
        self.patch_embed = ConvTokenizer(img_size, patch_size, in_chans, embed_dim, widths=widths,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, embed_dim) * .02)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i]) for i in range(depth)])
        for blk in self.blocks:
            # explicit q@kᵀ/softmax/@v instead of fused CPU SDPA: same math, faster under bf16 autocast on this CPU
            blk.attn.fused_attn = False
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {'pos_embed'}

    def forward_intermediates(self, x: torch.Tensor, indices=None, intermediates_only: bool = True,
                              output_fmt: str = 'NCHW') -> List[torch.Tensor]:
        """The token map after each block as NCHW (what ``timm_ldn.visualize`` reads; timm's argument names)."""
        if not intermediates_only or output_fmt != 'NCHW':
            raise ValueError('CompactConvTransformer.forward_intermediates returns NCHW intermediates only.')
        take = range(len(self.blocks)) if indices is None else (
            range(len(self.blocks) - indices, len(self.blocks)) if isinstance(indices, int) else indices)
        tokens = self.patch_embed(x)
        B, h, w, C = tokens.shape
        x = tokens.flatten(1, 2) + self.pos_embed
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                out.append(x.transpose(1, 2).reshape(B, C, h, w))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(1, 2) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x.mean(1)))


# Baselines by name: a timm entry point with its architecture overridden, or a class defined here.
BASELINES: Dict[str, Dict[str, Any]] = {
    # the same-size ViT of the small-image LDN variants (ERF pictures: ldn show --baseline
    # eval/fmnist/study_models.py:vit_nano_patch4_28)
    'vit_nano_patch4_28': dict(entry='vit_tiny_patch16_224', patch_size=4, img_size=28, embed_dim=64, depth=6,
                               num_heads=2, mlp_ratio=4.),
    # same-params CNN: timm's ResNet-10-T (deep tiered stem, avg-down) narrowed to 0.31 M params; output stride 8
    # keeps a 4x4 map in the last stage instead of 1x1 (28 px input), 0.0104 GMACs
    'resnet_nano_28': dict(entry='resnet10t', channels=(32, 48, 64, 96), output_stride=8),
    'cct_nano_28': dict(entry=CompactConvTransformer),
}


def vit_nano_patch4_28() -> nn.Module:
    """The block study's ViT baseline at Fashion-MNIST's classes / channels (``ldn show --baseline``)."""
    return build_model('vit_nano_patch4_28', num_classes=10, in_chans=1)


def cct_tok32() -> nn.Module:
    """The tokenizer study's CCT row at Fashion-MNIST's classes / channels: the ERF baseline of
    ``ldn show --baseline eval/fmnist/study_models.py:cct_tok32`` (weights via ``--baseline-checkpoint``)."""
    return build_model('cct_tok32', num_classes=10, in_chans=1)
