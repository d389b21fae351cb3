"""Observers: the range each gives on a tensor whose answer is known, layouts, and errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoloq.quantizers import observers as O
from yoloq.quantizers.spec import QuantSpec, SpecError


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def observe(spec: QuantSpec, *batches: torch.Tensor, axis: int | None = None):
    observer = O.make_observer(spec, axis)
    for batch in batches:
        observer.update(batch)
    return observer.range()


def heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    """Laplace(0, 1) by inverse CDF: a tail much longer than the grid wants at 4 bits."""
    u = torch.rand(n, generator=generator(seed)) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("name, cls", sorted(O.OBSERVER_CLASSES.items()))
def test_make_observer_builds_the_named_observer(name, cls):
    observer = O.make_observer(QuantSpec(observer=name))
    assert type(observer) is cls
    with pytest.raises(RuntimeError, match="no tensor observed"):
        observer.range()


@settings(deadline=None, max_examples=40)
@given(st.lists(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=30), min_size=1, max_size=4))
def test_minmax_is_the_min_and_max_over_batches(batches):
    lo, hi = observe(QuantSpec(), *[torch.tensor(b) for b in batches])
    flat = [v for b in batches for v in b]
    assert lo.shape == () and float(lo) == min(flat) and float(hi) == max(flat)


def test_per_channel_reduces_over_every_dim_but_the_channel_axis():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    spec = QuantSpec(granularity="per_channel")
    lo, hi = observe(spec, x, axis=1)
    assert lo.tolist() == [0.0, 4.0, 8.0] and hi.tolist() == [15.0, 19.0, 23.0]
    lo, hi = observe(spec, x, axis=0)
    assert lo.tolist() == [0.0, 12.0] and hi.tolist() == [11.0, 23.0]


def test_per_group_takes_consecutive_channels():
    w = torch.arange(8, dtype=torch.float32).reshape(8, 1, 1, 1)
    lo, hi = observe(QuantSpec(granularity="per_group", group_size=4), w, axis=0)
    assert lo.tolist() == [0.0, 4.0] and hi.tolist() == [3.0, 7.0]


def test_per_group_with_indivisible_channels_names_both_numbers():
    observer = O.make_observer(QuantSpec(granularity="per_group", group_size=4), 0)
    with pytest.raises(SpecError, match=r"6 channels.*group_size 4"):
        observer.update(torch.zeros(6, 3, 3, 3))


def test_channel_count_must_not_change_and_axis_is_required():
    observer = O.make_observer(QuantSpec(granularity="per_channel"), 1)
    observer.update(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"8 channels on axis 1.*\(2, 6, 4, 4\)"):
        observer.update(torch.zeros(2, 6, 4, 4))
    with pytest.raises(SpecError, match="channel_axis"):
        O.make_observer(QuantSpec(granularity="per_channel"))


def test_ema_minmax_follows_the_momentum():
    spec = QuantSpec(observer="ema_minmax", momentum=0.25)
    lo, hi = observe(spec, torch.tensor([-1.0, 2.0]), torch.tensor([-5.0, 10.0]))
    assert float(lo) == -1.0 + 0.25 * (-5.0 + 1.0) and float(hi) == 2.0 + 0.25 * (10.0 - 2.0)


def test_percentile_drops_a_planted_outlier():
    x = torch.rand(20000, generator=generator()) * 2 - 1
    x[123], x[456] = 1000.0, -800.0
    for symmetric in (True, False):
        lo, hi = observe(QuantSpec(observer="percentile", percentile=99.9, symmetric=symmetric), x)
        assert -1.0 <= float(lo) < -0.99 and 0.99 < float(hi) <= 1.0
    assert float(observe(QuantSpec(), x)[1]) == 1000.0


def test_percentile_samples_big_tensors_deterministically():
    x = torch.randn(2_500_000, generator=generator())
    spec = QuantSpec(observer="percentile", percentile=99.0)
    first, second = observe(spec, x), observe(spec, x)
    assert torch.equal(first[1], second[1])
    exact = float(torch.quantile(x[:1_000_000].abs(), 0.99))
    assert abs(float(first[1]) - exact) < 0.02 * exact


def test_mse_clips_a_heavy_tail_more_than_minmax():
    x = heavy_tailed(20000)
    spec = QuantSpec(bits=4, observer="mse")
    lo, hi = observe(spec, x)
    mm_lo, mm_hi = observe(QuantSpec(bits=4), x)
    assert float(hi) < 0.6 * float(mm_hi) and float(lo) > 0.6 * float(mm_lo)
    uniform_data = torch.rand(20000, generator=generator(1)) * 2 - 1
    assert float(observe(QuantSpec(bits=8, observer="mse"), uniform_data)[1]) > 0.95


def test_mse_per_channel_chooses_per_channel_and_handles_pot():
    x = torch.stack([heavy_tailed(5000), torch.rand(5000, generator=generator(2)) * 2 - 1])
    lo, hi = observe(QuantSpec(bits=4, observer="mse", granularity="per_channel"), x, axis=0)
    ratio = hi / x.amax(1)
    assert float(ratio[0]) < 0.6 and float(ratio[1]) > 0.9
    _, pot_hi = observe(QuantSpec(bits=4, observer="mse", scheme="pot"), x[0])
    assert 0 < float(pot_hi) < float(x[0].max())


@pytest.mark.parametrize("name", ["mse", "percentile"])
def test_tensors_of_one_batch_are_pooled_before_the_search(name):
    """A shared quantizer sees each root of its group once per batch: one range for their union."""
    wide, narrow = heavy_tailed(6000) * 10, heavy_tailed(3000, seed=1)
    spec = QuantSpec(bits=4, observer=name)
    observer = O.make_observer(spec)
    observer.update(wide)
    observer.update(narrow)
    observer.end_batch()
    assert all(torch.equal(a, b) for a, b in zip(observer.range(), observe(spec, torch.cat([wide, narrow]))))
    averaged = (observe(spec, wide)[1] + observe(spec, narrow)[1]) / 2  # each root fitted alone
    assert float(observer.range()[1]) > 1.2 * float(averaged)


def test_pooling_keeps_sizes_in_proportion_when_sampling():
    big, small = torch.rand(1, 300_000, generator=generator()), torch.rand(1, 100_000, generator=generator(1)) + 10
    pooled = O.pool_columns(big, big.shape[1], small, small.shape[1], 40_000, generator())
    assert pooled.shape == (1, 40_000)
    assert abs(float((pooled > 5).float().mean()) - 0.25) < 0.01


def test_batches_ended_separately_are_averaged():
    a, b = heavy_tailed(4000), heavy_tailed(4000, seed=1) * 3
    spec = QuantSpec(bits=4, observer="mse")
    observer = O.make_observer(spec)
    for x in (a, b):
        observer.update(x)
        observer.end_batch()
    expected = (observe(spec, a)[1] + observe(spec, b)[1]) / 2
    torch.testing.assert_close(observer.range()[1], expected)


def test_entropy_range_is_inside_minmax_and_clips_outliers():
    x = torch.randn(50000, generator=generator())
    x[7] = 60.0
    lo, hi = observe(QuantSpec(observer="entropy"), x)
    assert float(x.min()) <= float(lo) < 0 < float(hi) < 10.0
    lo, hi = observe(QuantSpec(observer="entropy", granularity="per_channel"), x.reshape(10, -1), axis=0)
    mm_lo, mm_hi = observe(QuantSpec(granularity="per_channel"), x.reshape(10, -1), axis=0)
    assert bool((lo >= mm_lo).all() and (hi <= mm_hi).all()) and float(hi[0]) < 10.0


def test_entropy_histogram_grows_with_the_range():
    observer = O.make_observer(QuantSpec(observer="entropy", bits=4))
    observer.update(torch.rand(4000, generator=generator()) * 2 - 1)
    observer.update((torch.rand(4000, generator=generator(1)) * 2 - 1) * 4)
    assert float(observer.hist.sum()) == 8000.0
    assert float(observer.width[0]) * O.HISTOGRAM_BINS >= 3.99
    lo, hi = observer.range()
    assert -4.0 <= float(lo) < 0 < float(hi) <= 4.0


def test_kl_keeps_everything_when_the_grid_has_as_many_levels_as_bins():
    hist = torch.ones(1, O.HISTOGRAM_BINS)
    assert int(O.kl_threshold_bins(hist, O.HISTOGRAM_BINS)[0]) == O.HISTOGRAM_BINS
