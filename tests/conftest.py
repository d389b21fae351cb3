"""Shared test helpers: where the real data lives, and output comparison for nested results."""
from __future__ import annotations

import pathlib
import sys
import types

import pytest
import torch
from torch import nn

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (CI has it)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a loaded 2-core machine their
    spin-waiting made small forwards 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_batches(size: int = 64, n: int = 2, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """``n`` reproducible batches of uniform random ``batch x 3 x size x size`` images in [0, 1]:
    calibration and check inputs for models whose accuracy the test does not measure."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, size, size, generator=gen) for _ in range(n)]


# The loss tests' case: a 64 × 64 image's three detection levels (stride, grid, anchors in pixels)
# and three targets (image, class, x, y, w, h normalised).
STRIDES = torch.tensor([8.0, 16.0, 32.0])
GRIDS = ((8, 8), (4, 4), (2, 2))  # a 64 × 64 image
ANCHORS_PX = torch.tensor([[[4, 5], [8, 10], [12, 8]],
                           [[16, 12], [20, 24], [32, 20]],
                           [[40, 32], [48, 56], [64, 48]]], dtype=torch.float32)
TARGETS = torch.tensor([[0, 1, 0.30, 0.40, 0.25, 0.35],
                        [0, 0, 0.70, 0.65, 0.50, 0.40],
                        [1, 2, 0.55, 0.45, 0.15, 0.20]])


def official_stand_ins(monkeypatch, official: dict[str, str]) -> dict[str, type]:
    """Empty classes at the official repositories' paths (``models.common.Conv`` ...), in stand-in
    ``models`` packages that monkeypatch removes after the test; keyed like ``official``."""
    classes = {}
    for package in ("models", "models.yolo", "models.common"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for ours, qualified in official.items():
        module, name = qualified.rsplit(".", 1)
        cls = type(name, (nn.Module,), {"__module__": module})
        setattr(sys.modules[module], name, cls)
        classes[ours] = cls
    return classes


def assert_outputs_close(actual, expected, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


def max_abs_diff(actual, expected) -> float:
    leaves_a = torch.utils._pytree.tree_leaves(actual)
    leaves_e = torch.utils._pytree.tree_leaves(expected)
    diffs = [(a - e).abs().max().item() for a, e in zip(leaves_a, leaves_e) if isinstance(a, torch.Tensor) and a.numel()]
    return max(diffs, default=0.0)


def executed_convs(model: nn.Module, x: torch.Tensor) -> tuple[set[str], object]:
    """Qualified names of the Conv2d modules that run in an eval forward pass, and its output."""
    names = {id(m): n for n, m in reversed(list(model.named_modules()))}
    seen: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, i, o: seen.add(names[id(mod)]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def graph_module_targets(gm, cls=nn.Conv2d) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)}


def write_toy_dataset(root: pathlib.Path, images: int = 8, size: int = 96, nc: int = 4, seed: int = 0,
                      polygons: bool = False) -> pathlib.Path:
    """A YOLO-format dataset of coloured rectangles on noise, one class per colour; returns its
    data.yaml. ``polygons``: label lines are the rectangles' corner polygons (segmentation format)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(230, 40, 40), (40, 200, 40), (40, 60, 230), (230, 220, 40)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(0, nc))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y:y + h, x:x + w] = colours[cls % len(colours)]
            if polygons:
                corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
                lines.append(f"{cls} " + " ".join(f"{px / size:.6f} {py / size:.6f}" for px, py in corners))
            else:
                lines.append(f"{cls} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        (root / "labels" / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"\n  {c}: c{c}" for c in range(nc))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images\nval: images\nnc: {nc}\nnames:{names}\n")
    return root / "data.yaml"


@pytest.fixture
def toy_dataset(tmp_path) -> pathlib.Path:
    return write_toy_dataset(tmp_path / "toy")
