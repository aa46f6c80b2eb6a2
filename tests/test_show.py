"""``ldn show`` and the numbers behind its pictures (timm_ldn.visualize), on tiny random-init models."""
import json
import sys
from pathlib import Path

import pytest
import torch
import timm
from PIL import Image

import timm_ldn  # noqa: F401  registers ldn_*
from timm_ldn import visualize as V
from timm_ldn.cli import main as ldn_main
from timm_ldn.diffusion import diffusion_attention_reference, grid_diameter

ROOT = Path(__file__).resolve().parents[1]
VIT = f'{ROOT / "eval" / "fmnist" / "study_models.py"}:vit_nano_patch4_28'  # the block study's same-size ViT

MODEL = 'ldn_nano_patch4_28'  # patch 4, offsets (1, 2), 6 blocks, 2 heads, 1 channel


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = timm.create_model(MODEL, pretrained=False).eval()
    with torch.no_grad():  # unequal scales and time steps per block, like a trained model
        for blk in m.blocks:
            blk.diffusion.a_raw.normal_(0., 1.)
            blk.diffusion.tau.normal_(0., 1.)
    return m


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('show_images')
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        arr = (torch.rand(28, 28, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f'img{i}.png')
    return root


def test_diffusion_path_reaches_every_token_exactly_at_the_grid_diameter(model):
    x = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    diameter = grid_diameter(7, 7, (1, 2))  # 6 = the model's depth
    erf = V.effective_receptive_field(V.diffusion_only(model).double(), x, 'corners')
    V.check_local(erf, V.diffusion_offsets(model))
    fraction = erf.token_fraction(0.)
    assert fraction[diameter - 2] < 1. and fraction[diameter - 1] == 1.
    assert erf.first_full_depth() == diameter
    # the centre token sees everything earlier (its eccentricity), which is why the curve probes the corners
    centre = V.effective_receptive_field(V.diffusion_only(model).double(), x, 'centre')
    assert centre.first_full_depth() == 4 < diameter
    # the full model is global from the first block (A_diff): the zeroing is what makes the curve local
    full = V.effective_receptive_field(model, x.float(), 'corners')
    assert full.token_fraction(0.)[0] == 1.
    with pytest.raises(ValueError, match='not local'):
        V.check_local(full, V.diffusion_offsets(model))


def test_corner_probe_equals_every_output_token(model):
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)  # 4x4 grid, diameter 4
    diff = V.diffusion_only(model).double()
    corners = V.effective_receptive_field(diff, x, 'corners').token_fraction(0.)
    every = V.effective_receptive_field(diff, x, 'all').token_fraction(0.)
    assert corners == every
    assert every.index(1.) + 1 == grid_diameter(4, 4, (1, 2))


def test_stencil_reach_matches_grid_diameter():
    for grid, offsets in (((7, 7), (1, 2)), ((14, 14), (1, 2, 4)), ((5, 9), (1, 2))):
        diameter = grid_diameter(*grid, offsets)
        corner = (0, 0)
        assert not V.stencil_reach(grid, offsets, corner, diameter - 1).all()
        assert V.stencil_reach(grid, offsets, corner, diameter).all()


def _dense_rows(model, x, layer):
    """Rows of D⁻¹W from the dense reference: (D⁻¹W − I)·I + I, per head, (B, heads, N, N)."""
    attn = model.blocks[layer].attn
    captured = {}
    handle = attn.register_forward_pre_hook(lambda m, args: captured.__setitem__('u', args[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        u = captured['u'].flatten(1, 2)  # the channels-last map as (B, N, C)
        B, N, C = u.shape
        q, k, _ = attn.qkv(u).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        eye = torch.eye(N, dtype=u.dtype).expand(B, attn.num_heads, N, N)
        return diffusion_attention_reference(q, k, eye) + eye


@pytest.mark.parametrize('layer', [0, -1])
def test_attention_rows_sum_to_one_and_match_the_dense_reference(model, layer):
    x = torch.randn(2, 1, 16, 16)  # 4x4 grid
    dense = _dense_rows(model, x, layer)
    for query in ((0, 0), (1, 2), 15):
        rows = V.attention_rows(model, x, layer, query)
        assert rows.shape == (2, 2, 4, 4)
        torch.testing.assert_close(rows.sum((-2, -1)), torch.ones(2, 2))
        r, c = V.resolve_query(query, (4, 4))
        torch.testing.assert_close(rows.flatten(2), dense[:, :, r * 4 + c], rtol=1e-5, atol=1e-6)


def test_attention_rows_refuse_a_kernel_they_do_not_match(model, monkeypatch):
    monkeypatch.setattr(V, 'attention_feature_map', lambda attn: lambda t: torch.relu(t) + 1e-3)  # another φ
    with pytest.raises(RuntimeError, match='attention kernel changed'):
        V.attention_rows(model, torch.randn(1, 1, 16, 16), 0, 5)


def test_diffusion_scales_report_the_coefficients_and_the_margin(model):
    stats = V.diffusion_scales(model)
    assert stats['offsets'] == [1, 2]
    for i, blk in enumerate(model.blocks):
        coef = blk.diffusion.coefficients().detach().double()
        torch.testing.assert_close(torch.tensor(stats['mean'][i], dtype=torch.float64), coef.mean(1))
        step_sum = 4 * coef.sum(0)
        assert stats['step_sum_max'][i] == pytest.approx(step_sum.max().item())
        assert stats['margin'][i] == pytest.approx(1 - step_sum.max().item())
        assert 0 < stats['margin'][i] < 1 and sum(stats['share'][i]) == pytest.approx(1.)
    assert len({round(m, 6) for m in stats['margin']}) == len(model.blocks)  # per layer, not one number


def test_grad_cam_on_the_feature_map(model):
    x = torch.randn(3, 1, 28, 28)
    res = V.grad_cam(model, x)
    assert res['cam'].shape == (3, 7, 7)
    assert res['cam'].amin() >= 0 and torch.allclose(res['cam'].flatten(1).amax(1), torch.ones(3))
    with torch.no_grad():
        assert torch.equal(res['target'], model(x).argmax(-1))
    vit = V.create_baseline(VIT)  # forward_features: tokens, not a map
    with pytest.raises(ValueError, match='spatial feature map'):
        V.grad_cam(vit, x)


def test_baseline_checkpoint_is_loaded(tmp_path):
    trained = V.create_baseline(VIT)
    path = tmp_path / 'vit.pth'
    torch.save({'state_dict': trained.state_dict()}, path)  # train.py-style wrapper
    loaded = V.create_baseline(VIT, path)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match='does not exist'):
        V.create_baseline(VIT, tmp_path / 'missing.pth')
    torch.save(V.create_baseline('vit_tiny_patch16_224').state_dict(), tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='does not fit .*vit_nano_patch4_28'):
        V.create_baseline(VIT, tmp_path / 'other.pth')
    shipped = ROOT / 'weights' / 'baselines' / 'vit_nano_patch4_28.fmnist_s0.safetensors'  # the pictures' baseline
    assert V.create_baseline(VIT, shipped).pos_embed.shape == (1, 50, 64)  # class token + 7x7 patches
    with pytest.raises(ValueError, match='Unknown baseline'):
        V.create_baseline('no_such_vit')


def test_baseline_from_a_file_gives_the_cct_erf(tmp_path):
    """A model class outside timm's registry (the study's CCT, eval/fmnist/study_models.py:cct_tok32) is a baseline too:
    its checkpoint loads strictly and its ERF is measured on the same token grid as LDN's."""
    spec = f'{ROOT / "eval" / "fmnist" / "study_models.py"}:cct_tok32'
    cct = V.create_baseline(spec)
    path = tmp_path / 'cct.pth'
    torch.save(cct.state_dict(), path)
    loaded = V.create_baseline(spec, path)
    assert all(torch.equal(a, b) for a, b in zip(cct.state_dict().values(), loaded.state_dict().values()))
    erf = V.effective_receptive_field(loaded, torch.randn(2, 1, 28, 28), 'centre')
    assert erf.grid == (7, 7) and erf.token_maps.shape == (6, 1, 7, 7)
    assert erf.token_fraction(0.)[0] == 1.  # softmax attention: every token from the first block
    with pytest.raises(ValueError, match='does not fit'):
        V.create_baseline(f'{ROOT / "eval" / "fmnist" / "study_models.py"}:CompactConvTransformer', path)  # MLP ratio 4
    with pytest.raises(ValueError, match='Cannot import baseline .*no file'):
        V.create_baseline('eval/no_such_file.py:cct_tok32')
    with pytest.raises(ValueError, match='Cannot import baseline'):
        V.create_baseline('timm_ldn.visualize:no_such_model')


def test_bad_layer_and_query_name_the_valid_range(model):
    with pytest.raises(ValueError, match=r'Layer 6 does not exist: the model has 6 blocks\. Pass a layer between 0'):
        V.resolve_layer(model, 6)
    with pytest.raises(ValueError, match=r'\(7, 0\) is outside the 7x7 token grid.*0 <= row < 7'):
        V.resolve_query((7, 0), (7, 7))
    with pytest.raises(ValueError, match='Token index 49 is outside the 7x7 token grid'):
        V.resolve_query(49, (7, 7))


def _show(tmp_path, image_dir, *argv):
    return ldn_main(['show', *argv, '--model', MODEL, '--random-init', '--images', str(image_dir),
                     '--out', str(tmp_path / 'out'), '--no-progress'])


def test_cli_writes_every_picture_and_its_numbers(tmp_path, image_dir, capsys):
    rc = _show(tmp_path, image_dir, '--baseline', VIT, '--query', '2,5', '--layer', '3',
               '--num-images', '1')
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / 'out'
    for picture in ('erf', 'diffusion', 'attention', 'gradcam'):
        assert (out / f'{picture}.png').stat().st_size > 1000
    erf = json.loads((out / 'erf.json').read_text())
    assert erf['diffusion_path']['first_full_depth'] == erf['diffusion_path']['grid_diameter'] == 6
    assert [c['label'] for c in erf['curves']][1] == f'{VIT} (untrained)'
    attention = json.loads((out / 'attention.json').read_text())
    assert attention['query'] == [2, 5] and attention['layer'] == 3
    assert len(json.loads((out / 'diffusion.json').read_text())['margin']) == 6


@pytest.mark.parametrize('argv, message', [
    (['attention', '--query', '9,9'], 'outside the 7x7 token grid'),
    (['attention', '--layer', '6'], 'Layer 6 does not exist'),
    (['attention', '--query', 'middle'], 'is not row,col'),
    (['nonsense'], "unknown picture 'nonsense'"),
])
def test_cli_bad_arguments_exit_non_zero_with_the_message(tmp_path, image_dir, capsys, argv, message):
    assert _show(tmp_path, image_dir, *argv) == 2
    assert message in capsys.readouterr().err


def test_cli_unreadable_image(tmp_path, capsys):
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not an image')
    rc = ldn_main(['show', 'diffusion', '--model', MODEL, '--random-init', '--images', str(broken),
                   '--out', str(tmp_path / 'out')])
    assert rc == 2
    err = capsys.readouterr().err
    assert f'Cannot read image {broken}' in err and 'remove it from --images' in err


def test_pictures_read_layer_variants():
    """The pictures read the model's layers, whichever are plugged in (the study's ablations, eval/ablations.py):
    Theorem 1 still at the diameter for a pre-norm K branch, A_diff rows exact for another φ, no A_diff named."""
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent / 'eval' / d) for d in ('fmnist', 'speed', '')]
    import ablations
    from functools import partial
    torch.manual_seed(0)
    m = timm.create_model(MODEL, diffusion_layer=ablations.BranchDiffusion, embed_layer=ablations.OverlapConvStem,
                          attn_layer=partial(ablations.FeatureMapAttention, phi='softplus')).eval()
    x = torch.randn(1, 1, 28, 28)
    erf = V.effective_receptive_field(V.diffusion_only(m).double(), x.double(), 'corners')
    V.check_local(erf, V.diffusion_offsets(m))
    assert erf.first_full_depth() == grid_diameter(7, 7, (1, 2))
    rows = V.attention_rows(m, x, 2, (3, 3))  # raises if the recomputed row is not the block's own
    torch.testing.assert_close(rows.sum((-2, -1)), torch.ones(1, 2))
    no_attn = timm.create_model(MODEL, block_fn=ablations.NoAttentionBlock).eval()
    with pytest.raises(ValueError, match='has no A_diff'):
        V.attention_rows(no_attn, x, 0, 0)
    assert len(V.diffusion_scales(no_attn)['margin']) == 6
