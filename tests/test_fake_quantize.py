"""``FakeQuantize``: life cycle, codes and dequantize, layouts, state_dict round trip, QAT, errors."""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from yoloq.quantizers import FakeQuantize, QuantSpec, SpecError
from yoloq.quantizers.nonuniform import pot_levels

SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=4, symmetric=False, granularity="per_channel"),
    QuantSpec(bits=3, granularity="per_group", group_size=2, learned="lsq"),
    QuantSpec(bits=4, symmetric=False, learned="lsq+", granularity="per_channel"),
    QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile", learned="lsq+"),
    QuantSpec(bits=4, scheme="pot", granularity="per_channel", observer="mse"),
    QuantSpec(bits=5, scheme="apot", learned="lsq", observer="entropy"),
    QuantSpec(bits=3, scheme="codebook", granularity="per_channel"),
    QuantSpec(bits=2, scheme="codebook", granularity="per_group", group_size=2, learned="lsq"),
    QuantSpec(bits=4, scheme="codebook", observer="ema_minmax"),
]
IDS = [f"{s.scheme}-{s.granularity}-{s.learned}-{s.bits}b" for s in SPECS]


def weight(seed: int = 0, shape=(4, 3, 3, 3)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def calibrated(spec: QuantSpec, x: torch.Tensor, axis: int | None = 0) -> FakeQuantize:
    fq = FakeQuantize(spec, axis)
    fq(x)
    return fq.calibrate_()


def test_life_cycle_observe_then_quantize():
    fq = FakeQuantize(QuantSpec(bits=4))
    assert (fq.observing, fq.quantizing) == (True, False)
    x = weight()
    assert fq(x) is x
    assert fq.calibrate_() is fq
    assert (fq.observing, fq.quantizing) == (False, True)
    y = fq(x)
    assert not torch.equal(y, x) and len(torch.unique(y)) <= 16


def test_calibrating_or_quantizing_before_observing_is_a_clear_error():
    fq = FakeQuantize(QuantSpec(bits=4))
    with pytest.raises(RuntimeError, match="no tensor observed"):
        fq.calibrate_()
    fq.quantizing = True
    with pytest.raises(RuntimeError, match="calibrate_"):
        fq(weight())
    with pytest.raises(RuntimeError, match="not calibrated"):
        fq.scale_range()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_codes_dequantize_to_the_forward_output(spec):
    x = weight()
    fq = calibrated(spec, x)
    codes = fq.codes(x)
    assert codes.dtype == torch.int32 and codes.shape == x.shape
    if spec.scheme == "uniform":
        assert spec.qmin <= int(codes.min()) and int(codes.max()) <= spec.qmax
    else:
        assert 0 <= int(codes.min()) and int(codes.max()) < fq.unit_levels.shape[-1] <= 2**spec.bits
    y = fq(x)
    assert torch.equal(fq.dequantize(codes), y)
    assert torch.equal(fq(y), y), "idempotent"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_state_dict_round_trip_into_a_fresh_module(spec):
    x = weight()
    fq = calibrated(spec, x)
    state = fq.state_dict()
    expected = {"scale", "unit_levels"} if spec.scheme != "uniform" else \
        {"scale", "offset" if spec.learned == "lsq+" else "zero_point"}
    assert set(state) == expected
    fresh = FakeQuantize(spec, 0)
    fresh.load_state_dict(state)
    assert (fresh.observing, fresh.quantizing) == (False, True)
    assert torch.equal(fresh(x), fq(x))
    assert isinstance(fresh.scale, nn.Parameter) == (spec.learned != "none")


def test_module_survives_torch_save_and_deepcopy():
    fq = calibrated(QuantSpec(bits=4, observer="percentile", granularity="per_channel"), weight())
    buffer = io.BytesIO()
    torch.save(fq, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert torch.equal(loaded(weight(1)), fq(weight(1)))


@settings(deadline=None, max_examples=40)
@given(st.sampled_from(SPECS), st.integers(0, 2**16), st.floats(0.01, 100))
def test_property_codes_range_exactness_and_idempotence(spec, seed, magnitude):
    x = weight(seed) * magnitude
    fq = calibrated(spec, x)
    probe = weight(seed + 1) * magnitude * 2  # values beyond the calibrated range too
    codes = fq.codes(probe)
    low, high = (spec.qmin, spec.qmax) if spec.scheme == "uniform" else (0, fq.unit_levels.shape[-1] - 1)
    assert low <= int(codes.min()) and int(codes.max()) <= high
    y = fq(probe)
    assert torch.equal(fq.dequantize(codes), y) and torch.equal(fq(y), y)


def test_per_group_shares_one_scale_per_group():
    w = weight(shape=(8, 3, 3, 3))
    fq = calibrated(QuantSpec(bits=4, granularity="per_group", group_size=4), w)
    assert fq.scale.shape == (2, 1, 1, 1)
    expected = w.reshape(2, -1).abs().amax(1) / 7
    torch.testing.assert_close(fq.scale.flatten(), expected)
    low, high = fq.scale_range()
    assert isinstance(low, float) and low <= high


def test_per_group_indivisible_channels_raise_spec_error_naming_both():
    fq = FakeQuantize(QuantSpec(bits=4, granularity="per_group", group_size=4), 0)
    with pytest.raises(SpecError, match=r"\b6 channels.*group_size 4"):
        fq(torch.zeros(6, 3, 3, 3))


def test_per_channel_layout_and_mismatched_channels():
    x = weight(shape=(2, 5, 4, 4))
    fq = calibrated(QuantSpec(bits=8, granularity="per_channel"), x, axis=1)
    assert fq.scale.shape == (1, 5, 1, 1)
    with pytest.raises(ValueError, match=r"5 channels on axis 1; got shape \(2, 6, 4, 4\)"):
        fq(torch.zeros(2, 6, 4, 4))
    with pytest.raises(SpecError, match="channel_axis"):
        FakeQuantize(QuantSpec(granularity="per_channel"))
    assert FakeQuantize(QuantSpec(), channel_axis=1).channel_axis is None


def test_levels_and_zero_point_by_scheme():
    x = weight()
    assert calibrated(QuantSpec(bits=4), x).levels is None
    pot = calibrated(QuantSpec(bits=3, scheme="pot"), x)
    torch.testing.assert_close(pot.levels, x.abs().max() * pot_levels(3, True))
    assert pot.zero_point is None
    codebook = calibrated(QuantSpec(bits=3, scheme="codebook", granularity="per_channel"), x)
    assert codebook.levels.shape == (4, 8)
    rows = x.reshape(4, -1)
    assert bool((codebook.levels.amin(1) >= rows.amin(1)).all() and (codebook.levels.amax(1) <= rows.amax(1)).all())
    affine = calibrated(QuantSpec(bits=8, symmetric=False), x)
    assert float(affine.zero_point) == round(float(affine.zero_point))


def test_extra_repr_names_bits_scheme_and_granularity():
    text = repr(FakeQuantize(QuantSpec(bits=4, scheme="pot", granularity="per_channel"), 0))
    assert "bits=4" in text and "scheme=pot" in text and "granularity=per_channel" in text


@pytest.mark.parametrize("learned", ["lsq", "lsq+"])
def test_qat_learns_scale_and_offset(learned):
    x = weight()
    fq = FakeQuantize(QuantSpec(bits=4, symmetric=False, learned=learned), None)
    params = list(fq.parameters())  # what an optimizer built before calibration would hold
    fq(x)
    fq.calibrate_()
    assert params[0] is fq.scale and isinstance(fq.scale, nn.Parameter)
    before = fq.scale.detach().clone()
    inputs = x.clone().requires_grad_(True)
    loss = (fq(inputs) - 3 * x).square().mean()
    loss.backward()
    assert fq.scale.grad is not None and inputs.grad is not None
    if learned == "lsq+":
        assert fq.offset.grad is not None
    with torch.no_grad():  # one SGD step; torch.optim would import dynamo, seconds of test time
        for p in params:
            p -= 0.1 * p.grad
    assert not torch.equal(fq.scale.detach(), before)
    with torch.no_grad():
        assert not fq(inputs).requires_grad


def test_lsq_module_gradient_uses_elements_per_learned_scale():
    w = weight(shape=(4, 2, 1, 1))
    fq = calibrated(QuantSpec(bits=4, granularity="per_group", group_size=2, learned="lsq"), w)
    fq(w).sum().backward()
    s = fq.scale.detach().repeat_interleave(2, dim=0)
    v = w / s
    per_element = torch.where((v > -8) & (v < 7), torch.round(v) - v, torch.where(v <= -8, -8.0, 7.0))
    g = 1 / math.sqrt(4 * 7)  # 4 elements share each group's scale
    expected = per_element.reshape(2, -1).sum(1) * g
    torch.testing.assert_close(fq.scale.grad.flatten(), expected, rtol=1e-5, atol=1e-6)


def test_lsq_plus_per_group_quantizes():
    """LSQ+ has an offset and no zero point; per-group expansion must not touch the missing one."""
    q = FakeQuantize(QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_group", group_size=2,
                               learned="lsq+"), channel_axis=1)
    x = torch.randn(2, 4, 3, 3)
    q(x)
    q.calibrate_()
    y = q(x.requires_grad_())
    y.sum().backward()
    assert y.shape == x.shape and q.offset.grad is not None and q.scale.grad is not None
