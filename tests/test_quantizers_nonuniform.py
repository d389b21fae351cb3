"""Non-uniform grids: PoT / APoT level sets, nearest-level projection and its STE, codebooks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoloq.quantizers import nonuniform as N

PROPERTY = settings(deadline=None, max_examples=60)
BITS = [2, 3, 4, 5, 8, 16]


def assert_table(levels: torch.Tensor, bits: int, signed: bool) -> None:
    assert levels.dtype == torch.float32 and levels.dim() == 1
    assert bool((levels[1:] > levels[:-1]).all()), "sorted and unique"
    assert len(levels) <= 2**bits
    assert float(levels.max()) == 1.0 and 0.0 in levels.tolist()
    if signed:
        assert torch.equal(levels, -levels.flip(0))
    else:
        assert float(levels.min()) == 0.0


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_pot_levels_are_zero_and_powers_of_two(bits, signed):
    levels = N.pot_levels(bits, signed)
    assert_table(levels, bits, signed)
    exponents = torch.log2(levels[levels > 0])
    assert torch.equal(exponents, exponents.round())
    if bits <= 4:  # before the 2^-24 floor: every code is used (signed leaves one spare)
        assert len(levels) == (2**bits - 1 if signed else 2**bits)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_apot_levels_are_a_valid_table(bits, signed):
    assert_table(N.apot_levels(bits, signed), bits, signed)


def test_apot_matches_the_paper_for_four_magnitude_bits():
    p0, p1 = [0, 1, 2**-2, 2**-4], [0, 2**-1, 2**-3, 2**-5]
    sums = sorted({a + b for a in p0 for b in p1})
    expected = torch.tensor(sums) / max(sums)
    levels = N.apot_levels(5, signed=True)
    torch.testing.assert_close(levels[levels >= 0], expected)
    assert len(levels) == 31


def test_apot_with_two_magnitude_bits_is_uniform():
    torch.testing.assert_close(N.apot_levels(3, signed=True), torch.arange(-3, 4) / 3.0)


levels_strategy = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=20, unique=True)
values = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=50)


@PROPERTY
@given(levels_strategy, values)
def test_projection_picks_the_nearest_level(levels, vals):
    table = torch.tensor(sorted(levels))
    v = torch.tensor(vals)
    index = N.nearest_level_index(v, table)
    assert int(index.min()) >= 0 and int(index.max()) < len(table)
    chosen = (table[index] - v).abs()
    best = (table[None, :] - v[:, None]).abs().min(1).values
    assert torch.equal(chosen, best)
    assert torch.equal(N.project(v, table), table[index])


def test_ties_go_to_the_smaller_magnitude():
    table = N.pot_levels(3, signed=True)  # 0, ±0.25, ±0.5, ±1
    v = torch.tensor([0.75, -0.75, 0.375, -0.375, 0.125, -0.125])
    assert N.project(v, table).tolist() == [0.5, -0.5, 0.25, -0.25, 0.0, 0.0]


@PROPERTY
@given(st.lists(levels_strategy, min_size=2, max_size=2), values)
def test_row_wise_projection_uses_each_rows_table(tables, vals):
    size = min(len(t) for t in tables)
    table = torch.stack([torch.tensor(sorted(t)[:size]) for t in tables])
    v = torch.tensor(vals).repeat(2, 1)
    projected = N.project(v, table)
    for row in range(2):
        assert torch.equal(projected[row], N.project(v[row], table[row]))


@PROPERTY
@given(values, st.sampled_from(["pot", "apot"]), st.integers(2, 6), st.floats(0.01, 10))
def test_projection_ste_and_idempotence(vals, scheme, bits, scale):
    table = (N.pot_levels if scheme == "pot" else N.apot_levels)(bits, True)
    x = torch.tensor(vals, requires_grad=True)
    s = torch.tensor(scale)
    out = N.nonuniform_fake_quantize(x, s, table)
    assert torch.equal(out, N.project(x.detach() / s, table) * s)
    assert torch.equal(N.nonuniform_fake_quantize(out.detach(), s, table), out.detach())
    out.sum().backward()
    v = x.detach() / s
    inside = ((v > -1) & (v < 1)).float()
    torch.testing.assert_close(x.grad, inside)


def test_learned_scale_gradient_of_a_nonuniform_grid():
    table = N.pot_levels(3, signed=True)
    x = torch.tensor([0.3, 0.9, 5.0, -7.0])
    s = torch.tensor(2.0, requires_grad=True)
    N.nonuniform_fake_quantize(x, s, table).sum().backward()
    # v = [0.15, 0.45, 2.5, -3.5] -> levels [0.25, 0.5, 1, -1]; ∂/∂s = ℓ - v inside, ℓ_end outside
    torch.testing.assert_close(s.grad, torch.tensor((0.25 - 0.15) + (0.5 - 0.45) + 1 - 1))


def clustered(centres, per_cluster=500, spread=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(per_cluster, generator=gen) for c in centres])


def test_codebook_finds_the_clusters():
    data = clustered([-3.0, -1.0, 0.5, 2.0])[None, :]
    levels = N.fit_codebook(data, 4)
    torch.testing.assert_close(levels[0], torch.tensor([-3.0, -1.0, 0.5, 2.0]), atol=0.02, rtol=0)
    assert torch.equal(levels, N.fit_codebook(data, 4)), "deterministic"


def test_lloyd_iterations_do_not_increase_the_error():
    u = torch.rand(1, 4000, generator=torch.Generator().manual_seed(1)) - 0.5
    data = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1)
    centres = N._quantile_init(data, 8)
    errors = []
    for _ in range(10):
        errors.append(float((N.project(data, centres) - data).square().mean()))
        centres = N.lloyd_step(data, centres)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_codebook_per_row_and_with_few_distinct_values():
    rows = torch.stack([clustered([0.0, 1.0]), clustered([-10.0, 10.0])])
    levels = N.fit_codebook(rows, 2)
    assert levels.shape == (2, 2)
    torch.testing.assert_close(levels, torch.tensor([[0.0, 1.0], [-10.0, 10.0]]), atol=0.02, rtol=0)
    three = torch.tensor([[-1.0, 0.0, 2.0] * 50])
    table = N.unique_levels(N.fit_codebook(three, 8))
    assert table.tolist() == [-1.0, 0.0, 2.0]


def test_tables_for_many_bits_stay_distinct_in_float32():
    levels = N.pot_levels(16, signed=True)
    assert len(levels) == 2 * (N.MAX_EXPONENT + 1) + 1
    assert math.isclose(float(levels[levels > 0].min()), 2.0**-N.MAX_EXPONENT)
