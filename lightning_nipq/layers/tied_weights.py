"""Tied weights: one weight held by several layers is quantized once, converted once, stored once.

Layers are tied when they hold the same weight: one ``nn.Parameter`` object, as GPT-2's
``lm_head.weight is transformer.wte.weight`` (equal values alone do not tie). Tied layers

* fake-quantized, share one weight quantizer (`LayerKind.quantize` with ``shared``): the
  weight's bits and ranges are learned once, and the budget counts its elements once;
* integer, share one ``weight_codes`` and one ``weight_scale`` tensor, and one `WeightTie`
  mark. The mark, not the tensors' identity, says that they are tied: ``model.to(device)``
  copies buffers module by module, so the copies would no longer be one tensor (the mark
  makes them one again, see `IntegerLayerMixin._apply`);
* are stored once in the artifact (an entry ``tied_to`` the layer holding the codes) and
  counted once in the report.

Each layer keeps what is its own: its bias, and its input quantizer or input settings (an
``nn.Embedding`` quantizes no input, the ``nn.Linear`` tied to it may).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_nipq.layers.forms import WEIGHT_TIE_ATTRIBUTE, is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import kind_of
from lightning_nipq.quant.granularity import Granularity


class WeightTie:
    """The mark shared by integer layers whose codes and steps are one tensor each; it holds no tensor itself.

    While a model is moved (``model.to``, ``model.half()``: torch converts each layer's
    buffers separately), it remembers the last conversion by weak reference so that the next
    tied layer takes the converted tensors instead of converting its own copy.
    """

    def __init__(self) -> None:
        self._last: Optional[tuple[Any, ...]] = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled and deep-copied as a fresh mark (copies keep their sharing through the memo);
        # the weak references of a move in progress mean nothing in the copy.
        return (WeightTie, ())

    def share(self, layer: nn.Module, before: tuple[Optional[Tensor], Optional[Tensor]]) -> None:
        """After torch converted ``layer``'s buffers (from ``before``): take an earlier tied layer's result of the same conversion."""
        codes, scale = layer._buffers.get("weight_codes"), layer._buffers.get("weight_scale")
        if codes is None or scale is None or before[0] is None or before[1] is None:
            return
        last = self._last
        if last is not None:
            old_codes, old_scale, new_codes, new_scale = (ref() for ref in last)
            if old_codes is before[0] and old_scale is before[1] and new_codes is not None and new_scale is not None:
                if new_codes.dtype == codes.dtype and new_codes.device == codes.device and new_scale.dtype == scale.dtype:
                    layer._buffers["weight_codes"], layer._buffers["weight_scale"] = new_codes, new_scale
                    return
        self._last = (weakref.ref(before[0]), weakref.ref(before[1]), weakref.ref(codes), weakref.ref(scale))


def weight_identity(layer: nn.Module) -> int:
    """What tied layers have in common: the weight Parameter (float, fake-quantized), the tie mark or the codes (integer)."""
    if is_integer(layer):
        tie = layer.__dict__.get(WEIGHT_TIE_ATTRIBUTE)
        return id(tie) if tie is not None else id(layer.weight_codes)
    return id(layer.weight)


def tied_groups(layers: Iterable[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """The groups of two or more of ``layers`` (quantizable layers, one form) that hold one weight, in the given order."""
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, layer in layers:
        groups.setdefault(weight_identity(layer), []).append((name, layer))
    return [group for group in groups.values() if len(group) > 1]


def check_tied_ranges(layers: Iterable[tuple[str, nn.Module]], granularity: Granularity) -> None:
    """Check that the tied ones among the float ``layers`` can share one weight quantizer at ``granularity``.

    Raises:
        ValueError: two layers holding one weight would have ranges of different shapes
            (their kinds lay the weight out differently), naming them and the fix.
    """
    for group in tied_groups(layers):
        shapes = {}
        for name, layer in group:
            kind = kind_of(layer)
            assert kind is not None  # only quantizable layers are grouped
            shapes[name] = tuple(kind.layer_range_shape(layer, granularity))
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise ValueError(
                f"layers {', '.join(shapes)} share one weight, which is quantized once, but their ranges at "
                f"weight_granularity={granularity!r} differ ({listed}); use weight_granularity='tensor', or leave all "
                "but one of them out with exclude"
            )


def _same_weight(first: nn.Module, other: nn.Module) -> bool:
    """Whether two integer layers hold equal codes and steps at equal bits and granularity."""
    if (first.weight_bits, first.weight_granularity) != (other.weight_bits, other.weight_granularity):
        return False
    a, b = first.weight_codes, other.weight_codes
    if a is b and first.weight_scale is other.weight_scale:
        return True
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and first.weight_scale.shape == other.weight_scale.shape
        and bool(torch.equal(a, b.to(a.device)))
        and bool(torch.equal(first.weight_scale, other.weight_scale.to(first.weight_scale.device)))
    )


def tie_integer_layers(layers: Sequence[nn.Module], check: bool = True) -> None:
    """Make integer layers converted from one weight share the first one's codes and steps, and one `WeightTie` mark.

    ``check=False`` skips the comparison of their values, for layers about to be loaded with
    one saved weight (their shapes must still agree).

    Raises:
        ValueError: the layers' codes, steps, bits or granularity differ (they were not
            converted from one weight quantizer); nothing is changed then.
    """
    if len(layers) < 2:
        return
    first = layers[0]
    if not all(is_integer(layer) for layer in layers):
        raise ValueError("only integer layers can share codes")
    if check:
        different = [index for index, layer in enumerate(layers[1:], 1) if not _same_weight(first, layer)]
    else:
        different = [index for index, layer in enumerate(layers[1:], 1) if layer.weight_codes.shape != first.weight_codes.shape]
    if different:
        raise ValueError(
            f"layers {different} of a tied group hold other codes, steps, bits or granularity than the first one; "
            "tied layers are converted from one weight quantizer"
        )
    tie = first.__dict__.get(WEIGHT_TIE_ATTRIBUTE) or WeightTie()
    for layer in layers:
        if layer is not first:
            layer.register_buffer("weight_codes", first.weight_codes)
            layer.register_buffer("weight_scale", first.weight_scale)
        layer.__dict__[WEIGHT_TIE_ATTRIBUTE] = tie


def integer_ties(layers: Iterable[tuple[str, nn.Module]]) -> dict[int, str]:
    """``id(layer) -> name`` of the earlier layer whose codes a tied integer layer shares, for each tied one.

    Tied means: the same `WeightTie` mark (or the very same codes tensor), and equal codes,
    steps, bits and granularity; a mark whose layers no longer agree (one was changed alone)
    ties nothing, so nothing is ever stored or counted once that is not one weight.
    """
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    tied: dict[int, str] = {}
    for name, layer in layers:
        if not is_integer(layer):
            continue
        candidates = owners.setdefault(weight_identity(layer), [])
        owner = next((owner_name for owner_name, first in candidates if _same_weight(first, layer)), None)
        if owner is None:
            candidates.append((name, layer))
        else:
            tied[id(layer)] = owner
    return tied


def share_weight_parameters(groups: Iterable[Sequence[nn.Module]]) -> None:
    """Give every float layer of each group the first one's weight Parameter (the tie of a float model)."""
    for group in groups:
        first = group[0]
        for layer in group[1:]:
            if not (is_quantized(layer) or is_integer(layer)):
                layer.weight = first.weight
