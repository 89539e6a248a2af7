"""Freezing a fake-quantized model, converting it to integer layers, and checking the result.

Plain torch: `hard_quantize` works on any model prepared with
`lightning_nipq.attach_quantizers`, trained with Lightning or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_nipq.attach import quantized_layers, quantizers
from lightning_nipq.distillation import first_tensor
from lightning_nipq.integer_layers import convert_layer_to_integer
from lightning_nipq.layer_check import LAYER_REL_TOLERANCE, layer_rel_diffs, record_layers
from lightning_nipq.report import QuantizationReport, integer_model_report

InputFn = Callable[[Any], Any]
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")


class IntegerMismatchError(RuntimeError):
    """The integer model disagrees with the fake-quantized model beyond the tolerance."""


def default_input_fn(batch: Any) -> Any:
    """The model input of a batch: the batch itself, its first element, or a usual dict key."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"cannot tell the model input in a batch of type {type(batch).__name__}; "
        "pass input_fn=lambda batch: ... returning the input (a tuple is passed as *args, a dict as **kwargs)"
    )


def call_model(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> Any:
    inputs = (input_fn or default_input_fn)(batch)
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


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
    average over a few batches (momentum ``None``) repairs that before conversion.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    for _, q in quantizers(model):
        q.mode = "hard"
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    count = 0
    try:
        for batch in batches:
            call_model(model, batch, input_fn)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("BatchNorm re-estimation got no batch; give at least one or turn it off")
    return count


def convert_to_integer(model: nn.Module) -> QuantizationReport:
    """Freeze and convert every fake-quantized layer of ``model`` to an integer layer, in place."""
    layers = list(quantized_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer to convert; attach quantizers first")
    uncalibrated = [name for name, layer in layers if layer.input_quantizer is not None and not layer.input_quantizer.calibrated]
    if uncalibrated:
        raise ValueError(
            f"input quantizers of {uncalibrated[:5]} were never calibrated; train (or call "
            "calibrate_activations) before converting"
        )
    freeze_quantizers(model)
    for _, layer in layers:
        _make_pruning_permanent(layer)
        convert_layer_to_integer(layer)
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


def compare_outputs(reference: list[Tensor], candidate: list[Tensor]) -> tuple[Optional[float], float, float]:
    """``(argmax agreement or None for non-class outputs, max |diff|, max |diff| / max |reference|)``."""
    agree = total = 0
    max_abs = 0.0
    scale = 0.0
    for ref, out in zip(reference, candidate):
        max_abs = max(max_abs, float((ref - out).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        if ref.dim() >= 2 and ref.shape[-1] > 1:
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += ref.argmax(-1).numel()
    agreement = agree / total if total else None
    return agreement, max_abs, max_abs / max(scale, 1e-12)


#: Share of compared samples whose difference must stay within ``max_rel_diff``.
TYPICAL_SAMPLE_QUANTILE = 0.99


def typical_rel_diff(reference: list[Tensor], candidate: list[Tensor], quantile: float = TYPICAL_SAMPLE_QUANTILE) -> float:
    """The ``quantile`` over samples of each sample's max ``|diff|``, relative to max ``|reference|``.

    The integer model is exact, while the fake-quantized one rounds in float: an activation
    that sits on a rounding boundary can land on the neighbouring code in one of them, a
    whole step at low bits, for a handful of samples. A layer that bypasses quantization
    shifts every sample. The worst sample measures the first; a high quantile the second.
    """
    per_sample = [(ref - out).abs().reshape(ref.shape[0], -1).amax(dim=1) for ref, out in zip(reference, candidate)]
    if not per_sample:
        return 0.0
    scale = max(float(ref.abs().max()) for ref in reference)
    return float(torch.quantile(torch.cat(per_sample).double(), quantile)) / max(scale, 1e-12)


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
            samples (see `typical_rel_diff`: activation codes on a rounding boundary may flip).
            Each converted layer must besides match its fake-quantized self on the same
            recorded input to float rounding (``1e-4``, `lightning_nipq.layer_check`).

    Raises:
        IntegerMismatchError: the integer model is off beyond the tolerances (the model is
            converted all the same, so it can be inspected).
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    freeze_quantizers(model)
    if bn_batches is not None:
        recalibrate_batchnorm(model, bn_batches, input_fn)
    compare = list(compare_batches) if compare_batches is not None else []
    names = [name for name, _ in quantized_layers(model)]
    reference: list[Tensor] = []
    # The reference pass also records each layer's first call (from the first batch) for the layer check.
    record = record_layers(model, lambda: reference.extend(_outputs(model, compare, input_fn))) if compare else {}
    report = convert_to_integer(model)
    if compare:
        integer = _outputs(model, compare, input_fn)
        report.agreement, report.max_abs_diff, report.max_rel_diff = compare_outputs(reference, integer)
        report.typical_rel_diff = typical_rel_diff(reference, integer)
        report.compared_batches = len(compare)
        report.layer_rel_diffs = layer_rel_diffs(model, record)
        report.uncalled_layers = [name for name in names if name not in record]
        check_agreement(report, min_agreement, max_rel_diff)
    return report


def check_agreement(report: QuantizationReport, min_agreement: float, max_rel_diff: float) -> None:
    problems = []
    off = {name: diff for name, diff in report.layer_rel_diffs.items() if diff > LAYER_REL_TOLERANCE}
    if off:
        worst = max(off, key=off.__getitem__)
        problems.append(
            f"{len(off)} converted layer(s) differ from their fake-quantized selves on the same input, beyond float "
            f"rounding ({LAYER_REL_TOLERANCE:g}): {worst} by {off[worst]:.3g}"
        )
    if report.agreement is not None and report.agreement < min_agreement:
        problems.append(f"argmax agreement {report.agreement:.4%} is below min_agreement={min_agreement}")
    if report.typical_rel_diff is not None and report.typical_rel_diff > max_rel_diff:
        problems.append(
            f"for {TYPICAL_SAMPLE_QUANTILE:.0%} of samples the relative difference is up to {report.typical_rel_diff:.3g}, "
            f"above max_rel_diff={max_rel_diff}"
        )
    if problems:
        raise IntegerMismatchError(
            "the integer model does not reproduce the fake-quantized model: "
            + "; ".join(problems)
            + ". This points to a layer whose forward bypasses the quantized layer (a fused kernel or a custom "
            "forward reading .weight); see the report's 'left in float' list.\n"
            + report.table()
        )
