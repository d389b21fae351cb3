"""insert_quantizers, calibrate and ``yoloq.quantize``: structure, numerics, report, bad input,
and the caller's model left untouched. Real accuracy runs on yolov5n.pt (slow)."""
import copy
import math

import pytest
import torch

import yoloq
from yoloq.models.tiny import TINY_MODELS
from yoloq.passes.calibrate import CalibrationError
from yoloq.passes.insert_quantizers import QuantizedLayer, insert_quantizers
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe, RecipeError

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.rand(2, 3, 64, 64, generator=GEN) for _ in range(3)]
X = torch.rand(1, 3, 64, 64, generator=GEN)


def _sqnr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return 10 * math.log10(expected.pow(2).sum().item() / (actual - expected).pow(2).sum().item())


def test_inserted_structure_on_the_tiny_yolo():
    captured = yoloq.capture(TINY_MODELS["tiny-yolo"](), X)
    gm, records = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("quantized", Recipe.preset("w4a4")))
    layers = [m for m in gm.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == records[-2].stats["layers"] == 18
    assert records[-1].stats["activation_quantizers"] == records[-2].stats["groups"]
    assert gm.get_submodule("stem.1.conv").weight_quant.spec.bits == 4
    assert gm.get_submodule("stem.1.conv").pre_act_quant.spec.bits == 16
    assert "stem.1.conv.layer.weight" in gm.state_dict()
    # before calibration every quantizer observes and passes values through: outputs are float
    torch.testing.assert_close(captured.decoder(gm(X)), TINY_MODELS["tiny-yolo"]()(X), atol=1e-5, rtol=1e-5)


def test_inserting_twice_is_refused():
    captured = yoloq.capture(TINY_MODELS["conv-bn-act"](), X)
    gm, _ = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("quantized", Recipe.preset("w8a8")))
    with pytest.raises(yoloq.PassError, match="insert_quantizers failed after \\[\\].*already inserted"):
        yoloq.run_pipeline(gm, (insert_quantizers,))


def test_sixteen_bits_everywhere_is_close_to_float():
    spec = QuantSpec(bits=16, granularity="per_channel")
    recipe = Recipe(weight=spec, activation=QuantSpec(bits=16, signed=True, symmetric=False))
    model = TINY_MODELS["tiny-yolo"]()
    qm = yoloq.quantize(model, recipe, calib=CALIB)
    with torch.no_grad():
        assert _sqnr(qm(X)[0], model(X)[0]) > 60


def test_w8a8_report_lists_every_quantizer():
    model = TINY_MODELS["tiny-yolo"]()
    qm = yoloq.quantize(model, "w8a8", calib=CALIB)
    fqs = [m for m in qm.graph_module.modules() if isinstance(m, FakeQuantize)]
    assert len(qm.report.rows) == len(fqs)
    roles = {r.role.split(" ")[0] for r in qm.report.rows}
    assert roles == {"weight", "pre_activation", "activation", "input"}
    assert all(r.sqnr_db > 15 for r in qm.report.by_role("weight"))
    assert all(r.scale_min <= r.scale_max for r in qm.report.rows)
    text = qm.report.format()
    assert "stem.0.conv" in text and "SQNR" in text
    with torch.no_grad():
        assert _sqnr(qm(X)[0], model(X)[0]) > 20


def test_caller_model_is_never_modified():
    model = TINY_MODELS["tiny-yolo"]().train()
    before = copy.deepcopy(model.state_dict())
    yoloq.quantize(model, "w4a4", calib=CALIB)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, (FakeQuantize, QuantizedLayer)) for m in model.modules())


@pytest.mark.parametrize("calib, message", [
    ([torch.full((1, 3, 64, 64), float("nan"))], "batch 0 has .* NaN/Inf"),
    ([torch.rand(1, 1, 64, 64)], r"batch 0 has shape \(1, 1, 64, 64\), expected B x 3 x H x W"),
    ([torch.rand(3, 64, 64)], "batch 0 has shape"),
    (["image.jpg"], "batch 0 is a str"),
    ([], "no calibration batches"),
    (None, "calib is required"),
])
def test_bad_calibration_data(calib, message):
    model = TINY_MODELS["tiny-yolo"]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match=message):
        yoloq.quantize(model, "w8a8", calib=calib)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recipe_errors_name_the_field():
    model = TINY_MODELS["tiny-yolo"]()
    with pytest.raises(RecipeError, match="wieght"):
        yoloq.quantize(model, Recipe.from_dict({"wieght": {"bits": 4}}), calib=CALIB)
    with pytest.raises((RecipeError, ValueError), match="w5a5"):
        yoloq.quantize(model, "w5a5", calib=CALIB)


@pytest.mark.slow
def test_yolov5n_w8a8_keeps_coco128_accuracy(shared_data, tmp_path):
    model = yoloq.models.load(shared_data / "weights" / "yolov5n.pt")
    data = shared_data / "coco128" / "data.yaml"
    qm = yoloq.quantize(model, "w8a8", calib=data, num_images=8, imgsz=320, batch=4)
    fp = yoloq.evaluate(model, data, imgsz=320, max_images=32, cache_dir=tmp_path)
    q = yoloq.evaluate(qm, data, imgsz=320, max_images=32, cache_dir=tmp_path)
    assert q.map50_95 == pytest.approx(fp.map50_95, abs=0.02)
    assert min(r.sqnr_db for r in qm.report.by_role("weight")) > 25


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov7-tiny", "yolov8n-seg", "ultralytics:yolo11n.yaml"])
def test_zoo_and_ultralytics_models_quantize_with_head_roles(name, recwarn):
    from yoloq.passes.plan_quantization import QUANT

    if name.startswith("ultralytics:"):
        ultralytics = pytest.importorskip("ultralytics")
        model = ultralytics.YOLO(name.split(":")[1])  # the user-facing wrapper, unwrapped by quantize
    else:
        model = yoloq.models.build(name).eval()
    calib = [torch.rand(1, 3, 128, 128, generator=GEN)]
    qm = yoloq.quantize(model, "w4a4", calib=calib)
    heads = [n for n in qm.graph_module.graph.nodes if "head" in n.meta[QUANT].roles]
    assert len(heads) >= 3 and all(n.meta[QUANT].output.bits == 8 for n in heads)
    assert not [w for w in recwarn if "matches nothing" in str(w.message)]
    with torch.no_grad():
        leaves = torch.utils._pytree.tree_leaves(qm(calib[0]))
    assert leaves and all(torch.isfinite(t).all() for t in leaves if isinstance(t, torch.Tensor))
