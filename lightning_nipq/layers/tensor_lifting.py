"""Lifting learned tensors into `lightning_nipq.layers.learned_tensors.LearnedTensor` layers, and back.

See that module for why. The lifted module's class is swapped in place for a cached subclass
(same name and module) whose attribute of each lifted name is a property calling the layer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

from torch import Tensor, nn

from lightning_nipq.layers.forms import is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import LAYER_KINDS, kind_of
from lightning_nipq.layers.learned_tensors import LearnedTensor

#: The attribute of a swapped class naming the lifted tensors, and its original class.
LIFTED_ATTRIBUTE = "_lifted_tensors"
BASE_ATTRIBUTE = "_lifted_base"


def _never_lifted(module: nn.Module) -> bool:
    # A layer of a registered kind, or a subclass of one (it may override forward, so it stays
    # float and is reported as such), a recurrent layer or an attention whose kernels read
    # their parameters directly, and the package's own modules.
    return (
        kind_of(module) is not None
        or isinstance(module, tuple(kind.float_type for kind in LAYER_KINDS))
        or isinstance(module, (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention))
        or type(module).__module__.startswith("lightning_nipq.")
    )


def liftable_tensors(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` of every learned tensor `lift_learned_tensors` can lift, in registration order.

    A parameter shared by several modules (or reached under several names) is listed once.
    """
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if not name or _never_lifted(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                found.append((name, pname))
    return found


def lifted_name(module_name: str, parameter: str) -> str:
    """The layer name of a lifted tensor: the parameter's own dotted name."""
    return f"{module_name}.{parameter}" if module_name else parameter


_SWAPPED: dict[tuple[type, tuple[str, ...]], type] = {}


def _reader(name: str, key: Optional[str] = None) -> property:
    child = key or name

    def read(self: nn.Module) -> Tensor:
        return self._modules[child]()

    return property(read, doc=f"The lifted learned tensor {name!r}, as its layer gives it (fake-quantized, integer or float).")


def _swapped_class(base: type, names: tuple[str, ...]) -> type:
    key = (base, names)
    if key not in _SWAPPED:
        attributes: dict[str, Any] = {name: _reader(name) for name in names}
        attributes.update({LIFTED_ATTRIBUTE: names, BASE_ATTRIBUTE: base, "__module__": base.__module__, "__qualname__": base.__qualname__})
        _SWAPPED[key] = type(base.__name__, (base,), attributes)
    return _SWAPPED[key]


def _lift_into(module: nn.Module, names: Iterable[str]) -> None:
    base = getattr(type(module), BASE_ATTRIBUTE, type(module))
    held = tuple(getattr(type(module), LIFTED_ATTRIBUTE, ()))
    for name in names:
        parameter = module._parameters.pop(name)
        assert parameter is not None
        module._modules[name] = LearnedTensor(parameter)
        held += (name,)
    module.__class__ = _swapped_class(base, tuple(sorted(set(held))))


def lift_learned_tensors_undoably(model: nn.Module, targets: Iterable[tuple[str, str]]) -> Callable[[], None]:
    """Lift each ``(module name, parameter name)`` into a `LearnedTensor`; returns a function that puts them back.

    Lifting a parameter that is lifted already does nothing. A parameter held by several
    modules is lifted in each into layers sharing one ``nn.Parameter``: tied layers.
    """
    by_module: dict[str, list[str]] = {}
    for module_name, pname in targets:
        module = model.get_submodule(module_name)
        if pname in module._parameters and module._parameters[pname] is not None:
            by_module.setdefault(module_name, []).append(pname)
    # Every module holding one of these Parameters under any name gets it lifted too, so that the tie stays.
    wanted = {id(model.get_submodule(m)._parameters[p]) for m, ps in by_module.items() for p in ps}
    lifts: list[tuple[nn.Module, list[str]]] = []
    done: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        if id(module) in done:
            continue
        names = [pname for pname, p in module._parameters.items() if p is not None and id(p) in wanted]
        if names:
            done.add(id(module))
            lifts.append((module, names))
    # The Parameters themselves are kept: whatever form their layers reach, undo puts them back untouched.
    before = [(module, type(module), {name: module._parameters[name] for name in names}) for module, names in lifts]
    for module, names in lifts:
        _lift_into(module, names)

    def undo() -> None:
        for module, cls, parameters in reversed(before):
            for name, parameter in parameters.items():
                module._modules.pop(name, None)
                module._parameters[name] = parameter
            module.__class__ = cls

    return undo


def lower_learned_tensors(model: nn.Module) -> list[str]:
    """Put every lifted tensor whose layer is float back into its module as a plain parameter; returns their names.

    Call it after turning the layers float (`lightning_nipq.layers.detach_quantizers` does): a
    fake-quantized or integer layer stays lifted.
    """
    lowered = []
    for name, module in list(model.named_modules()):
        names = getattr(type(module), LIFTED_ATTRIBUTE, None)
        if not names:
            continue
        remaining = []
        for pname in names:
            layer = module._modules.get(pname)
            if isinstance(layer, LearnedTensor) and not (is_quantized(layer) or is_integer(layer)):
                module._modules.pop(pname)
                module._parameters[pname] = layer.weight
                lowered.append(lifted_name(name, pname))
            else:
                remaining.append(pname)
        base = getattr(type(module), BASE_ATTRIBUTE)
        module.__class__ = _swapped_class(base, tuple(remaining)) if remaining else base
    return lowered


def lifted_in_state(model: nn.Module, keys: Iterable[str]) -> list[tuple[str, str]]:
    """The learned tensors of ``model`` that a state dict (or artifact) with ``keys`` holds lifted (keys under ``<tensor>.``)."""
    keys = list(keys)
    found = []
    for module_name, pname in liftable_tensors(model):
        prefix = lifted_name(module_name, pname) + "."
        if any(k.startswith(prefix) for k in keys):
            found.append((module_name, pname))
    return found


#: The suffix of a lifted layer's name while the model is traced (`traceable_lifted_tensors`).
TRACED_SUFFIX = "_layer"
_TRACEABLE: dict[type, type] = {}


@contextlib.contextmanager
def traceable_lifted_tensors(model: nn.Module) -> Iterator[None]:
    """Within it, each lifted layer is the child ``<tensor>_layer`` of its module, and the property reads it there.

    torch.export reaches every buffer by ``getattr`` along its name; under the tensor's own
    name the property would answer with the tensor rather than the layer holding the buffer.
    The module keeps its class's name and its forward; everything is put back afterwards.
    """
    swapped = []
    try:
        for module in model.modules():
            names = getattr(type(module), LIFTED_ATTRIBUTE, None)
            if not names:
                continue
            cls = type(module)
            if cls not in _TRACEABLE:
                attributes: dict[str, Any] = {n: _reader(n, n + TRACED_SUFFIX) for n in names}
                attributes.update({"__module__": cls.__module__, "__qualname__": cls.__qualname__})
                _TRACEABLE[cls] = type(cls.__name__, (cls,), attributes)
            children = dict(module._modules)
            swapped.append((module, cls, children))
            module._modules.clear()
            module._modules.update({(k + TRACED_SUFFIX if k in names else k): v for k, v in children.items()})
            module.__class__ = _TRACEABLE[cls]
        yield
    finally:
        for module, cls, children in swapped:
            module._modules.clear()
            module._modules.update(children)
            module.__class__ = cls
