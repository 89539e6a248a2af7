"""Wrapping a LightningModule's own methods, and finding a callback among the Trainer's.

Lightning offers no hook that returns a new loss, and it calls ``training_step`` and
``on_save_checkpoint``/``on_load_checkpoint`` through the module's attributes (the strategy
calls ``training_step`` inside the DDP wrapper, before AMP and accumulation scaling), so an
instance-level wrapper acts exactly as code the user wrote. Whatever instance attribute was
there before (another callback's wrapper, the compiled ``training_step`` Lightning puts there
for ``trainer.fit(torch.compile(model))``) is wrapped in turn and put back on removal.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_nipq.saving.checkpoint import NIPQCheckpointMixin, prepare_for_checkpoint, seal_manifest

CallbackT = TypeVar("CallbackT", bound=Callback)
_ABSENT = object()


def wrap_method(
    module: LightningModule, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[[], None]:
    """Set ``module.<name>`` to ``make_wrapper(current method)`` on the instance; returns the undo.

    The undo puts back exactly what the instance held before (its own attribute, or none), and
    only while the wrapper is still in place, so undoing in any order never removes another's.
    """
    previous = vars(module).get(name, _ABSENT)
    original = getattr(module, name)
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(module, name, wrapper)

    def undo() -> None:
        if vars(module).get(name) is wrapper:
            if previous is _ABSENT:
                delattr(module, name)
            else:
                setattr(module, name, previous)

    return undo


def keep_logging_eager(pl_module: LightningModule) -> Optional[Callable[[], None]]:
    """Run ``self.log`` eagerly in a module Lightning compiled (``trainer.fit(torch.compile(model))``); returns the undo.

    Lightning compiles ``training_step``, and ``self.log`` there inspects the compiled method's
    signature. Dynamo from torch 2.12 traces that inspection and fails ("'method' object has no
    attribute '__dict__'", Lightning issue 21836), which Lightning 2.6.6 and earlier do not
    avoid. Logging is bookkeeping outside the graph either way; this does for the instance
    what Lightning's fix does for the class. None where the module is not compiled.
    """
    if getattr(pl_module, "_compiler_ctx", None) is None:
        return None
    return wrap_method(pl_module, "log", torch.compiler.disable)


def install_load_hook(pl_module: LightningModule) -> Optional[Callable[[], None]]:
    """Make a Trainer restore rebuild the quantized structure a checkpoint holds before loading it.

    Lightning calls the module's ``on_load_checkpoint`` right before it loads the state dict, so
    the callbacks serve modules without `lightning_nipq.NIPQCheckpointMixin`. Returns the undo,
    or None if nothing was needed (the mixin, or another callback's hook, is already there).
    """
    if isinstance(pl_module, NIPQCheckpointMixin) or "on_load_checkpoint" in vars(pl_module):
        return None

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            prepare_for_checkpoint(pl_module, checkpoint)
            original(checkpoint)

        return on_load_checkpoint

    return wrap_method(pl_module, "on_load_checkpoint", make)


def seal_when_saved(pl_module: LightningModule) -> None:
    """Seal this checkpoint's manifest (its state digest) at the end of the save under way.

    Called from a callback's ``on_save_checkpoint``. Lightning calls the module's own
    ``on_save_checkpoint`` after every callback's, so a wrapper put on it here for this one
    save seals the state dict as it is finally written, even when a callback after ours
    replaces it (weight averaging, pruning). The wrapper takes itself off as it runs.
    """
    if _pending_seal(pl_module) is not None:
        return  # another callback of ours asked already

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            undo()
            original(checkpoint)
            seal_manifest(checkpoint)

        return on_save_checkpoint

    undo = wrap_method(pl_module, "on_save_checkpoint", make)
    vars(pl_module)["on_save_checkpoint"].remove_nipq_seal = undo


def _pending_seal(pl_module: LightningModule) -> Optional[Callable[[], None]]:
    return getattr(vars(pl_module).get("on_save_checkpoint"), "remove_nipq_seal", None)


def remove_pending_seal(pl_module: LightningModule) -> None:
    """Take off a seal wrapper a save that failed part-way left behind (the module must stay picklable)."""
    undo = _pending_seal(pl_module)
    if undo is not None:
        undo()


def find_callback(trainer: Trainer, cls: type[CallbackT]) -> Optional[CallbackT]:
    """The first of the Trainer's callbacks that is a ``cls``, or None."""
    return next((c for c in trainer.callbacks if isinstance(c, cls)), None)  # type: ignore[attr-defined]
