"""Activation calibration: the range and sign of each input quantizer from real batches.

While a quantizer is uncalibrated it passes its input through and an
`ActivationObserver` records, per batch, the ``percentile`` of ``|x|`` and the
minimum. `ActivationObserver.finish` turns those into ``alpha`` (the mean of the
per-batch percentiles) and the sign (signed if any observed value was negative).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_nipq.quantizer_base import BaseQuantizer

#: ``torch.quantile`` refuses inputs above 2**24 elements; a random subset is plenty.
MAX_SAMPLES = 1 << 20

Reducer = Callable[[Tensor], Tensor]


class InputObserver:
    """Base of the calibration observers: watches input quantizers and records their inputs.

    A watched quantizer calls `observe` with each input while it is uncalibrated; the
    observer notes the quantizer's size (its weight in the average bits) and hands the
    flattened float32 input to `record`.
    """

    def __init__(self) -> None:
        self._quantizers: dict[int, BaseQuantizer] = {}

    def watch(self, quantizer: BaseQuantizer) -> None:
        quantizer.observer = self
        self._quantizers[id(quantizer)] = quantizer

    @torch.no_grad()
    def observe(self, quantizer: BaseQuantizer, x: Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if quantizer.size == 0:
            quantizer.size = flat.numel()
        self.record(id(quantizer), flat)

    def record(self, key: int, flat: Tensor) -> None:
        raise NotImplementedError


class ActivationObserver(InputObserver):
    """Collects calibration statistics for a set of input quantizers."""

    def __init__(self, percentile: float = 99.9) -> None:
        super().__init__()
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        self._sum: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._min: dict[int, float] = {}

    def record(self, key: int, flat: Tensor) -> None:
        sample = flat
        if flat.numel() > MAX_SAMPLES:
            sample = flat[torch.randint(flat.numel(), (MAX_SAMPLES,), device=flat.device)]
        value = torch.quantile(sample.abs(), self.percentile / 100.0)
        self._sum[key] = self._sum.get(key, 0.0) + float(value)
        self._count[key] = self._count.get(key, 0) + 1
        self._min[key] = min(self._min.get(key, float("inf")), float(flat.min()))

    @property
    def batches_seen(self) -> int:
        return max(self._count.values(), default=0)

    def finish(self, reduce_mean: Optional[Reducer] = None, reduce_min: Optional[Reducer] = None) -> None:
        """Set every watched quantizer's range and sign, and stop observing.

        ``reduce_mean``/``reduce_min`` combine the statistics across processes (so every DDP
        rank ends with the same ranges); a quantizer that saw no input is reported.
        """
        watched = list(self._quantizers.values())
        unseen = [q for q in watched if id(q) not in self._count]
        if unseen:
            raise RuntimeError(
                f"{len(unseen)} input quantizer(s) saw no data during calibration: their layers were never "
                "called in training_step. Exclude those layers (exclude=[...]) or call them."
            )
        means = torch.tensor([self._sum[id(q)] / self._count[id(q)] for q in watched], dtype=torch.float64)
        mins = torch.tensor([self._min[id(q)] for q in watched], dtype=torch.float64)
        if reduce_mean is not None:
            means = reduce_mean(means)
        if reduce_min is not None:
            mins = reduce_min(mins)
        for quantizer, alpha, low in zip(watched, means.tolist(), mins.tolist()):
            quantizer.set_range(alpha=alpha if alpha > 0 else 1.0, signed=low < 0.0)
            quantizer.observer = None
        self._quantizers.clear()


def calibrate_activations(
    model: torch.nn.Module,
    batches: "list[object] | object",
    forward: Callable[[object], object],
    percentile: float = 99.9,
) -> None:
    """Calibrate every uncalibrated input quantizer of ``model`` by running ``forward`` on ``batches``.

    For models quantized outside Lightning: ``forward(batch)`` should call the model.
    """
    observer = ActivationObserver(percentile)
    observe_inputs(model, batches, forward, observer)
    observer.finish()


def observe_inputs(
    model: torch.nn.Module,
    batches: "list[object] | object",
    forward: Callable[[object], object],
    observer: "ActivationObserver | Any",
) -> None:
    """Run ``forward`` on ``batches`` while ``observer`` records every uncalibrated input quantizer.

    ``observer`` needs ``watch(quantizer)`` and ``observe(quantizer, x)``; the quantizers
    pass their input through meanwhile, so every layer sees float inputs.
    """
    from lightning_nipq.attach import quantizers

    was_training = model.training
    # Eval mode for the model (no BatchNorm updates, no dropout), train mode for the
    # quantizers being observed, which record only while training.
    model.eval()
    for _, q in quantizers(model):
        if not q.calibrated:
            observer.watch(q)
            q.train()
    try:
        with torch.no_grad():
            for batch in batches:  # type: ignore[union-attr]
                forward(batch)
    finally:
        model.train(was_training)
