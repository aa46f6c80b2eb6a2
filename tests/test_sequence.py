"""The contract's properties restated on sequences (path graph, padding), and the sequence model's API.

docs/contract.md lists which test checks which property.
"""
import json

import pytest
import torch

from timm_ldn.diffusion import (
    PATH_NEIGHBOURS_PER_SCALE, diffusion_attention_reference, diffusion_coefficients, linear_diffusion_attention,
    packed_linear_diffusion_attention, path_diameter, path_diffusion_step, path_laplacian_reference,
)
from timm.layers import Mlp

from timm_ldn.sequence import (
    ChunkedSoftmaxDiffusionAttention, DwConv1dMlp, ImplicitPathDiffusion, LdnSequenceClassifier, PathDiffusion,
    TaylorDiffusionAttention, default_offsets,
)

OFFSETS = [1, 2, 4]
DT = torch.float64


def _coef(channels: int, seed: int = 0, scale: float = 2.) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return diffusion_coefficients(torch.randn(len(OFFSETS), channels, generator=g, dtype=DT) * scale,
                                  torch.randn(channels, generator=g, dtype=DT) * scale, PATH_NEIGHBOURS_PER_SCALE)


def _mask(lengths, L):
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize('lengths', [(11, 11), (11, 6), (3, 1)])
def test_path_step_equals_dense_laplacian_and_keeps_constants(lengths):
    """K·1 = 0 at both ends and next to padding; the step equals the dense (I + δt·K) edge by edge."""
    L, C = 11, 3
    coef = _coef(C)
    mask = _mask(lengths, L)
    x = torch.randn(2, L, C, dtype=DT)
    upd = path_diffusion_step(x, coef, OFFSETS, mask, 0.)
    for b in range(2):
        for c in range(C):
            K = path_laplacian_reference(coef[:, c], OFFSETS, ~mask[b])
            assert torch.allclose(K.sum(1), torch.zeros(L, dtype=DT), atol=1e-14) and torch.equal(K, K.t())
            torch.testing.assert_close(upd[b, :, c], K @ x[b, :, c], rtol=1e-12, atol=1e-14)
    const = torch.full((2, L, C), 2.5, dtype=DT)
    torch.testing.assert_close(path_diffusion_step(const, coef, OFFSETS, mask), const, rtol=0, atol=1e-13)
    assert (upd[mask] == 0).all()  # padded positions are not nodes


def test_path_step_conserves_the_mean_of_each_real_sequence_and_never_grows_max_norm():
    L, C = 13, 4
    mask = _mask((13, 8), L)
    x = torch.randn(2, L, C, dtype=DT) * 3
    for scale in (1., 30.):  # huge coefficients: still a convex average
        y = path_diffusion_step(x, _coef(C, 1, scale), OFFSETS, mask)
        real = (~mask).to(DT).unsqueeze(-1)
        torch.testing.assert_close((y * real).sum(1), (x * real).sum(1), rtol=0, atol=1e-12)
        assert (y * real).abs().amax() <= (x * real).abs().amax() + 1e-12


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_deep_path_diffusion_stack_stays_finite_in_low_precision(dtype):
    torch.manual_seed(0)
    steps = [PathDiffusion(8, OFFSETS) for _ in range(12)]
    for s in steps:
        with torch.no_grad():
            s.a_raw.uniform_(5., 12.)
            s.tau.uniform_(-10., 30.)  # sigmoid(τ) ≈ 1: at the stability limit
    limit = torch.finfo(dtype).max / 4
    x = ((torch.rand(2, 40, 8) * 2 - 1) * limit).to(dtype)
    y = x
    with torch.no_grad():
        for s in steps:
            y = s.to(dtype)(y)
    assert torch.isfinite(y).all() and y.abs().max() <= x.abs().max()


@pytest.mark.parametrize('L,offsets', [(16, (1, 2, 4)), (23, (1, 3)), (9, (1,))])
def test_theorem1_on_the_path_graph_at_exactly_the_diameter(L, offsets):
    """With A_diff and F off, output i depends on input j for every pair once depth = diameter, not one earlier."""
    diameter = path_diameter(L, offsets)
    torch.manual_seed(1)
    steps = [PathDiffusion(1, offsets).double() for _ in range(diameter)]
    for s in steps:
        with torch.no_grad():
            s.a_raw.normal_()

    def stack(k):
        def f(x):
            for s in steps[:k]:
                x = s(x)
            return x
        return f

    x = torch.randn(1, L, 1, dtype=DT)
    full = torch.autograd.functional.jacobian(stack(diameter), x).reshape(L, L)
    assert (full.abs() > 0).all()
    short = torch.autograd.functional.jacobian(stack(diameter - 1), x).reshape(L, L)
    assert (short == 0).any()


def test_masked_attention_rows_sum_to_zero_and_match_dense():
    torch.manual_seed(2)
    B, H, L, d = 2, 2, 9, 4
    mask = _mask((9, 5), L)
    q, k, v = (torch.randn(B, H, L, d, dtype=DT) for _ in range(3))
    ref = diffusion_attention_reference(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(linear_diffusion_attention(q, k, v, key_padding_mask=mask), ref)
    qkv = torch.cat([t.transpose(1, 2).reshape(B, L, H * d) for t in (q, k, v)], -1)
    packed = packed_linear_diffusion_attention(qkv, H, mask)
    torch.testing.assert_close(packed, ref.transpose(1, 2).reshape(B, L, H * d))
    # a constant V over the real tokens: zero update (whatever the padded values are)
    v_const = torch.full_like(v, 1.5)
    v_const[1, :, 5:] = 99.
    out = linear_diffusion_attention(q, k, v_const, key_padding_mask=mask)
    torch.testing.assert_close(out[0], torch.zeros_like(out[0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :, :5], torch.zeros_like(out[1, :, :5]), rtol=0, atol=1e-12)


def _token_model(**kw):
    torch.manual_seed(0)
    m = LdnSequenceClassifier(num_classes=5, vocab_size=12, embed_dim=16, depth=2, num_heads=2, max_len=64, **kw)
    with torch.no_grad():  # off the init values so every term matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize('layers', [
    dict(mlp_layer=DwConv1dMlp), dict(mlp_layer=Mlp), dict(diffusion_layer=ImplicitPathDiffusion),
    dict(diffusion_layer=ImplicitPathDiffusion, attn_layer=TaylorDiffusionAttention),
    dict(diffusion_layer=ImplicitPathDiffusion, attn_layer=ChunkedSoftmaxDiffusionAttention)], ids=str)
def test_output_of_a_sequence_does_not_depend_on_the_padding_after_it(layers):
    m = _token_model(**layers)
    x = torch.randint(1, 12, (1, 20))
    with torch.no_grad():
        alone = m(x)
        for pad, fill in ((1, 0), (17, 5), (44, 11)):
            padded = torch.cat([x, torch.full((1, pad), fill)], 1)
            mask = torch.zeros(1, 20 + pad, dtype=torch.bool)
            mask[:, 20:] = True
            batch = torch.cat([padded, torch.randint(1, 12, (1, 20 + pad))])  # beside an unpadded neighbour
            out = m(batch, torch.cat([mask, torch.zeros_like(mask)]))
            torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-6)


def test_feature_model_trains_and_default_offsets_reach_across():
    torch.manual_seed(0)
    m = LdnSequenceClassifier(num_classes=3, in_features=1, embed_dim=16, depth=2, num_heads=2, max_len=784)
    assert m.offsets == default_offsets(784) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    x = torch.randn(4, 784, 1)
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_bad_inputs_name_the_problem_and_the_fix():
    m = _token_model()
    x = torch.randint(1, 12, (2, 10))
    with pytest.raises(ValueError, match=r'Token ids must lie in \[0, 12\)'):
        m(torch.full((1, 4), 12))
    with pytest.raises(ValueError, match=r'padding_mask must have shape \(B, L\) = \(2, 10\)'):
        m(x, torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match='all padding'):
        m(x, torch.tensor([[False] * 10, [True] * 10]))
    with pytest.raises(ValueError, match='takes integer token ids.*in_features'):
        m(torch.randn(2, 10))
    with pytest.raises(ValueError, match='bool tensor'):
        m(x, torch.zeros(2, 10))
    f = LdnSequenceClassifier(num_classes=2, in_features=3, embed_dim=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match='takes float features.*vocab_size'):
        f(torch.randint(0, 5, (2, 10, 3)))
    with pytest.raises(ValueError, match=r'expects \(B, L, 3\)'):
        f(torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match='exactly one of vocab_size'):
        LdnSequenceClassifier(num_classes=2, vocab_size=5, in_features=3)
    with pytest.raises(ValueError, match='exactly one of vocab_size'):
        LdnSequenceClassifier(num_classes=2)


def test_save_and_load_round_trip_and_clear_errors(tmp_path):
    m = _token_model()
    m.save_pretrained(tmp_path / 'm')
    assert {p.name for p in (tmp_path / 'm').iterdir()} >= {'config.json', 'model.safetensors'}
    loaded = LdnSequenceClassifier.from_pretrained(str(tmp_path / 'm'))
    x = torch.randint(1, 12, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), m(x), rtol=0, atol=0)
    other = tmp_path / 'other'
    LdnSequenceClassifier(num_classes=5, vocab_size=12, embed_dim=32, depth=2, num_heads=2).save_pretrained(other)
    (other / 'config.json').write_text((tmp_path / 'm' / 'config.json').read_text())  # config of another size
    with pytest.raises(RuntimeError, match='do not fit an LdnSequenceClassifier'):
        LdnSequenceClassifier.from_pretrained(str(other))
    cfg = json.loads((tmp_path / 'm' / 'config.json').read_text())
    cfg['in_features'] = 3  # both inputs: an invalid config
    (tmp_path / 'm' / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='exactly one of vocab_size'):
        LdnSequenceClassifier.from_pretrained(str(tmp_path / 'm'))


def test_published_sequence_model_loads_only_with_its_pinned_sha256(tmp_path, monkeypatch):
    """load_published verifies the manifest's sha256 (offline: the shipped copy) before loading."""
    from timm_ldn import hub
    from timm_ldn.sequence import load_published
    m = _token_model()
    folder = tmp_path / 'weights' / 'ldn_seq_test'
    m.save_pretrained(folder)
    weights = folder / 'model.safetensors'
    entry = dict(model='ldn_seq_test', architecture='LdnSequenceClassifier', hf_hub_id='timm-ldn/ldn_seq_test',
                 filename='model.safetensors', sha256=hub.sha256_file(weights), size=weights.stat().st_size,
                 layout_version=1, provenance={}, eval={}, reproduce='test',
                 local_file='ldn_seq_test/model.safetensors')
    manifest = tmp_path / 'weights' / 'manifest.json'
    manifest.write_text(json.dumps(dict(schema_version=1, weights={'ldn_seq_test': entry})))
    monkeypatch.setenv(hub.MANIFEST_ENV, str(manifest))

    def unreachable(repo_id, filename, cache_dir):  # no Hub here: the verified shipped copy is the fallback
        raise hub.WeightsError(f'{repo_id} unreachable')
    monkeypatch.setattr(hub, '_download', unreachable)
    x = torch.randint(1, 12, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_published('ldn_seq_test').eval()(x), m(x), rtol=0, atol=0)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit
    weights.write_bytes(bytes(data))
    with pytest.raises(hub.WeightsError, match='sha256'):
        load_published('ldn_seq_test')
    with pytest.raises(hub.NoPretrainedWeightsError):
        load_published('ldn_seq_missing')


@pytest.mark.parametrize('name, diffusion_layer, pos_embed, defaults', [
    ('ldn_seq_listops_512.lra', PathDiffusion, False, False),  # the paper's form, published before the default changed
    ('ldn_seq_listops_512.lra_v2', ImplicitPathDiffusion, True, True),  # today's defaults, 4000 steps
    ('ldn_seq_listops_512.lra_long', ImplicitPathDiffusion, True, True),  # today's defaults, the 32000-step long run
])
def test_shipped_sequence_weights_load_offline_in_the_form_they_were_trained(monkeypatch, name, diffusion_layer,
                                                                               pos_embed, defaults):
    """Each shipped ListOps model loads through load_published from the verified shipped copy (no Hub), rebuilds the
    layers it was trained with, and reads sequences of any length up to max_len, padding carrying nothing."""
    from timm_ldn import hub
    from timm_ldn.sequence import load_published
    monkeypatch.delenv(hub.MANIFEST_ENV, raising=False)

    def unreachable(repo_id, filename, cache_dir):
        raise hub.WeightsError(f'{repo_id} unreachable')
    monkeypatch.setattr(hub, '_download', unreachable)
    m = load_published(name).eval()
    assert type(m.blocks[0].diffusion) is diffusion_layer and (m.pos_embed is not None) == pos_embed
    entry = hub.load_manifest()['weights'][name]
    assert sum(p.numel() for p in m.parameters()) == entry['num_params']
    if defaults:  # published as the defaults: a default-built model takes its state dict as is
        default = LdnSequenceClassifier(**entry['model_args'])
        default.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 16, (1, 300), generator=g)
    padded = torch.cat([x, torch.zeros(1, 212, dtype=torch.long)], 1)
    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, 300:] = True
    with torch.no_grad():
        logits = m(x)
        torch.testing.assert_close(m(padded, mask), logits, rtol=1e-4, atol=1e-4)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_token_depthwise_conv_equals_nn_conv1d():
    from timm_ldn.sequence import TokenDepthwiseConv1d
    torch.manual_seed(3)
    for k in (1, 3, 5):
        conv = TokenDepthwiseConv1d(6, k).double()
        ref = torch.nn.Conv1d(6, 6, k, padding=k // 2, groups=6).double()
        ref.load_state_dict(conv.state_dict())
        x = torch.randn(2, 9, 6, dtype=DT, requires_grad=True)
        out = conv(x)
        torch.testing.assert_close(out, ref(x.transpose(1, 2)).transpose(1, 2))
        g_fast = torch.autograd.grad(out.sum(), [x, conv.weight])
        g_ref = torch.autograd.grad(ref(x.transpose(1, 2)).sum(), [x, ref.weight])
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match='odd'):
        TokenDepthwiseConv1d(4, 2)


def test_length_window_batches_pad_little_and_draw_every_sequence_equally():
    """The sequence benchmark's ListOps sampler (eval/lra/train_lra.py): batches of similar lengths, yet each
    sequence drawn as often as under uniform sampling, the shortest and longest included."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'lra'))
    from train_lra import length_window_sample

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 513, (4000,), generator=gen)
    by_length = lengths.argsort(stable=True)
    counts = torch.zeros(len(lengths))
    spreads = []
    for _ in range(4000):
        idx = length_window_sample(by_length, 32, gen, window=200)
        counts += torch.bincount(idx, minlength=len(lengths))
        spreads.append(float(lengths[idx].max() - lengths[idx].min()))
    uniform = torch.randint(0, len(lengths), (32,), generator=gen)
    assert sorted(spreads)[len(spreads) // 2] < 0.1 * float(lengths[uniform].max() - lengths[uniform].min())
    mean = counts.mean()  # 32 per sequence
    ends = torch.cat([by_length[:200], by_length[-200:]])
    assert abs(counts[ends].mean() - mean) < 0.1 * mean  # a clipped window would give the ends ~half
    assert abs(counts[by_length[1900:2100]].mean() - mean) < 0.1 * mean


def test_publish_writes_a_pinned_entry_that_load_published_reproduces(tmp_path, monkeypatch):
    """eval/lra/publish.py: a finished run's best weights -> weights/<name>/ + manifest entry; load_published gives
    the trained model's logits exactly; ablation rows are refused (their config.json would not rebuild them)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'lra'))
    import publish
    import study
    from timm_ldn import hub
    from timm_ldn.sequence import load_published

    monkeypatch.setattr(study, 'RESULTS', tmp_path / 'results')
    monkeypatch.setattr(study, 'RUNS', tmp_path / 'runs')
    arch = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2., num_classes=10, vocab_size=12, max_len=64)
    for row in ('ldn', 'ldn_no_k'):
        run = f'listops_{row}_s0'
        torch.manual_seed(0)
        model = publish.build_model(row, sequence=True, **arch)
        (study.RUNS / run).mkdir(parents=True)
        torch.save(model.state_dict(), study.RUNS / run / 'best.pt')
        study.RESULTS.mkdir(exist_ok=True)
        (study.RESULTS / f'{run}.json').write_text(json.dumps(dict(
            task='listops', row=row, seed=0, steps=10, arch=arch, best_step=10, val_acc=50., test_acc=49.)))
    weights = tmp_path / 'weights'
    entry = publish.publish('listops_ldn_s0', 'ldn_seq_test.lra', weights)
    assert entry['sha256'] == hub.sha256_file(weights / 'ldn_seq_test.lra' / 'model.safetensors')
    assert entry['eval']['test_acc'] == 49.

    monkeypatch.setenv(hub.MANIFEST_ENV, str(weights / 'manifest.json'))

    def unreachable(repo_id, filename, cache_dir):  # no Hub here: the verified shipped copy is the fallback
        raise hub.WeightsError(f'{repo_id} unreachable')
    monkeypatch.setattr(hub, '_download', unreachable)
    torch.manual_seed(0)
    trained = publish.build_model('ldn', sequence=True, **arch).eval()
    x = torch.randint(1, 12, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_published('ldn_seq_test.lra').eval()(x), trained(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"uses study layers .*ablations:NoDiffusion"):
        publish.publish('listops_ldn_no_k_s0', 'ldn_seq_ablation', weights)
    with pytest.raises(FileNotFoundError, match='finished runs'):
        publish.publish('listops_ldn_s9', 'ldn_seq_missing', weights)


def test_every_benchmark_row_ignores_padding_and_the_compared_rows_match_in_size():
    """eval/lra/models.py: each row is a fair comparison only if padding carries nothing through it (positions,
    attention, the conv, the pool) and the rows the targets compare stay within 10 % of LDN's parameters."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'lra'))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval'))
    import models
    from builder import build_model
    torch.manual_seed(0)
    sizes = {}
    x = torch.randint(0, 12, (1, 15))
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[0, 15:] = True
    batch = torch.cat([torch.cat([x, torch.full((1, 8), 3)], 1), torch.randint(0, 12, (1, 23))])
    for row in models.ROWS:
        m = build_model(row, sequence=True, num_classes=10, vocab_size=12, embed_dim=32, depth=2, num_heads=4).eval()
        sizes[row] = sum(p.numel() for p in m.parameters())
        with torch.no_grad():
            torch.testing.assert_close(m(batch, mask)[:1], m(x), rtol=1e-5, atol=1e-5, msg=row)
    for row in ('transformer', 'linear_transformer'):
        assert abs(sizes[row] / sizes['ldn'] - 1) <= 0.10, (row, sizes)
    with pytest.raises(ValueError, match='unknown sequence row'):
        build_model('ldn_typo', sequence=True, num_classes=10, vocab_size=12)


def test_feature_model_sees_the_magnitude_of_its_inputs_not_only_their_sign():
    """One pixel per step: two images that differ only in brightness must not get the same logits (a LayerNorm
    right after the 1-feature embedding made the model scale-invariant and left it the pixels' signs only)."""
    torch.manual_seed(0)
    m = LdnSequenceClassifier(num_classes=10, in_features=1, embed_dim=32, depth=2, num_heads=4, max_len=64).eval()
    x = torch.rand(1, 40, 1) + 0.1
    with torch.no_grad():
        assert (m(x) - m(3 * x)).abs().max() > 1e-3


def test_positions_are_each_real_tokens_rank_so_no_padding_moves_them():
    """pos_embed=True: a real token's position is its rank among its sequence's real tokens, so the output is the
    same with padding before, inside or after the sequence; the table is no parameter and not saved."""
    from timm_ldn.sequence import SinusoidalPositions, sinusoidal_positions
    plain, posed = _token_model(pos_embed=False), _token_model(pos_embed=True)
    assert plain.state_dict().keys() == posed.state_dict().keys()
    posed.load_state_dict(plain.state_dict())  # the same weights: only the positions differ
    x = torch.randint(1, 12, (1, 20))
    with torch.no_grad():
        assert (posed(x) - plain(x)).abs().max() > 1e-3
        alone = posed(x)
        for where in ('after', 'before'):
            pad = torch.full((1, 9), 7)
            padded = torch.cat([x, pad] if where == 'after' else [pad, x], 1)
            mask = torch.zeros(1, 29, dtype=torch.bool)
            mask[:, 20:] = where == 'after'
            mask[:, :9] = where == 'before'
            torch.testing.assert_close(posed(padded, mask), alone, rtol=1e-5, atol=1e-6, msg=where)
    layer = SinusoidalPositions(8, 16)
    mask = torch.tensor([[True, False, True, False, False]])
    out = layer(torch.zeros(1, 5, 8), mask)
    table = sinusoidal_positions(16, 8)
    torch.testing.assert_close(out[0, [1, 3, 4]], table[:3])  # ranks 0, 1, 2 among the real tokens
    with pytest.raises(ValueError, match='max_len >= 17'):
        layer(torch.zeros(1, 17, 8))


def test_positions_survive_save_and_load(tmp_path):
    """A feature model with positions keeps pos_embed in config.json and loads to the same outputs; an old
    config.json without the key (the shipped ListOps model's) loads without positions."""
    torch.manual_seed(0)
    m = LdnSequenceClassifier(num_classes=4, in_features=1, embed_dim=16, depth=2, num_heads=2, max_len=64,
                              pos_embed=True).eval()
    m.save_pretrained(tmp_path / 'm')
    cfg = json.loads((tmp_path / 'm' / 'config.json').read_text())
    assert cfg['pos_embed'] is True
    loaded = LdnSequenceClassifier.from_pretrained(str(tmp_path / 'm')).eval()
    assert loaded.pos_embed is not None
    x = torch.rand(2, 40, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    del cfg['pos_embed']
    (tmp_path / 'm' / 'config.json').write_text(json.dumps(cfg))
    assert LdnSequenceClassifier.from_pretrained(str(tmp_path / 'm')).pos_embed is None


def test_defaults_are_the_long_range_winner_and_old_configs_keep_the_papers_form(tmp_path):
    """The constructor's defaults are the row the long-range study chose (eval/lra/models.py's ABLATION_WINNER:
    the implicit step, positions, PyTorch's init); a config.json written before those arguments existed (the
    shipped ListOps model's) still rebuilds the paper's form: explicit K step, no positions."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'lra'))
    import models
    from timm_ldn.sequence import ImplicitPathDiffusion, PathDiffusion
    kw = dict(num_classes=3, vocab_size=12, embed_dim=16, depth=1, num_heads=2, max_len=64)
    LdnSequenceClassifier(**kw).save_pretrained(tmp_path / 'default')
    LdnSequenceClassifier(**kw, **models.LDN_ROWS[models.ABLATION_WINNER]).save_pretrained(tmp_path / 'winner')
    assert (tmp_path / 'default' / 'config.json').read_text() == (tmp_path / 'winner' / 'config.json').read_text()
    assert isinstance(LdnSequenceClassifier(**kw).blocks[0].diffusion, ImplicitPathDiffusion)
    old = LdnSequenceClassifier(**kw, **models.PAPER_FORM)
    old.save_pretrained(tmp_path / 'old')
    cfg = json.loads((tmp_path / 'old' / 'config.json').read_text())
    for key in ('diffusion_layer', 'pos_embed', 'weight_init', 'attn_layer', 'block_fn', 'ls_init_value', 'qkv_bias'):
        del cfg[key]
    (tmp_path / 'old' / 'config.json').write_text(json.dumps(cfg))
    loaded = LdnSequenceClassifier.from_pretrained(str(tmp_path / 'old')).eval()
    assert isinstance(loaded.blocks[0].diffusion, PathDiffusion) and loaded.pos_embed is None
    x = torch.randint(0, 12, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), old.eval()(x), rtol=0, atol=0)


def test_grad_checkpointing_gives_the_same_loss_and_gradients_with_padding():
    m = _token_model().train()
    x = torch.randint(1, 12, (3, 20))
    mask = _mask((20, 13, 4), 20)
    y = torch.tensor([0, 3, 1])

    def grads():
        m.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(m(x, mask), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    loss, ref = grads()
    m.set_grad_checkpointing()
    assert m.grad_checkpointing
    recomputed = []
    hook = m.blocks[0].register_forward_pre_hook(lambda *a: recomputed.append(1))
    loss_ckpt, got = grads()
    hook.remove()
    assert len(recomputed) == 2  # the block ran again in the backward: its activations were not kept
    torch.testing.assert_close(loss_ckpt, loss)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    m.set_grad_checkpointing(False)
    with torch.no_grad():  # switched off again, and inference never recomputes
        torch.testing.assert_close(m(x, mask), m.eval()(x, mask))


def test_attention_saves_no_spent_part_of_the_qkv_projection():
    """In training, A_diff keeps v for its backward, not the projection's whole [q | k | v] output (q and k are spent
    once φ has run): the memory that linear attention saves on long sequences is not given back here."""
    m = _token_model().train()
    attn = m.blocks[0].attn
    x = torch.randn(2, 30, 16, requires_grad=True)
    outputs, saved = [], []
    hook = attn.qkv.register_forward_hook(lambda mod, args, out: outputs.append(out))

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x)
    hook.remove()
    (qkv,) = outputs
    assert qkv.untyped_storage().data_ptr() not in saved
    out.sum().backward()  # and the backward still has what it needs
    assert x.grad is not None and torch.isfinite(x.grad).all()
