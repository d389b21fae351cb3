"""PNG charts of a ``QuantReport``: per-layer SQNR, and the bit width of every layer's tensors.

``sqnr.png`` has one bar per quantizer, in three panels (weights, pre-activations, activations and
the input), coloured by bit width as in the graph page, so the layer where the error starts is the
short bar in the activation panel. ``bits.png`` is a table of colours: one row per layer, one
column per role (weight, pre-activation, output activation); a blank cell is a role the layer has
no quantizer of its own for (a report row of a shared scale names only the first layer sharing
it). Figures are drawn on matplotlib's Agg canvas directly, so plotting never touches pyplot's
global backend.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from yoloq.tools.viz.colors import bits_color

PANELS = (("weight", ("weight",)), ("pre-activation", ("pre_activation",)), ("activation", ("activation", "input")))
ROW_INCHES = 0.2


def _role(row) -> str:
    return row.role.split(" ")[0]


def _layer(row) -> str:
    return row.node.split(" ")[0]


def _figure(width: float, height: float, rows: int = 1, ratios=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, squeeze=False, gridspec_kw={"height_ratios": ratios} if ratios else None)[:, 0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_sqnr(report, path: str | os.PathLike) -> Path:
    panels = [(title, [r for r in report.rows if _role(r) in roles]) for title, roles in PANELS]
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        raise ValueError("plot_sqnr: the report has no quantizer rows")
    finite = [r.sqnr_db for _, rows in panels for r in rows if math.isfinite(r.sqnr_db)]
    top = max(finite, default=1.0) * 1.08 + 1.0
    counts = [len(rows) for _, rows in panels]
    fig, axes = _figure(9.0, ROW_INCHES * sum(counts) + 1.2 * len(panels), len(panels), counts)
    for ax, (title, rows) in zip(axes, panels):
        values = [r.sqnr_db if math.isfinite(r.sqnr_db) else top for r in rows]
        ax.barh(range(len(rows)), values, color=[bits_color(r.bits) for r in rows], edgecolor="#555", linewidth=0.4)
        for y, (row, value) in enumerate(zip(rows, values)):
            text = "∞" if not math.isfinite(row.sqnr_db) else f"{row.sqnr_db:.1f}"
            ax.text(value + 0.3, y, f"{text} dB · {row.bits}b", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r.node for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.15)
        ax.set_title(f"SQNR per quantizer: {title}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("SQNR against float (dB); higher is better")
    return _save(fig, Path(path))


def plot_bits(report, path: str | os.PathLike) -> Path:
    """One row per layer (weights' order), columns weight / pre-activation / output activation."""
    layers = list(dict.fromkeys(_layer(r) for r in report.rows if _role(r) in ("weight", "pre_activation")))
    activations = {_layer(r): r.bits for r in report.rows if _role(r) in ("activation", "input")}
    layers += [name for name in activations if name not in layers]
    if not layers:
        raise ValueError("plot_bits: the report has no quantizer rows")
    bits = {(_layer(r), _role(r)): r.bits for r in report.rows}
    columns = ("weight", "pre_activation", "activation")
    fig, (ax,) = _figure(6.5, ROW_INCHES * len(layers) + 1.4)
    for x, role in enumerate(columns):
        for y, layer in enumerate(layers):
            value = activations.get(layer) if role == "activation" else bits.get((layer, role))
            ax.barh(y, 0.96, left=x, height=0.9, color=bits_color(value) if value is not None else "white",
                    edgecolor="#bbbbbb", linewidth=0.4)
            ax.text(x + 0.48, y, str(value) if value is not None else "—", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xticks([x + 0.48 for x in range(len(columns))], ["weight", "pre-act", "activation"])
    ax.xaxis.tick_top()
    ax.set_xlim(0, len(columns))
    ax.invert_yaxis()
    ax.set_title("bit width per layer (—: no quantizer of its own: no activation to table, or an output\n"
                 "scale shared with the layer its SQNR row names)", fontsize=8)
    return _save(fig, Path(path))


def plot_report(report, out_dir: str | os.PathLike) -> list[Path]:
    """``sqnr.png`` and ``bits.png`` in ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_sqnr(report, out / "sqnr.png"), plot_bits(report, out / "bits.png")]
