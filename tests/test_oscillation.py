"""Oscillation tracking on a layer whose weight codes move in a known pattern."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.oscillation import OscillationTracker
from yoloq.quantizers.spec import QuantSpec


def one_layer() -> tuple[nn.Module, QuantizedLayer]:
    conv = nn.Conv2d(1, 1, (1, 4), bias=False)
    quant = FakeQuantize(QuantSpec(bits=4, granularity="per_tensor"))
    quant.observing, quant.quantizing = False, True
    quant._assign("scale", torch.tensor(1.0))
    quant._assign("zero_point", torch.tensor(0.0))
    layer = QuantizedLayer(conv, quant, None)
    return nn.Sequential(layer), layer


def set_codes(layer: QuantizedLayer, values) -> None:
    with torch.no_grad():
        layer.layer.weight.copy_(torch.tensor(values, dtype=torch.float32).view(1, 1, 1, 4))


def test_flips_counted_only_on_direction_change():
    model, layer = one_layer()
    tracker = OscillationTracker(model, momentum=0.5, threshold=0.2)
    # weight 0: 0,1,0,1 oscillates; weight 1: 0,1,2,3 drifts; weight 2 constant; weight 3: 0,1,1,0 returns once
    pattern = [[0, 0, 5, 0], [1, 1, 5, 1], [0, 2, 5, 1], [1, 3, 5, 0]]
    for codes in pattern:
        set_codes(layer, codes)
        tracker.update()
    frequency = tracker.frequency["0"]
    # weight 0 flips at steps 3 and 4: f = 0.5 · (0.5 · 1) + 0.5 = 0.75
    assert frequency.flatten().tolist() == pytest.approx([0.75, 0.0, 0.0, 0.5])
    assert tracker.oscillating("0").flatten().tolist() == [True, False, False, True]
    assert tracker.summary()["oscillating"] == 0.5
    stats = tracker.layer_stats()[0]
    assert stats.name == "0" and stats.weights == 4 and stats.oscillating == 0.5


def test_state_round_trip_and_validation():
    model, layer = one_layer()
    tracker = OscillationTracker(model)
    for codes in ([0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]):
        set_codes(layer, codes)
        tracker.update()
    other = OscillationTracker(model)
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.frequency["0"], tracker.frequency["0"]) and other.steps == 3
    with pytest.raises(ValueError, match="momentum"):
        OscillationTracker(model, momentum=0)
    with pytest.raises(ValueError, match="layers this model does not have"):
        OscillationTracker(nn.Sequential(nn.Conv2d(1, 1, 1))).load_state_dict(tracker.state_dict())


def test_freezing_pins_weights_to_their_rounded_mean_code():
    model, layer = one_layer()
    tracker = OscillationTracker(model, momentum=0.5, threshold=0.2)
    for codes in ([0, 0, 5, 0], [1, 1, 5, 1], [0, 2, 5, 1], [1, 3, 5, 0]):
        set_codes(layer, codes)
        tracker.update()
    # weight 0's mean code: 0 -> .5 -> .25 -> .625 ; weight 3: 0 -> .5 -> .75 -> .375
    assert tracker.freeze_(threshold=0.4) == 2
    assert tracker.frozen["0"].flatten().tolist() == [True, False, False, True]
    assert tracker.frozen_codes["0"].flatten().tolist()[0] == 1 and tracker.frozen_codes["0"].flatten().tolist()[3] == 0
    set_codes(layer, [-3.2, 7.0, 5.0, 6.0])  # an optimizer step moves every weight
    with torch.no_grad():
        layer.weight_quant.scale.fill_(0.5)  # and the learned scale changes
    tracker.apply_frozen_()
    codes = tracker.current_codes("0").flatten().tolist()
    assert codes[0] == 1 and codes[3] == 0 and codes[1] == 7  # frozen ones keep their codes, others move
    assert tracker.summary()["frozen"] == 0.5 and tracker.layer_stats()[0].frozen == 0.5


def test_dampening_loss_pulls_weights_to_bin_centres():
    model, layer = one_layer()
    tracker = OscillationTracker(model)
    set_codes(layer, [0.0, 1.0, 2.4, -0.5])
    loss = tracker.dampening_loss()
    assert loss.item() == pytest.approx((0 + 0 + 0.4**2 + 0.5**2) / 4, abs=1e-6)
    loss.backward()
    grad = layer.layer.weight.grad.flatten()
    assert grad[0] == 0 and grad[2] > 0 and grad[3] != 0  # 2.4 is pushed down towards 2


def test_ema_ramp_and_copy():
    from yoloq.quantizers.ema import QuantizedEMA

    model, layer = one_layer()
    set_codes(layer, [1.0, 1.0, 1.0, 1.0])
    ema = QuantizedEMA(model, decay=0.9, tau=1.0)
    set_codes(layer, [3.0, 3.0, 3.0, 3.0])
    ema.update(model)  # d_1 = 0.9 (1 - e^-1)
    d = 0.9 * (1 - torch.exp(torch.tensor(-1.0)).item())
    expected = d * 1.0 + (1 - d) * 3.0
    assert ema.state["0.layer.weight"].flatten()[0].item() == pytest.approx(expected, rel=1e-6)
    assert ema.state["0.weight_quant.scale"].item() == pytest.approx(1.0)  # the scale is averaged too
    ema.copy_to(model)
    assert layer.layer.weight.flatten()[0].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="decay"):
        QuantizedEMA(model, decay=1.0)
