"""Correct a network after quantization-aware training: BN re-estimation, then QC, folded (DESIGN §6).

    reestimate_bn   every BN's running mean and variance ← the average of its batch statistics
                    over N batches of the *quantized* network (Nagel et al. 2022): QAT's running
                    averages mix statistics of weights that no longer exist and can be far off
    train_qc        h̃ = γ ⊙ h + β on the output h of every quantized conv (γ = 1, β = 0 at first),
                    trained alone on the detection loss for one epoch (Adam, constant lr 1e-4, BN
                    frozen), as in "Reducing the side-effects of oscillations in training of
                    quantized YOLO networks"
    fold_qc         per channel: γ into the weight quantizer's scale (it becomes per-channel),
                    γ·b + β into the bias, the codes kept (``QuantizedLayer.fold_qc_``): the
                    deployed graph has no extra node

``correct(qm, data)`` runs them on a deep copy and returns it, with one ``PassRecord`` per step
appended to its ``records``. ``reestimate_bn``, ``train_qc`` and ``fold_qc`` work in place.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.insert_quantizers import QCFoldError, QuantizedLayer
from yoloq.passes.plan_quantization import QUANT, QuantAnnotation
from yoloq.pipeline import PassRecord, PassResult
from yoloq.tools.qat_hook import network_of

NAME = "fold_qc"
BN_BATCHES = 50  # default batches for BN re-estimation
_BatchNorm = nn.modules.batchnorm._BatchNorm

__all__ = ["QCFoldError", "correct", "fold_qc", "reestimate_bn", "train_qc", "train_images"]


# ------------------------------------------------------------------------------------- BN re-estimation
def reestimable_bns(network: nn.Module) -> list[_BatchNorm]:
    """The BNs with running statistics, except those of fold-simulated layers: their statistics
    define the weight the quantizer sees, so measuring them through that weight would be circular."""
    simulated = {id(m.bn) for m in network.modules() if isinstance(m, QuantizedLayer) and m.fold_bn}
    return [m for m in network.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and id(m) not in simulated]


@torch.no_grad()
def reestimate_bn(qm: nn.Module, batches: Iterable) -> dict[str, int]:
    """Recompute, in place, the running statistics of every BN of ``qm`` (a QuantizedModel or its
    GraphModule) over ``batches`` (image tensors, or tuples whose first item is one).

    Fresh statistics: each BN is reset and averages its batch statistics cumulatively
    (``momentum=None``); only the BNs run in training mode, without gradients. Momenta and the
    training flag are restored afterwards, and the old statistics too if anything fails."""
    network = network_of(qm)
    bns = reestimable_bns(network)
    simulated = sum(isinstance(m, QuantizedLayer) and m.fold_bn for m in network.modules())
    stats = {"bn_layers": len(bns), "skipped_fold_simulated": simulated, "batches": 0, "images": 0}
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("reestimate_bn needs at least one batch of images")
    if not bns:
        return stats
    device = next(itertools.chain(network.parameters(), network.buffers())).device
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.state_dict().items() if not k.endswith(("weight", "bias"))})
             for m in bns]
    was_training = network.training
    try:
        network.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for item in itertools.chain([first], iterator):
            images = item[0] if isinstance(item, (tuple, list)) else item
            network(images.to(device))
            stats["batches"] += 1
            stats["images"] += int(images.shape[0])
    except BaseException:
        for m, _, buffers in saved:
            m.load_state_dict(buffers, strict=False)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        network.train(was_training)
    return stats


def train_images(data_yaml: str | os.PathLike, batches: int, imgsz: int, batch: int, seed: int = 0,
                 workers: int = 0) -> Iterator[torch.Tensor]:
    """The first ``batches`` image batches of the train split (shuffled by ``seed``, letterboxed,
    not augmented), decoded lazily."""
    from yoloq.tools.data import labels_are_polygons
    from yoloq.tools.train_data import TrainDataset

    dataset = TrainDataset(data_yaml, imgsz, augment=False, seed=seed,
                           segments=labels_are_polygons(data_yaml, "train"))
    stream = dataset.batches(batch, shuffle=True, workers=workers)
    try:
        for _, (images, _, _) in zip(range(batches), stream):
            yield images
    finally:
        stream.close()


# ------------------------------------------------------------------------------------- QC
def qc_layers(network: nn.Module) -> dict[str, QuantizedLayer]:
    """The layers QC corrects: every quantized layer with a weight quantizer."""
    return {n: m for n, m in network.named_modules() if isinstance(m, QuantizedLayer) and m.weight_quant is not None}


def fold_qc(gm: fx.GraphModule) -> PassResult:
    """Fold the QC of every layer that has one (``QuantizedLayer.fold_qc_``), all or nothing: each
    layer is first folded on a copy, and one that cannot fold exactly stops the pass, naming every
    such layer, before any is changed. The weight spec of a layer's ``QuantAnnotation`` follows its
    quantizer when that became per-channel."""
    layers = {n: m for n, m in gm.named_modules() if isinstance(m, QuantizedLayer) and m.has_qc}
    problems = []
    for name, layer in layers.items():
        try:
            copy.deepcopy(layer).fold_qc_()
        except QCFoldError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise QCFoldError("QC cannot fold exactly, nothing was folded: " + "; ".join(problems))
    totals = Counter({"sign_into_bn": 0, "mirrored": 0, "per_channel": 0})
    for layer in layers.values():
        totals.update(layer.fold_qc_())
    for node in gm.graph.nodes:
        annotation = node.meta.get(QUANT)
        if node.op == "call_module" and node.target in layers and isinstance(annotation, QuantAnnotation):
            node.meta[QUANT] = dataclasses.replace(annotation, weight=layers[node.target].weight_quant.spec)
    notes = [f"{totals['per_channel']} weight quantizer(s) became per-channel"] if totals["per_channel"] else []
    return PassResult(gm, bool(layers), {"folded": len(layers), **totals}, notes)


def _requires(gm: fx.GraphModule) -> str | None:
    return None if qc_layers(gm) else "no QuantizedLayer with a weight quantizer: run insert_quantizers first"


def _ensures(gm: fx.GraphModule) -> str | None:
    left = [n for n, m in gm.named_modules() if isinstance(m, QuantizedLayer) and m.has_qc]
    return f"QC left unfolded in {left[:5]}" if left else None


fold_qc.name = NAME
fold_qc.requires = _requires
fold_qc.ensures = _ensures


def train_qc(qm: nn.Module, data_yaml: str | os.PathLike, epochs: int = 1, lr: float = 1e-4, imgsz: int = 320,
             batch: int = 8, max_steps: int | None = None, seed: int = 0, *, workers: int = 2,
             max_images: int | None = None, augment: bool = True, loss: nn.Module | None = None,
             fold: bool = True, progress: bool = True) -> dict[str, float]:
    """Add QC to every quantized layer of ``qm``, train only γ and β on ``data_yaml``'s train split,
    fold them (``fold=False``: leave them trained, unfolded), and return statistics. In place:
    copies nothing (``correct`` copies first).

    Training is ``train_qat`` with every other parameter's ``requires_grad`` off (restored
    afterwards, by name), BN frozen in evaluation mode, Adam (AdamW without decay) at a constant
    ``lr``. If training fails, QC is removed and the model is as it was; if folding fails
    (``QCFoldError``), the trained QC stays, unfolded."""
    from yoloq.tools.qat import QATConfig, train_qat

    network = network_of(qm)
    layers = qc_layers(network)
    if not layers:
        raise ValueError("no quantized layer with a weight quantizer: nothing for QC to correct")
    config = QATConfig(epochs=epochs, batch=batch, imgsz=imgsz, lr=lr, scale_lr=0.0, weight_decay=0.0,
                       optimizer="adamw", final_lr_ratio=1.0, freeze_bn=True, max_steps=max_steps, seed=seed,
                       workers=workers, max_images=max_images, augment=augment)
    flags = {name: p.requires_grad for name, p in network.named_parameters()}
    try:
        try:
            for p in network.parameters():
                p.requires_grad_(False)
            for layer in layers.values():
                layer.add_qc_()
                layer.qc_scale.requires_grad_(True)
                layer.qc_shift.requires_grad_(True)
            result = train_qat(qm, data_yaml, config, loss=loss, progress=progress)
        except BaseException:
            for layer in layers.values():
                layer.remove_qc_()
            raise
        gammas = torch.cat([m.qc_scale.detach().flatten() for m in layers.values()])
        shifts = torch.cat([m.qc_shift.detach().flatten() for m in layers.values()])
        folded = fold_qc(network) if fold else PassResult(network, False)
    finally:
        for name, p in network.named_parameters():
            p.requires_grad_(flags.get(name, True))
    return {"qc_layers": len(layers), "channels": gammas.numel(), "steps": result.steps,
            "loss_first": result.losses[0] if result.losses else float("nan"),
            "loss_last": result.losses[-1] if result.losses else float("nan"),
            "gamma_min": float(gammas.min()), "gamma_max": float(gammas.max()),
            "beta_max_abs": float(shifts.abs().max()), **folded.stats}


# ------------------------------------------------------------------------------------- both
def correct(qm: nn.Module, data_yaml: str | os.PathLike, *, bn_batches: int = BN_BATCHES, qc: bool = True,
            epochs: int = 1, lr: float = 1e-4, imgsz: int = 320, batch: int = 8, max_steps: int | None = None,
            seed: int = 0, workers: int = 2, max_images: int | None = None, progress: bool = True) -> nn.Module:
    """BN re-estimation over ``bn_batches`` train batches (0: skip; skipped too without BN), then QC
    (``qc=False``: skip), on a deep copy of ``qm`` (a QuantizedModel after QAT), returned in eval
    mode; ``qm`` is not changed. Each step appends a ``PassRecord`` to the copy's ``records``."""
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches must be an integer >= 0, got {bn_batches!r}")
    out = copy.deepcopy(qm)
    network = network_of(out)
    records = list(getattr(out, "records", ()))
    if bn_batches and reestimable_bns(network):
        start = time.perf_counter()
        stats = reestimate_bn(out, train_images(data_yaml, bn_batches, imgsz, batch, seed, workers))
        records.append(PassRecord("reestimate_bn", time.perf_counter() - start, True, stats, ()))
    if qc:
        start = time.perf_counter()
        stats = train_qc(out, data_yaml, epochs, lr, imgsz, batch, max_steps, seed, workers=workers,
                         max_images=max_images, progress=progress)
        records.append(PassRecord("qc", time.perf_counter() - start, True, stats, ()))
    if hasattr(out, "records"):
        out.records = tuple(records)
    return out.eval()
