"""BN re-estimation and QC (passes/correct.py, QuantizedLayer's QC): the fold keeps outputs and codes,
QC trains only γ and β, BN statistics become the quantized network's, the caller's model is left
alone, negative γ, every weight grid, and the CLI verb — on a tiny model and a toy dataset."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import yoloq
from yoloq.models.tiny import tiny_yolo
from yoloq.passes.correct import correct, fold_qc, reestimate_bn, train_qc
from yoloq.passes.insert_quantizers import QCFoldError, QuantizedLayer
from yoloq.passes.plan_quantization import QUANT
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe
from yoloq.tools.train_data import TrainDataset

pytestmark = pytest.mark.usefixtures("one_thread")

IMGSZ = 64
FAST = dict(imgsz=IMGSZ, batch=4, workers=0, progress=False)


def calib_batches(data) -> list[torch.Tensor]:
    dataset = TrainDataset(data, IMGSZ, augment=False)
    return [images for images, _, _ in dataset.batches(4, shuffle=False, workers=0)]


def prepared(data, recipe="w4a4"):
    return yoloq.prepare_qat(tiny_yolo(), recipe, calib=calib_batches(data)).eval()


def with_weight(spec: dict, **changes) -> Recipe:
    """w4a4 with ``spec`` as every layer's weight spec (no first/head overrides)."""
    return Recipe.from_dict({**Recipe.preset("w4a4").to_dict(), "weight": spec, "overrides": [], **changes})


def layers(qm) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in qm.graph_module.named_modules() if isinstance(m, QuantizedLayer)}


def codes(qm) -> dict[str, torch.Tensor]:
    return {n: m.weight_quant.codes(m.effective_weight()) for n, m in layers(qm).items()}


def outputs(qm, x) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(qm.graph_module(x))


def max_diff(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def random_qc(qm, seed: int = 0, spread: float = 0.3) -> None:
    """QC with non-trivial γ ∈ 1 ± spread (positive) and β on every layer."""
    gen = torch.Generator().manual_seed(seed)
    for layer in layers(qm).values():
        layer.add_qc_()
        with torch.no_grad():
            layer.qc_scale.copy_((1 + spread * torch.randn(layer.qc_scale.shape, generator=gen)).clamp_min(0.2))
            layer.qc_shift.copy_(0.1 * torch.randn(layer.qc_shift.shape, generator=gen))


def test_absent_or_identity_qc_is_bit_identical(toy_dataset):
    qm = prepared(toy_dataset)
    x = calib_batches(toy_dataset)[0]
    before = outputs(qm, x)
    assert not any(m.has_qc for m in layers(qm).values())
    assert not any("qc_" in k for k in qm.state_dict())
    for layer in layers(qm).values():
        layer.add_qc_()
    assert all(torch.equal(a, b) for a, b in zip(before, outputs(qm, x)))
    assert sum("qc_scale" in k for k in qm.state_dict()) == len(layers(qm))


def test_one_step_qc_folds_without_changing_outputs_or_codes(toy_dataset):
    """The CI check: QC trained one step on one batch (γ, β non-trivial), then folded."""
    qm = prepared(toy_dataset)
    start = codes(qm)
    stats = train_qc(qm, toy_dataset, max_steps=1, lr=1e-2, fold=False, **FAST)
    assert stats["steps"] == 1 and stats["gamma_min"] < 1 < stats["gamma_max"] and stats["beta_max_abs"] > 0
    x = calib_batches(toy_dataset)[0]
    before = outputs(qm, x)
    result = fold_qc(qm.graph_module)
    assert result.modified and result.stats["folded"] == len(layers(qm)) == 18
    assert not any(m.has_qc for m in layers(qm).values())
    assert max_diff(before, outputs(qm, x)) < 1e-5
    after = codes(qm)
    assert all(torch.equal(start[n], after[n]) for n in start)
    again = fold_qc(qm.graph_module)  # nothing left to fold
    assert not again.modified and again.stats["folded"] == 0


def test_qc_trains_only_gamma_and_beta(toy_dataset):
    qm = prepared(toy_dataset)
    frozen = {n for n, p in qm.graph_module.named_parameters() if not p.requires_grad}
    before = state_of(qm.graph_module)
    train_qc(qm, toy_dataset, max_steps=2, lr=1e-2, fold=False, **FAST)
    after = state_of(qm.graph_module)
    qc_keys = {k for k in after if ".qc_" in k}
    assert len(qc_keys) == 2 * len(layers(qm)) and set(after) - qc_keys == set(before)
    for key in before:  # weights, scales, BN affine and running statistics: all bit-identical
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(after[k], torch.ones_like(after[k])) for k in qc_keys if "scale" in k)
    fold_qc(qm.graph_module)
    qm2 = prepared(toy_dataset)
    train_qc(qm2, toy_dataset, max_steps=1, **FAST)  # folding: requires_grad restored by name
    assert {n for n, p in qm2.graph_module.named_parameters() if not p.requires_grad} == frozen


def test_reestimate_bn_gives_the_quantized_networks_batch_statistics(toy_dataset):
    qm = prepared(toy_dataset)
    x = calib_batches(toy_dataset)[0]
    probe = copy.deepcopy(qm.graph_module)  # direct computation: each BN's input in a train-mode forward
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: seen.__setitem__(name, args[0].detach()))
             for n, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)]
    probe.train()
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    momenta = {n: m.momentum for n, m in qm.graph_module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stats = reestimate_bn(qm, [x])
    assert stats == {"bn_layers": len(seen), "skipped_fold_simulated": 0, "batches": 1, "images": 4}
    assert not qm.graph_module.training
    for name, m in qm.graph_module.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            inputs = seen[name].transpose(0, 1).flatten(1)
            torch.testing.assert_close(m.running_mean, inputs.mean(1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.running_var, inputs.var(1, unbiased=True), atol=1e-5, rtol=1e-4)
            assert m.momentum == momenta[name] and not m.training
    with pytest.raises(ValueError, match="at least one batch"):
        reestimate_bn(qm, [])


def test_reestimate_bn_restores_statistics_on_failure_and_skips_fold_simulated(toy_dataset):
    qm = prepared(toy_dataset)
    before = state_of(qm.graph_module)

    def broken():
        yield calib_batches(toy_dataset)[0]
        raise RuntimeError("data went away")

    with pytest.raises(RuntimeError, match="data went away"):
        reestimate_bn(qm, broken())
    after = state_of(qm.graph_module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    simulated = prepared(toy_dataset, with_weight({"bits": 4, "granularity": "per_channel", "learned": "lsq"},
                                                  qat_batchnorm="fold_simulated"))
    stats = reestimate_bn(simulated, calib_batches(toy_dataset)[:1])
    assert stats["bn_layers"] == 0 and stats["skipped_fold_simulated"] == 14 and stats["batches"] == 0


def test_correct_copies_and_records(toy_dataset):
    qm = prepared(toy_dataset)
    before = state_of(qm)
    records = len(qm.records)
    out = correct(qm, toy_dataset, bn_batches=1, max_steps=1, **FAST)
    assert all(torch.equal(before[k], v) for k, v in state_of(qm).items()) and state_of(qm).keys() == before.keys()
    assert not any(m.has_qc for m in layers(qm).values()) and len(qm.records) == records
    assert [r.name for r in out.records[records:]] == ["reestimate_bn", "qc"]
    assert out.records[-1].stats["folded"] == 18 and not out.training
    assert not any(m.has_qc for m in layers(out).values())
    changed = [k for k, v in state_of(out).items() if k in before and not torch.equal(before[k], v)]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight_quant.scale") for k in changed)
    only_bn = correct(qm, toy_dataset, bn_batches=1, qc=False, **FAST)
    assert [r.name for r in only_bn.records[records:]] == ["reestimate_bn"]
    with pytest.raises(ValueError, match="bn_batches"):
        correct(qm, toy_dataset, bn_batches=-1)


def test_negative_gamma_with_bn_moves_the_sign_into_bn(toy_dataset):
    qm = prepared(toy_dataset)
    random_qc(qm)
    layer = layers(qm)["block.cv1.conv"]
    with torch.no_grad():
        layer.qc_scale[:3] *= -1
    bn_weight = layer.bn.weight.detach().clone()
    x = calib_batches(toy_dataset)[0]
    start, before = codes(qm), outputs(qm, x)
    stats = fold_qc(qm.graph_module).stats
    assert stats["sign_into_bn"] == 3 and stats["mirrored"] == 0
    assert torch.equal(layer.bn.weight[:3], -bn_weight[:3]) and torch.equal(layer.bn.weight[3:], bn_weight[3:])
    assert max_diff(before, outputs(qm, x)) < 1e-5
    assert all(torch.equal(start[n], c) for n, c in codes(qm).items())


def _head_conv_with_negative_gamma(qm, channel: int, at_qmin: bool) -> QuantizedLayer:
    """``head.box.0.1`` (no BN after it) with γ < 0 on ``channel``, whose codes avoid qmin or hit it."""
    layer = layers(qm)["head.box.0.1"]
    q = layer.weight_quant
    step = q.scale.detach()[channel].flatten()[0]
    with torch.no_grad():
        w = layer.layer.weight[channel]
        w.clamp_(min=(q.spec.qmin + 1) * step)
        if at_qmin:
            w.view(-1)[0] = q.spec.qmin * step * 1.5  # beyond the grid: clipped to the code qmin
        layer.qc_scale[channel] = -0.7
    return layer


def test_negative_gamma_without_bn_mirrors_codes(toy_dataset):
    qm = prepared(toy_dataset)
    random_qc(qm)
    _head_conv_with_negative_gamma(qm, channel=5, at_qmin=False)
    x = calib_batches(toy_dataset)[0]
    start, before = codes(qm), outputs(qm, x)
    stats = fold_qc(qm.graph_module).stats
    assert stats["mirrored"] == 1 and stats["sign_into_bn"] == 0
    assert max_diff(before, outputs(qm, x)) < 1e-5
    after = codes(qm)
    assert torch.equal(after["head.box.0.1"][5], -start["head.box.0.1"][5])
    keep = torch.arange(16) != 5
    assert torch.equal(after["head.box.0.1"][keep], start["head.box.0.1"][keep])


def test_negative_gamma_without_a_mirror_is_refused_and_nothing_folds(toy_dataset):
    qm = prepared(toy_dataset)
    random_qc(qm)
    layer = _head_conv_with_negative_gamma(qm, channel=2, at_qmin=True)
    before = state_of(qm.graph_module)
    with pytest.raises(QCFoldError, match=r"nothing was folded: head\.box\.0\.1: channel\(s\) \[2\] of 16.*mirror"):
        fold_qc(qm.graph_module)
    assert layer.has_qc and all(m.has_qc for m in layers(qm).values())
    assert all(torch.equal(before[k], v) for k, v in state_of(qm.graph_module).items())
    with torch.no_grad():
        layer.qc_scale[2] = 0.0
    with pytest.raises(QCFoldError, match="γ is 0"):
        layer.fold_qc_()


@pytest.mark.parametrize("spec", [
    {"bits": 4, "granularity": "per_tensor", "learned": "lsq"},
    {"bits": 4, "granularity": "per_group", "group_size": 4, "learned": "lsq"},
    {"bits": 4, "symmetric": False, "granularity": "per_tensor", "learned": "lsq+"},
    {"bits": 4, "granularity": "per_channel", "scheme": "apot", "learned": "lsq"},
    {"bits": 4, "granularity": "per_group", "group_size": 4, "scheme": "pot"},
    {"bits": 4, "granularity": "per_group", "group_size": 4, "scheme": "codebook"},
    {"bits": 4, "granularity": "per_tensor", "scheme": "codebook"},
], ids=["tensor-lsq", "group-lsq", "tensor-lsq+", "channel-apot", "group-pot", "group-codebook", "tensor-codebook"])
def test_fold_on_every_grid_keeps_codes_and_becomes_per_channel(toy_dataset, spec):
    qm = prepared(toy_dataset, with_weight(spec))
    random_qc(qm)
    x = calib_batches(toy_dataset)[0]
    start, before = codes(qm), outputs(qm, x)
    stats = fold_qc(qm.graph_module).stats
    assert stats["per_channel"] == (0 if spec["granularity"] == "per_channel" else 18)
    assert max_diff(before, outputs(qm, x)) < 1e-5
    assert all(torch.equal(start[n], c) for n, c in codes(qm).items())
    for node in qm.graph_module.graph.nodes:
        if node.op == "call_module" and node.target in layers(qm):
            layer = layers(qm)[node.target]
            assert layer.weight_quant.spec.granularity == "per_channel"
            assert node.meta[QUANT].weight == layer.weight_quant.spec
            assert layer.weight_quant.scale.shape == (layer.layer.weight.shape[0], 1, 1, 1)


def test_fold_simulated_bn_with_qc(toy_dataset):
    recipe = with_weight({"bits": 4, "granularity": "per_channel", "learned": "lsq"}, qat_batchnorm="fold_simulated")
    qm = prepared(toy_dataset, recipe)
    random_qc(qm)
    x = calib_batches(toy_dataset)[0]
    start, before = codes(qm), outputs(qm, x)
    real = copy.deepcopy(qm)
    simulated = [m for m in layers(real).values() if m.fold_bn]
    for layer in simulated:
        layer.fold_simulated_bn_()  # folds QC first: it sits between the conv and the BN
    assert len(simulated) == 14 and not any(m.has_qc or m.bn is not None for m in simulated)
    assert max_diff(before, outputs(real, x)) < 1e-4
    fold_qc(qm.graph_module)
    assert max_diff(before, outputs(qm, x)) < 1e-5
    assert all(torch.equal(start[n], c) for n, c in codes(qm).items())


def test_fold_scales_a_bias_correction_alike(toy_dataset):
    qm = prepared(toy_dataset)
    if "bias_correction" not in next(iter(layers(qm).values()))._buffers:
        pytest.skip("QuantizedLayer has no bias_correction")
    random_qc(qm)
    gen = torch.Generator().manual_seed(1)
    for layer in layers(qm).values():
        layer.bias_correction = 0.05 * torch.randn(layer.qc_scale.shape, generator=gen)
    with torch.no_grad():
        layers(qm)["block.cv1.conv"].qc_scale[:2] *= -1
    x = calib_batches(toy_dataset)[0]
    before = outputs(qm, x)
    fold_qc(qm.graph_module)
    assert max_diff(before, outputs(qm, x)) < 1e-5


def test_saved_model_with_unfolded_qc_loads_the_same(toy_dataset, tmp_path):
    qm = prepared(toy_dataset)
    random_qc(qm)
    x = calib_batches(toy_dataset)[0]
    yoloq.save(qm, tmp_path / "qc.yoloq")
    loaded = yoloq.load_quantized(tmp_path / "qc.yoloq")
    assert all(m.has_qc for m in layers(loaded).values())
    assert max_diff(outputs(qm, x), outputs(loaded, x)) == 0


def test_cli_correct_round_trip(toy_dataset, tmp_path, capsys):
    from yoloq.cli import main

    run = tmp_path / "run"
    assert main(["qat", "--model", "tiny-yolo", "--data", str(toy_dataset), "--imgsz", "64", "--batch", "4",
                 "--max-steps", "1", "--workers", "0", "--calib-images", "4", "--out", str(run)]) == 0
    common = ["--data", str(toy_dataset), "--imgsz", "64", "--batch", "4", "--workers", "0", "--bn-batches", "1"]
    out = tmp_path / "corrected.yoloq"
    assert main(["correct", "--model", str(run / "model.yoloq"), *common, "--max-steps", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reestimate_bn:" in printed and "qc:" in printed and f"saved {out}" in printed
    corrected = yoloq.load_quantized(out)
    assert not any(m.has_qc for m in layers(corrected).values())
    assert [r.name for r in corrected.records[-2:]] == ["reestimate_bn", "qc"]
    assert main(["correct", "--model", str(run / "last.pt"), *common, "--no-qc", "-o", str(tmp_path / "bn.yoloq")]) == 0
    assert "qc:" not in capsys.readouterr().out
    assert main(["correct", "--model", str(tmp_path / "missing.pt"), *common, "-o", str(out)]) == 2
    assert "yoloq correct: error" in capsys.readouterr().err


def _assert_qc_folds_exactly(conv: nn.Conv2d, quant: FakeQuantize) -> None:
    """γ = (0.5, 0.25), β = (0.1, -0.2) on the two channels, folded: the same outputs."""
    layer = QuantizedLayer(conv, quant, None).add_qc_()
    with torch.no_grad():
        layer.qc_scale.copy_(torch.tensor([0.5, 0.25]))
        layer.qc_shift.copy_(torch.tensor([0.1, -0.2]))
    x = torch.randn(3, 2, 4, 4)
    before = layer(x)
    layer.fold_qc_()
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)


def test_dead_channel_with_floored_scale_folds_into_the_bias():
    """A channel whose weights all quantize to 0 (scale at the floor) folds γ·b + β into the bias only."""
    from yoloq.quantizers.uniform import SCALE_EPS

    conv = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.weight[1].zero_()
    quant = FakeQuantize(QuantSpec(bits=4, granularity="per_channel"), 0)
    quant(conv.weight.detach())
    quant.calibrate_()
    assert float(quant.scale.flatten()[1]) == pytest.approx(SCALE_EPS)
    _assert_qc_folds_exactly(conv, quant)


def test_channel_near_the_scale_floor_folds_within_float_rounding():
    """Weights of ~1e-8 (scale near the floor) with γ < 1: the floor is kept, the error stays ~1e-8."""
    conv = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.weight[1].copy_(torch.tensor([3e-8, -5e-8]).view(2, 1, 1))
    quant = FakeQuantize(QuantSpec(bits=4, granularity="per_channel"), 0)
    quant(conv.weight.detach())
    quant.calibrate_()
    _assert_qc_folds_exactly(conv, quant)
