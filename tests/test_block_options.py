"""The block options of the Fashion-MNIST study (issue 9) keep the spec's properties and timm's contracts.

Options: ``diffusion_form`` ('stream' | 'branch' | 'none'), ``dt_mode`` ('param' | 'input'), ``attn_kernel``
('linear' | 'softmax' | 'none'), ``attn_feature_map`` (φ), ``mlp_dwconv``, ``stem_type`` ('patch' | 'overlap').
"""
import pytest
import torch

import timm

import timm_ldn  # noqa: F401
from timm_ldn.diffusion import (
    FEATURE_MAPS, diffusion_attention_reference, diffusion_step, grid_diameter, laplacian_reference,
    linear_diffusion_attention, per_sample_diffusion_coefficients, per_sample_diffusion_step, stencil_basis,
)
from timm_ldn.ldn import LdnBlock, PrimaryDiffusion

NANO = 'ldn_nano_patch4_28'
OPTIONS = [
    dict(mlp_dwconv=True), dict(stem_type='overlap'), dict(diffusion_form='branch'), dict(dt_mode='input'),
    dict(attn_feature_map='relu'), dict(attn_feature_map='softplus'), dict(attn_kernel='none'),
    dict(diffusion_form='none'), dict(tau_init=-6.),
    dict(mlp_dwconv=True, stem_type='overlap', diffusion_form='branch', dt_mode='input'),
]


@pytest.mark.parametrize('kwargs', OPTIONS, ids=lambda k: ','.join(f'{a}={b}' for a, b in k.items()))
def test_option_trains_scripts_and_uses_every_parameter(kwargs):
    torch.manual_seed(0)
    model = timm.create_model(NANO, **kwargs)
    x = torch.randn(2, 1, 28, 28)
    model.train()
    model(x).square().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f'parameters without gradient: {unused}'
    model.eval()
    with torch.no_grad():
        eager = model(x)
        # the no-grad fast paths (in-place MLP, fused step) compute the same as the autograd path
        torch.testing.assert_close(eager, model.forward_head(model.forward_features(x)))
    with torch.enable_grad():
        torch.testing.assert_close(model(x).detach(), eager, rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs', [dict(stem_type='overlap'), dict(mlp_dwconv=True)])
def test_option_runs_at_other_sizes_and_as_backbone(kwargs):
    model = timm.create_model(NANO, features_only=True, out_indices=(1, 5), **kwargs).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 1, 36, 20))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 9, 5)] * 2


def test_overlap_stem_keeps_patch_grid_and_pads_dynamically():
    model = timm.create_model('ldn_tiny', stem_type='overlap', depth=1, in_chans=1, dynamic_img_pad=True).eval()
    assert model.patch_embed.proj.in_channels == 1  # first_conv of the cfg: in_chans adaptation finds it
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 70, 50)).shape == (1, 192, 5, 4)
    with pytest.raises(ValueError, match='power-of-two patch_size'):
        timm.create_model('ldn_tiny', stem_type='overlap', patch_size=12)


@pytest.mark.parametrize('name,value', [('diffusion_form', 'residual'), ('dt_mode', 'learned'),
                                        ('attn_kernel', 'cosine'), ('attn_feature_map', 'sigmoid'),
                                        ('stem_type', 'conv')])
def test_unknown_option_names_the_choices(name, value):
    with pytest.raises(ValueError, match=name):
        timm.create_model(NANO, **{name: value})


# --- input-dependent time step -------------------------------------------------------------------------------

def _input_dt_op(channels: int, offsets=(1, 2), seed: int = 0) -> PrimaryDiffusion:
    torch.manual_seed(seed)
    op = PrimaryDiffusion(channels, offsets, dt_mode='input').double()
    with torch.no_grad():
        op.a_raw.normal_(0., 2.)
        op.tau.normal_(0., 2.)
        op.tau_proj.weight.normal_(0., 3.)
    return op


def test_input_dependent_step_matches_dense_operator_per_sample():
    """Each sample gets its own δt, and its step is exactly (I + δt_b·K)·H with K built edge by edge."""
    h, w, C = 5, 6, 3
    op = _input_dt_op(C)
    x = torch.randn(2, h, w, C, dtype=torch.float64)
    coef = op.coefficients(x)  # (B, S, C) = δt_b·a_s
    assert coef.shape == (2, 2, C) and not torch.allclose(coef[0], coef[1])
    a = torch.nn.functional.softplus(op.a_raw)
    expected = torch.empty_like(x)
    for b in range(2):
        for c in range(C):
            dt = coef[b, 0, c] / a[0, c]
            M = torch.eye(h * w, dtype=x.dtype) + dt * laplacian_reference(a[:, c], op.offsets, h, w)
            expected[b, ..., c] = (x[b, ..., c].reshape(-1) @ M.t()).reshape(h, w)
    torch.testing.assert_close(op.step(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(x), expected - x, rtol=1e-10, atol=1e-12)


def test_per_sample_step_equals_shared_step_when_samples_agree():
    x = torch.randn(3, 7, 7, 4, dtype=torch.float64)
    offsets = [1, 2, 4]
    a_raw, tau = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    shared = per_sample_diffusion_coefficients(a_raw, tau.expand(3, 4))
    ref = diffusion_step(x, shared[0], stencil_basis(offsets, dtype=torch.float64), offsets, 'conv')
    torch.testing.assert_close(per_sample_diffusion_step(x, shared, offsets), ref, rtol=1e-10, atol=1e-12)


def test_input_dependent_step_stays_inside_the_bound_and_conserves():
    """Whatever τ the input produces, Σ_s 4·δt_b·a_s < 1 per sample and channel: a convex average per sample."""
    op = _input_dt_op(8, offsets=(1, 2, 4), seed=1)
    with torch.no_grad():
        op.a_raw.uniform_(-5., 60.)
        op.tau_proj.weight.normal_(0., 1e3)  # drives sigmoid(τ) to both ends
    x = torch.randn(4, 9, 9, 8, dtype=torch.float64) * 1e3
    coef = op.coefficients(x)
    assert (coef >= 0).all() and (4 * coef.sum(1) < 1).all()
    with torch.no_grad():
        y = op.step(x)
        assert y.abs().amax((1, 2, 3)).le(x.abs().amax((1, 2, 3)) * (1 + 1e-12)).all()
        torch.testing.assert_close(y.mean((1, 2)), x.mean((1, 2)), rtol=0, atol=1e-9)
        const = torch.full((2, 9, 9, 8), 2.5, dtype=torch.float64)
        torch.testing.assert_close(op(const), torch.zeros_like(const), rtol=0, atol=1e-12)


def test_input_dependent_coefficients_need_the_input():
    with pytest.raises(ValueError, match='needs the token map'):
        PrimaryDiffusion(4, dt_mode='input').coefficients()


# --- primary diffusion as a pre-norm branch ---------------------------------------------------------------------

def _branch_block(channels: int, offsets, seed: int = 0) -> LdnBlock:
    torch.manual_seed(seed)
    blk = LdnBlock(channels, num_heads=1, diffusion_offsets=offsets, diffusion_form='branch').double()
    with torch.no_grad():  # switch off A_diff and F: only H + δt·K(LN(H)) remains
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        blk.diffusion.a_raw.normal_(0., 1.)
    return blk


def test_branch_form_is_bounded_whatever_the_input_scale():
    """Branch stability: δt·K(U) = (M − I)·U with M = I + δt·K convex, so |δt·K(U)| ≤ 2·max|U|, U = LN(H).

    The update is bounded by the normalised branch input, not by H: a huge stream cannot blow the branch up, and a
    spatially constant stream (any scale) is left exactly where it is.
    """
    blk = _branch_block(6, (1, 2, 4))
    with torch.no_grad():
        blk.diffusion.a_raw.uniform_(-3., 80.)
        blk.diffusion.tau.uniform_(-10., 40.)
    for scale in (1., 1e4):
        h = torch.randn(2, 8, 8, 6, dtype=torch.float64) * scale
        u = blk.norm0(h)
        update = blk.diffusion(u)
        assert update.abs().max() <= 2 * u.abs().max() * (1 + 1e-12)
        assert (u + update).abs().max() <= u.abs().max() * (1 + 1e-12)  # the step on U is a convex average
    const = torch.randn(1, 1, 1, 6, dtype=torch.float64).expand(2, 8, 8, 6) * 1e3
    torch.testing.assert_close(blk(const), const, rtol=0, atol=1e-9)


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


# --- A_diff feature maps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('phi', FEATURE_MAPS)
def test_every_feature_map_keeps_rows_summing_to_zero_and_matches_dense(phi):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    fast = linear_diffusion_attention(q, k, v, phi)
    torch.testing.assert_close(fast, diffusion_attention_reference(q, k, v, 'linear', phi), rtol=1e-9, atol=1e-9)
    const = torch.full_like(v, 4.)
    torch.testing.assert_close(linear_diffusion_attention(q, k, const, phi), torch.zeros_like(v), rtol=0, atol=1e-9)
