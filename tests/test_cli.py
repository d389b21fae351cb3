import pytest

from yoloq.cli import main


def test_graph_lists_nodes_with_shapes_and_creating_pass(capsys):
    assert main(["graph", "tiny-yolo", "--imgsz", "64", "--guards"]) == 0
    out = capsys.readouterr().out
    assert "stem.0.conv (FusedConv2d)" in out and "float32[1, 32, 8, 8]" in out and "fuse_conv_act" in out
    assert "head.cls.1.1 (Conv2d)" in out and "capture" in out
    assert "head outputs: head_box_0_1, head_cls_0_1, head_box_1_1, head_cls_1_1" in out
    assert "guard: len(chunk) == 2 in block (SplitBlock)" in out


def test_graph_at_the_captured_stage_keeps_batchnorm(capsys):
    assert main(["graph", "conv-bn-act", "--stage", "captured", "--imgsz", "32"]) == 0
    assert "0.bn (BatchNorm2d)" in capsys.readouterr().out


def test_unknown_model_and_stage_are_clear_errors(capsys):
    assert main(["graph", "yolov99z"]) == 2
    err = capsys.readouterr().err
    assert "yolov99z" in err and "tiny-yolo" in err and "yolov5n" in err
    assert main(["graph", "tiny-yolo", "--stage", "fuzed", "--imgsz", "32"]) == 2
    assert "unknown pipeline stage 'fuzed'" in capsys.readouterr().err
    assert main(["graph", "missing.pt"]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


def test_demo_on_the_tiny_model(capsys, tmp_path):
    """The main job: capture table, then quantize -> lower -> check -> export -> ORT -> HTML per recipe."""
    assert main(["demo", "--model", "tiny-yolo", "--imgsz", "128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    capture_table, chain_table = out.split("quantize -> lower")
    assert "tiny-yolo" in capture_table and "14 -> 0" in capture_table and capture_table.rstrip().endswith("ok")
    rows = [line.split() for line in chain_table.splitlines() if line.startswith("tiny-yolo")]
    assert [r[1] for r in rows] == ["w8a8", "w4a4"]
    assert all(r[6] == "0" for r in rows)  # integer graph vs fake-quant graph: no differing code
    for recipe in ("w8a8", "w4a4"):
        page = (tmp_path / f"tiny-yolo-{recipe}.html").read_text()
        assert "<svg" in page and "http://" not in page.replace("http://www.w3.org", "")
        assert (tmp_path / f"tiny-yolo-{recipe}.onnx").stat().st_size > 10_000
        assert sorted(p.name for p in (tmp_path / f"tiny-yolo-{recipe}-charts").glob("*.png")) == ["bits.png", "sqnr.png"]


@pytest.mark.slow
def test_graph_of_the_official_checkpoint(shared_data, capsys):
    assert main(["graph", str(shared_data / "weights" / "yolov5n.pt"), "--imgsz", "320"]) == 0
    out = capsys.readouterr().out
    assert "model.24.m.2 (Conv2d)" in out and "BatchNorm2d" not in out
