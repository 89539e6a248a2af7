"""The integer code grid: which bit-widths exist, and how many levels each one has.

Every other module asks this one. Signed codes are symmetric, ``[-n, n]`` with
``n = 2**(b-1) - 1``, so that zero is exact and no zero point is needed (at the cost of
one of the ``2**b`` levels); unsigned codes are ``[0, 2**b - 1]``.
"""

from __future__ import annotations

from typing import Any, Union, overload

import torch
from torch import Tensor

MIN_BITS = 1
"""Fewest bits of any code."""
MIN_SIGNED_BITS = 2
"""Fewest bits of signed codes: symmetric codes at 1 bit would hold only zero."""
MAX_BITS = 16
"""Widest codes: the integer layers accumulate exactly in float64 (up to ``2**53``), and ONNX's
QuantizeLinear holds at most 16-bit integers."""


@overload
def num_levels(bits: int, signed: bool) -> int: ...


@overload
def num_levels(bits: Tensor, signed: bool) -> Tensor: ...


@overload
def num_levels(bits: Tensor, signed: Tensor) -> Tensor: ...


def num_levels(bits: Union[int, Tensor], signed: Union[bool, Tensor]) -> Union[int, Tensor]:
    """Largest integer code ``n``: codes lie in ``[-n, n]`` (signed) or ``[0, n]`` (unsigned).

    ``bits`` is a Python integer (the answer is exact) or a tensor (the answer is a float
    tensor, differentiable in continuous bits). With a tensor of bits, ``signed`` may be a
    boolean tensor too, one flag per element (many quantizers' bits at once).
    """
    if isinstance(signed, Tensor):
        return torch.pow(2.0, bits - signed.to(bits.dtype)) - 1.0  # type: ignore[union-attr]
    if isinstance(bits, Tensor):
        return torch.pow(2.0, bits - 1.0) - 1.0 if signed else torch.pow(2.0, bits) - 1.0
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def lowest_bits(signed: bool) -> int:
    """The fewest bits codes of this signedness can have."""
    return MIN_SIGNED_BITS if signed else MIN_BITS


def is_bit_width(value: Any, signed: bool = False) -> bool:
    """Whether ``value`` is a whole bit-width (not a bool) that codes of this signedness can have."""
    return isinstance(value, int) and not isinstance(value, bool) and lowest_bits(signed) <= value <= MAX_BITS


def bit_width_rule(signed: bool = False) -> str:
    """What `is_bit_width` asks, in words, for messages."""
    why = " (signed codes need at least 2 bits)" if signed else ""
    return f"a whole number in [{lowest_bits(signed)}, {MAX_BITS}]{why}"


def check_bit_width(name: str, value: Any, signed: bool = False) -> int:
    """``value`` as an ``int`` if `is_bit_width`, else a `ValueError` naming ``name`` and the allowed range."""
    if not is_bit_width(value, signed):
        raise ValueError(f"{name} must be {bit_width_rule(signed)}, got {value!r}")
    return int(value)


def code_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer type that holds codes of ``bits`` bits."""
    return torch.int8 if bits <= 8 else torch.int16


# ---------------------------------------------------------------------- zero points
#: What calibration may do about an input's zero point (the ``input_zero_point`` argument):
#: ``"off"`` keeps symmetric signed or unsigned codes; ``"auto"`` gives a zero point to an
#: input whose negative side is small against its positive one (the rule is
#: `lightning_nipq.quant.observers.wants_zero_point`).
ZERO_POINT_RULES: tuple[str, ...] = ("off", "auto")
MAX_NEGATIVE_SHARE = 0.5
"""Largest share of a zero-point range below zero: a range more negative than positive is no
longer the case a zero point pays for (symmetric signed codes serve it)."""


def check_zero_point_rule(name: str, value: Any) -> str:
    """``value`` if it is one of `ZERO_POINT_RULES`, else a `ValueError` naming ``name`` and the allowed values."""
    if not isinstance(value, str) or value not in ZERO_POINT_RULES:
        raise ValueError(
            f"{name} must be 'off' (symmetric signed or unsigned input codes) or 'auto' (a zero point for inputs whose "
            f"negative side is small, such as GELU or SiLU outputs), got {value!r}"
        )
    return value


def check_negative_share(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in ``[0, MAX_NEGATIVE_SHARE]``, else a `ValueError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_NEGATIVE_SHARE:
        raise ValueError(
            f"{name} (the share of an input's range below zero, which sets its zero point) must be a number in "
            f"[0, {MAX_NEGATIVE_SHARE}], got {value!r}"
        )
    return float(value)
