"""QAT trainer: BN kept or fold-simulated, determinism, resume, divergence and interrupt handling,
parameter groups, the hook in a user's own loop, and the CLI verb — on a tiny model and a toy dataset."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import yoloq
from yoloq.models.tiny import tiny_yolo
from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.recipe import Recipe
from yoloq.tools.qat import QATConfig, QATError, cosine_factor, fused_optimizer, load_checkpoint, train_qat
from yoloq.tools.qat_hook import QATHook, TrainingDiverged
from yoloq.tools.train_data import TrainDataset

pytestmark = pytest.mark.usefixtures("one_thread")

IMGSZ = 64
CONFIG = QATConfig(batch=4, imgsz=IMGSZ, lr=1e-3, scale_lr=1e-3, workers=0, epochs=2)


def calib_batches(data) -> list[torch.Tensor]:
    dataset = TrainDataset(data, IMGSZ, augment=False)
    return [images for images, _, _ in dataset.batches(4, shuffle=False, workers=0)]


def prepared(data, recipe="w4a4"):
    return yoloq.prepare_qat(tiny_yolo(), recipe, calib=calib_batches(data))


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.graph_module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_prepare_keeps_bn_after_quantized_conv(toy_dataset):
    qm = prepared(toy_dataset)
    layers = [m for m in qm.graph_module.modules() if isinstance(m, QuantizedLayer)]
    with_bn = [m for m in layers if m.bn is not None]
    assert with_bn and not any(m.fold_bn for m in layers)
    assert qm.head is not None and qm.head.kind == "dfl" and qm.head.nc == 4
    # PTQ folds the same BNs away
    ptq = yoloq.quantize(tiny_yolo(), "w4a4", calib=calib_batches(toy_dataset))
    assert not any(m.bn is not None for m in ptq.graph_module.modules() if isinstance(m, QuantizedLayer))


def test_training_changes_weights_scales_and_bn_statistics(toy_dataset):
    qm = prepared(toy_dataset)
    before = state_of(qm)
    result = train_qat(qm, toy_dataset, CONFIG, progress=False)
    after = state_of(qm)
    assert result.steps == 4 and len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("layer.weight") for k in changed)
    assert any(k.endswith("_quant.scale") or (k.startswith("activation_quantizers") and k.endswith("scale"))
               for k in changed)
    assert any(k.endswith("bn.running_mean") for k in changed)
    assert not qm.graph_module.training  # handed back in eval mode


def test_same_seed_same_weights(toy_dataset):
    runs = []
    for _ in range(2):
        qm = prepared(toy_dataset)
        train_qat(qm, toy_dataset, dataclasses_replace(CONFIG, epochs=1), progress=False)
        runs.append(state_of(qm))
    assert_same_state(*runs)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_resume_continues_exactly(toy_dataset, tmp_path):
    straight = prepared(toy_dataset)
    train_qat(straight, toy_dataset, CONFIG, progress=False)
    first = prepared(toy_dataset)
    half = train_qat(first, toy_dataset, dataclasses_replace(CONFIG, max_steps=3), out_dir=tmp_path, progress=False)
    assert half.steps == 3 and (tmp_path / "last.pt").is_file()
    resumed = train_qat(None, toy_dataset, CONFIG, resume=tmp_path / "last.pt", recipe="w4a4", progress=False)
    assert resumed.steps == 4 and len(resumed.losses) == 1
    assert_same_state(state_of(straight), state_of(resumed.model))


def test_resume_with_another_recipe_is_refused(toy_dataset, tmp_path):
    qm = prepared(toy_dataset)
    train_qat(qm, toy_dataset, dataclasses_replace(CONFIG, max_steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(QATError, match=r"trained with recipe 'w4a4'.*'w3a3'.*differ in: .*activation"):
        train_qat(None, toy_dataset, CONFIG, resume=tmp_path / "last.pt", recipe="w3a3", progress=False)
    with pytest.raises(QATError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_names_step_and_collapsed_scale(toy_dataset):
    qm = prepared(toy_dataset)
    name, quantizer = next((n, m) for n, m in qm.graph_module.named_modules()
                           if isinstance(m, FakeQuantize) and isinstance(m.scale, nn.Parameter) and "g" in n)
    calls = {"n": 0}
    base = qm.head.make_loss(IMGSZ)

    def sabotaging_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 3:  # the scale collapses during the second step
            with torch.no_grad():
                quantizer.scale.fill_(float("nan"))
            outputs = [o * quantizer.scale.sum() for o in outputs]
        return base(outputs, targets)

    with pytest.raises(TrainingDiverged, match=rf"step 2: the loss is nan.*{name}"):
        train_qat(qm, toy_dataset, CONFIG, loss=sabotaging_loss, progress=False)


def test_interrupt_leaves_resumable_checkpoint(toy_dataset, tmp_path):
    qm = prepared(toy_dataset)
    base, calls = qm.head.make_loss(IMGSZ), {"n": 0}

    def interrupted(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return base(outputs, targets)

    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2; resume with"):
        train_qat(qm, toy_dataset, CONFIG, out_dir=tmp_path, loss=interrupted, progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    resumed = train_qat(None, toy_dataset, CONFIG, resume=tmp_path / "last.pt", progress=False)
    assert resumed.steps == 4


def test_parameter_groups_and_schedule(toy_dataset):
    qm = prepared(toy_dataset)
    groups = {g["name"]: g for g in QATHook(qm).param_groups(lr=1e-3, scale_lr=1e-4, weight_decay=1e-2)}
    assert groups["scales"]["lr"] == 1e-4 and groups["scales"]["weight_decay"] == 0
    assert groups["weights"]["weight_decay"] == 1e-2 and all(p.dim() > 1 for p in groups["weights"]["params"])
    scale_ids = {id(p) for m in qm.graph_module.modules() if isinstance(m, FakeQuantize) for p in m.parameters()}
    assert {id(p) for p in groups["scales"]["params"]} == scale_ids
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in qm.graph_module.parameters() if p.requires_grad])
    assert cosine_factor(0, 100, 0, 0.01) == 1.0 and cosine_factor(100, 100, 0, 0.01) == pytest.approx(0.01)
    assert cosine_factor(4, 100, 10, 0.01) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scale_lr"):
        QATHook(qm).param_groups(lr=1e-3, scale_lr=-1)


def test_optimizers_are_fused_where_torch_has_a_kernel():
    params = [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))]
    assert fused_optimizer(torch.optim.AdamW, params, lr=1e-3).defaults["fused"] is True
    sgd = fused_optimizer(torch.optim.SGD, [{"params": params, "lr": 0.1}], lr=0.1, momentum=0.9, nesterov=True)
    assert sgd.defaults["fused"] is True
    plain = fused_optimizer(torch.optim.RMSprop, params, lr=0.1)  # no fused kernel at all: the loop
    assert not plain.defaults.get("fused") and len(plain.param_groups[0]["params"]) == 2
    before = params[0].detach().clone()
    params[0].grad, params[1].grad = torch.ones(3, 3), torch.ones(3)
    plain.step()
    assert not torch.equal(params[0], before)


@pytest.mark.parametrize("field, value", [("imgsz", 50), ("batch", 0), ("optimizer", "lion"), ("lr", float("nan"))])
def test_bad_config_names_field(field, value):
    with pytest.raises(QATError, match=f"QATConfig.{field}"):
        QATConfig(**{field: value})


def test_fold_simulated_bn(toy_dataset):
    recipe = Recipe.from_dict({**Recipe.preset("w4a4").to_dict(), "qat_batchnorm": "fold_simulated"})
    qm = prepared(toy_dataset, recipe)
    layers = [m for m in qm.graph_module.modules() if isinstance(m, QuantizedLayer) and m.bn is not None]
    assert layers and all(m.fold_bn for m in layers)
    train_qat(qm, toy_dataset, dataclasses_replace(CONFIG, epochs=1), progress=False)
    x = calib_batches(toy_dataset)[0]
    with torch.no_grad():
        simulated = qm.graph_module(x)
        folded = copy.deepcopy(qm.graph_module)
        for m in folded.modules():
            if isinstance(m, QuantizedLayer):
                m.fold_simulated_bn_()
        real = folded(x)
    assert not any(m.bn is not None for m in folded.modules() if isinstance(m, QuantizedLayer))
    for a, b in zip(simulated, real):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_hook_in_a_users_own_loop(toy_dataset):
    qm = prepared(toy_dataset)
    hook = QATHook(qm)
    optimizer = torch.optim.SGD(hook.param_groups(lr=1e-2, scale_lr=1e-3), lr=1e-2)
    loss_fn = qm.head.make_loss(IMGSZ)
    dataset = TrainDataset(toy_dataset, IMGSZ, augment=False)
    qm.graph_module.train()
    for images, targets, _ in dataset.batches(4, workers=0):
        loss, _ = loss_fn(qm.graph_module(images), targets)
        hook.check_loss(loss, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hook.after_step()
    stats = hook.stats()
    assert stats["step"] == 2 and 0.0 <= stats["oscillating"] <= 1.0
    assert hook.tracker.steps == 2


def test_cli_qat_trains_and_resumes(toy_dataset, tmp_path, capsys):
    from yoloq.cli import main

    out = tmp_path / "run"
    args = ["qat", "--model", "tiny-yolo", "--recipe", "w4a4", "--data", str(toy_dataset), "--imgsz", "64",
            "--batch", "4", "--max-steps", "1", "--workers", "0", "--calib-images", "4", "--out", str(out),
            "--ema", "--dampening", "0.1", "--freeze", "0.04", "0.01"]
    assert main(args) == 0
    assert (out / "last.pt").is_file() and (out / "model.yoloq").is_file()
    assert "trained 1 steps" in capsys.readouterr().out
    saved = load_checkpoint(out / "last.pt")["config"]
    assert saved["ema"] and saved["dampening"] == 0.1 and (saved["freeze_from"], saved["freeze_to"]) == (0.04, 0.01)
    resume = ["qat", "--resume", str(out / "last.pt"), "--data", str(toy_dataset), "--max-steps", "2",
              "--workers", "0", "--out", str(out)]
    assert main(resume) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert main(resume[:2] + [str(out / "last.pt"), "--recipe", "w8a8"] + resume[3:]) == 2
    assert "trained with recipe 'w4a4'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n-seg", "yolov5n-seg"])
def test_segmentation_models_train_with_mask_loss(name, tmp_path):
    from conftest import write_toy_dataset
    from yoloq.models.zoo import build

    data = write_toy_dataset(tmp_path / "seg", images=4, polygons=True)
    calib = [images for images, _, _ in TrainDataset(data, IMGSZ, augment=False, segments=True).batches(4, workers=0)]
    recipe = Recipe.from_dict({**Recipe.preset("w4a4").to_dict(), "weight": {"bits": 4, "granularity": "per_channel",
                                                                             "learned": "lsq"}})
    qm = yoloq.prepare_qat(build(name, nc=4), recipe, calib=calib)
    assert qm.head.segmentation
    result = train_qat(qm, data, dataclasses_replace(CONFIG, max_steps=2), progress=False)
    assert result.steps == 2 and "seg" in result.parts[-1]
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.parts[-1]["seg"] > 0


@pytest.mark.slow
def test_smoke_on_the_official_checkpoint(shared_data, tmp_path):
    """The real thing in miniature: yolov5n.pt, W4A4, a few steps on a few COCO128 images."""
    from yoloq.sources import load_model

    data = shared_data / "coco128" / "data.yaml"
    model = load_model(str(shared_data / "weights" / "yolov5n.pt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = yoloq.prepare_qat(model, "w4a4", calib=data, num_images=4, imgsz=128, batch=4)
    config = QATConfig(batch=4, imgsz=128, epochs=2, max_steps=3, max_images=8, workers=0)
    start = state_of(qm)
    result = train_qat(qm, data, config, out_dir=tmp_path, progress=False)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert set(result.parts[-1]) == {"box", "obj", "cls"}
    assert any(not torch.equal(start[k], v) for k, v in state_of(qm).items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert load_checkpoint(tmp_path / "last.pt", "w4a4")["step"] == 3


def test_ema_dampening_and_freezing_in_the_loop(toy_dataset, tmp_path):
    qm = prepared(toy_dataset)
    config = dataclasses_replace(CONFIG, ema=True, ema_decay=0.9, ema_tau=1.0, dampening=1e-2,
                                 freeze_from=0.02, freeze_to=0.01, lr=5e-3, oscillation_momentum=0.3)
    result = train_qat(qm, toy_dataset, config, out_dir=tmp_path, progress=False)
    assert "damp" in result.parts[-1] and result.parts[-1]["damp"] > 0
    assert result.hook.ema is not None and result.hook.ema.updates == result.steps
    # the returned model is the EMA copy
    for key, value in qm.graph_module.state_dict().items():
        assert torch.equal(value, result.hook.ema.state[key]), key
    assert 0.0 <= result.oscillation["frozen"] <= 1.0
    resumed = load_checkpoint(tmp_path / "last.pt")
    assert resumed["hook"]["ema"]["updates"] == result.steps
    for plot in ("training_curves.png", "oscillation_histograms.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["step"] for h in result.history] == list(range(1, result.steps + 1))  # steps completed


def test_bad_freeze_thresholds_are_refused():
    with pytest.raises(QATError, match="freeze_from/freeze_to"):
        QATConfig(freeze_from=0.01, freeze_to=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; the device machine does)")
def test_training_on_a_gpu(toy_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 sums on both sides
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = dataclasses_replace(CONFIG, max_steps=3, augment=False)
    on_cpu, on_gpu = prepared(toy_dataset, "w8a8"), prepared(toy_dataset, "w8a8")
    start = state_of(on_gpu)
    cpu = train_qat(on_cpu, toy_dataset, config, progress=False)
    gpu = train_qat(on_gpu, toy_dataset, config, progress=False, device="cuda")
    assert all(p.is_cuda for p in on_gpu.parameters())
    assert any(not torch.equal(v.cpu(), start[k]) for k, v in state_of(on_gpu).items())  # it trained
    # The first step: the same batch through the same weights; only the order of float sums
    # differs (cuDNN's), which can move a code at a rounding tie.
    assert gpu.losses[0] == pytest.approx(cpu.losses[0], rel=1e-2)
    yoloq.save(on_gpu, tmp_path / "gpu.yq")  # written as CPU tensors, loadable without a GPU
    loaded = yoloq.load_quantized(tmp_path / "gpu.yq")
    assert not any(t.is_cuda for t in loaded.state_dict().values())
    x = calib_batches(toy_dataset)[0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x)[0], copy.deepcopy(on_gpu).cpu().eval()(x)[0])
