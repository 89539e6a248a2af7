"""Post-training quantization: fixed bits, ranges from the weights and a few calibration batches, no training.

The baseline without any training. `post_training_quantize` attaches LSQ quantizers
(fixed bits; their step is the range over the largest code) and sets every range by
min-max, a percentile of ``|x|``, or the clipping that minimises the quantization MSE.
The model is left fake-quantized, so `lightning_nipq.hard_quantize` converts it to the
same integer layers and report as NIPQ, and `lightning_nipq.LSQCallback` can fine-tune it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from lightning_nipq.layers.attach import AttachResult, attach_quantizers
from lightning_nipq.layers.calibration import observe_inputs
from lightning_nipq.layers.model_calls import InputFn, call_model
from lightning_nipq.layers.model_walk import quantized_layers
from lightning_nipq.quant.granularity import Granularity
from lightning_nipq.quant.lsq_quantizer import LSQConfig
from lightning_nipq.quant.observers import RangeObserver
from lightning_nipq.quant.range_search import check_range_method, weight_ranges


def post_training_quantize(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    weight_bits: int = 8,
    act_bits: Optional[int] = None,
    method: str = "minmax",
    percentile: float = 99.99,
    forward: Optional[Callable[[Any], Any]] = None,
    input_fn: Optional[InputFn] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    float_input_layers: Optional[Sequence[str]] = None,
    weight_granularity: Granularity = "channel",
    quantize_inputs: bool = True,
    input_zero_point: str = "off",
) -> AttachResult:
    """Quantize ``model`` in place without training: fixed bits, ranges from the weights and ``calibration_batches``.

    Attaches quantizers exactly as the callbacks do (the same layers, the first layer's
    input left float), sets each weight's range from the weight and each input's range
    and sign from the calibration batches, and leaves the model fake-quantized:
    convert it with `lightning_nipq.hard_quantize`, which also re-estimates BatchNorm
    and checks the integer model if you give it batches. The quantizers are LSQ
    quantizers, so `lightning_nipq.LSQCallback` can fine-tune the result.

    Args:
        model: a float model (no quantizers attached yet).
        calibration_batches: batches run through the model to measure the inputs' ranges.
        weight_bits: bits of every weight (at least 2).
        act_bits: bits of every quantized input; defaults to ``weight_bits``.
        method: ``"minmax"`` (``max|x|``), ``"percentile"`` (``percentile`` of ``|x|``) or
            ``"mse"`` (the clipping of ``max|x|`` minimising the quantization MSE, searched
            on a grid of ratios; for inputs over a sample of every calibration batch).
        percentile: the percentile of ``|x|`` for ``method="percentile"``.
        forward: calls the model on a batch; by default ``model(input_fn(batch))``.
        input_fn: maps a batch to the model input (default: the batch itself, its first
            tensor, or a usual dict key), when ``forward`` is not given.
        include: shell-style module-name patterns to quantize (default: all supported layers).
        exclude: module-name patterns to leave in float.
        float_input_layers: layers whose input stays float (default: the first supported layer).
        weight_granularity: ``"channel"``, ``"tensor"`` or a group size: the ranges of each
            weight, each searched by ``method`` on its own elements.
        quantize_inputs: ``False`` quantizes weights only (no input quantizers, and
            ``calibration_batches`` are not run).
        input_zero_point: ``"off"`` (symmetric signed or unsigned input codes) or ``"auto"``:
            each input whose most negative value is at most half its largest magnitude (GELU
            and SiLU outputs) gets unsigned codes with a zero point, covering ``[min, alpha]``
            (see `lightning_nipq.quant.observers.wants_zero_point`).

    Returns:
        What was quantized and what was left in float.

    Example:

        ```python
        from lightning_nipq import hard_quantize, post_training_quantize

        post_training_quantize(model, train_batches[:8], weight_bits=4, act_bits=4, method="mse")
        report = hard_quantize(model, bn_batches=train_batches[:8], compare_batches=val_batches)
        print(report)
        ```
    """
    check_range_method(method, percentile)
    config = LSQConfig(
        weight_bits=weight_bits, act_bits=act_bits, weight_granularity=weight_granularity, input_zero_point=input_zero_point
    )
    if not quantize_inputs and input_zero_point != "off":
        raise ValueError(
            "input_zero_point gives quantized inputs a zero point, but quantize_inputs=False quantizes no input; "
            "pass one or the other"
        )
    result = attach_quantizers(model, config, include, exclude, float_input_layers, quantize_inputs)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            quantizer = layer.weight_quantizer
            alpha = weight_ranges(layer.weight, quantizer.granularity, quantizer.range_shape, weight_bits, method, percentile)
            quantizer.set_range(alpha, signed=True)
    if not quantize_inputs:
        return result
    observer = RangeObserver(method, percentile)
    run = forward if forward is not None else (lambda batch: call_model(model, batch, input_fn))
    observe_inputs(model, calibration_batches, run, observer)
    observer.finish()
    return result
