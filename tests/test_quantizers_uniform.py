"""Uniform grids: qparams, quantize / dequantize, the STE, LSQ and LSQ+ gradients (closed forms)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoloq.quantizers import uniform as U
from yoloq.quantizers.spec import QuantSpec

PROPERTY = settings(deadline=None, max_examples=80)

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64)
grids = st.builds(QuantSpec, bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans())


def qparams_for(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return U.uniform_qparams(x.min(), x.max(), spec.qmin, spec.qmax, spec.symmetric)


@PROPERTY
@given(values, grids)
def test_codes_in_range_and_fake_quant_is_dequantized_codes(vals, spec):
    x = torch.tensor(vals)
    scale, zero_point = qparams_for(x, spec)
    codes = U.quantize(x, scale, zero_point, spec.qmin, spec.qmax)
    assert codes.dtype == torch.int32
    assert spec.qmin <= int(codes.min()) and int(codes.max()) <= spec.qmax
    assert float(zero_point) == round(float(zero_point)) and spec.qmin <= float(zero_point) <= spec.qmax
    x_hat = U.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax)
    assert torch.equal(x_hat, U.dequantize(codes, scale, zero_point))
    assert torch.equal(U.fake_quantize(x_hat, scale, zero_point, spec.qmin, spec.qmax), x_hat)


@PROPERTY
@given(values, grids)
def test_error_inside_the_range_is_at_most_half_a_step(vals, spec):
    x = torch.tensor(vals)
    if spec.symmetric and not spec.signed:
        x = x.abs()  # an unsigned symmetric grid has no negative side to cover
    scale, zero_point = qparams_for(x, spec)
    error = (U.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax) - x).abs()
    assert bool((error <= 0.5 * scale + 1e-6 * x.abs().max()).all())


@PROPERTY
@given(st.floats(-100, -0.01), st.floats(0.01, 100), st.floats(1.01, 50), grids)
def test_values_outside_the_range_clamp_to_the_end_levels(lo, hi, factor, spec):
    scale, zero_point = U.uniform_qparams(torch.tensor(lo), torch.tensor(hi), spec.qmin, spec.qmax, spec.symmetric)
    top, bottom = (spec.qmax - zero_point) * scale, (spec.qmin - zero_point) * scale
    far = torch.tensor([top * factor + scale, bottom * factor - scale])
    x_hat = U.fake_quantize(far, scale, zero_point, spec.qmin, spec.qmax)
    assert torch.equal(x_hat, torch.stack([top, bottom]))


@PROPERTY
@given(st.floats(-100, 0), st.floats(0, 100), grids)
def test_range_always_includes_an_exact_zero(lo, hi, spec):
    scale, zero_point = U.uniform_qparams(torch.tensor(lo + 1.0), torch.tensor(hi + 2.0), spec.qmin, spec.qmax,
                                          spec.symmetric)
    zero = torch.zeros(1)
    assert float(U.fake_quantize(zero, scale, zero_point, spec.qmin, spec.qmax)) == 0.0
    assert float(scale) >= U.SCALE_EPS


def test_symmetric_scale_maps_the_largest_magnitude_to_qmax():
    spec = QuantSpec(bits=8)
    scale, zero_point = U.uniform_qparams(torch.tensor(-2.0), torch.tensor(1.0), spec.qmin, spec.qmax, True)
    assert float(zero_point) == 0.0 and math.isclose(float(scale), 2.0 / 127, rel_tol=1e-6)
    codes = U.quantize(torch.tensor([-2.0, 2.0]), scale, zero_point, spec.qmin, spec.qmax)
    assert codes.tolist() == [-127, 127]


def test_all_zero_range_gets_the_scale_floor():
    scale, zero_point = U.uniform_qparams(torch.tensor(0.0), torch.tensor(0.0), -128, 127, False)
    assert float(scale) == float(torch.tensor(U.SCALE_EPS)) and -128 <= float(zero_point) <= 127


def test_rounding_is_half_to_even():
    codes = U.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), torch.tensor(1.0), 0, -8, 7)
    assert codes.tolist() == [0, 2, 2, 0, -2]


# Grids of 2^16 levels train through their clamp alone (U.FINE_GRID_LEVELS; its own test below), so
# within half a step beyond an end their gradient is 0 where the rounding STE's is 1: this
# property is the rounding STE's, on the grids that use it.
coarse_grids = st.builds(QuantSpec, bits=st.integers(2, 15), signed=st.booleans(), symmetric=st.booleans())


@PROPERTY
@given(values, coarse_grids)
def test_ste_gradient_is_one_inside_and_zero_where_clamped(vals, spec):
    x = torch.tensor(vals)
    scale, zero_point = U.uniform_qparams(x.min() / 2, x.max() / 2, spec.qmin, spec.qmax, spec.symmetric)
    x.requires_grad_(True)
    U.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax).sum().backward()
    unclamped = torch.round(x.detach() / scale) + zero_point
    expected = ((unclamped >= spec.qmin) & (unclamped <= spec.qmax)).float()
    assert torch.equal(x.grad, expected)


@PROPERTY
@given(values, st.floats(1e-3, 10))
def test_grad_scale_and_round_pass_keep_values_and_scale_gradients(vals, factor):
    t = torch.tensor(vals, requires_grad=True)
    out = U.grad_scale(t, factor)
    assert torch.equal(out, t.detach())
    out.sum().backward()
    torch.testing.assert_close(t.grad, torch.full_like(t, factor))
    t.grad = None
    rounded = U.round_pass(t)
    assert torch.equal(rounded, torch.round(t.detach()))
    rounded.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))


def test_lsq_gradients_match_the_paper_on_a_hand_example():
    # bits 3 signed: [-4, 3]; s = 0.5; v = x/s = [-6, -0.8, 0.52, 1.8, 10]
    x = torch.tensor([-3.0, -0.4, 0.26, 0.9, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = U.lsq_fake_quantize(x, s, 0, -4, 3)
    assert out.tolist() == [-2.0, -0.5, 0.5, 1.0, 1.5]
    out.sum().backward()
    g = 1 / math.sqrt(5 * 3)
    # ∂x̂/∂s: -Qn | round(v) - v | ... | Qp  =  -4 - 0.2 + 0.48 + 0.2 + 3
    torch.testing.assert_close(s.grad, torch.tensor(-0.52 * g), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_lsq_plus_gradients_match_the_paper_on_a_hand_example():
    # bits 3 unsigned: [0, 7]; s = 0.5, β = 0.3; v = (x - β)/s = [-2.6, -0.4, 1.2, 3.4, 17.4]
    x = torch.tensor([-1.0, 0.1, 0.9, 2.0, 9.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    beta = torch.tensor(0.3, requires_grad=True)
    out = U.lsq_plus_fake_quantize(x, s, beta, 0, 7)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.3, 0.8, 1.8, 3.8]))
    out.sum().backward()
    g = 1 / math.sqrt(5 * 7)
    torch.testing.assert_close(s.grad, torch.tensor((0 + 0 - 0.2 - 0.4 + 7) * g), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(beta.grad, torch.tensor(3 * g), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))


def lsq_closed_form(v: torch.Tensor, low, high, ends_inside: bool = True) -> torch.Tensor:
    """∂x̂/∂s / g per element; LSQ counts the ends inside, LSQ+ (autograd's clamp) outside."""
    inside = (v >= low) & (v <= high) if ends_inside else (v > low) & (v < high)
    return torch.where(inside, torch.round(v) - v, torch.where(v < low, low, high) if ends_inside
                       else torch.where(v <= low, low, high))


@PROPERTY
@given(values, st.floats(0.01, 50), st.builds(QuantSpec, bits=st.integers(2, 8), signed=st.booleans()),
       st.integers(-3, 3))
def test_lsq_scale_gradient_matches_the_closed_form_times_g(vals, scale, spec, zero_point):
    x = torch.tensor(vals, requires_grad=True)
    s = torch.tensor(scale, requires_grad=True)
    zero_point = float(max(spec.qmin, min(spec.qmax, zero_point)))
    out = U.lsq_fake_quantize(x, s, torch.tensor(zero_point), spec.qmin, spec.qmax)
    assert torch.equal(out, U.fake_quantize(x.detach(), s.detach(), zero_point, spec.qmin, spec.qmax))
    out.sum().backward()
    v = x.detach() / s.detach()
    g = 1 / math.sqrt(x.numel() * spec.qmax)
    expected = lsq_closed_form(v, spec.qmin - zero_point, spec.qmax - zero_point).sum() * g
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-5 * g * x.numel() * spec.qmax)
    inside = (v >= spec.qmin - zero_point) & (v <= spec.qmax - zero_point)
    torch.testing.assert_close(x.grad, inside.float())


@PROPERTY
@given(values, st.floats(0.01, 50), st.floats(-20, 20), st.builds(QuantSpec, bits=st.integers(2, 8),
                                                                      signed=st.booleans()))
def test_lsq_plus_offset_gradient_matches_the_closed_form_times_g(vals, scale, offset, spec):
    x = torch.tensor(vals, requires_grad=True)
    s, beta = torch.tensor(scale, requires_grad=True), torch.tensor(offset, requires_grad=True)
    U.lsq_plus_fake_quantize(x, s, beta, spec.qmin, spec.qmax).sum().backward()
    v = (x.detach() - beta.detach()) / s.detach()
    g = 1 / math.sqrt(x.numel() * spec.qmax)
    outside = ((v <= spec.qmin) | (v >= spec.qmax)).float()
    torch.testing.assert_close(beta.grad, outside.sum() * g, rtol=1e-5, atol=1e-6)
    expected_s = lsq_closed_form(v, spec.qmin, spec.qmax, ends_inside=False).sum() * g
    torch.testing.assert_close(s.grad, expected_s, rtol=1e-4, atol=1e-5 * g * x.numel() * spec.qmax)


def test_fine_grid_trains_through_its_clamp_and_evaluates_exactly():
    scale = torch.tensor(1e-3)  # 16 bits signed: ends ±32.768 / 32.767
    x = torch.tensor([-40.0, -1.23456, 0.0004, 2.5, 32.767, 50.0])
    exact = U.fake_quantize(x, scale, 0, -32768, 32767)  # no gradient: rounds
    assert torch.equal(exact, U.dequantize(U.quantize(x, scale, 0, -32768, 32767), scale, 0))
    t = x.clone().requires_grad_()
    trained = U.fake_quantize(t, scale, 0, -32768, 32767)
    assert (trained.detach() - exact).abs().max() <= 0.5e-3 + 1e-6
    assert trained[0].item() == pytest.approx(-32.768) and trained[-1].item() == pytest.approx(32.767)
    trained.sum().backward()
    assert t.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    inside = x[1:4].clone().requires_grad_()  # nothing clamps: the input itself, no autograd node
    assert U.fake_quantize(inside, scale, 0, -32768, 32767) is inside


def test_lsq_ends_count_as_inside():
    # unsigned 2 bits [0, 3], s = 1: v = x; 0 and 3 are the ends and pass the gradient
    x = torch.tensor([-1.0, 0.0, 1.4, 3.0, 5.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    U.lsq_fake_quantize(x, s, 0, 0, 3).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    g = 1 / math.sqrt(5 * 3)  # ∂x̂/∂s: 0 (below) | 0 | -0.4 | 0 | 3 (above)
    torch.testing.assert_close(s.grad, torch.tensor(2.6 * g))


def test_lsq_per_channel_scale_broadcasts_and_uses_elements_per_scale():
    x = torch.tensor([[0.3, -2.0, 0.9], [5.0, 0.1, -0.7]], requires_grad=True)
    s = torch.tensor([0.25, 1.0], requires_grad=True)
    out = U.lsq_fake_quantize(x, U.per_axis(s, 2, 0), 0, -8, 7)
    out.sum().backward()
    g = 1 / math.sqrt(3 * 7)  # N = 3 elements per channel
    v = x.detach() / s.detach()[:, None]
    expected = lsq_closed_form(v, -8, 7).sum(1) * g
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)
    assert U.per_axis(s, 4, 1).shape == (1, 2, 1, 1)
