"""The registry of quantizable layer kinds: the one table every other module reads.

Attaching, conversion, checkpoints, the artifact, the ONNX export and the report find a
layer's kind here and move it between forms through its `LayerKind`. To add a kind, write
its forms (a maths mixin, a fake-quantized and an integer class: see
`lightning_nipq.layers.torch_layers`) and add its entry to `LAYER_KINDS`; docs/design.md
walks through it.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_nipq.layers.forms import LayerKind
from lightning_nipq.layers.torch_layers import TORCH_LAYER_KINDS

LAYER_KINDS: tuple[LayerKind, ...] = (*TORCH_LAYER_KINDS,)
"""Every quantizable layer kind. A layer is of a kind only if its class is exactly one of the
kind's three classes: a subclass of ``nn.Linear`` may override ``forward``."""

_BY_CLASS: dict[type[nn.Module], LayerKind] = {
    cls: kind for kind in LAYER_KINDS for cls in (kind.float_type, kind.fake_quantized, kind.integer)
}
_BY_NAME: dict[str, LayerKind] = {kind.name: kind for kind in LAYER_KINDS}


def kind_of(layer: nn.Module) -> Optional[LayerKind]:
    """The kind of ``layer`` in any of its forms, or None if it is not a quantizable layer."""
    return _BY_CLASS.get(type(layer))


def kind_named(name: str) -> Optional[LayerKind]:
    """The kind whose float class is called ``name`` (as the artifact records it), or None."""
    return _BY_NAME.get(name)


def supported_names() -> str:
    """The float classes that can be quantized, for messages."""
    return ", ".join(kind.name for kind in LAYER_KINDS)


def describe_layer(layer: nn.Module) -> str:
    """``Linear``, ``Conv2d``, ``Conv2d(depthwise)``, ``Conv2d(groups=4)``... for the report."""
    kind = kind_of(layer)
    name = kind.name if kind is not None else type(layer).__name__
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        name += "(depthwise)" if groups == getattr(layer, "in_channels", 0) else f"(groups={groups})"
    return name
