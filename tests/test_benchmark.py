"""Smoke test of ``ldn benchmark --quick``: it runs, writes every artefact, and the numbers are sane."""
import json
import math
import os

import pytest

from timm_ldn.cli import main
from timm_ldn.commands.benchmark import fit_exponent


def test_fit_exponent_recovers_power_law() -> None:
    tokens = [196, 576, 1024, 4096]
    assert fit_exponent(tokens, [3.0 * t for t in tokens]) == pytest.approx(1.0)
    assert fit_exponent(tokens, [0.5 * t ** 2 for t in tokens]) == pytest.approx(2.0)


def test_gmacs_count_deit_attention() -> None:
    """On CPU tensors the fused SDPA kernel has no FLOP formula; counting on meta must include attention."""
    from timm_ldn.commands.benchmark import count_gmacs
    # DeiT-Ti at 224: 1.26 GMACs with attention, ~1.08 without
    assert count_gmacs('deit_tiny_patch16_224', 224) == pytest.approx(1.26, abs=0.01)


def test_quick_benchmark_writes_results(tmp_path) -> None:
    out = tmp_path / 'results'
    assert main(['benchmark', '--quick', '--out-dir', str(out), '--name', 'smoke']) == 0
    for ext in ('json', 'csv', 'md', 'png'):
        assert (out / f'smoke.{ext}').stat().st_size > 0, ext
    result = json.loads((out / 'smoke.json').read_text())
    rows = result['rows']
    assert {r['model'] for r in rows} == {'ldn_tiny', 'deit_tiny_patch16_224'}
    for r in rows:
        assert r['img_s'] > 0 and r['img_s_min'] <= r['img_s'] <= r['img_s_max']
        assert r['peak_mem_mb_b1'] > 0 and r['gmacs'] > 0
        if r['model'] == r['reference']:
            assert r['speedup_vs_ref'] == pytest.approx(1.0)
    assert math.isfinite(result['train']['speedup'][0])
    assert set(result['exponents']) == {'ldn_tiny', 'deit_tiny_patch16_224'}
