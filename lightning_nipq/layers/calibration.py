"""Calibrating input quantizers on real batches, outside Lightning (the callbacks calibrate during training)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from lightning_nipq.layers.model_walk import quantizers
from lightning_nipq.quant.observers import RangeObserver


def calibrate_activations(
    model: torch.nn.Module,
    batches: Iterable[object],
    forward: Callable[[object], object],
    percentile: float = 99.9,
) -> None:
    """Calibrate every uncalibrated input quantizer of ``model`` by running ``forward`` on ``batches``.

    For models quantized outside Lightning: ``forward(batch)`` should call the model. Each
    quantizer gets its range and sign, and a zero point where its ``zero_point`` setting is
    ``"auto"`` (``NIPQConfig(input_zero_point="auto")``; see `lightning_nipq.quant.observers`).
    """
    observer = RangeObserver("percentile", percentile)
    observe_inputs(model, batches, forward, observer)
    observer.finish()


def observe_inputs(
    model: torch.nn.Module,
    batches: Iterable[object],
    forward: Callable[[object], object],
    observer: RangeObserver,
) -> None:
    """Run ``forward`` on ``batches`` while ``observer`` records every uncalibrated input quantizer.

    The quantizers pass their input through meanwhile, so every layer sees float inputs. The
    tensors of each batch are the model's own inputs (`RangeObserver.note_model_inputs`): a
    layer that receives one of them keeps its input float, unless attaching decided otherwise.
    """
    was_training = model.training
    # Eval mode for the model (no BatchNorm updates, no dropout), train mode for the
    # quantizers being observed, which record only while training.
    model.eval()
    for name, q in quantizers(model):
        if not q.calibrated and not q.stays_float:
            observer.watch(q, name)
            q.train()
    try:
        with torch.no_grad():
            for batch in batches:  # type: ignore[union-attr]
                with observer.tracing_model_inputs(batch):
                    forward(batch)
    finally:
        model.train(was_training)
