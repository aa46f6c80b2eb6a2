"""The Fashion-MNIST study rows (``eval/fmnist/study_models.py``) and their layers keep the spec's properties.

* every row of ``ROWS`` builds, trains (every parameter that can learn gets a gradient) and holds the nano budget;
  ``ldn_v2`` is the shipped default, ``ldn_base`` the layout-v1 block;
* the ablation layers of ``eval/ablations.py`` keep the properties of the operators they replace (checked against
  the dense references of ``timm_ldn.diffusion``, in double precision);
* ``timm_ldn.ldn.ConvTokenizer`` (the tokenizer study's stem) keeps the patch grid.
"""
import re
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
from timm.layers import Mlp

import timm_ldn  # noqa: F401
from timm_ldn.diffusion import diffusion_attention_reference, grid_diameter, laplacian_reference
from timm_ldn.ldn import ConvTokenizer, DiffusionAttention, DwConvMlp, LdnBlock
from timm_ldn.profiling import count_cost

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / 'eval' / d) for d in ('fmnist', 'speed')] + [str(ROOT / 'eval')]
import ablations  # noqa: E402
import study_models  # noqa: E402
from builder import build_model  # noqa: E402

NANO = 'ldn_nano_patch4_28'
NANO_PARAMS = 350_000  # the block study's budget: every row within 0.35 M params
DD = dict(dtype=torch.float64)

# Parameters a row builds that cannot learn, by row: name pattern -> why.
NO_GRAD: dict = {}
ZERO_GRAD = {
    # timm's zero_init_last: bn2.weight = 0 at init, so each residual branch before it starts with zero gradient
    'resnet': r'layer\d\.\d+\.(conv1\.weight|bn1\.(weight|bias)|conv2\.weight)',
}


def _uses_ablation(row: study_models.Row) -> bool:
    def module_of(v):
        return getattr(v.func if isinstance(v, partial) else v, '__module__', '')
    return any(module_of(v) == ablations.__name__ for v in row.overrides.values())


# --- every study row -------------------------------------------------------------------------------------------

def _recorded_params():
    import csv
    path = ROOT / 'eval' / 'results' / 'block_study' / 'block_study.csv'
    with open(path) as f:
        return {r['row']: int(r['params']) for r in csv.DictReader(f)}


RECORDED_PARAMS = _recorded_params()


@pytest.mark.parametrize('name', list(study_models.ROWS))
def test_row_builds_trains_and_holds_the_budget(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_chans=1).train()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.square().sum().backward()

    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    expected = {n for n, _ in model.named_parameters() if name in NO_GRAD and re.fullmatch(NO_GRAD[name], n)}
    assert no_grad == expected, f'parameters without gradient: {sorted(no_grad ^ expected)}'
    zero = {n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()}
    expected = {n for n, _ in model.named_parameters() if name in ZERO_GRAD and re.fullmatch(ZERO_GRAD[name], n)}
    assert zero == expected, f'parameters with an all-zero gradient: {sorted(zero ^ expected)}'
    if name in NO_GRAD or name in ZERO_GRAD:
        assert expected, 'the exception must name existing parameters'

    cost = count_cost(model, (1, 28, 28))
    params = sum(p.numel() for p in model.parameters())
    assert params == round(cost['params_m'] * 1e6)
    if name in RECORDED_PARAMS:  # the row rebuilds the architecture its study result was trained with
        assert params == RECORDED_PARAMS[name], (params, RECORDED_PARAMS[name])
    assert params <= NANO_PARAMS, f'{name}: {params} params over the nano budget'
    if name.startswith(('ldn_tok', 'cct_tok')):
        assert params <= study_models.TOKENIZER_BUDGET['params']
        assert cost['gmacs'] <= study_models.TOKENIZER_BUDGET['gmacs'], f"{name}: {cost['gmacs']:.4f} GMACs"


@pytest.mark.parametrize('name', [n for n, r in study_models.ROWS.items() if _uses_ablation(r)])
def test_ablation_row_scripts(name):
    model = build_model(name, num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)


def _layout(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_ldn_v2_row_is_the_default_model():
    row = build_model('ldn_v2', num_classes=10, in_chans=1)
    default = timm.create_model(NANO, num_classes=10, in_chans=1)
    assert _layout(row) == _layout(default)
    assert [(n, type(m)) for n, m in row.named_modules()] == [(n, type(m)) for n, m in default.named_modules()]


def test_ldn_base_row_is_the_v1_block():
    model = build_model('ldn_base', num_classes=10, in_chans=1)
    layout = _layout(model)
    assert not [k for k in layout if 'mlp.dwconv' in k]
    for blk in model.blocks:
        assert type(blk.mlp) is Mlp and not isinstance(blk.mlp, DwConvMlp)
        assert blk.mlp.fc1.out_features == 4 * model.embed_dim  # ratio 4
    # the v2 default differs from it exactly by the depthwise conv and the narrower hidden layer
    v2 = _layout(timm.create_model(NANO, num_classes=10, in_chans=1))
    assert {k for k in v2 if k not in layout} == {k for k in v2 if 'mlp.dwconv' in k}


# --- primary diffusion as a pre-norm branch ---------------------------------------------------------------------

def _branch_block(channels: int, offsets, seed: int = 0) -> LdnBlock:
    torch.manual_seed(seed)
    blk = LdnBlock(channels, num_heads=1, diffusion_offsets=offsets, diffusion_layer=ablations.BranchDiffusion, **DD)
    with torch.no_grad():  # switch off A_diff and F: only H + δt·K(LN(H)) remains
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        blk.diffusion.a_raw.normal_(0., 1.)
    return blk


def test_branch_diffusion_is_bounded_whatever_the_input_scale():
    """Branch stability: δt·K(U) = (M − I)·U with M = I + δt·K convex, so |δt·K(U)| ≤ 2·max|U|, U = LN(H).

    The update is bounded by the normalised branch input, not by H: a huge stream cannot blow the branch up, and a
    spatially constant stream (any scale) is left exactly where it is.
    """
    torch.manual_seed(0)
    op = ablations.BranchDiffusion(6, (1, 2, 4), **DD)
    assert op.norm.weight.dtype == torch.float64 and op.norm.eps == 1e-6  # the model's norm, in the model's dtype
    with torch.no_grad():
        op.a_raw.uniform_(-3., 80.)
        op.tau.uniform_(-10., 40.)
        op.norm.weight.normal_(1., 2.)
        op.norm.bias.normal_(0., 1.)
    for scale in (1., 1e4):
        h = torch.randn(2, 8, 8, 6, dtype=torch.float64) * scale
        u = op.norm(h)
        update = op.update(u)
        torch.testing.assert_close(op(h) - h, update, rtol=0, atol=1e-8 * scale)
        assert update.abs().max() <= 2 * u.abs().max() * (1 + 1e-12)
        assert (u + update).abs().max() <= u.abs().max() * (1 + 1e-12)  # the step on U is a convex average
    const = torch.randn(1, 1, 1, 6, dtype=torch.float64).expand(2, 8, 8, 6) * 1e3
    torch.testing.assert_close(op(const), const, rtol=0, atol=1e-9)


@pytest.mark.parametrize('grid,offsets', [((7, 7), (1, 2)), ((6, 9), (1, 2))])
def test_theorem1_holds_for_the_branch_form_at_exactly_the_diameter(grid, offsets):
    """Through H + δt·K(LN(H)) blocks (A_diff, F zeroed) every token depends on every token at the diameter."""
    diameter = grid_diameter(*grid, offsets)
    blocks = [_branch_block(4, offsets, seed=i) for i in range(diameter)]
    n = grid[0] * grid[1]

    def dependency(depth: int) -> torch.Tensor:
        def run(x):
            for blk in blocks[:depth]:
                x = blk(x)
            return x
        x = torch.randn(1, *grid, 4, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(run, x, vectorize=True).reshape(n, 4, n, 4)
        return jac.abs().sum((1, 3))  # token-to-token influence over all channel pairs

    assert (dependency(diameter) > 0).all(), 'every token must reach every token at the diameter'
    assert (dependency(diameter - 1) == 0).any(), 'some pair must still be disconnected one layer earlier'


# --- input-dependent time step ------------------------------------------------------------------------------------

def _input_dt_op(channels: int, offsets=(1, 2), seed: int = 0) -> ablations.InputTimeStepDiffusion:
    torch.manual_seed(seed)
    op = ablations.InputTimeStepDiffusion(channels, offsets, **DD)
    assert op.tau_proj.weight.dtype == torch.float64
    with torch.no_grad():
        op.a_raw.normal_(0., 2.)
        op.tau.normal_(0., 2.)
        op.tau_proj.weight.normal_(0., 3.)
    return op


def test_input_dependent_step_matches_dense_operator_per_sample():
    """Each sample gets its own δt_b = 0.99·sigmoid(τ + W·mean(H_b)) / Σ_s 4·a_s, and its step is exactly
    (I + δt_b·K)·H_b with K built edge by edge."""
    h, w, C = 5, 6, 3
    op = _input_dt_op(C)
    x = torch.randn(2, h, w, C, dtype=torch.float64)
    a = F.softplus(op.a_raw)
    with torch.no_grad():
        dt = 0.99 * torch.sigmoid(op.tau + op.tau_proj(x.mean((1, 2)))) / (4 * a.sum(0))  # (B, C)
        torch.testing.assert_close(op.per_sample_coefficients(x), dt[:, None, :] * a, rtol=1e-12, atol=0)
        assert not torch.allclose(dt[0], dt[1])
        expected = torch.empty_like(x)
        for b in range(2):
            for c in range(C):
                M = torch.eye(h * w, dtype=x.dtype) + dt[b, c] * laplacian_reference(a[:, c], op.offsets, h, w)
                expected[b, ..., c] = (x[b, ..., c].reshape(-1) @ M.t()).reshape(h, w)
        torch.testing.assert_close(op(x), expected, rtol=1e-10, atol=1e-12)


def test_input_dependent_step_stays_inside_the_bound_and_conserves():
    """Whatever τ the input produces, Σ_s 4·δt_b·a_s < 1 per sample and channel: a convex average per sample."""
    op = _input_dt_op(8, offsets=(1, 2, 4), seed=1)
    with torch.no_grad():
        op.a_raw.uniform_(-5., 60.)
        op.tau_proj.weight.normal_(0., 1e3)  # drives sigmoid(τ) to both ends
        x = torch.randn(4, 9, 9, 8, dtype=torch.float64) * 1e3
        coef = op.per_sample_coefficients(x)
        assert (coef >= 0).all() and (4 * coef.sum(1) < 1).all()
        y = op(x)
        assert y.abs().amax((1, 2, 3)).le(x.abs().amax((1, 2, 3)) * (1 + 1e-12)).all()
        torch.testing.assert_close(y.mean((1, 2)), x.mean((1, 2)), rtol=0, atol=1e-9)
        const = torch.full((2, 9, 9, 8), 2.5, dtype=torch.float64)
        torch.testing.assert_close(op(const), const, rtol=0, atol=1e-12)


# --- A_diff alternatives ------------------------------------------------------------------------------------------

def _qkv(attn, x):
    B, N, C = x.shape
    return attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize('phi', ['relu', 'softplus'])
def test_feature_map_attention_rows_sum_to_zero_and_match_dense(phi):
    torch.manual_seed(3)
    attn = ablations.FeatureMapAttention(16, num_heads=2, phi=phi, **DD).eval()
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)  # a channels-last token map
    with torch.no_grad():
        q, k, v = _qkv(attn, x.reshape(2, 30, 16))
        ref = diffusion_attention_reference(q, k, v, phi=ablations.FEATURE_MAPS[phi])
        expected = attn.proj(ref.transpose(1, 2).reshape(2, 30, 16)).reshape(x.shape)
        torch.testing.assert_close(attn(x), expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(attn.attend(q, k, torch.full_like(v, 4.)), torch.zeros_like(v), rtol=0, atol=1e-9)
        torch.testing.assert_close(torch.jit.script(attn)(x), expected, rtol=1e-9, atol=1e-9)
        # the named φ is used, not the shipped elu + 1
        elu = DiffusionAttention(16, num_heads=2, **DD)
        elu.load_state_dict(attn.state_dict())
        assert not torch.allclose(elu(x), expected)
    with pytest.raises(ValueError, match='phi must be one of'):
        ablations.FeatureMapAttention(16, num_heads=2, phi='sigmoid')


def test_softmax_diffusion_attention_of_a_constant_is_zero_and_matches_dense():
    torch.manual_seed(4)
    attn = ablations.SoftmaxDiffusionAttention(16, num_heads=2, **DD).eval()
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = _qkv(attn, x.reshape(2, 30, 16))
        torch.testing.assert_close(attn.attend(q, k, torch.full_like(v, -3.)), torch.zeros_like(v), rtol=0, atol=1e-12)
        dense = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim ** .5, -1) @ v - v
        expected = attn.proj(dense.transpose(1, 2).reshape(2, 30, 16)).reshape(x.shape)
        torch.testing.assert_close(attn(x), expected, rtol=1e-9, atol=1e-9)


def test_no_attention_and_no_diffusion_leave_the_stream_unchanged():
    torch.manual_seed(5)
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    assert ablations.NoDiffusion(8, (1, 2))(x) is x
    no_attn = ablations.NoAttention(8, num_heads=2)
    assert not list(no_attn.parameters())
    assert torch.equal(no_attn(x), torch.zeros_like(x))

    blk = LdnBlock(8, 2, diffusion_offsets=(1, 2), diffusion_layer=ablations.NoDiffusion,
                   attn_layer=ablations.NoAttention, **DD).eval()
    with torch.no_grad():
        assert torch.equal(blk(x), x + blk.mlp(blk.norm2(x)))  # only F acts
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
        assert torch.equal(blk(x), x)  # and without it nothing does

        blk = LdnBlock(8, 2, diffusion_offsets=(1, 2), attn_layer=ablations.NoAttention, **DD).eval()
        h = blk.diffusion(x)
        torch.testing.assert_close(blk(x), h + blk.mlp(blk.norm2(h)), rtol=0, atol=0)  # the attention adds nothing


# --- stems ------------------------------------------------------------------------------------------------------

def test_overlap_stem_keeps_patch_grid_and_pads_dynamically():
    model = timm.create_model('ldn_tiny', embed_layer=ablations.OverlapConvStem, depth=1, in_chans=1,
                              dynamic_img_pad=True).eval()
    assert model.patch_embed.proj.in_channels == 1  # first_conv of the cfg: in_chans adaptation finds it
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 70, 50)).shape == (1, 192, 5, 4)
        stem = ablations.OverlapConvStem(patch_size=4, in_chans=1, embed_dim=16).eval()
        assert stem(torch.randn(2, 1, 28, 20)).shape == (2, 7, 5, 16)  # channels-last
    with pytest.raises(ValueError, match='power-of-two patch_size'):
        timm.create_model('ldn_tiny', embed_layer=ablations.OverlapConvStem, patch_size=12)


@pytest.mark.parametrize('patch_size,widths', [(2, ()), (4, (8,)), (8, (4, 8))])
def test_conv_tokenizer_keeps_the_patch_grid_channels_last(patch_size, widths):
    tok = ConvTokenizer(patch_size=patch_size, in_chans=3, embed_dim=16, widths=widths,
                        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    assert tok.stages[0].in_channels == 3  # stages.0: the first_conv of ldn_nano_convtok_28
    with torch.no_grad():
        y = tok(torch.randn(2, 3, 32, 24))
    assert y.shape == (2, 32 // patch_size, 24 // patch_size, 16)
    torch.testing.assert_close(y.mean(-1), torch.zeros(y.shape[:-1]), rtol=0, atol=1e-5)  # LN over the last dim


def test_conv_tokenizer_rejects_bad_patch_sizes_and_widths():
    for p in (1, 6, 12):
        with pytest.raises(ValueError, match=f'power-of-two patch_size >= 2, got {p}'):
            ConvTokenizer(patch_size=p, widths=())
    with pytest.raises(ValueError, match=r'patch_size=8 has 3 stages: give 2 inner width\(s\) in widths, got \[32\]'):
        ConvTokenizer(patch_size=8, widths=(32,))
    with pytest.raises(ValueError, match=r'give 0 inner width\(s\)'):
        ConvTokenizer(patch_size=2, widths=(32,))


def test_conv_tokenizer_pads_dynamically():
    torch.manual_seed(6)
    tok = ConvTokenizer(patch_size=4, in_chans=1, embed_dim=8, widths=(4,), dynamic_img_pad=True).eval()
    x = torch.randn(1, 1, 30, 26)
    with torch.no_grad():
        y = tok(x)
        assert y.shape == (1, 8, 7, 8)
        tok.dynamic_img_pad = False
        torch.testing.assert_close(y, tok(F.pad(x, (0, 2, 0, 2))), rtol=0, atol=0)  # zero padding bottom / right
    model = timm.create_model('ldn_nano_convtok_28', depth=1, dynamic_img_pad=True).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 30, 26)).shape == (1, 64, 8, 7)
    with pytest.raises(ValueError, match='dynamic_img_pad=True'):
        timm.create_model('ldn_nano_convtok_28', depth=1)(torch.randn(1, 1, 30, 26))
