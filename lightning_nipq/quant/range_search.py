"""Searching the range (the clipping ``alpha``) of a tensor: min-max, a percentile of ``|x|``, or the least MSE.

Used to start weight ranges (NIPQ's ``weight_init="mse"``), by post-training quantization,
and by the calibration observers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_nipq.quant.codes import MAX_NEGATIVE_SHARE, num_levels
from lightning_nipq.quant.fake_quant import code_grid, integer_codes, zero_point
from lightning_nipq.quant.granularity import Granularity, RangeShape, grouped_view, range_rows

#: Starting ranges at or below this are treated as empty (see `usable_weight_range`).
EMPTY_RANGE = 1e-6
#: ``torch.quantile`` refuses inputs above 2**24 elements; a random subset is plenty.
MAX_SAMPLES = 1 << 20
RANGE_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")
#: Clipping ratios tried per stage of the MSE search (a coarse grid, then a fine one around its best).
MSE_GRID = 100
#: Candidates times elements evaluated at once, to bound the memory of the vectorised search.
_CHUNK = 1 << 21


def random_subset(flat: Tensor, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
    if flat.numel() <= count:
        return flat
    index = torch.randint(flat.numel(), (count,), generator=generator).to(flat.device)
    return flat[index]


def quantization_mse(x: Tensor, alphas: Tensor, bits: int, signed: bool) -> Tensor:
    """Mean squared error of fake-quantizing ``x`` at each range in ``alphas``: one value per range.

    Uses the quantizers' own formula (`lightning_nipq.quant.integer_codes` times ``alpha / n``),
    vectorised over the ranges and chunked over the elements.
    """
    flat = x.detach().reshape(-1).float()
    alphas = torch.as_tensor(alphas, dtype=torch.float32, device=flat.device).reshape(-1, 1)
    b = torch.tensor(float(bits), device=flat.device)
    scale = alphas / num_levels(b, signed)
    total = torch.zeros(alphas.shape[0], dtype=torch.float64, device=flat.device)
    rows = max(1, _CHUNK // alphas.shape[0])
    for part in flat.split(rows):
        error = integer_codes(part.unsqueeze(0), alphas, b, signed) * scale - part.unsqueeze(0)
        total += error.square().sum(dim=1, dtype=torch.float64)
    return total / max(flat.numel(), 1)


def row_quantization_mse(
    rows: Tensor, alphas: Tensor, bits: int, signed: bool, zero_points: Optional[Tensor] = None
) -> Tensor:
    """Mean squared error of fake-quantizing each row of ``rows`` at its own range ``alphas[i]``: one value per row.

    ``zero_points`` (one per row, unsigned codes only) gives each row's codes that zero point.
    """
    b = torch.tensor(float(bits), device=rows.device)
    alphas = alphas.reshape(-1, 1).to(rows.device, torch.float32)
    zp = None if zero_points is None else zero_points.reshape(-1, 1).to(rows.device, torch.float32)
    top = code_grid(b, signed, zp)[1]
    error = integer_codes(rows, alphas, b, signed, zp) * (alphas / top) - rows
    return error.square().mean(dim=1, dtype=torch.float64)


def negative_share(negative: Tensor, alpha: Tensor) -> Tensor:
    """The share ``f = negative / (alpha + negative)`` of a range ``[-negative, alpha]`` below zero, at most `MAX_NEGATIVE_SHARE`.

    What a zero-point quantizer keeps (see `lightning_nipq.quant.fake_quant.zero_point`).
    """
    return (negative / (alpha + negative)).clamp(0.0, MAX_NEGATIVE_SHARE)


def mse_ranges(rows: Tensor, bits: int, signed: bool, grid: int = MSE_GRID, negative: Optional[Tensor] = None) -> Tensor:
    """Per row of ``rows`` (one row per range), the range minimising the quantization MSE of that row.

    ``grid`` clipping ratios of the row's ``max|x|``, then as many around the best. Never worse
    than min-max: the ratio 1 is among the candidates. An all-zero row gets ``1e-8``.

    ``negative`` (one value >= 0 per row) searches zero-point codes instead (``signed`` must be
    False): each candidate top ``alpha`` gets the zero point that puts the bottom of its range
    at ``-negative`` (`negative_share`), so only the top is clipped.
    """
    rows = rows.detach().float()
    top = rows.abs().amax(dim=1) if rows.shape[1] else torch.zeros(rows.shape[0], device=rows.device)
    b = torch.tensor(float(bits), device=rows.device)
    below = None if negative is None else torch.as_tensor(negative, dtype=torch.float32, device=rows.device).reshape(-1)

    def errors_at(alphas: Tensor) -> Tensor:
        zero_points = None if below is None else zero_point(b, negative_share(below, alphas))
        return row_quantization_mse(rows, alphas, bits, signed, zero_points)

    def best_of(ratios: Tensor) -> Tensor:  # ratios: (candidates, rows)
        errors = torch.stack([errors_at((r * top).clamp_min(1e-8)) for r in ratios])
        return ratios.gather(0, errors.argmin(dim=0, keepdim=True)).squeeze(0)

    coarse = torch.linspace(1.0 / grid, 1.0, grid, device=rows.device).unsqueeze(1).expand(grid, rows.shape[0])
    best = best_of(coarse)
    low = (best - 1.0 / grid).clamp_min(1.0 / grid**2)
    high = (best + 1.0 / grid).clamp_max(1.0)
    steps = torch.linspace(0.0, 1.0, grid, device=rows.device).unsqueeze(1)
    fine = torch.cat([low + (high - low) * steps, best.unsqueeze(0)])  # the fine stage can only improve on the coarse one
    return torch.where(top > 0, best_of(fine) * top, torch.full_like(top, 1e-8))


def mse_alpha(x: Tensor, bits: int, signed: bool, grid: int = MSE_GRID, negative: Optional[float] = None) -> float:
    """The range minimising the quantization MSE of the whole of ``x`` (`mse_ranges` with one row).

    ``negative``: search zero-point codes whose range reaches down to ``-negative`` (see `mse_ranges`).
    """
    below = None if negative is None else torch.tensor([float(negative)])
    return float(mse_ranges(x.detach().reshape(1, -1), bits, signed, grid, below)[0])


def row_ranges(rows: Tensor, bits: int, signed: bool, method: str = "minmax", percentile: float = 99.99) -> Tensor:
    """One range per row of ``rows`` by ``method`` (``"minmax"``, ``"percentile"`` or ``"mse"``), at least ``1e-8``."""
    check_range_method(method, percentile)
    rows = rows.detach().float()
    if method == "minmax":
        alphas = rows.abs().amax(dim=1)
    elif method == "percentile":
        alphas = torch.quantile(rows.abs(), percentile / 100.0, dim=1)
    else:
        alphas = mse_ranges(rows, bits, signed)
    return alphas.clamp_min(1e-8)


def abs_percentile(x: Tensor, percentile: float, generator: Optional[torch.Generator] = None) -> float:
    """The ``percentile`` (0-100) of ``|x|``, from a random subset above `MAX_SAMPLES` elements."""
    flat = x.detach().reshape(-1).float().abs()
    return float(torch.quantile(random_subset(flat, MAX_SAMPLES, generator), percentile / 100.0))


def choose_alpha(x: Tensor, bits: int, signed: bool, method: str = "minmax", percentile: float = 99.99) -> float:
    """The range of one tensor by ``method``: ``"minmax"`` (``max|x|``), ``"percentile"`` or ``"mse"``."""
    check_range_method(method, percentile)
    if method == "minmax":
        alpha = float(x.detach().abs().max())
    elif method == "percentile":
        alpha = abs_percentile(x, percentile)
    else:
        alpha = mse_alpha(x, bits, signed)
    return max(alpha, 1e-8)


def usable_weight_ranges(alphas: Tensor, weight: Tensor) -> Tensor:
    """`usable_weight_range` for every range of a weight at once: empty ranges become ``1 / sqrt(fan_in)``."""
    fan_in = weight[0].numel() if weight.dim() > 1 else max(weight.numel(), 1)
    return torch.where(alphas > EMPTY_RANGE, alphas, torch.full_like(alphas, 1.0 / math.sqrt(fan_in)))


def usable_weight_range(alpha: float, weight: Tensor) -> float:
    """``alpha``, unless the weight is (almost) all zeros: then the bound of torch's default initialisation, ``1 / sqrt(fan_in)``.

    A range of about zero clips every weight and every update to it, and its softplus
    gradient is about zero too, so the layer could never learn; from the usual
    initialisation bound it trains like any other layer.
    """
    if alpha > EMPTY_RANGE:
        return alpha
    fan_in = weight[0].numel() if weight.dim() > 1 else max(weight.numel(), 1)
    return 1.0 / math.sqrt(fan_in)


def check_range_method(method: str, percentile: float) -> None:
    if method not in RANGE_METHODS:
        raise ValueError(f"method must be one of {RANGE_METHODS}, got {method!r}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


def weight_ranges(
    weight: Tensor,
    granularity: Granularity,
    range_shape: RangeShape,
    bits: int,
    method: str = "minmax",
    percentile: float = 99.99,
) -> Tensor:
    """The ranges of ``weight`` at ``granularity`` (a tensor of ``range_shape``), each searched by ``method`` on its own elements.

    Empty ranges (an all-zero channel) get `usable_weight_ranges`' starting bound.
    """
    rows = range_rows(grouped_view(weight.detach().float(), granularity), range_shape)
    alphas = row_ranges(rows, bits, True, method, percentile).reshape(range_shape)
    return usable_weight_ranges(alphas, weight)
