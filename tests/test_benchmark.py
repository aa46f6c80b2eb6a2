"""The benchmark harness in eval/ (``python eval/speed/benchmark.py``): timing, overrides, counting, tables, cross-check."""
import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from timm.utils import ParseKwargs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / 'eval' / d) for d in ('fmnist', 'speed')] + [str(ROOT / 'eval')]
import bench_harness as H  # noqa: E402
import benchmark as eval_benchmark  # noqa: E402  eval/speed/benchmark.py


def test_fit_exponent_recovers_power_law() -> None:
    tokens = [196, 576, 1024, 4096]
    assert H.fit_exponent(tokens, [3.0 * t for t in tokens]) == pytest.approx(1.0)
    assert H.fit_exponent(tokens, [0.5 * t ** 2 for t in tokens]) == pytest.approx(2.0)


def test_round_robin_times_with_the_given_clock_and_alternates() -> None:
    """The clock is an argument (nothing module-wide to set): a fake clock that ticks 1 s per reading gives
    exactly 1 s per single-call chunk; the order of the models flips every round."""
    ticks = iter(range(10 ** 6))
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ('a', 'b')}
    times = H.time_round_robin(fns, rounds=3, device=torch.device('cpu'), min_round_s=0.0, warmup=0,
                               clock=lambda: float(next(ticks)))
    assert times == {'a': [1.0] * 3, 'b': [1.0] * 3}
    assert calls[2:] == ['a', 'b', 'b', 'a', 'a', 'b']  # after the two sizing calls


def test_overrides_reach_ldn_only_and_do_not_persist() -> None:
    ldn = H.bench_model('ldn_tiny', 64, 'meta', {'depth': 2})
    deit = H.bench_model('deit_tiny_patch16_224', 64, 'meta', {'depth': 2})
    assert len(ldn.blocks) == 2 and len(deit.blocks) == 12  # the reference is never modified
    assert deit.pos_embed.shape[1] == 1 + (64 // 16) ** 2  # re-created for the resolution
    assert len(H.bench_model('ldn_tiny', 64, 'meta').blocks) == 12  # no state left behind by the first call


def test_gmacs_by_the_project_counter() -> None:
    """count_cost on the meta device: DeiT-Ti's attention is counted (1.26 GMACs, ~1.08 without)."""
    assert H.model_gmacs('deit_tiny_patch16_224', 224) == pytest.approx(1.26, abs=0.01)
    assert H.model_gmacs('ldn_tiny', 64, {'depth': 6}) == pytest.approx(H.model_gmacs('ldn_tiny', 64) / 2, rel=0.05)


def _parse_kwargs(items):
    p = argparse.ArgumentParser()
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    return p.parse_args(['--model-kwargs', *items]).model_kwargs


def test_model_kwargs_literals_and_round_trip() -> None:
    """eval/speed/benchmark.py reads --model-kwargs as timm does; kwargs_to_args writes them back for timm's script."""
    parser = argparse.ArgumentParser()
    eval_benchmark.add_arguments(parser)
    kwargs = parser.parse_args(['--model-kwargs', 'mlp_dwconv=True', 'diffusion_offsets=(1, 2)',
                                'attn_feature_map=relu']).model_kwargs
    assert kwargs == dict(mlp_dwconv=True, diffusion_offsets=(1, 2), attn_feature_map='relu')
    kwargs['tag'] = 'True'  # a string that reads as a literal must stay a string
    assert _parse_kwargs(H.kwargs_to_args(kwargs)) == kwargs


def test_quick_benchmark_writes_results(tmp_path) -> None:
    out = tmp_path / 'results'
    argv = ['--quick', '--out-dir', str(out), '--name', 'smoke', '--model-kwargs', 'depth=6']
    assert eval_benchmark.main(argv) == 0
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
        if r['model'] == 'ldn_tiny':  # the measured LDN is the overridden one
            assert r['gmacs'] == pytest.approx(H.model_gmacs('ldn_tiny', r['resolution'], {'depth': 6}))
    assert math.isfinite(result['train']['speedup'][0])
    assert set(result['exponents']) == {'ldn_tiny', 'deit_tiny_patch16_224'}
    assert result['environment']['model_kwargs'] == {'depth': 6} and result['environment']['clock'] == 'wall'
    assert result['command'] == 'python eval/speed/benchmark.py --quick --model-kwargs depth=6'
    assert (out / 'smoke.md').read_text().startswith('`python eval/speed/benchmark.py --quick')


FAKE_TIMM_BENCHMARK = '''
import argparse, json
p = argparse.ArgumentParser()
p.add_argument('--model'); p.add_argument('--img-size', type=int); p.add_argument('--results-file')
p.add_argument('--model-kwargs', nargs='*', default=[])
args, _ = p.parse_known_args()
if args.model.startswith('deit') and args.img_size != 224 and not args.model_kwargs:
    raise AssertionError("Input height doesn't match model (224).")
speed = (40.0 if 'depth=6' in args.model_kwargs else 30.0) if args.model.startswith('ldn') else 20.0
json.dump({'model': args.model, 'infer_samples_per_sec': speed}, open(args.results_file, 'w'))
'''


def test_timm_crosscheck_compares_with_our_table(tmp_path) -> None:
    """The cross-check runs the given script per model (LDN with our overrides), takes per-round LDN/DeiT
    ratios and compares them with ours."""
    script = tmp_path / 'benchmark.py'
    script.write_text(FAKE_TIMM_BENCHMARK)
    out = tmp_path / 'results'
    out.mkdir()
    ours = dict(rows=[dict(model='ldn_tiny', resolution=64, batch=2, speedup_vs_ref=1.25, img_s=10.0)])
    (out / 'benchmark_cpu.json').write_text(json.dumps(ours))
    assert eval_benchmark.main(['--quick', '--timm-benchmark', str(script), '--out-dir', str(out)]) == 0
    row = json.loads((out / 'benchmark_timm.json').read_text())['rows'][0]
    assert row['ratio'] == pytest.approx(1.5) and row['ours_ratio'] == pytest.approx(1.25)
    assert row['disagreement'] == pytest.approx(0.2)
    # DeiT at a non-224 size without re-creating it: the failure is recorded
    assert "doesn't match" in row['note']
    assert '1.50×' in (out / 'benchmark_timm.md').read_text()
    argv = ['--quick', '--timm-benchmark', str(script), '--out-dir', str(out), '--model-kwargs', 'depth=6']
    assert eval_benchmark.main(argv) == 0
    assert json.loads((out / 'benchmark_timm.json').read_text())['rows'][0]['ratio'] == pytest.approx(2.0)


def test_layer_type_kwargs_resolve_from_dotted_paths():
    """`--model-kwargs mlp_layer=timm.layers.Mlp` builds the block with that layer; a bad path names itself."""
    from timm.layers import Mlp
    from timm_ldn.commands.benchmark import build_model, resolve_layer_kwargs
    assert resolve_layer_kwargs(dict(mlp_layer='timm.layers.Mlp', mlp_ratio=4.)) == dict(mlp_layer=Mlp, mlp_ratio=4.)
    model = build_model('ldn_tiny', 64, dict(mlp_layer='timm.layers.Mlp', mlp_ratio=4., depth=1))
    assert type(model.blocks[0].mlp) is Mlp and model.blocks[0].mlp.fc1.out_features == 768
    with pytest.raises(ValueError, match='cannot import timm.layers.NoSuchMlp'):
        resolve_layer_kwargs(dict(mlp_layer='timm.layers.NoSuchMlp'))


def test_ab_speed_times_each_build_against_its_peer_in_the_same_process(tmp_path):
    """eval/speed/ab_speed.py: every worker times its build's LDN and the fixed peer in one process, and the A/B of
    two builds is reported both bare and normalised by that peer."""
    import ab_speed
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / 'ab'
    assert ab_speed.main(['--old', str(root), '--new', str(root), '--rounds', '1', '--iters', '1',
                          '--cases', 'seq_train_L256_b32', '--out', str(out)]) == 0
    saved = json.loads(out.with_suffix('.json').read_text())
    row = saved['rows'][0]
    assert row['case'] == 'seq_train_L256_b32' and row['old_peer_ms'] > 0 and row['new_ms'] > 0
    run = saved['runs']['seq_train_L256_b32']['new'][0]
    assert run['peer_over_ldn'] == pytest.approx(run['peer_ms'] / run['ms'])
    assert row['new_over_old_normalised'] == pytest.approx(
        saved['runs']['seq_train_L256_b32']['old'][0]['peer_over_ldn'] / run['peer_over_ldn'])
    assert 'peer-normalised' in out.with_suffix('.md').read_text()


def test_speed_benchmarks_build_the_registered_model_where_a_study_row_shares_its_name():
    """The block study's v1 row is called ``ldn_base``, like timm's ViT-B-sized LDN: the one builder gives the row,
    the speed benchmarks (which compare registered models) get timm's model."""
    from builder import build_model
    bench = H.bench_model('ldn_base', 64, 'meta')
    assert bench.embed_dim == 768 and bench.in_chans == 3
    row = build_model('ldn_base', device='meta')
    assert row.in_chans == 1 and row.embed_dim != 768
    with pytest.raises(ValueError, match='not registered with timm'):
        build_model('ldn_v2', registered=True)
