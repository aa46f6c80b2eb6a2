"""Each variant stays within the DeiT of its size (params and GMACs at 224), counted by the same counter."""
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm_ldn  # noqa: F401
from timm_ldn.profiling import count_cost

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / 'eval' / d) for d in ('fmnist', 'speed', '')]
from ablations import SoftmaxDiffusionAttention  # noqa: E402  the exact (quadratic) kernel of the block study

PAIRS = [('ldn_tiny', 'deit_tiny_patch16_224'), ('ldn_small', 'deit_small_patch16_224'),
         ('ldn_base', 'deit_base_patch16_224')]


def _cost(name: str, **kwargs):
    with torch.device('meta'):
        return count_cost(timm.create_model(name, **kwargs), (3, 224, 224))


@pytest.mark.parametrize('ldn,deit', PAIRS)
def test_variant_within_deit_budget(ldn, deit):
    mine, peer = _cost(ldn), _cost(deit)
    assert mine['params_m'] <= peer['params_m'], (mine, peer)
    assert mine['gmacs'] <= peer['gmacs'], (mine, peer)


def test_counter_sees_attention():
    """The counter must not skip SDPA: DeiT-S is 4.6 GMACs with attention, 4.24 without."""
    assert _cost('deit_small_patch16_224')['gmacs'] == pytest.approx(4.60, abs=0.01)
    linear = _cost('ldn_small')['gmacs']
    exact = _cost('ldn_small', attn_layer=SoftmaxDiffusionAttention)['gmacs']
    assert exact > linear  # the quadratic variant costs more and the counter sees it


def test_counting_a_real_model_matches_meta():
    model = timm.create_model('ldn_tiny', depth=2, attn_layer=SoftmaxDiffusionAttention)
    on_cpu = count_cost(model, (3, 224, 224))
    with torch.device('meta'):
        on_meta = count_cost(timm.create_model('ldn_tiny', depth=2, attn_layer=SoftmaxDiffusionAttention),
                             (3, 224, 224))
    assert on_cpu == on_meta
    assert next(model.parameters()).device.type == 'cpu'  # the caller's model is left where it was
