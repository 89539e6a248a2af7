"""The NIPQ quantization functions: plain tensor maths, no modules and no Lightning.

Every function takes ``alpha`` (the truncation, > 0) and ``bits`` as tensors so that
gradients reach both. ``bits`` may be integer-valued (the usual case: the caller rounds
with `round_ste`) or continuous (the gradient checks use that).

Zero points. Besides symmetric signed codes (range ``[-alpha, alpha]``) and unsigned ones
(``[0, alpha]``), an input may have unsigned codes ``[0, N]`` (``N = 2**b - 1``) with a zero
point ``z``: code ``z`` stands for 0.0, the step is ``s = alpha / (N - z)`` and the range
``[-z * s, alpha]``. The quantizer keeps the calibrated share of the range below zero,
``f``, and `zero_point` derives ``z = round(f * N)`` at the current bits, so the range holds
whatever bit-width NIPQ learns. The functions below take the zero point as an optional
tensor ``zero_point`` (None: no zero point) and work on *centred* codes ``q - z``, integers
in ``[-z, N - z]``: those are what the integer layers multiply, so that zero (and a
convolution's zero padding) stays exactly zero.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lightning_nipq.quant.codes import num_levels


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def zero_point(bits: Tensor, negative_share: Union[float, Tensor]) -> Tensor:
    """The zero point ``z = round(f * N)`` of unsigned codes at ``bits`` (``N = 2**b - 1``), ``f = negative_share``.

    A float tensor holding an integer, without gradient (the bits reach the step through
    ``N - z`` instead). Computed in float32 on ``bits``' device: a float32 product and round
    are the same on every device, so the integer conversion, which calls this at the frozen
    bits, finds the very ``z`` training used. At most ``N - 1``, so that at least one code
    lies above zero (at 1 bit ``z`` is 0: the codes are plain unsigned ones).
    """
    n = num_levels(bits.detach().float(), False)
    share = torch.as_tensor(negative_share, dtype=torch.float32, device=n.device)
    return torch.minimum(torch.round(share * n), (n - 1.0).clamp_min(0.0))


def zero_point_of(bits: int, negative_share: float) -> int:
    """`zero_point` at whole ``bits`` as a Python integer (0 without a negative share)."""
    if negative_share == 0:
        return 0
    return int(zero_point(torch.tensor(float(bits)), negative_share))


def code_grid(bits: Tensor, signed: bool, zero_point: Optional[Tensor] = None) -> tuple[Union[float, Tensor], Tensor]:
    """``(lower, top)`` of the centred codes: they lie in ``[lower * top, top]``, the range is ``[lower * alpha, alpha]``.

    ``top`` is the largest centred code (the step is ``alpha / top``): ``n`` of `num_levels`,
    or ``N - z`` with a zero point, whose ``lower`` is ``-z / (N - z)``.
    """
    if zero_point is None:
        return (-1.0 if signed else 0.0), num_levels(bits, signed)
    if signed:
        raise ValueError("a zero point goes with unsigned codes; got signed=True with a zero point")
    top = num_levels(bits, False) - zero_point
    return -zero_point / top, top


def _clamp_unit(v: Tensor, lower: Union[float, Tensor]) -> Tensor:
    """``v`` clamped to ``[lower, 1]``; a tensor ``lower`` (a zero point's) is clamped against as a tensor.

    torch.clamp takes a tensor bound only with a tensor upper bound too, and would read a
    0-d one as a Python number (a device sync, and a graph break under torch.compile).
    """
    if isinstance(lower, Tensor):
        return torch.clamp(v, min=lower, max=torch.ones_like(lower))
    return torch.clamp(v, lower, 1.0)


def integer_codes(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, zero_point: Optional[Tensor] = None) -> Tensor:
    """The integer code of every element (as a float tensor holding integers).

    With a ``zero_point`` the centred code ``q - z`` (in ``[-z, N - z]``); the stored unsigned
    code is this plus ``z``.
    """
    lower, n = code_grid(bits, signed, zero_point)
    return torch.round(_clamp_unit(x / alpha, lower) * n)


def hard_fake_quant(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, zero_point: Optional[Tensor] = None) -> Tensor:
    """Fake quantization with a straight-through round.

    Gradients: to ``x`` 1 inside ``(lo, alpha)`` and 0 where clipped; to ``alpha``
    ``(round(v) - v) / n`` inside and ``+-1`` where clipped (the LSQ form; ``-z / (N - z)``
    at the bottom of a zero-point range); to ``bits`` through ``n`` (``N - z``).
    """
    lower, n = code_grid(bits, signed, zero_point)
    v = _clamp_unit(x / alpha, lower) * n
    return round_ste(v) * (alpha / n)


def noise_fake_quant(
    x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, noise: Tensor, zero_point: Optional[Tensor] = None
) -> Tensor:
    """The NIPQ noise proxy: clip to the range, then add ``noise * step`` inside it.

    ``noise`` holds samples in ``[-0.5, 0.5]`` (see `lightning_nipq.quant.noise`) and is
    treated as a constant. Gradients: to ``x`` 1 inside, 0 where clipped (no
    straight-through estimate is needed because nothing is rounded); to ``alpha`` ``+-1``
    where clipped and ``noise / n`` inside; to ``bits`` through the step ``alpha / n(bits)``,
    so the bit gradient measures how much the loss cares about one step of perturbation.
    With a ``zero_point`` the range is ``[-z * step, alpha]`` with ``step = alpha / (N - z)``,
    the range `hard_fake_quant` rounds onto.
    """
    _, n = code_grid(bits, signed, zero_point)
    step = alpha / n
    if zero_point is not None:
        lower = -zero_point * step
        clipped = torch.clamp(x, min=lower, max=alpha)
        inside = (x > lower) & (x < alpha)
    elif signed:
        lower = -alpha
        clipped = torch.clamp(x, min=lower, max=alpha)
        inside = (x > lower) & (x < alpha)
    else:
        clipped = torch.clamp(x, min=torch.zeros_like(alpha), max=alpha)
        inside = (x > 0) & (x < alpha)
    return clipped + inside.to(x.dtype) * noise.detach() * step


def rounding_error(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, zero_point: Optional[Tensor] = None) -> Tensor:
    """Normalised rounding error ``round(v) - v`` of the elements strictly inside the range."""
    lower, n = code_grid(bits, signed, zero_point)
    if isinstance(lower, Tensor):
        lower = lower.detach()
    v = (x / alpha).detach()
    v = v[(v > lower) & (v < 1.0)] * n.detach()
    return torch.round(v) - v
