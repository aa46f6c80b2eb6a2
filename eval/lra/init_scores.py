"""How selective A_diff is at initialisation: for ListOps test sequences, the first block's attention scores under
each row's init (the figures in eval/lra/README.md, "A walk from LDN to the Transformer").

    python eval/lra/init_scores.py

Per row: the std of the softmax scores ``q·k/√d`` and, for the softmax and the elu+1 kernel, each query's largest
normalised weight as a multiple of the uniform ``1/N`` (1.00 = attention that does not select at all).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builder import build_model  # noqa: E402  eval/builder.py: the one builder
from tasks import load_listops  # noqa: E402
from timm_ldn.diffusion import positive_feature_map  # noqa: E402


def first_block_qkv(model, x: torch.Tensor):
    h = model.norm_embed(model.embed(x))
    if model.pos_embed is not None:
        h = model.pos_embed(h, None)
    blk = model.blocks[0]
    u = blk.norm1(blk.diffusion(h))
    attn = blk.attn
    B, N, _ = u.shape
    return attn.qkv(u).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


@torch.no_grad()
def main() -> None:
    data = load_listops()
    test = data['test']
    L = 256  # the first 8 test sequences of at least 256 tokens, cut to 256 (no padding)
    x = test['ids'][test['lengths'] >= L][:8, :L].long()
    arch = dict(num_classes=10, vocab_size=len(data['vocab']), max_len=512)
    print('| row (init) | std q·k/√d | softmax max weight x N | elu+1 max weight x N |')
    print('|---|---|---|---|')
    for row in ('ldn_softmax_adiff_sinpos', 'ldn_softmax_sinpos_torch_init', 'ldn', 'ldn_torch_init'):
        torch.manual_seed(0)
        q, k, _ = first_block_qkv(build_model(row, sequence=True, **arch).eval(), x)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        soft = scores.softmax(-1).amax(-1).mean() * L
        w = positive_feature_map(q) @ positive_feature_map(k).transpose(-1, -2)
        elu = (w / w.sum(-1, keepdim=True)).amax(-1).mean() * L
        print(f'| {row} | {scores.std():.3f} | {soft:.2f} | {elu:.2f} |')


if __name__ == '__main__':
    main()
