"""Bad input gets a ValueError that names the problem and the fix, never a shape error from deep inside."""
import pytest
import torch

import timm
import timm_ldn  # noqa: F401


@pytest.fixture(scope='module')
def model():
    return timm.create_model('ldn_tiny', depth=1).eval()


@pytest.mark.parametrize('shape,match', [
    ((3, 224, 224), r'\(B, C, H, W\).*unsqueeze\(0\)'),
    ((1, 1, 3, 64, 64), r'5-D'),
    ((2, 1, 64, 64), r'in_chans=3 but the input has 1 channels'),
    ((2, 4, 64, 64), r'in_chans=4'),
    ((0, 3, 64, 64), r'Empty batch'),
    ((1, 3, 8, 64), r'smaller than one 16x16 patch'),
    ((1, 3, 100, 64), r'100x64 is not a multiple of the patch size 16x16.*dynamic_img_pad=True'),
])
def test_bad_input_raises_clear_error(model, shape, match):
    for fn in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError, match=match):
            fn(torch.randn(*shape))


def test_scripted_model_raises_the_same_errors():
    with timm.set_scriptable(True):
        scripted = torch.jit.script(timm.create_model('ldn_tiny', depth=1).eval())
    with pytest.raises(Exception, match='not a multiple of the patch size'):
        scripted(torch.randn(1, 3, 100, 64))
