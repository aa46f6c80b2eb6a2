""" Hugging Face transformers' timm integration (TimmWrapper) on a Hub repo written by ``ldn export``, through the
loopback Hub. Optional: skipped when transformers is not installed (``pip install "timm-ldn[transformers]"``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip('transformers')

sys.path.insert(0, str(Path(__file__).parent))
import hub_helpers as H  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp('transformers')
    repos = H.write_fixture_repos(root)
    image = root / 'image.png'
    Image.fromarray((torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255)
                    .to(torch.uint8).numpy()).save(image)
    with H.LoopbackHub(H.hub_files(repos)) as server:
        env = H.client_env(os.environ, server.endpoint, root / 'hf_home', repos['manifest'])
        proc = subprocess.run([sys.executable, str(TESTS / 'transformers_client.py'), str(image)],
                              env=env, cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return H.load_json_lines(proc.stdout)


def _ok(result: dict) -> dict:
    assert result['ok'], result.get('trace') or result
    return result


def test_auto_model_loads_exported_repo_with_timm_logits_and_labels(results):
    r = _ok(results['auto_model'])
    assert r['cls'] == 'TimmWrapperForImageClassification'
    assert r['equal'], 'TimmWrapper logits differ from timm_ldn pretrained=True'
    assert r['labels'] == ['class_0', 'class_1']  # top-level label_names in config.json, not LABEL_0


def test_pipeline_image_classification_matches_timm(results):
    r = _ok(results['pipeline'])
    assert r['label'] == r['want'] and r['score_close']


def test_transformers_path_does_not_verify_checksums_but_verified_snapshot_does(results):
    # documented limitation: transformers downloads model.safetensors itself and never sees the manifest
    assert _ok(results['tampered_repo'])['differs']
    assert _ok(results['verified_route'])['equal']
    r = results['verified_route_tampered']
    assert not r['ok'] and r['error'] == 'ChecksumError', r
