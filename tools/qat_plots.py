"""PNG plots of a QAT run: training curves, and the oscillation frequency histogram of every layer.

``training_curves`` draws the loss parts, the share of oscillating / frozen weights and the
learning rate against the step; ``oscillation_histograms`` draws one small histogram per
quantized layer of its weights' oscillation frequency (log counts, the threshold marked).
``train_qat`` writes both into its ``out_dir``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from yoloq.quantizers.oscillation import OscillationTracker  # noqa: E402


def training_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """``history``: one dict per step with ``step``, ``loss``, loss parts, ``oscillating``,
    ``frozen`` and ``lr``."""
    if not history:
        raise ValueError("training_curves: the history is empty (no step was trained)")
    steps = [h["step"] for h in history]
    parts = [k for k in history[-1] if k not in ("step", "loss", "oscillating", "frozen", "lr")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [h["loss"] for h in history], label="total / batch", color="black")
    for key in parts:
        axes[0].plot(steps, [h.get(key, math.nan) for h in history], label=key, linewidth=1)
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    axes[1].plot(steps, [100 * h["oscillating"] for h in history], label="oscillating")
    axes[1].plot(steps, [100 * h["frozen"] for h in history], label="frozen")
    axes[1].set_title("weights (%)")
    axes[2].plot(steps, [h["lr"] for h in history])
    axes[2].set_title("learning rate (weights)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def oscillation_histograms(tracker: OscillationTracker, path: str | os.PathLike, bins: int = 30) -> Path:
    names = list(tracker.frequency)
    if not names:
        raise ValueError("oscillation_histograms: the tracker has seen no step")
    cols = min(8, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False)
    top = max(float(f.max()) for f in tracker.frequency.values()) or 1.0
    for ax, name in zip(axes.flat, names):
        values = tracker.frequency[name].flatten().cpu().numpy()
        ax.hist(values, bins=bins, range=(0, top), color="tab:blue", log=True)
        ax.axvline(tracker.threshold, color="tab:red", linewidth=0.8)
        share = 100 * float(tracker.oscillating(name).float().mean())
        frozen = 100 * float(tracker.frozen[name].float().mean())
        ax.set_title(f"{name}\n{share:.1f}% osc, {frozen:.1f}% frozen", fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"oscillation frequency per layer (EMA, momentum {tracker.momentum}; red: threshold "
                 f"{tracker.threshold})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
