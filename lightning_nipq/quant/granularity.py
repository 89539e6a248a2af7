"""How many ranges a weight has: one for the tensor, one per output channel, or one per group of inputs.

A quantizer's range (``alpha``, and everything derived from it: the step, the scale of the
integer codes) is a tensor of the quantizer's *range shape*, which broadcasts against the
tensor it quantizes seen through `grouped_view`:

* ``"tensor"``: shape ``()``, one range;
* ``"channel"``: the weight's shape with every axis but the output-channel axis set to 1,
  for example ``(C_out, 1, 1, 1)`` for a ``Conv2d`` and ``(1, C_out, 1, 1)`` for a
  transposed convolution, whose weight is ``(C_in, C_out / groups, k, k)``;
* an integer ``g``: ranges per group of ``g`` consecutive input elements of each output
  channel, for weights of shape ``(C_out, K)``; the weight is seen as ``(C_out, K / g, g)``
  and the range shape is ``(C_out, K / g, 1)``.

Bits stay one per quantizer whatever the granularity: the budget counts elements, and the
extra ranges are counted as stored scales by the artifact and the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

from torch import Tensor

Granularity = Union[str, int]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel")
RangeShape = tuple[int, ...]


def granularity_rule() -> str:
    """What `check_granularity` accepts, for messages."""
    return "'tensor', 'channel', or a group size (a whole number >= 1 that divides each layer's input size)"


def is_group_size(granularity: Any) -> bool:
    """Whether ``granularity`` names groups (a whole number, not a bool)."""
    return isinstance(granularity, int) and not isinstance(granularity, bool)


def check_granularity(name: str, value: Any) -> Granularity:
    """``value`` if it is a granularity, else a `ValueError` naming ``name`` and what it may be."""
    if is_group_size(value):
        if value < 1:
            raise ValueError(f"{name} must be {granularity_rule()}; got {value}. Use 'channel' for one range per output channel")
        return int(value)
    if value not in GRANULARITIES:
        raise ValueError(f"{name} must be {granularity_rule()}, got {value!r}")
    return str(value)


def check_range_shape(granularity: Granularity, shape: Any) -> RangeShape:
    """``shape`` as a tuple if it is a range shape ``granularity`` can have, else a `ValueError`."""
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)) or not all(
        is_group_size(d) and d >= 1 for d in shape
    ):
        raise ValueError(f"range_shape must be a sequence of whole numbers >= 1, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if granularity == "tensor" and shape != ():
        raise ValueError(f"a per-tensor range has range_shape (), got {shape}")
    if granularity == "channel" and (not shape or sum(d > 1 for d in shape) > 1):
        raise ValueError(f"a per-channel range varies along one axis, got range_shape {shape}")
    if is_group_size(granularity) and (len(shape) != 3 or shape[2] != 1):
        raise ValueError(f"ranges per group have range_shape (channels, groups, 1), got {shape}")
    return shape


def range_shape_for(
    weight_shape: Sequence[int], granularity: Granularity, output_axis: int = 0, groupable: bool = True
) -> RangeShape:
    """The range shape of a weight of ``weight_shape`` at ``granularity``.

    ``output_axis`` is the weight's output-channel axis; ``groupable`` says whether the layer
    kind's weight is ``(C_out, K)`` with ``K`` the inputs summed into one output.

    Raises:
        ValueError: the granularity does not fit the weight (a group size that does not
            divide ``K``, groups on a layer kind that cannot have them), naming
            ``weight_granularity`` and the fix.
    """
    granularity = check_granularity("weight_granularity", granularity)
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return tuple(d if axis == output_axis else 1 for axis, d in enumerate(weight_shape))
    if not groupable or len(weight_shape) != 2:
        raise ValueError(
            f"weight_granularity={granularity} (ranges per group of inputs) needs a linear-like layer whose weight "
            f"is (outputs, inputs); this weight is {tuple(weight_shape)}. Use weight_granularity='channel' for it, "
            "or leave the layer out with exclude"
        )
    outputs, inputs = weight_shape
    if inputs % granularity:
        raise ValueError(
            f"weight_granularity={granularity} does not divide this layer's {inputs} inputs; pick a group size that "
            f"divides every quantized layer's input size (a divisor of {inputs}, such as {math.gcd(inputs, granularity)}), "
            "or use 'channel'"
        )
    return (outputs, inputs // granularity, 1)


def grouped_view(x: Tensor, granularity: Granularity) -> Tensor:
    """``x`` seen so that a range of `range_shape_for` broadcasts against it (groups split off the last axis)."""
    if is_group_size(granularity):
        return x.reshape(x.shape[0], -1, int(granularity))
    return x


def range_rows(x: Tensor, range_shape: RangeShape) -> Tensor:
    """The elements of ``x`` (already a `grouped_view`) as one row per range: shape ``(ranges, elements per range)``.

    The axes along which the range varies come first, so row ``i`` is range ``i`` of the
    range tensor read in order.
    """
    if not range_shape:
        return x.reshape(1, -1)
    kept = [axis for axis, d in enumerate(range_shape) if d == x.shape[axis] and d > 1]
    rest = [axis for axis in range(x.dim()) if axis not in kept]
    ranges = math.prod(range_shape)
    return x.permute(*kept, *rest).reshape(ranges, -1)


def ranges_from_rows(values: Tensor, range_shape: RangeShape) -> Tensor:
    """One value per row of `range_rows` laid out in ``range_shape``."""
    return values.reshape(range_shape)


def granularity_name(granularity: Granularity) -> str:
    """``tensor``, ``channel`` or ``group of 32``, for reports and messages."""
    return f"group of {granularity}" if is_group_size(granularity) else str(granularity)
