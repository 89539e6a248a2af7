"""Module names that do not depend on which submodules are wrapped in ``torch.compile``.

``torch.compile(module)`` returns an ``OptimizedModule`` holding the original module as
``_orig_mod``, so a submodule compiled in place (``self.net = torch.compile(self.net)``)
shows up in ``named_modules()`` and ``state_dict()`` with an extra ``_orig_mod.`` segment:
``net._orig_mod.fc1.weight`` instead of ``net.fc1.weight``. The canonical name of a module
or state-dict key leaves every ``_orig_mod`` segment out, so that the same layer has the same
name in the compiled and the plain model; saved files use canonical names, and loading maps
them back onto the names of the model at hand (`model_keys`).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

#: The attribute under which torch's ``OptimizedModule`` holds the module it compiles.
COMPILED_SEGMENT = "_orig_mod"


def canonical_name(name: str) -> str:
    """``name`` (a module name or state-dict key) with every ``_orig_mod`` segment left out."""
    if COMPILED_SEGMENT not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILED_SEGMENT)


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile`` wraps a module in."""
    # No module can be one unless torch._dynamo was imported: do not import it (slow) to ask.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    return wrapper is not None and isinstance(module, wrapper)


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (through any number of wrappers), or ``module`` itself."""
    while is_compile_wrapper(module):
        module = getattr(module, COMPILED_SEGMENT)
    return module


def canonical_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``canonical name -> module`` for every module of ``model`` under every name, compile wrappers left out.

    A compiled submodule is listed under the wrapper's name (``net``), as the module it
    compiles: the one that holds the layers and the state.
    """
    return {canonical_name(name): module for name, module in model.named_modules(remove_duplicate=False) if not is_compile_wrapper(module)}


def model_names(model: nn.Module) -> dict[str, str]:
    """``canonical name -> the name the module has in model`` (the compiled module's, ``net._orig_mod``, for a compiled one)."""
    return {canonical_name(name): name for name, module in model.named_modules(remove_duplicate=False) if not is_compile_wrapper(module)}


def model_key(names: Mapping[str, str], key: str) -> str:
    """The state-dict ``key`` or module name (named in any model, compiled or not) as ``model`` names it; ``names`` is `model_names`.

    The longest module name of the key that the model has is replaced by the model's own name
    for it, so a key under a layer the model does not have yet (a quantizer, a projection of an
    attention module still whole) is placed under the model's name for its nearest module.
    """
    parts = canonical_name(key).split(".")
    for end in range(len(parts), -1, -1):
        actual: Optional[str] = names.get(".".join(parts[:end]))
        if actual is not None:
            rest = ".".join(parts[end:])
            return f"{actual}.{rest}" if actual and rest else actual or rest
    return ".".join(parts)


def model_keys(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a state dict saved from ``model``'s architecture, compiled or not) with its keys as ``model`` names them.

    Keys that are not strings are kept as they are, for ``load_state_dict`` to report; the
    ``_metadata`` torch keeps on a state dict (versions by module name) is translated too.

    Raises:
        ValueError: two keys of ``state`` name the same entry (one with ``_orig_mod.``, one without).
    """
    names = model_names(model)
    translated: dict[Any, Any] = {}
    origin: dict[Any, Any] = {}
    for key, value in state.items():
        new = model_key(names, key) if isinstance(key, str) else key
        if new in translated:
            raise ValueError(
                f"the state dict holds {origin[new]!r} and {key!r}: one entry under two names (with and without "
                f"{COMPILED_SEGMENT!r}, the segment torch.compile adds)"
            )
        translated[new], origin[new] = value, key
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, Mapping):
        translated = OrderedDict(translated)
        translated._metadata = OrderedDict(  # type: ignore[attr-defined]
            (model_key(names, name) if isinstance(name, str) else name, value) for name, value in metadata.items()
        )
    return translated
