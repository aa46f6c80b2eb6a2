"""Model cost counters shared by ``ldn info``, the budget table and the benchmarks.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2). On CPU that counter has no
formula for the fused SDPA kernel and silently counts attention as free, so fused attention is switched
off (timm modules expose ``fused_attn``) while counting: DeiT-S is then 4.60 GMACs, not 4.24.
Counting runs on the meta device: no memory, no compute, the same numbers.
"""
import contextlib
import copy
from typing import Dict, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_cost', 'explicit_attention']

# ops whose outputs count as activations (the convention of fvcore's activation count: conv / matmul outputs)
_ACTIVATION_OPS = {
    'aten.convolution.default', 'aten.addmm.default', 'aten.mm.default', 'aten.bmm.default',
    'aten.baddbmm.default', 'aten._scaled_dot_product_flash_attention_for_cpu.default',
    'aten._scaled_dot_product_efficient_attention.default', 'aten._scaled_dot_product_flash_attention.default',
}


class _ActivationCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in _ACTIVATION_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.count += first.numel()
        return out


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily route timm attention through explicit matmuls so every MAC is visible to the counter."""
    flags = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, 'fused_attn', None), bool)]
    try:
        for m, _ in flags:
            m.fused_attn = False
        yield model
    finally:
        for m, flag in flags:
            m.fused_attn = flag


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_cost(model: nn.Module, input_size: Sequence[int]) -> Dict[str, float]:
    """Params (M), GMACs and activations (M) of one forward pass for a single ``input_size`` (C, H, W) image.

    The model may live on any device; it is counted as a meta-device copy in eval mode and left untouched.
    (On real CPU tensors a bare ``F.scaled_dot_product_attention`` dispatches to a fused kernel that the counter
    cannot see; on the meta device it decomposes into counted matmuls.)
    """
    if next(model.parameters()).device.type != 'meta':
        model = copy.deepcopy(model).to('meta')
    was_training = model.training
    model.eval()
    flops = FlopCounterMode(display=False)
    acts = _ActivationCounter()
    try:
        with explicit_attention(model), torch.no_grad(), flops, acts:
            model(torch.empty(1, *input_size, device='meta'))
    finally:
        model.train(was_training)
    return {
        'params_m': count_params(model) / 1e6,
        'gmacs': flops.get_total_flops() / 2e9,
        'activations_m': acts.count / 1e6,
    }
