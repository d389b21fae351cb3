"""Safe loading of official YOLOv5 checkpoints: numerics against the official code's output,
refusal of unsafe pickles, clear errors for broken or foreign files."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy
import pytest
from conftest import official_stand_ins
import torch
from torch import nn

from yoloq.models import checkpoint
from yoloq.models.checkpoint import CheckpointError, UnknownArchitectureError, UnsafeCheckpointError, load
from yoloq.models.zoo import build

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEIGHTS = DATA / "weights" / "yolov5n.pt"
REFERENCE = DATA / "reference" / "yolov5n_bus640_raw.pt"
needs_data = pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def yolov5n():
    return load(WEIGHTS)


@needs_data
def test_reproduces_official_output(yolov5n):
    ref = torch.load(REFERENCE, weights_only=True)
    x = ref["input"].float() / 255
    with torch.no_grad():
        out = yolov5n(x)[0]
    assert out.shape == ref["output"].shape == (1, 25200, 85)
    # The reference comes from the official (fused) model; fusing alone moves boxes by ~1e-3 px.
    torch.testing.assert_close(out[..., :4], ref["output"][..., :4], atol=5e-3, rtol=0)
    torch.testing.assert_close(out[..., 4:], ref["output"][..., 4:], atol=1e-4, rtol=0)


@needs_data
def test_loaded_model_attributes(yolov5n):
    assert not yolov5n.training
    assert yolov5n.names[:3] == ["person", "bicycle", "car"] and len(yolov5n.names) == 80
    assert yolov5n.stride.tolist() == [8.0, 16.0, 32.0]
    assert yolov5n.anchors[2].tolist() == [[116.0, 90.0], [156.0, 198.0], [373.0, 326.0]]
    assert all(p.dtype == torch.float32 for p in yolov5n.state_dict().values() if p.is_floating_point())
    assert sum(p.numel() for p in yolov5n.parameters()) == 1_872_157


@needs_data
def test_state_dict_equals_checkpoint(yolov5n):
    record = checkpoint.read_checkpoint(WEIGHTS)["model"]
    theirs = checkpoint.module_state(record)
    ours = yolov5n.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.float() if value.is_floating_point() else value), key


@needs_data
@pytest.mark.slow
def test_loaded_model_is_capturable(yolov5n):
    from yoloq.passes.capture import capture

    captured = capture(yolov5n, torch.rand(1, 3, 640, 640))
    x = torch.rand(1, 3, 640, 640)
    with torch.no_grad():
        torch.testing.assert_close(captured(x), yolov5n(x), atol=1e-4, rtol=1e-4)


def test_rejects_os_system_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    # A protocol-0 pickle (torch's legacy, non-zip path) that would run `touch pwned`.
    evil.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*'os\.system', which is not allow-listed"):
        load(evil)
    assert not marker.exists()


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_rejects_unsafe_global_inside_zip_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_zip.pt"
    torch.save({"model": _RunsCommand(f"touch {marker}"), "epoch": 1}, evil)
    with pytest.raises(UnsafeCheckpointError, match=rf"'{os.system.__module__}\.system'"):
        load(evil)
    assert not marker.exists()


def test_rejects_dotted_attribute_lookup(tmp_path):
    """Protocol 4 resolves dotted names; an allowed class must not open a path to its attributes."""
    path = tmp_path / "dotted.pt"
    path.write_bytes(b"\x80\x04\x8c\x0bcollections\x8c\x14OrderedDict.__init__\x93.")
    with pytest.raises(UnsafeCheckpointError, match="collections.OrderedDict.__init__"):
        load(path)


@needs_data
def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(WEIGHTS.read_bytes()[: WEIGHTS.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable PyTorch checkpoint"):
        load(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a readable"):
        load(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load(tmp_path / "missing.pt")


def test_checkpoint_without_model(tmp_path):
    path = tmp_path / "weights_only.pt"
    torch.save({"epoch": 3, "state": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"no 'model' or 'ema' entry \(keys: \['epoch', 'state'\]\)"):
        load(path)


# Official class paths of yoloq's blocks: pickling a yoloq model under these names produces a file
# laid out like an official checkpoint, for scales and heads we have no release weights for.
OFFICIAL = {"YOLOv5": "models.yolo.Model", "Detect": "models.yolo.Detect", "Segment": "models.yolo.Segment",
            **{n: f"models.common.{n}" for n in ("Conv", "C3", "Bottleneck", "SPPF", "Concat", "Proto")}}


@pytest.fixture
def official_classes(monkeypatch):
    """Stand-ins for the official modules, importable only while the test runs."""
    return official_stand_ins(monkeypatch, OFFICIAL)


def _save_official_style(model: nn.Module, classes: dict, path: Path, **model_attrs) -> None:
    model = copy.deepcopy(model).half()
    for m in model.modules():
        if type(m).__name__ in classes:
            m.__class__ = classes[type(m).__name__]
    model.__dict__.update(stride=torch.tensor([8.0, 16.0, 32.0]), **model_attrs)
    # best_fitness is a numpy scalar in checkpoints that were not stripped for release.
    torch.save({"epoch": -1, "best_fitness": numpy.float64(0.5), "model": model, "ema": None}, path)


@pytest.mark.parametrize("name", ["yolov5s-seg", "yolov5n"])
def test_round_trip_through_official_layout(tmp_path, official_classes, name):
    torch.manual_seed(0)
    ours = build(name, nc=3).eval()
    path = tmp_path / f"{name}.pt"
    _save_official_style(ours, official_classes, path, names={0: "a", 1: "b", 2: "c"},
                         yaml={"nc": 3, "depth_multiple": ours.depth_multiple, "width_multiple": ours.width_multiple})
    loaded = load(path)
    assert type(loaded.model[-1]) is type(ours.model[-1]) and loaded.names == ["a", "b", "c"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours.half().float()(x)  # the file holds fp16 weights
        torch.testing.assert_close(loaded(x), expected)


def test_yaml_less_checkpoint_found_by_shapes(tmp_path, official_classes):
    path = tmp_path / "noyaml.pt"
    _save_official_style(build("yolov5s", nc=2), official_classes, path)
    assert load(path).width_multiple == 0.5


def test_unknown_architecture(tmp_path, official_classes):
    model = build("yolov5n", nc=2)
    del model.model[9]  # no SPPF: not a layout yoloq knows
    path = tmp_path / "odd.pt"
    _save_official_style(model, official_classes, path)
    with pytest.raises(UnknownArchitectureError, match=r"odd\.pt: unknown layer sequence"):
        load(path)
    torch.save({"model": nn.Linear(2, 2)}, path)
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load(path)


def test_unpickler_never_builds_real_modules(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 1, 1)), path)
    record = checkpoint.read_checkpoint(path)
    assert isinstance(record, checkpoint.PickledObject) and not isinstance(record, nn.Module)
    assert record.pickled_name == "torch.nn.modules.container.Sequential"
    assert set(checkpoint.module_state(record)) == {"0.weight", "0.bias"}
