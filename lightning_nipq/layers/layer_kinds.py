"""The registry of quantizable layer kinds: the one table every other module reads.

Attaching, conversion, checkpoints, the artifact, the ONNX export and the report find a
layer's kind here and move it between forms through its `LayerKind`. To add a kind, write
its forms (a maths mixin, a fake-quantized and an integer class: see
`lightning_nipq.layers.torch_layers`) and register its entry with `register_layer_kind`,
as the built-in kinds are; docs/design.md walks through it.

Kinds whose float class belongs to an optional package are registered lazily
(`LAZY_KINDS`): transformers' ``Conv1D`` (the GPT-2 family) is known by its module and class
name, and the module defining its forms (`lightning_nipq.layers.transformers_layers`) is
imported, and so transformers, and its kinds registered only when a model holds one, or an
artifact names the kind.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from torch import nn

from lightning_nipq.layers.forms import IntegerLayerMixin, LayerKind, QuantizedLayerMixin
from lightning_nipq.layers.learned_tensors import LEARNED_TENSOR_KIND
from lightning_nipq.layers.torch_layers import TORCH_LAYER_KINDS

LAYER_KINDS: list[LayerKind] = []
"""Every registered quantizable layer kind, in registration order (read it; add to it with
`register_layer_kind`). A layer is of a kind only if its class is exactly one of the kind's
three classes: a subclass of ``nn.Linear`` may override ``forward``."""

_BY_CLASS: dict[type[nn.Module], LayerKind] = {}
_BY_NAME: dict[str, LayerKind] = {}
#: The maths every form calls (see `lightning_nipq.layers.forms`).
_MATHS = ("apply_weight", "reduction_size")


@dataclass(frozen=True)
class LazyKind:
    """A kind registered on first use: its float class by module and name, and the module that registers it.

    The float class is recognised by ``module`` and ``qualname`` without importing anything,
    so that the package it belongs to is imported only for a model that holds such a layer.
    """

    name: str
    module: str
    qualname: str
    #: The lightning_nipq module defining the kind's forms (it imports ``module``), whose
    #: ``PROVIDED_KINDS`` are registered on first use.
    provider: str


LAZY_KINDS: tuple[LazyKind, ...] = (
    LazyKind("Conv1D", "transformers.pytorch_utils", "Conv1D", "lightning_nipq.layers.transformers_layers"),
)


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add a quantizable layer kind to the registry, so that every part of the package handles it; returns ``kind``.

    The built-in kinds are registered the same way. ``kind.fake_quantized`` must subclass
    `QuantizedLayerMixin` and ``kind.integer`` `IntegerLayerMixin`, both must subclass
    ``kind.float_type`` and provide the kind's maths (``apply_weight``, ``reduction_size``
    and, for a layer with a bias or per-channel ranges, ``per_output_channel``), and none of
    the three classes nor the kind's `LayerKind.name` (which the artifact records) may be
    registered already. See docs/design.md, "Adding a layer kind".

    Raises:
        ValueError: naming what does not fit; the registry is unchanged then.
    """
    if not isinstance(kind, LayerKind):
        raise ValueError(f"register_layer_kind takes a LayerKind, got {type(kind).__name__}")
    float_type = kind.float_type
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise ValueError(f"LayerKind.float_type must be an nn.Module class, got {float_type!r}")
    for label, form, mixin in (("fake_quantized", kind.fake_quantized, QuantizedLayerMixin), ("integer", kind.integer, IntegerLayerMixin)):
        if not (isinstance(form, type) and issubclass(form, float_type) and issubclass(form, mixin)):
            raise ValueError(
                f"LayerKind.{label} must be a class subclassing {mixin.__name__} and {float_type.__name__} "
                f"(class {label.title().replace('_', '')}{float_type.__name__}({mixin.__name__}, <maths>, {float_type.__name__})), "
                f"got {form!r}"
            )
        missing = [method for method in _MATHS if not callable(getattr(form, method, None))]
        if missing:
            raise ValueError(f"LayerKind.{label} {form.__name__} lacks the kind's maths: {', '.join(missing)}; give its maths mixin these methods")
    if not isinstance(kind.output_axis, int) or isinstance(kind.output_axis, bool) or kind.output_axis < 0:
        raise ValueError(f"LayerKind.output_axis must be a whole number >= 0 (an axis of the weight), got {kind.output_axis!r}")
    for cls in (float_type, kind.fake_quantized, kind.integer):
        if cls in _BY_CLASS:
            raise ValueError(
                f"{cls.__name__} already belongs to the registered kind {_BY_CLASS[cls].name!r}: a class has one kind "
                "(unregister_layer_kind first to replace it)"
            )
    if kind.name in _BY_NAME:
        raise ValueError(
            f"a kind named {kind.name!r} is registered already ({_BY_NAME[kind.name].float_type.__module__}."
            f"{_BY_NAME[kind.name].float_type.__qualname__}); the artifact records kinds by name, so give this one "
            "another with LayerKind(..., type_name='...')"
        )
    LAYER_KINDS.append(kind)
    _BY_NAME[kind.name] = kind
    for cls in (float_type, kind.fake_quantized, kind.integer):
        _BY_CLASS[cls] = kind
    return kind


def unregister_layer_kind(kind: LayerKind) -> None:
    """Take a kind registered with `register_layer_kind` out of the registry (for tests, or to replace one).

    Raises:
        ValueError: ``kind`` is not registered.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"the kind {getattr(kind, 'name', kind)!r} is not registered")
    LAYER_KINDS.remove(kind)
    del _BY_NAME[kind.name]
    for cls in (kind.float_type, kind.fake_quantized, kind.integer):
        _BY_CLASS.pop(cls, None)


_LAZY_BY_LOCATION: dict[tuple[str, str], LazyKind] = {(lazy.module, lazy.qualname): lazy for lazy in LAZY_KINDS}


def _load_lazy(lazy: LazyKind) -> None:
    """Import the module providing a lazy kind and register the kinds it provides (once).

    Raises:
        ImportError: the optional package is not installed.
    """
    provided = importlib.import_module(lazy.provider).PROVIDED_KINDS
    for kind in provided:
        if kind not in LAYER_KINDS:
            register_layer_kind(kind)


def kind_of(layer: nn.Module) -> Optional[LayerKind]:
    """The kind of ``layer`` in any of its forms, or None if it is not a quantizable layer."""
    cls = type(layer)
    kind = _BY_CLASS.get(cls)
    if kind is None:
        lazy = _LAZY_BY_LOCATION.get((cls.__module__, cls.__qualname__))
        if lazy is not None:
            # The layer's class is imported already, so importing the provider costs nothing more.
            _load_lazy(lazy)
            kind = _BY_CLASS.get(cls)
    return kind


def kind_named(name: str) -> Optional[LayerKind]:
    """The kind called ``name`` (as the artifact records it), or None.

    A lazily registered kind is registered now if its package can be imported (the artifact
    of a GPT-2 names ``Conv1D``); None if it cannot.
    """
    kind = _BY_NAME.get(name)
    if kind is None:
        lazy = next((lazy for lazy in LAZY_KINDS if lazy.name == name), None)
        if lazy is not None:
            try:
                _load_lazy(lazy)
            except ImportError:
                return None
            kind = _BY_NAME.get(name)
    return kind


def supported_names() -> str:
    """The layer kinds that can be quantized, for messages."""
    registered = [kind.name for kind in LAYER_KINDS]
    lazy = [f"{lazy.name} ({lazy.module.split('.')[0]})" for lazy in LAZY_KINDS if lazy.name not in _BY_NAME]
    return ", ".join(registered + lazy)


for _kind in (*TORCH_LAYER_KINDS, LEARNED_TENSOR_KIND):
    register_layer_kind(_kind)


def describe_layer(layer: nn.Module) -> str:
    """``Linear``, ``Conv2d``, ``Conv2d(depthwise)``, ``Conv2d(groups=4)``... for the report."""
    kind = kind_of(layer)
    name = kind.name if kind is not None else type(layer).__name__
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        name += "(depthwise)" if groups == getattr(layer, "in_channels", 0) else f"(groups={groups})"
    return name
