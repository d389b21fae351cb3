"""YOLOv8, YOLO11 and YOLOv8-seg: sizes, state-dict layout and numerics against the ultralytics
package, ultralytics checkpoints through the restricted loader, capture and the fused pipeline."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import yoloq.models
from yoloq.models import checkpoint
from yoloq.models.checkpoint import UnknownArchitectureError, UnsafeCheckpointError
from yoloq.models.ultralytics_blocks import DFL
from yoloq.models.zoo import BUILDERS, build

ultralytics_tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics is a test extra")

# Official parameter counts (unfused, DFL's fixed 16 weights included), as printed in the model
# summaries quoted in ultralytics' own cfg/models/v8/yolov8.yaml and cfg/models/11/yolo11.yaml
# ("YOLOv8n summary: 129 layers, 3157200 parameters"), and for yolov8n-seg in the ultralytics
# segmentation docs table (3.4M) / the summary of the released yolov8n-seg.pt.
OFFICIAL = {
    "yolov8n": 3_157_200, "yolov8s": 11_166_560, "yolov8m": 25_902_640, "yolov8l": 43_691_520, "yolov8x": 68_229_648,
    "yolo11n": 2_624_080, "yolo11s": 9_458_752, "yolo11m": 20_114_688, "yolo11l": 25_372_160, "yolo11x": 56_966_176,
    "yolov8n-seg": 3_409_968,
}
SMALL = ("yolov8n", "yolo11n", "yolov8n-seg")
ZOO = tuple(f"{family}{scale}{task}" for family, task in (("yolov8", ""), ("yolo11", ""), ("yolov8", "-seg"))
            for scale in "nsmlx")


pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ultralytics(name: str) -> nn.Module:
    cls = ultralytics_tasks.SegmentationModel if name.endswith("-seg") else ultralytics_tasks.DetectionModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(f"{name}.yaml", verbose=False)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BNs are identities; random statistics make an ordering or wiring mistake visible."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _decoded(out, segment: bool):
    return out[0][0] if segment else out[0]


def _check_against_ultralytics(name: str) -> None:
    theirs = _randomise_bn(_ultralytics(name)).eval()
    ours = build(name).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 256, 320)
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    segment = name.endswith("-seg")
    torch.testing.assert_close(_decoded(actual, segment), _decoded(expected, segment), atol=1e-4, rtol=1e-4)
    if segment:
        torch.testing.assert_close(actual[0][1], expected[0][1], atol=1e-4, rtol=1e-4)  # protos


@pytest.mark.parametrize("name", SMALL)
def test_state_dict_and_parameter_count_equal_ultralytics(name):
    theirs, ours = _ultralytics(name), build(name)
    assert _shapes(ours) == _shapes(theirs)
    assert _count(ours) == _count(theirs) == OFFICIAL[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if n not in SMALL])
def test_parameter_counts_of_larger_scales(name):
    """The -seg scales above n have no exact public figure (the docs round: 11.8M, 27.3M, 46.0M,
    71.8M), so they are checked against the ultralytics-built model only."""
    theirs, ours = _ultralytics(name), build(name)
    assert _count(ours) == _count(theirs) == OFFICIAL.get(name, _count(theirs))
    assert _shapes(ours) == _shapes(theirs)


@pytest.mark.parametrize("name", SMALL)
def test_outputs_equal_ultralytics(name):
    _check_against_ultralytics(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolo11m", "yolov8s-seg"])  # C3k blocks, 4-head attention; wider Proto
def test_outputs_equal_ultralytics_at_other_scales(name):
    _check_against_ultralytics(name)


def test_scaling_caps_width_at_max_channels_and_picks_c3k_by_scale():
    sd = build("yolov8m").state_dict()
    assert sd["model.9.cv2.conv.weight"].shape[0] == 576  # min(1024, 768) * 0.75
    assert sum(k.startswith("model.4.m.") and k.endswith("cv1.conv.weight") for k in sd) == 4  # 6 * 0.67
    assert "model.2.m.0.m.0.cv1.conv.weight" in build("yolo11m").state_dict()  # C3k inside C3k2
    assert "model.2.m.0.cv1.conv.weight" in build("yolo11s").state_dict()  # plain bottleneck


def test_head_variants():
    v8, v11 = build("yolov8n").model[-1], build("yolo11n").model[-1]
    assert isinstance(v8.cv3[0][0].conv, nn.Conv2d) and v8.cv3[0][0].conv.groups == 1
    assert v11.cv3[0][0][0].conv.groups == 64  # depth-wise first conv of YOLO11's class branch
    assert build("yolo11n").model[10].m[0].attn.num_heads == 2  # 128 channels / 64
    assert build("yolo11l").model[10].m[0].attn.num_heads == 4  # 256 / 64
    dfl = v8.dfl
    assert isinstance(dfl, DFL) and not dfl.conv.weight.requires_grad
    assert dfl.conv.weight.flatten().tolist() == list(range(16))


def test_output_contract():
    model = build("yolov8n", nc=3).eval()
    with torch.no_grad():
        decoded, raw = model(torch.rand(2, 3, 128, 160))
    anchors = 16 * 20 + 8 * 10 + 4 * 5
    assert decoded.shape == (2, 4 + 3, anchors)
    assert [tuple(r.shape) for r in raw] == [(2, 67, 16, 20), (2, 67, 8, 10), (2, 67, 4, 5)]
    assert 0 < decoded[:, 4:].min() and decoded[:, 4:].max() < 1
    model.train()
    assert [tuple(r.shape) for r in model(torch.rand(2, 3, 128, 160))] == [tuple(r.shape) for r in raw]
    seg = build("yolov8n-seg", nc=2).eval()
    with torch.no_grad():
        (decoded, protos), raw = seg(torch.rand(1, 3, 128, 128))
    assert decoded.shape == (1, 4 + 2 + 32, 16 * 16 + 8 * 8 + 4 * 4)
    assert protos.shape == (1, 32, 32, 32) and raw[0].shape == (1, 64 + 2 + 32, 16, 16)
    torch.testing.assert_close(decoded[0, 6:, :256], raw[0][0, 66:].reshape(32, -1))  # mask coefficients stay linear


def test_uniform_bins_decode_to_boxes_centred_on_cells():
    """Zero box logits: every side's distribution is uniform over 16 bins, expectation 7.5 cells."""
    model = build("yolov8n", nc=1).eval()
    for conv in (branch[-1] for branch in model.model[-1].cv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    with torch.no_grad():
        decoded, _ = model(torch.rand(1, 3, 64, 96))
    p3 = decoded[0, :4, : 8 * 12].view(4, 8, 12)
    assert p3[:, 2, 5].tolist() == [(5 + 0.5) * 8, (2 + 0.5) * 8, 15 * 8, 15 * 8]
    assert decoded[0, 2, -1].item() == 15 * 32  # last P5 cell: 15 cells of stride 32


def test_zoo_table_has_the_ultralytics_rows():
    assert set(ZOO) <= set(BUILDERS) and len(ZOO) == 15
    assert build("yolo11n", nc=20).model[-1].cv3[0][-1].out_channels == 20


@pytest.fixture(scope="module")
def ultralytics_checkpoints(tmp_path_factory):
    """Checkpoints pickled against ultralytics' real classes, as its trainer saves them (fp16)."""
    paths, references = {}, {}
    for name in SMALL:
        model = _randomise_bn(_ultralytics(name)).eval()
        paths[name] = tmp_path_factory.mktemp("ckpt") / f"{name}.pt"
        torch.save({"model": model.half(), "ema": None, "epoch": -1, "train_args": {"imgsz": 640}}, paths[name])
        references[name] = model.float()  # the same fp16-rounded weights, in fp32
    return paths, references


@pytest.mark.parametrize("name", SMALL)
def test_ultralytics_checkpoint_loads_into_yoloq_model(ultralytics_checkpoints, name):
    paths, references = ultralytics_checkpoints
    model = yoloq.models.load(paths[name])
    assert type(model).__name__ == "YOLOv8" and not model.training
    assert (model.family, model.scale) == (name.split("-")[0][:-1], "n")
    assert model.stride.tolist() == [8.0, 16.0, 32.0] and len(model.names) == 80
    x = torch.rand(1, 3, 256, 320)
    with torch.no_grad():
        expected, actual = references[name](x), model(x)
    segment = name.endswith("-seg")
    torch.testing.assert_close(_decoded(actual, segment), _decoded(expected, segment), atol=1e-4, rtol=1e-4)
    if segment:
        torch.testing.assert_close(actual[0][1], expected[0][1], atol=1e-4, rtol=1e-4)


def test_checkpoint_records_ultralytics_classes_and_state(ultralytics_checkpoints):
    paths, references = ultralytics_checkpoints
    record = checkpoint.read_checkpoint(paths["yolov8n-seg"])["model"]
    assert record.pickled_name == "ultralytics.nn.tasks.SegmentationModel"
    assert isinstance(record, checkpoint.PickledObject) and record.yaml["scale"] == "n"
    state = checkpoint.module_state(record)
    assert state.keys() == references["yolov8n-seg"].state_dict().keys()
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())


def test_ultralytics_pose_checkpoint_is_an_architecture_error(tmp_path):
    path = tmp_path / "pose.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"model": ultralytics_tasks.PoseModel("yolov8n-pose.yaml", verbose=False)}, path)
    with pytest.raises(UnknownArchitectureError, match=r"PoseModel, not a YOLO model yoloq rebuilds"):
        yoloq.models.load(path)


def test_ultralytics_classes_outside_the_allow_list_are_refused(tmp_path):
    path = tmp_path / "v9.pt"
    torch.save({"model": _ultralytics("yolov9t")}, path)  # RepNCSPELAN4 is not a yoloq architecture
    with pytest.raises(UnsafeCheckpointError, match=r"'ultralytics\.nn\.modules\.\w+\.\w+', which is not allow"):
        yoloq.models.load(path)


def test_ultralytics_checkpoint_of_another_layout_is_refused(tmp_path):
    path = tmp_path / "p2.pt"
    torch.save({"model": _ultralytics("yolov8n-p2")}, path)  # a fourth, P2/4 output level
    with pytest.raises(UnknownArchitectureError, match=r"p2\.pt: the model's yaml is not a YOLOv8 or YOLO11"):
        yoloq.models.load(path)


def _capture_and_fuse_match(model: nn.Module) -> None:
    from yoloq.passes.capture import capture
    from yoloq.pipeline import build_pipeline, run_pipeline

    sizes = [torch.rand(1, 3, 320, 320), torch.rand(1, 3, 256, 320)]
    captured = capture(model, sizes[0])
    with torch.no_grad():
        for x in sizes:
            torch.testing.assert_close(captured(x), model(x), atol=1e-4, rtol=1e-4)
        captured.graph_module, _ = run_pipeline(captured.graph_module, build_pipeline("fused"))
        for x in sizes:
            torch.testing.assert_close(captured(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_fresh_model_is_capturable_and_fusable(name):
    torch.manual_seed(0)
    _capture_and_fuse_match(_randomise_bn(build(name)).eval())


@pytest.mark.slow
def test_loaded_checkpoint_is_capturable_and_fusable(ultralytics_checkpoints):
    paths, _ = ultralytics_checkpoints
    _capture_and_fuse_match(yoloq.models.load(paths["yolo11n"]))
