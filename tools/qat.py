"""Quantization-aware training of a ``QuantizedModel`` (from ``yoloq.prepare_qat``) on a YOLO dataset.

    data.yaml --TrainDataset (augmented, seeded, sharded per rank)--> batches
    batches --graph_module (train mode: BN batch statistics, LSQ scales)--> raw head outputs
    raw outputs --HeadLayout.make_loss (anchor / TAL+DFL [+ mask])--> loss --AdamW/SGD, cosine lr-->

The loop is ``QATHook`` (parameter groups, divergence diagnosis, oscillation statistics) plus data,
loss, schedule, checkpoints and a progress bar. Runs are deterministic under ``QATConfig.seed``:
the data is a pure function of (seed, epoch, index) and the model starts from the same weights,
so the same command gives the same weights, and a resumed run continues exactly where it stopped.

Under ``torchrun`` (or any initialised ``torch.distributed`` group) the graph is wrapped in
DistributedDataParallel: gradients are averaged, and after every step the BN running statistics
are averaged over the ranks (each saw its own shard), so weights, scales, BN statistics and the
oscillation statistics (a function of the weights) stay identical on every rank.

A checkpoint (``last.pt`` in ``out_dir``) holds the whole model, the optimizer, the schedule, the
hook's state and the config; it is written at the end of every epoch, every ``save_every`` steps,
at the end, and when the run is interrupted (Ctrl-C), so every stop is resumable.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from yoloq.tools.data import labels_are_polygons
from yoloq.tools.qat_hook import QATHook, network_of
from yoloq.tools.train_data import AugmentConfig, TrainDataset

CHECKPOINT_FORMAT = "yoloq-qat/1"
OPTIMIZERS = ("adamw", "sgd")


class QATError(ValueError):
    """A QAT run that cannot start (bad config, mismatched checkpoint); names the field or file."""


@dataclasses.dataclass(frozen=True)
class QATConfig:
    epochs: int = 1
    batch: int = 8
    imgsz: int = 320
    lr: float = 1e-4  # weights, biases, BN
    scale_lr: float = 1e-4  # quantizer scales and offsets
    weight_decay: float = 5e-4
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    warmup_steps: int = 0
    final_lr_ratio: float = 0.01  # the cosine schedule ends at lr · final_lr_ratio
    grad_clip: float = 10.0  # max gradient norm; 0 disables
    max_steps: int | None = None  # stop early (a smoke test, a time budget)
    seed: int = 0
    workers: int = 2
    augment: bool = True
    mosaic: bool = False
    max_images: int | None = None
    save_every: int = 0  # steps between checkpoints; 0: at each epoch end only
    oscillation_momentum: float = 0.01
    freeze_bn: bool = False  # BN in eval mode (running statistics fixed), e.g. while training QC alone
    ema: bool = False  # keep an EMA of weights, BN statistics and scales; the result is the EMA copy
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0  # steps of the decay ramp d_t = α(1 − exp(−t/τ))
    dampening: float = 0.0  # weight of the oscillation dampening loss (cosine-ramped from 0); 0: off
    freeze_from: float = 0.0  # freeze weights oscillating above a threshold annealed from this ...
    freeze_to: float = 0.0  # ... to this (cosine); 0: no freezing
    hyp: dict = dataclasses.field(default_factory=dict)  # AugmentConfig overrides

    def __post_init__(self):
        positive = ("epochs", "batch", "imgsz")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QATError(f"QATConfig.{name} must be a positive integer, got {value!r}")
        if self.imgsz % 32:
            raise QATError(f"QATConfig.imgsz must be a multiple of 32 (the largest stride), got {self.imgsz}")
        for name in ("lr", "scale_lr", "weight_decay", "momentum", "final_lr_ratio", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise QATError(f"QATConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise QATError(f"QATConfig.optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        for name in ("warmup_steps", "save_every", "seed", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise QATError(f"QATConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_tau <= 0:
            raise QATError(f"QATConfig.ema_decay must be in [0, 1) and ema_tau > 0, got {self.ema_decay}, {self.ema_tau}")
        if not (0.0 <= self.freeze_to <= self.freeze_from < 1.0) or (self.freeze_from > 0) != (self.freeze_to > 0):
            raise QATError(f"QATConfig.freeze_from/freeze_to must satisfy 0 < freeze_to <= freeze_from < 1 "
                           f"(or both 0: off), got {self.freeze_from}, {self.freeze_to}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise QATError(f"QATConfig.max_steps must be a positive integer or None, got {self.max_steps!r}")
        try:
            AugmentConfig.from_dict(self.hyp)
        except ValueError as exc:
            raise QATError(f"QATConfig.hyp: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QATConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise QATError(f"QATConfig has no field(s) {unknown}")
        return cls(**values)


@dataclasses.dataclass
class QATResult:
    model: nn.Module  # the QuantizedModel, trained, in eval mode
    steps: int
    losses: list[float]  # total loss per step (this run's steps only)
    parts: list[dict[str, float]]
    seconds: float
    checkpoint: Path | None
    oscillation: dict[str, float]  # summary at the end (hook.tracker has per-weight statistics)
    hook: QATHook
    history: list[dict]  # per step: loss, parts, oscillating and frozen shares, lr


def distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def average_bn_statistics(network: nn.Module, world: int) -> None:
    """All-reduce the mean of every BatchNorm's running mean and variance over the ranks."""
    for m in network.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer.div_(world)


def cosine_factor(step: int, total: int, warmup: int, final: float) -> float:
    """lr multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 down to ``final``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(hook: QATHook, config: QATConfig) -> torch.optim.Optimizer:
    groups = hook.param_groups(config.lr, config.scale_lr, config.weight_decay)
    if config.optimizer == "sgd":
        return fused_optimizer(torch.optim.SGD, groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.momentum > 0)
    return fused_optimizer(torch.optim.AdamW, groups, lr=config.lr)


def fused_optimizer(kind: type[torch.optim.Optimizer], params, **settings) -> torch.optim.Optimizer:
    """``kind(params, fused=True, **settings)``: one kernel over every parameter instead of a dozen
    small ops per tensor (a QAT model has a learned scale per quantizer besides its weights; on the
    CPU the per-tensor loop of AdamW took 3x as long). Falls back to the loop where this torch has
    no fused kernel for ``kind`` on the parameters' device."""
    params = list(params)
    try:
        return kind(params, fused=True, **settings)
    except (RuntimeError, TypeError, ValueError):
        return kind(params, **settings)


# ------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, hook: QATHook, config: QATConfig,
                    step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "model": model, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "hook": hook.state_dict(), "config": config.to_dict(),
             "recipe": model.recipe.to_dict(), "step": step}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing never leaves a truncated checkpoint
    return path


def load_checkpoint(path: str | os.PathLike, recipe=None) -> dict:
    """A QAT checkpoint; with ``recipe`` (Recipe, preset name or YAML), it must be the one trained."""
    from yoloq.recipe import load_recipe

    path = Path(path)
    if not path.is_file():
        raise QATError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")  # yoloq's own pickle
    except Exception as exc:
        raise QATError(f"{path}: not a readable QAT checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise QATError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if recipe is not None:
        wanted = load_recipe(recipe).to_dict()
        if wanted != state["recipe"]:
            fields = sorted(k for k in set(wanted) | set(state["recipe"]) if wanted.get(k) != state["recipe"].get(k))
            raise QATError(f"{path} was trained with recipe {state['recipe']['name']!r}; resuming it with recipe "
                           f"{wanted['name']!r} is not possible (they differ in: {', '.join(fields)}). Resume "
                           "with the same recipe, or start a new run from the float model")
    return state


# ------------------------------------------------------------------------------------- the loop
def train_qat(model: nn.Module | None, data: str | os.PathLike, config: QATConfig = QATConfig(), *,
              out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
              recipe=None, loss: nn.Module | None = None, progress: bool = True,
              device: str | torch.device | None = None) -> QATResult:
    """Train ``model`` (a ``QuantizedModel`` from ``prepare_qat``) on ``data``'s train split.

    ``resume``: a checkpoint to continue (then ``model`` may be None; ``recipe``, when given, must
    match the checkpoint's). ``loss``: ``loss(raw_outputs, targets, masks) -> (total, parts)``;
    by default the head's own (``model.head.make_loss``). ``device``: move the model there first
    ("cuda" is each process's own GPU under torchrun); None trains where the model is. Batches
    follow the model."""
    state = None
    if resume is not None:
        state = load_checkpoint(resume, recipe)
        saved = QATConfig.from_dict(state["config"])
        config = dataclasses.replace(saved, epochs=max(config.epochs, saved.epochs), max_steps=config.max_steps,
                                     save_every=config.save_every, workers=config.workers)
        model = state["model"]
    if model is None:
        raise QATError("train_qat needs a model (from yoloq.prepare_qat) or a checkpoint to resume")
    rank, world = distributed()
    if device is not None:
        model.to(_process_device(device, world))
    network = network_of(model)
    where = next(network.parameters()).device  # batches follow the model (model.to("cuda") trains on the GPU)
    # the head's own loss holds its strides and anchors as buffers: on the model's device too
    criterion = loss if loss is not None else _default_loss(model, config.imgsz).to(where)
    polygons = labels_are_polygons(data, "train")
    needs_masks = _needs_masks(model)
    if needs_masks and not polygons and loss is None:
        raise QATError(f"{data}: a segmentation model trains on polygon labels ('cls x1 y1 x2 y2 ...'); "
                       "these label files hold boxes")
    dataset = TrainDataset(data, config.imgsz, augment=config.augment, mosaic=config.mosaic, seed=config.seed,
                           hyp=AugmentConfig.from_dict(config.hyp), segments=polygons,
                           max_images=config.max_images)
    steps_per_epoch = math.ceil(len(dataset.sampler_indices(0, rank, world)) / config.batch)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    hook = QATHook(model, config.oscillation_momentum, ema_decay=config.ema_decay if config.ema else None,
                   ema_tau=config.ema_tau, dampening=config.dampening, total_steps=total,
                   freeze=(config.freeze_from, config.freeze_to) if config.freeze_from else None)
    optimizer = make_optimizer(hook, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_factor(s, config.epochs * steps_per_epoch, config.warmup_steps,
                                           config.final_lr_ratio))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        hook.load_state_dict(state["hook"])
        step = int(state["step"])
    torch.manual_seed(config.seed + step)
    trainable = network if world == 1 else nn.parallel.DistributedDataParallel(network, broadcast_buffers=False)
    checkpoint = Path(out_dir) / "last.pt" if out_dir is not None else None

    def save() -> Path | None:
        if checkpoint is None or rank != 0:
            return None
        return save_checkpoint(checkpoint, model, optimizer, scheduler, hook, config, step)

    losses, parts_log, history = [], [], []
    bar = tqdm(total=total, initial=step, desc="qat", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    start_time = time.perf_counter()
    network.train()
    if config.freeze_bn:
        for m in network.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    try:
        while step < total:
            epoch, first = divmod(step, steps_per_epoch)
            for images, targets, segments in dataset.batches(config.batch, epoch=epoch, workers=config.workers,
                                                             rank=rank, world_size=world, start=first):
                if step >= total:
                    break
                masks = _masks(criterion, segments, targets, images) if needs_masks else None
                images, targets = images.to(where, non_blocking=True), targets.to(where, non_blocking=True)
                outputs = trainable(images)
                total_loss, parts = criterion(outputs, targets, masks) if masks is not None \
                    else criterion(outputs, targets)
                regularization = hook.regularization()
                if regularization is not None:
                    parts = {**parts, "damp": regularization.detach()}
                    total_loss = total_loss + regularization
                hook.check_loss(total_loss, images)
                optimizer.zero_grad(set_to_none=True)
                total_loss.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                if world > 1:
                    average_bn_statistics(network, world)
                hook.after_step()
                step += 1
                losses.append(float(total_loss.detach()))
                parts_log.append({k: float(v) for k, v in parts.items()})
                osc = hook.stats()
                history.append({"step": step, "loss": losses[-1] / len(images), **parts_log[-1],
                                "oscillating": osc["oscillating"], "frozen": osc["frozen"],
                                "lr": optimizer.param_groups[-1]["lr"]})
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in parts_log[-1].items()},
                                 "osc": f"{100 * osc['oscillating']:.2f}%", "frozen": f"{100 * osc['frozen']:.2f}%"},
                                refresh=False)
                bar.update(1)
                if config.save_every and step % config.save_every == 0:
                    save()
            save()  # end of an epoch (or of the budget)
    except KeyboardInterrupt:
        path = save()
        raise KeyboardInterrupt(f"QAT interrupted at step {step}" + (f"; resume with --resume {path}" if path else ""))
    finally:
        bar.close()
        network.eval()
    hook.finish()  # evaluation and export use the EMA copy when there is one
    if out_dir is not None and rank == 0 and history:
        from yoloq.tools.qat_plots import oscillation_histograms, training_curves

        training_curves(history, Path(out_dir) / "training_curves.png")
        oscillation_histograms(hook.tracker, Path(out_dir) / "oscillation_histograms.png")
    return QATResult(model, step, losses, parts_log, time.perf_counter() - start_time,
                     checkpoint if checkpoint is not None and checkpoint.is_file() else None, hook.tracker.summary(), hook,
                     history)


def _default_loss(model: nn.Module, imgsz: int) -> nn.Module:
    head = getattr(model, "head", None)
    if head is None:
        raise QATError(f"{type(model).__name__} has no known detection head layout (model.head is None); "
                       "pass loss=... (loss(raw_outputs, targets) -> (total, parts)) or use QATHook in your loop")
    return head.make_loss(imgsz)


def _needs_masks(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    return bool(head is not None and head.segmentation)


def _process_device(device: str | torch.device, world: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _masks(criterion, segments, targets, images):
    if segments is None:
        return None
    from yoloq.tools.losses import polygons_to_masks

    layout = getattr(criterion, "layout", None)
    stride = 4 if layout is None else layout.strides[0] / 2  # prototypes are at half the first stride
    size = (int(images.shape[2] // stride), int(images.shape[3] // stride))
    return polygons_to_masks(segments, targets, size)


# ------------------------------------------------------------------------------------- the CLI verb
def add_qat_arguments(parser) -> None:
    """Options of ``yoloq qat``."""
    defaults = QATConfig()
    parser.add_argument("--model", help="float model: checkpoint (.pt), zoo name or ultralytics YAML")
    parser.add_argument("--recipe", help="preset name or recipe YAML (default w4a4; with --resume it must "
                                         "match the checkpoint's)")
    parser.add_argument("--data", required=True, help="data.yaml: its train split trains, its val split evaluates")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--imgsz", type=int, default=defaults.imgsz)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of weights, biases, BN")
    parser.add_argument("--scale-lr", type=float, default=defaults.scale_lr, help="learning rate of quantizer scales")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--max-images", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--calib-images", type=int, default=32, help="images that calibrate the starting ranges")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data decoding threads")
    parser.add_argument("--mosaic", action="store_true", help="mosaic augmentation")
    parser.add_argument("--no-augment", action="store_true", help="letterbox only, no augmentation")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: per epoch)")
    parser.add_argument("--ema", action="store_true", help="EMA of weights, BN statistics and scales (the result)")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--ema-tau", type=float, default=defaults.ema_tau, help="decay ramp length (steps)")
    parser.add_argument("--dampening", type=float, default=0.0, help="oscillation dampening weight (0: off)")
    parser.add_argument("--freeze", type=float, nargs=2, metavar=("FROM", "TO"), default=None,
                        help="freeze weights oscillating above a threshold annealed FROM -> TO (e.g. 0.04 0.01)")

    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1 (under torchrun, "
                                                        "cuda is each process's LOCAL_RANK GPU)")
    parser.add_argument("--out", default="runs/qat", help="directory for last.pt and the trained model")
    parser.add_argument("--resume", help="continue from a checkpoint (last.pt)")
    parser.add_argument("--eval", action="store_true", help="evaluate mAP before and after training")


def main_qat(args) -> int:
    """``yoloq qat``: prepare (or resume), train, save, and optionally evaluate before and after."""
    from yoloq.quantize import prepare_qat
    from yoloq.sources import load_model
    from yoloq.storage import save
    from yoloq.tools.evaluate import evaluate

    if args.model is None and args.resume is None:
        raise QATError("yoloq qat needs --model (a float model to train) or --resume (a checkpoint)")
    if os.environ.get("WORLD_SIZE", "1") != "1" and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, _ = distributed()
    config = QATConfig(epochs=args.epochs, batch=args.batch, imgsz=args.imgsz, lr=args.lr, scale_lr=args.scale_lr,
                       optimizer=args.optimizer, max_steps=args.max_steps, max_images=args.max_images,
                       seed=args.seed, workers=args.workers, mosaic=args.mosaic, augment=not args.no_augment,
                       save_every=args.save_every, ema=args.ema, ema_decay=args.ema_decay, ema_tau=args.ema_tau,
                       dampening=args.dampening, freeze_from=args.freeze[0] if args.freeze else 0.0,
                       freeze_to=args.freeze[1] if args.freeze else 0.0)
    model = None
    if args.resume is None:
        model = prepare_qat(load_model(args.model), args.recipe or "w4a4", calib=args.data,
                            num_images=args.calib_images, imgsz=args.imgsz)
        if args.eval and rank == 0:
            before = evaluate(model, args.data, imgsz=args.imgsz)
            print(f"before QAT: mAP50-95 {before.map50_95:.4f}  mAP50 {before.map50:.4f}")
    result = train_qat(model, args.data, config, out_dir=args.out, resume=args.resume, recipe=args.recipe,
                       device=args.device)
    if rank == 0:
        final = Path(args.out) / "model.yoloq"
        size = save(result.model, final)
        print(f"trained {result.steps} steps in {result.seconds:.0f} s; last loss {result.losses[-1]:.4f}; "
              f"oscillating weights {100 * result.oscillation['oscillating']:.2f}%" if result.losses else
              f"nothing left to train: the checkpoint is at step {result.steps}")
        print(f"checkpoint {result.checkpoint}; quantized model {final} ({size.ratio:.2f}x smaller than FP32)")
        if args.eval:
            after = evaluate(result.model, args.data, imgsz=args.imgsz)
            print(f"after QAT:  mAP50-95 {after.map50_95:.4f}  mAP50 {after.map50:.4f}")
    if dist.is_initialized():
        dist.barrier()
    return 0
