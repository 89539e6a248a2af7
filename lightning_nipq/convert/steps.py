"""Turning a fake-quantized model into a validated integer model, as public steps. Plain torch.

`hard_quantize` is the four steps in order, and `lightning_nipq.HardQuantize` composes the
same steps with its DDP reductions between them:

1. `freeze_quantizers`: whole bits, hard quantization;
2. `recalibrate_batchnorm`: BatchNorm statistics re-estimated under hard quantization;
3. `convert_and_compare`: every fake-quantized layer becomes an integer layer, and the
   integer model is compared with the fake-quantized one; gives the report;
4. `check_report`: the comparison figures must meet the tolerances.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_nipq.convert.comparison import check_report, check_tolerances, compare_outputs, typical_rel_diff
from lightning_nipq.convert.layer_check import layer_rel_diffs, record_layers
from lightning_nipq.convert.report import QuantizationReport, integer_model_report
from lightning_nipq.layers.layer_kinds import kind_of
from lightning_nipq.layers.model_calls import InputFn, call_model, first_tensor
from lightning_nipq.layers.model_walk import batchnorm_layers, quantized_layers, quantizers
from lightning_nipq.layers.restore_point import restore_point


def freeze_quantizers(model: nn.Module) -> None:
    """Freeze every quantizer at its current rounded bits and switch it to hard quantization."""
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits()
        q.mode = "hard"


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], input_fn: Optional[InputFn] = None) -> int:
    """Re-estimate BatchNorm running statistics under hard quantization; returns the batch count.

    Quantization shifts the statistics the float-trained BatchNorm layers saw; an exact
    average over a few batches (momentum ``None``) repairs that before conversion. If the
    batches fail (an exception, an interrupt, or no batch at all), the previous statistics
    are put back before the error is raised.
    """
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    for _, q in quantizers(model):
        q.mode = "hard"
    saved = [({k: v.clone() for k, v in m.state_dict().items()}, m.momentum) for m in norms]
    was_training = model.training
    count = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in batches:
            call_model(model, batch, input_fn)
            count += 1
        if count == 0:
            raise ValueError("BatchNorm re-estimation got no batch; give at least one or turn it off")
    except BaseException:
        for m, (state, _) in zip(norms, saved):
            m.load_state_dict(state)
        raise
    finally:
        for m, (_, momentum) in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)
    return count


def convert_to_integer(model: nn.Module) -> QuantizationReport:
    """Convert every fake-quantized layer of ``model`` to an integer layer, in place; returns the report.

    Each layer takes the rounded bits its quantizers use in eval mode; call
    `freeze_quantizers` first to fix them.

    Raises:
        ValueError: there is no quantized layer, or an input quantizer was never calibrated
            (checked before anything is converted).
    """
    layers = list(quantized_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer to convert; attach quantizers first")
    uncalibrated = [name for name, layer in layers if layer.input_quantizer is not None and not layer.input_quantizer.calibrated]
    if uncalibrated:
        raise ValueError(
            f"input quantizers of {uncalibrated[:5]} were never calibrated; train (or call "
            "calibrate_activations) before converting"
        )
    restore = restore_point(model)
    try:
        for _, layer in layers:
            _make_pruning_permanent(layer)
            kind = kind_of(layer)
            assert kind is not None
            kind.to_integer(layer)
    except BaseException:
        restore()  # all layers or none: a half-converted model would neither train nor save
        raise
    return integer_model_report(model)


def _make_pruning_permanent(layer: nn.Module) -> None:
    # torch.nn.utils.prune (and Lightning's ModelPruning) recompute ``layer.weight`` from
    # ``weight_orig * weight_mask`` in a forward pre-hook; the integer layer holds codes of
    # the pruned weight instead, so the reparametrisation is folded in first.
    for hook in list(layer._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            prune.remove(layer, hook._tensor_name)


def _outputs(model: nn.Module, batches: list[Any], input_fn: Optional[InputFn]) -> list[Tensor]:
    model.eval()
    with torch.no_grad():
        return [first_tensor(call_model(model, b, input_fn)).float() for b in batches]


def convert_and_compare(
    model: nn.Module, compare_batches: Optional[Iterable[Any]] = None, input_fn: Optional[InputFn] = None
) -> QuantizationReport:
    """`convert_to_integer`, with the integer model compared with the fake-quantized one on ``compare_batches``.

    The report then holds the argmax agreement, the largest and the typical (99% of samples)
    relative difference, and each converted layer against its fake-quantized self on the
    same recorded input (`lightning_nipq.convert.layer_check`). Nothing is checked against
    a tolerance here: that is `check_report`.
    """
    compare = list(compare_batches) if compare_batches is not None else []
    if not compare:
        return convert_to_integer(model)
    names = [name for name, _ in quantized_layers(model)]
    reference: list[Tensor] = []
    # The reference pass also records each layer's first call (from the first batch) for the layer check.
    record = record_layers(model, lambda: reference.extend(_outputs(model, compare, input_fn)))
    report = convert_to_integer(model)
    integer = _outputs(model, compare, input_fn)
    report.agreement, report.max_abs_diff, report.max_rel_diff = compare_outputs(reference, integer)
    report.typical_rel_diff = typical_rel_diff(reference, integer)
    report.compared_batches = len(compare)
    report.layer_rel_diffs = layer_rel_diffs(model, record)
    report.uncalled_layers = [name for name in names if name not in record]
    return report


def hard_quantize(
    model: nn.Module,
    bn_batches: Optional[Iterable[Any]] = None,
    compare_batches: Optional[Iterable[Any]] = None,
    input_fn: Optional[InputFn] = None,
    min_agreement: float = 0.999,
    max_rel_diff: float = 1e-2,
) -> QuantizationReport:
    """Freeze, optionally re-estimate BatchNorm, convert to integer layers, and validate.

    Args:
        model: a model with quantizers attached and calibrated (trained with NIPQ).
        bn_batches: batches for BatchNorm re-estimation under hard quantization; None skips it.
        compare_batches: batches on which the integer model must match the fake-quantized one.
        input_fn: maps a batch to the model input (default: the batch's first tensor).
        min_agreement: lowest acceptable argmax agreement.
        max_rel_diff: highest acceptable ``|diff| / max |output|`` for 99% of the compared
            samples (see `lightning_nipq.convert.comparison.typical_rel_diff`: activation codes
            on a rounding boundary may flip). Each converted layer must besides match its
            fake-quantized self on the same recorded input to float rounding (``1e-4``,
            `lightning_nipq.convert.layer_check`).

    Raises:
        IntegerMismatchError: the integer model is off beyond the tolerances (the model is
            converted all the same, so it can be inspected).
    """
    check_tolerances(min_agreement, max_rel_diff)
    freeze_quantizers(model)
    if bn_batches is not None:
        recalibrate_batchnorm(model, bn_batches, input_fn)
    report = convert_and_compare(model, compare_batches, input_fn)
    check_report(report, min_agreement, max_rel_diff)
    return report
