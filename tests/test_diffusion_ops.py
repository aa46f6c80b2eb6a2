"""The contract's properties of the diffusion operators (docs/contract.md: what the tests must show)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from timm_ldn.diffusion import (
    DEFAULT_OFFSETS, diffusion_attention_reference, diffusion_coefficients, grid_diameter, laplacian_reference,
    linear_diffusion_attention, stencil_basis, time_step,
)
from timm_ldn.ldn import LdnBlock, PrimaryDiffusion

# square, non-square, smaller than the largest offset, a single row
GRIDS = [(14, 14), (7, 9), (3, 3), (1, 5), (5, 1)]


def _diffusion(channels: int, offsets=DEFAULT_OFFSETS, seed: int = 0, scale: float = 1.) -> PrimaryDiffusion:
    torch.manual_seed(seed)
    op = PrimaryDiffusion(channels, offsets).double()
    with torch.no_grad():
        op.a_raw.normal_(0., 2. * scale)
        op.tau.normal_(0., 2. * scale)
    return op


@pytest.mark.parametrize('grid', GRIDS)
def test_constant_field_does_not_move(grid):
    """K·1 = 0 on every row, border rows included."""
    op = _diffusion(6)
    x = torch.full((2, *grid, 6), 3.25, dtype=torch.float64)
    torch.testing.assert_close(op.update(x), torch.zeros_like(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(op(x), x, rtol=0, atol=1e-12)  # the step leaves it where it is


@pytest.mark.parametrize('grid', GRIDS)
def test_stencil_matches_dense_laplacian(grid):
    """The folded stencil conv + border correction equals δt·K with K built edge by edge (no-flux rule)."""
    h, w = grid
    op = _diffusion(3, seed=1)
    x = torch.randn(2, h, w, 3, dtype=torch.float64)
    a = torch.nn.functional.softplus(op.a_raw)
    dt = time_step(a, op.tau)
    expected = torch.empty_like(x)
    for c in range(3):
        K = laplacian_reference(a[:, c], op.offsets, h, w)
        assert torch.allclose(K.sum(1), torch.zeros(h * w, dtype=K.dtype), atol=1e-12), 'rows must sum to 0'
        assert torch.equal(K, K.t()), 'same weight for +d and -d: K is symmetric'
        expected[..., c] = dt[c] * (x[..., c].reshape(2, -1) @ K.t()).reshape(2, h, w)
    torch.testing.assert_close(op.update(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(x), x + expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('grid', GRIDS)
def test_diffusion_step_conserves_channel_mean(grid):
    op = _diffusion(4, seed=2)
    x = torch.randn(3, *grid, 4, dtype=torch.float64)
    stepped = op(x)
    torch.testing.assert_close(stepped.mean((1, 2)), x.mean((1, 2)), rtol=0, atol=1e-12)


def test_replicate_padding_would_break_no_flux():
    """Guards the border correction: replicate padding pairs a border token with the wrong neighbour at d > 1."""
    op = _diffusion(1, seed=3)
    x = torch.randn(1, 9, 9, 1, dtype=torch.float64)
    coef = op.coefficients()
    radius = max(op.offsets)
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (radius,) * 4, mode='replicate')
    weight = (coef.t() @ op.basis.reshape(len(op.offsets), -1)).reshape(1, 1, 2 * radius + 1, -1)
    replicate = torch.nn.functional.conv2d(padded, weight).permute(0, 2, 3, 1)
    assert not torch.allclose(replicate, op.update(x)), 'replicate padding is not the no-flux rule for offsets > 1'


@pytest.mark.parametrize('a_scale', [1., 30.])
@pytest.mark.parametrize('tau', [-20., 0., 8., 40.])
def test_time_step_respects_explicit_euler_bound(a_scale, tau):
    """I + δt·K is entrywise non-negative with unit row sums, so one step never grows max|H|."""
    torch.manual_seed(4)
    a_raw = torch.randn(len(DEFAULT_OFFSETS), 5, dtype=torch.float64) * a_scale
    tau_t = torch.full((5,), tau, dtype=torch.float64)
    a = torch.nn.functional.softplus(a_raw)
    dt = time_step(a, tau_t)
    assert torch.all(dt * 4 * a.sum(0) < 1.), 'δt must stay strictly inside 1 / Σ|N_s|a_s'
    h, w = 6, 7
    for c in range(5):
        M = torch.eye(h * w, dtype=torch.float64) + dt[c] * laplacian_reference(a[:, c], DEFAULT_OFFSETS, h, w)
        assert M.min() >= 0.
        torch.testing.assert_close(M.sum(1), torch.ones(h * w, dtype=torch.float64))


@pytest.mark.parametrize('tau', [-30., 0., 30.])
def test_huge_coefficients_never_grow_max_norm(tau):
    op = PrimaryDiffusion(8).double()
    with torch.no_grad():
        op.a_raw.uniform_(-5., 1e4)  # softplus(1e4) = 1e4: huge, and wildly different across scales
        op.tau.fill_(tau)
    torch.manual_seed(5)
    x = torch.randn(2, 11, 13, 8, dtype=torch.float64) * 1e3
    y = op(x)
    assert torch.isfinite(y).all()
    assert (y.abs().amax((1, 2)) <= x.abs().amax((1, 2)) * (1 + 1e-12)).all()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_diffusion_only_stack_stays_finite_in_low_precision(dtype):
    """12 diffusion steps at the stability limit on near-max-range inputs stay finite and never grow."""
    torch.manual_seed(6)
    steps = []
    for _ in range(12):
        op = PrimaryDiffusion(16)
        with torch.no_grad():
            op.a_raw.uniform_(-3., 50.)
            op.tau.uniform_(-10., 30.)  # sigmoid(τ) ≈ 1: right at the stability limit
        steps.append(op.to(dtype))
    limit = torch.finfo(dtype).max / 2
    x = ((torch.rand(2, 14, 14, 16) * 2 - 1) * limit).to(dtype)
    y = x
    with torch.no_grad():
        for op in steps:
            y = op(y)
    assert torch.isfinite(y).all()
    # convex averaging: no growth beyond the rounding of the low-precision dtype
    assert y.float().abs().max() <= x.float().abs().max() * (1 + 12 * torch.finfo(dtype).eps)


def _zero_update_branches(block: LdnBlock) -> LdnBlock:
    """Switch off A_diff and F by zeroing their output projections: only H ← H + δt·K(H) remains."""
    with torch.no_grad():
        for lin in (block.attn.proj, block.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    return block


def test_grid_diameter_of_spec_example():
    assert grid_diameter(14, 14, (1, 2, 4)) == 8  # the spec's worked example
    assert grid_diameter(14, 14, (1,)) == 26


@pytest.mark.parametrize('grid,offsets', [((14, 14), (1, 2, 4)), ((6, 9), (1, 2))])
def test_theorem1_global_dependency_at_exactly_the_diameter(grid, offsets):
    """∂h_i^(L)/∂h_j^(0) ≠ 0 for every pair (i, j) once L reaches the graph diameter, and not before.

    Runs full LDN blocks with A_diff and F zeroed; one channel keeps the Jacobian small (diffusion is depthwise).
    """
    diameter = grid_diameter(*grid, offsets)
    torch.manual_seed(7)
    blocks = [_zero_update_branches(LdnBlock(1, num_heads=1, diffusion_offsets=offsets)).double()
              for _ in range(diameter)]
    n = grid[0] * grid[1]

    def jacobian(depth: int) -> torch.Tensor:
        def run(x):
            for blk in blocks[:depth]:
                x = blk(x)
            return x
        x = torch.randn(1, *grid, 1, dtype=torch.float64)
        return torch.autograd.functional.jacobian(run, x, vectorize=True).reshape(n, n)

    assert (jacobian(diameter) != 0).all(), 'every token must reach every token at the diameter'
    assert (jacobian(diameter - 1) == 0).any(), 'some pair must still be disconnected one layer earlier'


def test_diffusion_attention_of_constant_values_is_zero():
    torch.manual_seed(8)
    q, k = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    v = torch.full((2, 3, 50, 16), -7.5)
    torch.testing.assert_close(linear_diffusion_attention(q, k, v), torch.zeros_like(v), rtol=0, atol=1e-5)


def test_diffusion_attention_matches_dense_definition():
    """(D⁻¹W − I)·V with W built explicitly equals the linear-time operator."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.float64) for _ in range(3))
    fast = linear_diffusion_attention(q, k, v)
    torch.testing.assert_close(fast, diffusion_attention_reference(q, k, v), rtol=1e-9, atol=1e-9)


class _LargestIntermediate(TorchDispatchMode):
    """Records every tensor an op produces, to prove that no N×N matrix exists."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _has_token_square(shapes, n: int) -> bool:
    return any(sum(1 for s in shape if s == n) >= 2 for shape in shapes)


def test_linear_attention_never_forms_token_by_token_matrix():
    from timm_ldn.ldn import DiffusionAttention
    n = 257  # distinct from every other dim
    attn = DiffusionAttention(32, num_heads=4)
    x = torch.randn(2, n, 32, requires_grad=True)
    with _LargestIntermediate() as rec:
        attn(x).sum().backward()
    assert rec.shapes and not _has_token_square(rec.shapes, n), 'A_diff built an N×N tensor'
    # the detector itself must see the N×N matrix of the dense reference
    q, k, v = torch.randn(3, 1, 2, n, 8).unbind(0)
    with _LargestIntermediate() as rec:
        diffusion_attention_reference(q, k, v)
    assert _has_token_square(rec.shapes, n)


def test_coefficients_are_nonnegative_and_inside_bound():
    torch.manual_seed(10)
    a_raw = torch.randn(3, 7) * 10
    tau = torch.randn(7) * 10
    coef = diffusion_coefficients(a_raw, tau)
    assert (coef >= 0).all()
    assert ((4 * coef.sum(0)) < 1).all()
    torch.testing.assert_close(4 * diffusion_coefficients(a_raw, torch.full((7,), 50.)).sum(0), torch.full((7,), 0.99))
    basis = stencil_basis((1, 2, 4))
    assert basis.shape == (3, 9, 9)
    torch.testing.assert_close(basis.sum((1, 2)), torch.zeros(3))
