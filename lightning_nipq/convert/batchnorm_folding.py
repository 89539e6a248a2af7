"""Which BatchNorm directly follows which quantized layer, seen on one batch, and folding it into the integer layer.

A BatchNorm folds into a layer only where that is provably the same computation: the
BatchNorm's every input is the layer's output, and that output feeds nothing else (no
residual, no ``view``, no return from the model). Both are seen by running the model once,
in eval mode and without gradients, on one real batch:

* a forward hook on every quantized layer notes each output tensor it returns;
* a forward pre-hook on every BatchNorm notes which of those tensors it receives;
* a ``torch.overrides.TorchFunctionMode`` counts every other torch call (functions, tensor
  methods, operators) that takes one of those tensors outside a BatchNorm's own forward,
  except pure metadata reads (``shape``, ``dim()``...); a tensor the model returns counts too.

This needs no tracing, so it works for any forward (keyword arguments, data-dependent
control flow, Hugging Face models), but it sees only what that forward did on that batch:
a model whose data flow changes with the input may differ on other batches (the comparison
of `lightning_nipq.convert_and_compare` then shows it), and a layer output that leaves the
model without any torch call (stored on ``self`` and read after the forward) is not seen.
Without a batch nothing can be seen, and nothing is folded: the functions that fold ask
for one.

Only exact ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` modules that keep running
statistics and carry no hooks of their own fold; the BatchNorm must normalise the layer's
output channels (dimension 1 of the output). Folding uses the running statistics, as eval
mode does: the folded model computes the eval-mode model.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_nipq.layers.folded_batchnorm import (
    FOLDABLE_TYPES,
    FoldedBatchNorm,
    FoldProblem,
    fold_into,
    output_channels,
    replace_everywhere,
)
from lightning_nipq.layers.forms import is_integer, is_quantized
from lightning_nipq.layers.model_calls import InputFn, call_model
from lightning_nipq.layers.model_walk import named_layers
from lightning_nipq.layers.restore_point import restore_point

#: Torch calls that read a tensor's metadata only: a layer output passed to them is not used.
_METADATA = frozenset(
    {
        Tensor.shape.__get__,  # type: ignore[attr-defined]
        Tensor.dtype.__get__,  # type: ignore[attr-defined]
        Tensor.device.__get__,  # type: ignore[attr-defined]
        Tensor.ndim.__get__,  # type: ignore[attr-defined]
        Tensor.dim,
        Tensor.size,
        Tensor.numel,
        Tensor.is_floating_point,
    }
)


@dataclass
class _Output:
    """One tensor a quantized layer returned during the pass, and what took it."""

    layer: str
    tensor: "weakref.ref[Tensor]"
    #: Whether the layer's output channels are dimension 1 of this output (what a BatchNorm normalises).
    channels_at_dim_1: bool
    #: Torch calls that took it outside a BatchNorm's forward, plus 1 if the model returned it.
    other_uses: int = 0
    #: The BatchNorms that received it, once per call.
    batchnorms: list[str] = field(default_factory=list)


class _Recorder(TorchFunctionMode):
    """Counts the torch calls that take a recorded layer output, outside the BatchNorms' own forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[int, _Output] = {}
        self.batchnorm_depth = 0

    def find(self, value: Any) -> Optional[_Output]:
        """The record of ``value`` if it is a recorded layer output still alive (ids of dead tensors get reused)."""
        if not isinstance(value, Tensor):
            return None
        record = self.outputs.get(id(value))
        return record if record is not None and record.tensor() is value else None

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.batchnorm_depth == 0 and func not in _METADATA:
            for value in _tensors((args, kwargs)):
                record = self.find(value)
                if record is not None:
                    record.other_uses += 1
        return func(*args, **kwargs)


def _tensors(value: Any, depth: int = 0) -> Iterator[Tensor]:
    """Every tensor inside nested tuples, lists and dicts (as torch calls and model outputs hold them)."""
    if isinstance(value, Tensor):
        yield value
    elif depth < 32 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 32 and isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item, depth + 1)


def _channels_at_dim_1(layer: nn.Module, output: Tensor) -> bool:
    # per_output_channel shapes a vector to broadcast against the output from the right: its
    # length says which dimension of the output holds the channels. A kind without it (an
    # embedding: a lookup, no channel-wise output scale) never takes a BatchNorm's fold.
    if not hasattr(layer, "per_output_channel"):
        return False
    shaped = layer.per_output_channel(torch.ones(output_channels(layer)))  # type: ignore[operator]
    return output.dim() - shaped.dim() == 1 and output.shape[1] == shaped.shape[0]


def check_fold_batchnorm(value: Any) -> bool:
    """``value`` if it is True or False, else a `ValueError` saying what ``fold_batchnorm`` takes."""
    if not isinstance(value, bool):
        raise ValueError(
            f"fold_batchnorm must be True (fold each BatchNorm that directly follows a quantized layer into it) "
            f"or False, got {value!r}"
        )
    return value


@dataclass
class FoldPlan:
    """What one pass found: ``(BatchNorm name, layer name)`` pairs to fold, and ``(BatchNorm name, why not)`` for the rest."""

    pairs: list[tuple[str, str]]
    kept: list[tuple[str, str]]


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


@torch.no_grad()
def find_foldable_batchnorms(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> FoldPlan:
    """Run ``model`` once on ``batch`` (eval mode, no gradients) and find each BatchNorm that directly follows a quantized layer.

    Works on fake-quantized and integer layers alike, and changes nothing (the training
    mode is put back, and eval mode leaves the BatchNorm statistics alone). See the module
    docstring for what "directly follows" means and what one pass can and cannot see.
    """
    layers = named_layers(model, lambda m: is_quantized(m) or is_integer(m))
    norms = named_layers(model, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm))
    recorder = _Recorder()
    produced: dict[str, list[_Output]] = {names[0]: [] for names, _ in layers}
    received: dict[str, list[Optional[str]]] = {names[0]: [] for names, _ in norms}

    def note_output(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor):
                record = _Output(name, weakref.ref(output), _channels_at_dim_1(module, output))
                recorder.outputs[id(output)] = record
                produced[name].append(record)

        return hook

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            value = args[0] if args else kwargs.get("input")
            record = recorder.find(value)
            if record is not None:
                record.batchnorms.append(name)
            received[name].append(None if record is None else record.layer)
            recorder.batchnorm_depth += 1

        return hook

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        recorder.batchnorm_depth -= 1

    hookless = {names[0] for names, bn in norms if not _has_hooks(bn)}
    handles = []
    was_training = model.training
    try:
        # Prepended, so that a hook of the user's that computes with the output counts as a use.
        handles += [layer.register_forward_hook(note_output(names[0]), prepend=True) for names, layer in layers]
        for names, bn in norms:
            if names[0] in hookless:
                handles.append(bn.register_forward_pre_hook(enter(names[0]), with_kwargs=True))
                handles.append(bn.register_forward_hook(leave, always_call=True))
        model.eval()
        with recorder:
            result = call_model(model, batch, input_fn)
        for value in _tensors(result):
            record = recorder.find(value)
            if record is not None:
                record.other_uses += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    modules = {names[0]: layer for names, layer in layers}
    pairs: list[tuple[str, str]] = []
    kept: list[tuple[str, str]] = []
    for names, bn in norms:
        name = names[0]
        reason = _why_not(bn, name, name in hookless, received[name], produced, modules)
        if reason is None:
            pairs.append((name, received[name][0]))  # type: ignore[arg-type]
        else:
            kept.append((name, reason))
    return FoldPlan(pairs, kept)


def _why_not(
    bn: nn.Module,
    name: str,
    hookless: bool,
    received: list[Optional[str]],
    produced: dict[str, list[_Output]],
    layers: dict[str, nn.Module],
) -> Optional[str]:
    """Why ``bn`` cannot be folded, or None if it folds into the one layer it received from."""
    if type(bn) not in FOLDABLE_TYPES.values():
        return f"a {type(bn).__name__}, whose forward may differ from BatchNorm's"
    if bn.running_mean is None or bn.running_var is None:
        return "it keeps no running statistics"
    if not hookless:
        return "it has hooks of its own, which folding would drop"
    if not received:
        return "it was not called on the batch"
    sources = set(received)
    if None in sources or len(sources) > 1:
        return "its input is not the output of one quantized layer"
    layer = received[0]
    assert layer is not None
    outputs = produced[layer]
    if any(o.other_uses or o.batchnorms != [name] for o in outputs):
        return f"the output of {layer} is also used elsewhere"
    if not all(o.channels_at_dim_1 for o in outputs):
        return f"the output channels of {layer} are not its dimension 1"
    if bn.num_features != output_channels(layers[layer]):
        return f"it has {bn.num_features} features and {layer} {output_channels(layers[layer])} output channels"
    return None


def apply_folds(model: nn.Module, pairs: list[tuple[str, str]]) -> tuple[dict[str, nn.Module], list[tuple[str, str]]]:
    """Fold each ``(BatchNorm name, integer layer name)`` pair and put a `FoldedBatchNorm` in the BatchNorm's place.

    Returns ``layer name -> the BatchNorm folded into it`` (detached from the model, unchanged)
    and ``(BatchNorm name, why not)`` for the pairs whose fold the layer cannot hold. Not
    transactional by itself: callers hold a restore point.
    """
    modules = dict(model.named_modules())
    folded: dict[str, nn.Module] = {}
    kept: list[tuple[str, str]] = []
    for bn_name, layer_name in pairs:
        bn, layer = modules[bn_name], modules[layer_name]
        try:
            created = fold_into(layer, bn)
        except FoldProblem as e:
            kept.append((bn_name, str(e)))
            continue
        replace_everywhere(model, bn, FoldedBatchNorm.replacing(bn, layer_name, created))
        folded[layer_name] = bn
    return folded, kept


def fold_batchnorms(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Fold every BatchNorm that directly follows an integer layer into it, in place, seen on one ``batch``.

    For an integer model that was converted without folding (`lightning_nipq.hard_quantize`
    and `lightning_nipq.HardQuantize` fold at conversion with ``fold_batchnorm=True``). See
    the module docstring for how "directly follows" is decided.

    Returns:
        ``BatchNorm name -> layer name`` for the folded ones, and ``(BatchNorm name, why not)``
        for the others.

    Raises:
        ValueError: ``batch`` is None. If folding fails part-way, the model is put back as it was.
    """
    if batch is None:
        raise ValueError("fold_batchnorms needs a batch to see which BatchNorm takes which layer's output; pass one input batch")
    plan = find_foldable_batchnorms(model, batch, input_fn)
    modules = dict(model.named_modules())
    pairs = [(bn, layer) for bn, layer in plan.pairs if is_integer(modules[layer])]
    kept = plan.kept + [(bn, f"{layer} is not an integer layer") for bn, layer in plan.pairs if not is_integer(modules[layer])]
    restore = restore_point(model)
    try:
        folded, problems = apply_folds(model, pairs)
    except BaseException:
        restore()
        raise
    return {bn: layer for bn, layer in pairs if layer in folded}, kept + problems
