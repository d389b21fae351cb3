"""Capture and the structural passes on the official yolov5n.pt, against the official raw output."""
import pytest
import torch

import yoloq
import yoloq.models


@pytest.mark.slow
def test_yolov5n_checkpoint_capture_fold_fuse_matches_reference(shared_data):
    model = yoloq.models.load(shared_data / "weights" / "yolov5n.pt")
    ref = torch.load(shared_data / "reference" / "yolov5n_bus640_raw.pt", weights_only=True)
    x = ref["input"].float() / 255
    captured = yoloq.capture(model, x)
    gm, records = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("fused"))
    captured.graph_module = gm
    stats = {r.name: r.stats for r in records}
    assert stats["fold_conv_bn"]["folded"] == 57 and stats["fuse_conv_act"]["fused"] == 57
    assert captured.head_outputs == ("model_24_m_0", "model_24_m_1", "model_24_m_2")
    with torch.no_grad():
        out = captured(x)[0]
        eager = model(x)[0]
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    diff = (out - ref["output"]).abs()
    assert diff[..., :4].max() < 5e-3 and diff[..., 4:].max() < 1e-4
