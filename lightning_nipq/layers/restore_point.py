"""Putting a model back as it was when a change to it fails part-way: all of a change or none of it."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Callable

import torch
from torch import Tensor, nn


def restore_point(model: nn.Module, overwritten: Iterable[str] = ()) -> Callable[[], None]:
    """A function that puts ``model`` back as it is now, after a change to it failed part-way.

    Changing a layer's form changes its class and attributes, and registers or deletes
    parameters, buffers and submodules; loading a state dict copies into the model's own
    tensors. Every module's class and attribute dict, and the dicts and sets inside it
    (parameters, buffers, submodules, hooks), are copied shallowly, which costs pointers;
    only the tensors at the ``overwritten`` state-dict keys are cloned.
    """
    modules = []
    for module in model.modules():
        attributes = dict(module.__dict__)
        containers = [(v, copy.copy(v)) for v in attributes.values() if isinstance(v, (dict, set))]
        modules.append((module, type(module), attributes, containers))
    keys = list(overwritten)
    state = model.state_dict(keep_vars=True) if keys else {}
    values = [(state[key], state[key].detach().clone()) for key in keys if isinstance(state.get(key), Tensor)]

    def restore() -> None:
        for module, cls, attributes, containers in modules:
            for container, saved in containers:
                # The same container objects, refilled: other references to them see the old content too.
                container.clear()
                container.update(saved)
            module.__dict__.clear()
            module.__dict__.update(attributes)
            module.__class__ = cls
        with torch.no_grad():
            for tensor, saved in values:
                tensor.copy_(saved)

    return restore
