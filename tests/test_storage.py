"""yoloq.save / yoloq.load_quantized: packed integer weights, identical outputs, the size ratio."""
import pytest
import torch

import yoloq
from yoloq.models.tiny import TINY_MODELS
from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.rand(2, 3, 64, 64, generator=GEN)]
X = torch.rand(1, 3, 64, 64, generator=GEN)


def _round_trip(qm, path):
    size = yoloq.save(qm, path)
    loaded = yoloq.load_quantized(path)
    with torch.no_grad():
        expected, actual = qm(X), loaded(X)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    return size, loaded


@pytest.mark.parametrize("recipe", [
    "w8a8", "w4a4", "w3a3", "w4a4-nonuniform",
    Recipe(weight=QuantSpec(bits=4, granularity="per_group", group_size=4)),
    Recipe(weight=QuantSpec(bits=2, scheme="codebook", granularity="per_channel")),
    Recipe(weight=QuantSpec(bits=5, scheme="pot")),
], ids=["w8a8", "w4a4", "w3a3", "w4a4-nonuniform", "w4-group4", "w2-codebook", "w5-pot"])
def test_loaded_model_gives_identical_outputs(tmp_path, recipe):
    qm = yoloq.quantize(TINY_MODELS["tiny-yolo"](), recipe, calib=CALIB)
    size, loaded = _round_trip(qm, tmp_path / "model.yq")
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLayer)]
    assert size.packed_layers == len(layers) == 18
    assert size.file_bytes == (tmp_path / "model.yq").stat().st_size


def test_file_is_smaller_with_fewer_bits(tmp_path):
    sizes = {p: yoloq.save(yoloq.quantize(TINY_MODELS["tiny-yolo"](), p, calib=CALIB), tmp_path / p).file_bytes
             for p in ("w8a8", "w4a4-all", "w3a3")}
    assert sizes["w8a8"] > sizes["w4a4-all"] > sizes["w3a3"]


def test_not_a_quantized_file(tmp_path):
    path = tmp_path / "x.yq"
    path.write_bytes(b"not lzma at all")
    with pytest.raises(ValueError, match="x.yq: not a yoloq quantized model file"):
        yoloq.load_quantized(path)


@pytest.mark.slow
def test_yolov5n_w4_per_channel_is_at_least_7_5x_smaller(shared_data, tmp_path):
    model = yoloq.models.load(shared_data / "weights" / "yolov5n.pt")
    qm = yoloq.quantize(model, "w4a4-all", calib=[torch.rand(1, 3, 320, 320, generator=GEN)])
    size, _ = _round_trip(qm, tmp_path / "yolov5n-w4.yq")
    assert size.ratio >= 7.5, size
