"""The NIPQ quantization functions: plain tensor maths, no modules and no Lightning.

Every function takes ``alpha`` (the truncation, > 0) and ``bits`` as tensors so that
gradients reach both. ``bits`` may be integer-valued (the usual case: the caller rounds
with `round_ste`) or continuous (the gradient checks use that).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nipq.quant.codes import num_levels


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def integer_codes(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool) -> Tensor:
    """The integer code of every element (as a float tensor holding integers)."""
    n = num_levels(bits, signed)
    lower = -1.0 if signed else 0.0
    return torch.round(torch.clamp(x / alpha, lower, 1.0) * n)


def hard_fake_quant(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool) -> Tensor:
    """Fake quantization with a straight-through round.

    Gradients: to ``x`` 1 inside ``(lo, alpha)`` and 0 where clipped; to ``alpha``
    ``(round(v) - v) / n`` inside and ``+-1`` where clipped (the LSQ form); to ``bits``
    through ``n``.
    """
    n = num_levels(bits, signed)
    lower = -1.0 if signed else 0.0
    v = torch.clamp(x / alpha, lower, 1.0) * n
    return round_ste(v) * (alpha / n)


def noise_fake_quant(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, noise: Tensor) -> Tensor:
    """The NIPQ noise proxy: clip to the range, then add ``noise * step`` inside it.

    ``noise`` holds samples in ``[-0.5, 0.5]`` (see `lightning_nipq.quant.noise`) and is
    treated as a constant. Gradients: to ``x`` 1 inside, 0 where clipped (no
    straight-through estimate is needed because nothing is rounded); to ``alpha`` ``+-1``
    where clipped and ``noise / n`` inside; to ``bits`` through the step ``alpha / n(bits)``,
    so the bit gradient measures how much the loss cares about one step of perturbation.
    """
    n = num_levels(bits, signed)
    step = alpha / n
    if signed:
        lower = -alpha
        clipped = torch.clamp(x, min=lower, max=alpha)
        inside = (x > lower) & (x < alpha)
    else:
        clipped = torch.clamp(x, min=torch.zeros_like(alpha), max=alpha)
        inside = (x > 0) & (x < alpha)
    return clipped + inside.to(x.dtype) * noise.detach() * step


def rounding_error(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool) -> Tensor:
    """Normalised rounding error ``round(v) - v`` of the elements strictly inside the range."""
    n = num_levels(bits, signed)
    lower = -1.0 if signed else 0.0
    v = (x / alpha).detach()
    v = v[(v > lower) & (v < 1.0)] * n.detach()
    return torch.round(v) - v
