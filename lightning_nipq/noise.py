"""Noise samplers for the NIPQ noise phase: values in ``[-0.5, 0.5]``, shaped like the input."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_nipq.fake_quant import rounding_error

NoiseKind = Literal["uniform", "histogram"]
NOISE_KINDS: tuple[str, ...] = ("uniform", "histogram")
HISTOGRAM_BINS = 256


def uniform_noise(like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``U(-0.5, 0.5)``: the paper found it as accurate as the histogram and cheaper."""
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32) - 0.5


def histogram_noise(
    x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Sample from a 256-bin histogram of the actual rounding error of ``x``.

    This is what the paper's released code does. It crashed when every element was
    clipped (``torch.multinomial`` on an empty histogram); then there is no rounding
    error to imitate, and uniform noise is used instead.
    """
    error = rounding_error(x.float(), alpha, bits, signed)
    if error.numel() == 0:
        return uniform_noise(x, generator)
    counts = torch.histc(error, bins=HISTOGRAM_BINS, min=-0.5, max=0.5)
    if not bool(counts.sum() > 0):
        return uniform_noise(x, generator)
    bin_index = torch.multinomial(counts, x.numel(), replacement=True, generator=generator).view(x.shape)
    within_bin = torch.rand(x.shape, device=x.device, generator=generator)
    return (bin_index.float() + within_bin) / HISTOGRAM_BINS - 0.5


def sample_noise(
    kind: str, x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, generator: Optional[torch.Generator] = None
) -> Tensor:
    if kind == "uniform":
        return uniform_noise(x, generator)
    if kind == "histogram":
        return histogram_noise(x, alpha, bits, signed, generator)
    raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
