"""Export: ONNX (both torch exporters) checked with onnxruntime, and torch.export, at small inputs.

Every full variant goes through the TorchScript-based exporter (seconds each). The default torch.export-based
("dynamo") ONNX exporter costs 20-30 s for a full 12-block model on a loaded 2-core box, so here it runs on a
3-block ldn_tiny (same operators; depth only repeats blocks); full-depth dynamo exports of all three variants
were run by hand (see the PR report).
All exports use dynamic batch / height / width and are checked at a second, different input shape.
"""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
import timm_ldn  # noqa: F401

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

VARIANTS = ['ldn_tiny', 'ldn_small', 'ldn_base']
ATOL = 1e-4  # fp32 logits of a random-init model are O(1); observed differences are ~1e-6


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g), torch.randn(1, 3, 96, 48, generator=g)


def _check_onnx(path: Path, model: torch.nn.Module) -> None:
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    for x in _inputs():  # export shape and a different batch / aspect ratio
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {name: x.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize('name', VARIANTS)
def test_onnx_torchscript_exporter(name, tmp_path):
    """timm's own onnx_export helper (what timm's onnx_export.py runs), TorchScript exporter, dynamic size."""
    from timm.utils.onnx import onnx_export
    torch.set_num_threads(1)
    model = _model(name)
    path = tmp_path / f'{name}.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TracerWarnings from the input checks, which trace as constants
        onnx_export(model, str(path), example_input=_inputs()[0], dynamic_size=True, opset=17, check=True)
    _check_onnx(path, model)


def test_onnx_dynamo_exporter_tiny(tmp_path):
    torch.set_num_threads(1)
    model = _model('ldn_tiny', depth=3)  # same ops as the full model; depth only repeats blocks
    path = tmp_path / 'ldn_tiny.onnx'
    batch = torch.export.Dim('batch', max=256)
    h, w = torch.export.Dim('h', min=1, max=64), torch.export.Dim('w', min=1, max=64)
    torch.onnx.export(
        model, (_inputs()[0],), str(path), dynamo=True, verbose=False,
        dynamic_shapes=({0: batch, 2: 16 * h, 3: 16 * w},))  # any multiple of the 16 px patch
    _check_onnx(path, model)


def test_torch_export_dynamic_shapes():
    torch.set_num_threads(1)
    model = _model('ldn_tiny', depth=2)
    x, x2 = _inputs()
    h, w = torch.export.Dim('h', min=1, max=64), torch.export.Dim('w', min=1, max=64)
    ep = torch.export.export(
        model, (x,), dynamic_shapes=({0: torch.export.Dim('batch', max=256), 2: 16 * h, 3: 16 * w},))
    exported = ep.module()
    with torch.no_grad():
        for inp in (x, x2):
            torch.testing.assert_close(exported(inp), model(inp), atol=1e-5, rtol=1e-5)
    # features too: the unpooled map is what detection/segmentation users export
    ep_feat = torch.export.export(_FeatureWrapper(model), (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep_feat.module()(x), model.forward_features(x), atol=1e-5, rtol=1e-5)


class _FeatureWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)
