"""Paired bootstrap of mAP differences: pycocotools' mAP re-derived from its per-image matches,
image weights equal to duplicated images, intervals, errors and the ``yoloq eval --baseline`` line."""
from __future__ import annotations

import argparse
import zlib

import numpy as np
import pytest
import torch

from test_data import make_dataset
from test_evaluate import Oracle
from yoloq.tools.bootstrap import MapDifference, map_difference
from yoloq.tools.data import YoloDataset
from yoloq.tools.evaluate import add_eval_arguments, evaluate, main_eval

# Eight images, three classes, one to three labels each: enough detections for curves with steps.
IMAGES = {f"im{i}.jpg": ("RGB", 320 + 32 * (i % 3), 240 + 16 * i,
                         [f"{(i + k) % 3} {0.2 + 0.25 * k} {0.3 + 0.05 * i} {0.15 + 0.02 * i} 0.2"
                          for k in range(1 + i % 3)]) for i in range(8)}


class Noisy(Oracle):
    """The oracle's boxes moved by a few pixels, with scores that are not sorted by quality and
    one false positive per image: an mAP well inside (0, 1). ``shift`` scales the movement, so
    two instances make two different models of the same images. An image named ``dup_X`` gets
    X's rows (a copy of X)."""

    def __init__(self, dataset, shift: float = 1.0):
        super().__init__(dataset)
        self.shift = shift

    def _rows(self, record, shape):
        rows = super()._rows(record, shape)
        rng = np.random.default_rng(zlib.crc32(record.image.name.removeprefix("dup_").encode()))
        n = len(record.labels)
        rows[:n, :2] += torch.from_numpy(rng.normal(0, 4 * self.shift, (n, 2))).float()
        rows[:n, 2:4] *= torch.from_numpy(rng.uniform(0.8, 1.2, (n, 2))).float()
        rows[:n, 4] = torch.from_numpy(rng.uniform(0.3, 1.0, n)).float()
        rows[n, :5] = torch.tensor([40.0, 40.0, 30.0, 30.0, float(rng.uniform(0.2, 0.9))])
        rows[n, 5 + int(rng.integers(0, self.nc))] = 0.9
        return rows


def _score(yaml_file, cache, shift=1.0):
    dataset = YoloDataset(yaml_file, imgsz=320, batch=1, rect=True)
    return evaluate(Noisy(dataset, shift), yaml_file, imgsz=320, cache_dir=cache)


@pytest.fixture
def noisy_yaml(tmp_path):
    return make_dataset(tmp_path / "ds", IMAGES)


def test_matches_reproduce_pycocotools_map(noisy_yaml, tmp_path):
    metrics = _score(noisy_yaml, tmp_path / "cache")
    assert 0.2 < metrics.map50_95 < 0.9
    assert metrics.matches.map50_95() == pytest.approx(metrics.map50_95, abs=1e-12)
    # every image twice: the same curves, the same mAP
    assert metrics.matches.map50_95(np.full(len(IMAGES), 2)) == pytest.approx(metrics.map50_95, abs=1e-12)


def test_image_weights_equal_duplicated_images(noisy_yaml, tmp_path):
    twice = ("im1.jpg", "im4.jpg", "im6.jpg")
    duplicated = dict(IMAGES, **{"dup_" + name: IMAGES[name] for name in twice})
    dup_yaml = make_dataset(tmp_path / "dup", duplicated)
    pooled = evaluate(Noisy(YoloDataset(dup_yaml, imgsz=320, batch=1, rect=True)), dup_yaml, imgsz=320,
                      cache_dir=tmp_path / "cache")

    weighted = _score(noisy_yaml, tmp_path / "cache").matches
    names = sorted(IMAGES)  # image ids follow filename order
    counts = np.array([2 if name in twice else 1 for name in names])
    assert weighted.map50_95(counts) == pytest.approx(pooled.map50_95, abs=1e-12)
    assert weighted.map50_95(counts) != pytest.approx(weighted.map50_95(), abs=1e-6)


def test_map_difference_is_paired_and_reproducible(noisy_yaml, tmp_path):
    a = _score(noisy_yaml, tmp_path / "cache", shift=0.5)
    b = _score(noisy_yaml, tmp_path / "cache", shift=3.0)
    same = map_difference(a, a, resamples=50)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)  # paired: identical draws cancel

    diff = map_difference(a, b, resamples=200, seed=3)
    assert diff.delta == pytest.approx(100 * (b.map50_95 - a.map50_95), abs=1e-9)
    assert diff.a == pytest.approx(100 * a.map50_95) and diff.b == pytest.approx(100 * b.map50_95)
    assert diff.low < diff.delta < diff.high and diff.delta < 0  # larger shifts score lower
    assert map_difference(a, b, resamples=200, seed=3) == diff
    wider = map_difference(a, b, resamples=200, seed=3, level=0.99)
    assert wider.low <= diff.low and wider.high >= diff.high
    assert "points (95% interval" in str(diff) and "200 paired resamples" in str(diff)


def test_a_model_that_detects_nothing_compares_too(noisy_yaml, tmp_path):
    class Silent(torch.nn.Module):
        def forward(self, images):
            return torch.zeros(len(images), 100, 8)

    a = _score(noisy_yaml, tmp_path / "cache")
    silent = evaluate(Silent(), noisy_yaml, imgsz=320, cache_dir=tmp_path / "cache")
    assert silent.map50_95 == 0.0 and silent.matches.map50_95() == 0.0
    diff = map_difference(a, silent, resamples=100)
    assert diff.delta == pytest.approx(-100 * a.map50_95) and diff.high < 0


def test_map_difference_refuses_unpaired_or_matchless_input(noisy_yaml, tmp_path):
    a = _score(noisy_yaml, tmp_path / "cache")
    fewer = make_dataset(tmp_path / "fewer", {k: IMAGES[k] for k in list(IMAGES)[:5]})
    b = _score(fewer, tmp_path / "cache")
    with pytest.raises(ValueError, match="different images"):
        map_difference(a, b)
    with pytest.raises(ValueError, match="b carries no per-image matches"):
        map_difference(a, object())
    with pytest.raises(ValueError, match="level"):
        map_difference(a, a, level=1.5)
    with pytest.raises(ValueError, match="resamples"):
        map_difference(a, a, resamples=0)


def test_cli_baseline_prints_the_difference(noisy_yaml, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLOQ_CACHE", str(tmp_path))
    dataset = YoloDataset(noisy_yaml, imgsz=320, batch=1, rect=True)
    models = {"good": Noisy(dataset, 0.5), "bad": Noisy(dataset, 3.0)}
    monkeypatch.setattr("yoloq.tools.evaluate.load_for_eval", lambda name: models[name])
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args([
        "--model", "bad", "--baseline", "good", "--data", str(noisy_yaml), "--imgsz", "320",
        "--resamples", "100"])
    assert main_eval(args) == 0
    out = capsys.readouterr().out
    expected = map_difference(_score(noisy_yaml, tmp_path / "c", 0.5), _score(noisy_yaml, tmp_path / "c", 3.0),
                              resamples=100)
    assert f"vs baseline good: {expected}" in out
    assert "masks vs baseline" not in out  # box models: no mask line
    assert isinstance(expected, MapDifference)
