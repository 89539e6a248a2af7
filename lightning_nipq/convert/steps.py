"""Turning a fake-quantized model into a validated integer model, as public steps. Plain torch.

`hard_quantize` is the four steps in order, and `lightning_nipq.HardQuantize` composes the
same steps with its DDP reductions between them:

1. `freeze_quantizers`: whole bits, hard quantization;
2. `recalibrate_batchnorm`: BatchNorm statistics re-estimated under hard quantization;
3. `convert_and_compare`: every fake-quantized layer becomes an integer layer (with
   ``fold_batchnorm=True``, a BatchNorm that directly follows one is folded into it, see
   `lightning_nipq.convert.batchnorm_folding`), and the integer model is compared with the
   fake-quantized one; gives the report;
4. `check_report`: the comparison figures must meet the tolerances.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_nipq.convert.batchnorm_folding import apply_folds, check_fold_batchnorm, find_foldable_batchnorms
from lightning_nipq.convert.comparison import check_report, check_tolerances, compare_outputs, typical_rel_diff
from lightning_nipq.convert.layer_check import layer_rel_diffs, record_layers
from lightning_nipq.convert.report import QuantizationReport, integer_model_report
from lightning_nipq.layers.activation_products import product_to_integer
from lightning_nipq.layers.folded_batchnorm import batchnorm_eval
from lightning_nipq.layers.forms import integer_arithmetic
from lightning_nipq.layers.layer_kinds import kind_of
from lightning_nipq.layers.model_calls import InputFn, call_model, first_tensor
from lightning_nipq.layers.model_walk import batchnorm_layers, product_quantizers, quantized_layers, quantized_products, quantizers
from lightning_nipq.layers.restore_point import restore_point
from lightning_nipq.layers.tied_weights import tie_integer_layers, tied_groups


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


def convert_to_integer(
    model: nn.Module, fold_batchnorm: bool = False, fold_batch: Any = None, input_fn: Optional[InputFn] = None
) -> QuantizationReport:
    """Convert every fake-quantized layer of ``model`` to an integer layer, in place; returns the report.

    Each layer takes the rounded bits its quantizers use in eval mode; call
    `freeze_quantizers` first to fix them.

    With ``fold_batchnorm=True``, every BatchNorm that directly follows a quantized layer (its
    only input is that layer's output, and that output feeds nothing else) is folded into the
    integer layer's per-channel steps and bias, and replaced in the model by a
    `lightning_nipq.layers.folded_batchnorm.FoldedBatchNorm` (an identity). Which BatchNorm
    follows which layer is seen by running the model once on ``fold_batch`` (read by
    ``input_fn``); see `lightning_nipq.convert.batchnorm_folding`. The report lists the
    folded BatchNorms and why the others were kept.

    Raises:
        ValueError: there is no quantized layer, an input quantizer was never calibrated, or
            ``fold_batchnorm`` is not a bool or has no ``fold_batch`` (checked before anything
            is converted). If conversion or folding fails part-way, the model is put back as it was.
    """
    return _convert(model, fold_batchnorm, fold_batch, input_fn)[0]


def _convert(
    model: nn.Module, fold_batchnorm: bool, fold_batch: Any, input_fn: Optional[InputFn]
) -> tuple[QuantizationReport, dict[str, nn.Module]]:
    """`convert_to_integer`, also returning ``layer name -> the BatchNorm folded into it``."""
    check_fold_batchnorm(fold_batchnorm)
    if fold_batchnorm and fold_batch is None:
        raise ValueError(
            "fold_batchnorm=True needs a batch to see which BatchNorm takes which layer's output: pass fold_batch "
            "(hard_quantize takes the first of compare_batches or bn_batches), or fold_batchnorm=False"
        )
    layers = list(quantized_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer to convert; attach quantizers first")
    uncalibrated = [
        name
        for name, layer in layers
        if layer.input_quantizer is not None and not layer.input_quantizer.calibrated and not layer.input_quantizer.stays_float
    ]
    products = list(quantized_products(model))
    uncalibrated += [
        name for name, product in products if not all(q.calibrated for q in product_quantizers(product))
    ]
    if uncalibrated:
        raise ValueError(
            f"input quantizers of {uncalibrated[:5]} were never calibrated; train (or call "
            "calibrate_activations) before converting"
        )
    # Seen on the fake-quantized model, whose data flow the integer one keeps; changes nothing.
    plan = find_foldable_batchnorms(model, fold_batch, input_fn) if fold_batchnorm else None
    restore = restore_point(model)
    ties = tied_groups(layers)  # layers sharing one weight (and one weight quantizer) share one set of codes
    try:
        for _, layer in layers:
            _make_pruning_permanent(layer)
            kind = kind_of(layer)
            assert kind is not None
            kind.to_integer(layer)
        for _, product in products:
            product_to_integer(product)
        for group in ties:
            tie_integer_layers([layer for _, layer in group])
        folded, problems = apply_folds(model, plan.pairs) if plan is not None else ({}, [])
    except BaseException:
        restore()  # all layers or none: a half-converted model would neither train nor save
        raise
    report = integer_model_report(model)
    if plan is not None:
        report.batchnorms_kept = plan.kept + problems
    return report, folded


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
    model: nn.Module,
    compare_batches: Optional[Iterable[Any]] = None,
    input_fn: Optional[InputFn] = None,
    fold_batchnorm: bool = False,
    fold_batch: Any = None,
) -> QuantizationReport:
    """`convert_to_integer`, with the integer model compared with the fake-quantized one on ``compare_batches``.

    The report then holds the argmax agreement, the largest and the typical (99% of samples)
    relative difference, and each converted layer against its fake-quantized self on the
    same recorded input (`lightning_nipq.convert.layer_check`). Nothing is checked against
    a tolerance here: that is `check_report`.

    With ``fold_batchnorm=True`` the BatchNorms that directly follow a quantized layer are
    folded (see `convert_to_integer`; ``fold_batch`` defaults to the first compared batch), so
    the comparison covers the folded model, and a folded layer is checked against its
    fake-quantized self followed by its BatchNorm.
    """
    compare = list(compare_batches) if compare_batches is not None else []
    if fold_batch is None and compare:
        fold_batch = compare[0]
    if not compare:
        return convert_to_integer(model, fold_batchnorm, fold_batch, input_fn)
    check_fold_batchnorm(fold_batchnorm)
    # Eager, even where the user compiled the model's forward (Lightning does so in place): the
    # check runs once, and compiled it would trace the layer hooks, one recompile per layer name,
    # until Dynamo's recompile limit warns and gives up.
    with torch.compiler.set_stance("force_eager"):
        return _compare(model, compare, input_fn, fold_batchnorm, fold_batch)


def _compare(model: nn.Module, compare: list[Any], input_fn: Optional[InputFn], fold_batchnorm: bool, fold_batch: Any) -> QuantizationReport:
    names = [name for name, _ in quantized_layers(model)]
    reference: list[Tensor] = []
    # The reference pass also records each layer's first call (from the first batch) for the layer check.
    # The reference is the fake-quantized model computing what its integer form will, to the bit
    # (`integer_arithmetic`): a correct conversion then matches it exactly, whatever the bits.
    with integer_arithmetic():
        record = record_layers(model, lambda: reference.extend(_outputs(model, compare, input_fn)))
    report, folded = _convert(model, fold_batchnorm, fold_batch, input_fn)
    with torch.no_grad():
        for name, bn in folded.items():
            if name in record:
                x, y = record[name]
                record[name] = (x, batchnorm_eval(bn, y))
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
    fold_batchnorm: bool = False,
) -> QuantizationReport:
    """Freeze, optionally re-estimate BatchNorm, convert to integer layers (folding BatchNorm if asked), and validate.

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
        fold_batchnorm: fold every BatchNorm that directly follows a quantized layer into the
            integer layer (its per-channel steps and bias), so that the integer model runs no
            float BatchNorm after a quantized layer; see `convert_to_integer`. Which BatchNorm
            follows which layer is seen on the first of ``compare_batches`` (else of
            ``bn_batches``), so one of them is needed. False by default: folding replaces
            modules of the model (``model.bn`` becomes a ``FoldedBatchNorm``), which code
            that reads them afterwards may not expect, and it needs a batch.

    Raises:
        ValueError: a tolerance or ``fold_batchnorm`` is invalid, or ``fold_batchnorm=True``
            has no batch (checked before the model is changed).
        IntegerMismatchError: the integer model is off beyond the tolerances (the model is
            converted all the same, so it can be inspected).
    """
    check_tolerances(min_agreement, max_rel_diff)
    check_fold_batchnorm(fold_batchnorm)
    compare = list(compare_batches) if compare_batches is not None else []
    fold_batch = None
    if fold_batchnorm:
        if not compare and bn_batches is not None:
            bn_batches = list(bn_batches)  # its first batch is used twice
        fold_batch = compare[0] if compare else next(iter(bn_batches or []), None)
        if fold_batch is None:
            raise ValueError(
                "hard_quantize(fold_batchnorm=True) needs a batch to see which BatchNorm takes which layer's "
                "output: pass compare_batches or bn_batches, or fold_batchnorm=False"
            )
    freeze_quantizers(model)
    if bn_batches is not None:
        recalibrate_batchnorm(model, bn_batches, input_fn)
    report = convert_and_compare(model, compare, input_fn, fold_batchnorm, fold_batch)
    check_report(report, min_agreement, max_rel_diff)
    return report
