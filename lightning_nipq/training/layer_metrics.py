"""Per-layer bits and ranges of a fake-quantized model, as scalar tensors ready for ``log_dict``.

Names are ``<group>/<layer>``, one group per quantity (``nipq_weight_bits/blocks.0.inner.0``),
so TensorBoard shows one section per quantity with every layer side by side, and the
names stay plain CSV column names.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from lightning_nipq.layers.forms import is_quantized
from lightning_nipq.quant.base_quantizer import BaseQuantizer

#: The metric groups, by quantizer role and quantity.
WEIGHT_BITS = "nipq_weight_bits"
WEIGHT_BITS_ROUNDED = "nipq_weight_bits_rounded"
WEIGHT_ALPHA = "nipq_weight_alpha"
INPUT_BITS = "nipq_input_bits"
INPUT_BITS_ROUNDED = "nipq_input_bits_rounded"
INPUT_ALPHA = "nipq_input_alpha"
METRIC_GROUPS = (WEIGHT_BITS, WEIGHT_BITS_ROUNDED, WEIGHT_ALPHA, INPUT_BITS, INPUT_BITS_ROUNDED, INPUT_ALPHA)

# ``add_module`` only forbids dots, so a child name may hold "/" (TensorBoard's group
# separator) or "," (CSV's); keeping to this set makes each layer one tag segment.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def metric_layer_name(name: str) -> str:
    """The layer part of a metric name: ``name`` with characters unsafe in tags and CSV headers replaced."""
    return _UNSAFE.sub("_", name) or "_"


def quantizer_metrics(quantizer: BaseQuantizer) -> tuple[Tensor, Tensor, Tensor]:
    """``(continuous bits, rounded bits, alpha)`` of one quantizer: detached float32 scalars on its device.

    Nothing is read back to the host, so calling this every step costs no device sync.
    """
    with torch.no_grad():
        continuous = quantizer.continuous_bits()
        rounded = quantizer.bits()
        alpha = quantizer.alpha.amax()  # the largest range where there are several
    # One dtype for every value, whatever the model's precision (bf16-true, fp16...).
    return continuous.detach().float(), rounded.detach().float(), alpha.detach().float()


def per_layer_metrics(named_layers: Iterable[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """Learned bits and truncation of every fake-quantized layer, keyed ``<group>/<layer>``.

    For each layer: ``nipq_weight_bits`` (the continuous, learned bits), ``nipq_weight_bits_rounded``
    (the whole bits eval mode uses), ``nipq_weight_alpha``; and the same three ``nipq_input_*``
    when the layer quantizes its input and that quantizer is calibrated (before calibration
    its range is a placeholder). Layers that are not fake-quantized are skipped, so
    ``named_layers`` may be ``model.named_modules()`` as well as
    `lightning_nipq.layers.quantized_layers`.

    The values are scalar tensors on the quantizer's device, never ``.item()``-ed: pass them to
    ``LightningModule.log_dict`` and Lightning moves them to the host only when it writes logs.

    Example:

        ```python
        if is_logging_step(trainer):  # Lightning would drop the values on other steps
            pl_module.log_dict(per_layer_metrics(quantized_layers(pl_module)), on_step=True, on_epoch=False)
        ```
    """
    out: dict[str, Tensor] = {}
    for name, layer in named_layers:
        if not is_quantized(layer):
            continue
        key = metric_layer_name(name)
        bits, rounded, alpha = quantizer_metrics(layer.weight_quantizer)
        out[f"{WEIGHT_BITS}/{key}"] = bits
        out[f"{WEIGHT_BITS_ROUNDED}/{key}"] = rounded
        out[f"{WEIGHT_ALPHA}/{key}"] = alpha
        quantizer = layer.input_quantizer
        if quantizer is not None and quantizer.calibrated:
            bits, rounded, alpha = quantizer_metrics(quantizer)
            out[f"{INPUT_BITS}/{key}"] = bits
            out[f"{INPUT_BITS_ROUNDED}/{key}"] = rounded
            out[f"{INPUT_ALPHA}/{key}"] = alpha
    return out


def is_logging_step(trainer: Any) -> bool:
    """Whether the loggers write this training step's ``on_step`` metrics (``log_every_n_steps``).

    Lightning drops step values logged on other steps, yet ``LightningModule.log`` costs
    about a third of a millisecond per name, which for a few hundred per-layer names can
    outweigh the training step; call `per_layer_metrics` only when this is true. It asks the
    trainer's logger connector, as Lightning's own ``LearningRateMonitor`` does, and is
    valid from ``on_train_batch_start`` to ``on_train_batch_end``.
    """
    if not trainer.loggers:
        return False
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
