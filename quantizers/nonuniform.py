"""Non-uniform grids: power-of-two, additive powers-of-two and a learned codebook.

A non-uniform grid is a sorted table of *unit levels* ``ℓ_0 < ℓ_1 < … < ℓ_{L-1}`` with
``max |ℓ_i| = 1`` and a scale ``s`` (the largest level magnitude)::

    code(x) = argmin_i |x/s - ℓ_i|          (a level index in [0, L-1], L <= 2^bits)
    x̂       = s · ℓ_code(x)

Ties go to the level of smaller magnitude, so symmetric tables round symmetrically. Backward is
the STE of the projection: ``∂x̂/∂x = 1`` for ``s·ℓ_0 < x < s·ℓ_{L-1}`` and 0 outside.

* PoT: ``{0, ±2^-k : k = 0..K}``; signed ``K = 2^(b-1) - 2`` (2^b - 1 levels), unsigned
  ``K = 2^b - 2`` (2^b levels, all >= 0).
* APoT (Li et al., ICLR 2020): each magnitude is ``p_0 + p_1`` with
  ``p_i ∈ {0} ∪ {2^-(i + 2j) : j = 0 .. 2^(k_i) - 2}``, where the magnitude bits
  (``b - 1`` signed, ``b`` unsigned) split as ``k_0 = ceil(m/2)``, ``k_1 = floor(m/2)``; the set of
  sums is normalised to max 1 (4 magnitude bits give the paper's
  ``{0, 1, 2^-2, 2^-4} + {0, 2^-1, 2^-3, 2^-5}``).
* Codebook: ``2^b`` levels fitted by Lloyd's algorithm (1-D k-means) per row of data,
  initialised at the quantiles ``(i + 1/2) / L``.

Both PoT tables drop exponents beyond ``MAX_EXPONENT``: a level below ``2^-24`` of the top level
is under one float32 ulp of it and adds no precision, so large ``b`` gives fewer than 2^b levels.
"""
from __future__ import annotations

import torch

MAX_EXPONENT = 24
LLOYD_ITERATIONS = 30


def _signed_table(magnitudes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Sorted unique float32 table, normalised to max 1, mirrored to negatives when ``signed``."""
    magnitudes = magnitudes.to(torch.float64)
    magnitudes = magnitudes / magnitudes.max()
    table = torch.cat([-magnitudes, magnitudes]) if signed else magnitudes
    return torch.unique(torch.cat([table, table.new_zeros(1)]).to(torch.float32))


def pot_levels(bits: int, signed: bool) -> torch.Tensor:
    """Unit power-of-two levels ``{0, ±2^-k}`` (module docstring for ``K``)."""
    count = 2 ** (bits - 1) - 1 if signed else 2**bits - 1  # nonzero magnitudes that fit
    exponents = torch.arange(min(count, MAX_EXPONENT + 1), dtype=torch.float64)
    return _signed_table(2.0 ** -exponents, signed)


def apot_levels(bits: int, signed: bool) -> torch.Tensor:
    """Unit additive-powers-of-two levels: all sums of one term from each of two PoT sets."""
    magnitude_bits = bits - 1 if signed else bits
    sizes = ((magnitude_bits + 1) // 2, magnitude_bits // 2)
    terms = []
    for start, k in enumerate(sizes):
        exponents = [start + 2 * j for j in range(2**k - 1) if start + 2 * j <= MAX_EXPONENT]
        terms.append(torch.tensor([0.0] + [2.0**-e for e in exponents], dtype=torch.float64))
    sums = (terms[0][:, None] + terms[1][None, :]).flatten()
    return _signed_table(sums, signed)


def take_levels(index: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``levels[index]`` for a shared ``[L]`` table, or row by row for ``[R, L]`` and ``[R, M]``."""
    return levels[index] if levels.dim() == 1 else levels.gather(1, index)


def nearest_level_index(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each ``v`` (int64).

    ``levels``: sorted 1-D ``[L]`` (any shape of ``v``) or ``[R, L]`` with ``v`` of shape ``[R, M]``
    (one table per row). Ties go to the level of smaller magnitude, then to the lower index.
    """
    v = v.contiguous()
    last = levels.shape[-1] - 1
    upper = torch.searchsorted(levels.contiguous(), v).clamp(max=last)
    lower = (upper - 1).clamp(min=0)
    low_level, up_level = take_levels(lower, levels), take_levels(upper, levels)
    d_low, d_up = (v - low_level).abs(), (up_level - v).abs()
    pick_up = (d_up < d_low) | ((d_up == d_low) & (up_level.abs() < low_level.abs()))
    return torch.where(pick_up, upper, lower)


def project(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The nearest level to each ``v`` (same layouts as ``nearest_level_index``)."""
    return take_levels(nearest_level_index(v, levels), levels)


def project_pass(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``project(v)`` forward; backward 1 strictly between the end levels and 0 outside.
    Written as ``level + (v - v)`` with a masked gradient so the value is exactly the level."""
    with torch.no_grad():
        value = project(v, levels)
        low, high = levels[..., :1], levels[..., -1:]
        inside = (v > low) & (v < high)
    if not v.requires_grad:
        return value
    return value + (v - v.detach()) * inside


def nonuniform_fake_quantize(x: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``s · project(x / s)`` with a shared 1-D table; with a learnable ``s`` autograd gives
    LSQ's scale gradient ``ℓ - x/s`` inside and ``ℓ_end`` outside (apply ``grad_scale`` first)."""
    return project_pass(x / scale, levels) * scale


def _quantile_init(rows: torch.Tensor, count: int) -> torch.Tensor:
    probs = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return torch.quantile(rows.to(torch.float64), probs.to(rows.device), dim=1).T.to(rows.dtype)


def lloyd_step(rows: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """One 1-D k-means step per row: assign to the nearest center, move centers to the means.
    A center that gets no data stays where it is. Returns sorted centers ``[R, L]``."""
    assign = nearest_level_index(rows, centers)
    sums = torch.zeros_like(centers).scatter_add_(1, assign, rows)
    counts = torch.zeros_like(centers).scatter_add_(1, assign, torch.ones_like(rows))
    moved = torch.where(counts > 0, sums / counts.clamp_min(1.0), centers)
    return moved.sort(dim=1).values


def fit_codebook(rows: torch.Tensor, count: int, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """``count`` levels per row of ``rows`` ``[R, M]`` by Lloyd's algorithm from quantiles.

    Returns ``[R, count]`` sorted (non-decreasing) levels. Rows with fewer than ``count`` distinct
    values keep duplicate levels; ``unique_levels`` drops them for a single shared table.
    """
    rows = rows.to(torch.float32)
    centers = _quantile_init(rows, count)
    for _ in range(iterations):
        moved = lloyd_step(rows, centers)
        if torch.equal(moved, centers):
            break
        centers = moved
    return centers


def unique_levels(levels: torch.Tensor) -> torch.Tensor:
    """A 1-D sorted table without repeats (for a per-tensor codebook)."""
    return torch.unique(levels.flatten())
