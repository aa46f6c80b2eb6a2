"""PyTorch's module contract: what users do to a timm backbone works on LDN as on a ViT.

Forward hooks fire on every submodule with the same outputs in every autograd mode; an ``nn.Linear`` subclass
(a LoRA-style adapter) swapped into any projection changes the output identically in every mode; ``peft`` LoRA
trains and merges; ``torch.ao`` dynamic int8 quantization runs (and keeps the shipped tag's accuracy, in
``tests/test_fmnist.py``); the model traces with FX.
"""
import copy
from typing import Dict, List

import pytest
import torch
import torch.nn as nn

import timm

import timm_ldn  # noqa: F401

MODES = {'grad': torch.enable_grad, 'no_grad': torch.no_grad, 'inference_mode': torch.inference_mode}


def _model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('ldn_tiny', depth=2, num_classes=7, **kwargs).eval()
    with torch.no_grad():  # off the init values (zero a_raw, unit layer scale): every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))


def test_forward_hooks_fire_identically_in_every_autograd_mode():
    model = _model()
    x = _input()
    seen: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    for mode, ctx in MODES.items():
        calls: Dict[str, List[torch.Tensor]] = {}

        def hook(module, args, output, name=None, calls=calls):
            if isinstance(output, torch.Tensor):
                calls.setdefault(name, []).append(output.detach().clone())  # clone: later in-place edits would show

        handles = [m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n))
                   for name, m in model.named_modules() if name]
        with ctx():
            out = model(x)
        for h in handles:
            h.remove()
        calls['logits'] = [out.detach().clone()]
        seen[mode] = calls
    ref = seen['grad']
    # every leaf module fires, in every block (the whole tree, not a fused subset); the diffusion step's own
    # stochastic-depth branch exists only in training (in eval the identity rides in the stencil)
    leaves = {n for n, m in model.named_modules() if n and not list(m.children())}
    assert {n for n in leaves if not n.endswith('diffusion.drop_path')} <= set(ref)
    for name in ('blocks.0.mlp', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2', 'blocks.0.mlp.act', 'blocks.0.mlp.dwconv',
                 'blocks.0.attn', 'blocks.0.attn.qkv', 'blocks.0.attn.proj', 'blocks.0.diffusion', 'blocks.1.ls1'):
        assert len(ref[name]) == 1, name
    for mode in ('no_grad', 'inference_mode'):
        assert set(seen[mode]) == set(ref), mode
        for name, outs in ref.items():
            assert len(seen[mode][name]) == len(outs), (mode, name)
            for a, b in zip(seen[mode][name], outs):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f'{mode} {name}: {m}')
    # what the hook saw at qkv is what the attention consumed: nothing overwrote it in place afterwards
    blk = model.blocks[0]
    u = blk.norm1(blk.diffusion(model.patch_embed(x)))
    torch.testing.assert_close(ref['blocks.0.attn.qkv'][0], blk.attn.qkv(u.reshape(2, -1, u.shape[-1])))


class _AddLinear(nn.Linear):
    """A LoRA-style adapter: the Linear plus a learned low-rank term."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(base.out_features)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (x @ self.down.t()) @ self.up.t()


@pytest.mark.parametrize('target', ['attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'])
def test_linear_subclass_changes_the_output_identically_in_every_mode(target):
    model = _model()
    x = _input()
    with torch.no_grad():
        plain = model(x)
    adapted = copy.deepcopy(model)
    for blk in adapted.blocks:
        parent_name, child_name = target.split('.')
        parent = getattr(blk, parent_name)
        setattr(parent, child_name, _AddLinear(getattr(parent, child_name)))
    outs = {}
    for mode, ctx in MODES.items():
        with ctx():
            outs[mode] = adapted(x).detach().clone()
    assert (outs['grad'] - plain).abs().max() > 1e-3  # the adapter is not skipped
    for mode in ('no_grad', 'inference_mode'):
        torch.testing.assert_close(outs[mode], outs['grad'], rtol=0, atol=0, msg=lambda m: f'{mode}: {m}')


def test_peft_lora_trains_and_merges():
    peft = pytest.importorskip('peft')
    model = _model()
    x = _input()
    y = torch.tensor([1, 4])
    with torch.no_grad():
        base = model(x)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['qkv', 'fc1', 'fc2'], modules_to_save=['head.fc'])
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any('lora_A' in n for n in trainable) and not any('a_raw' in n for n in trainable)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(lora(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    lora.eval()
    with torch.no_grad():
        adapted = lora(x)
        assert (adapted - base).abs().max() > 1e-4  # two steps moved the adapters and the head
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
    assert isinstance(merged.blocks[0].attn.qkv, nn.Linear) and type(merged.blocks[0].attn.qkv) is nn.Linear


def test_dynamic_int8_quantization_runs_and_stays_close():
    model = _model()
    x = _input()
    with torch.no_grad():
        ref = model(x)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(q.blocks[0].attn.qkv, dynamic_linear) and isinstance(q.blocks[1].mlp.fc2, dynamic_linear)
    with torch.no_grad():
        out = q(x)
    rel = (out - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and rel < 0.2, rel


def test_fx_graph_matches_eager():
    """timm's FX feature extraction (torch.fx with timm's leaf functions) traces the whole model, head included."""
    from timm.models import create_feature_extractor
    model = _model()
    x = _input()
    graph = create_feature_extractor(model, return_nodes={'blocks.1': 'out', 'head.fc': 'logits'})
    with torch.no_grad():
        feats = graph(x)
        torch.testing.assert_close(feats['logits'], model(x))
    assert feats['out'].shape == (2, 4, 3, 192)
