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
from torch import Tensor, nn

from lightning_nipq.attach import AttachResult, attach_quantizers, quantized_layers
from lightning_nipq.calibration import MAX_SAMPLES, InputObserver, observe_inputs
from lightning_nipq.fake_quant import integer_codes, num_levels
from lightning_nipq.hard_quantize import InputFn, call_model
from lightning_nipq.lsq import LSQConfig

PTQ_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")
#: Clipping ratios tried per stage of the MSE search (a coarse grid, then a fine one around its best).
MSE_GRID = 100
#: Elements of each input kept per calibration batch for the MSE search (the range itself
#: and the sign come from every element).
MSE_SAMPLES_PER_BATCH = 1 << 16
#: Candidates times elements evaluated at once, to bound the memory of the vectorised search.
_CHUNK = 1 << 21


def _sample(flat: Tensor, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
    if flat.numel() <= count:
        return flat
    index = torch.randint(flat.numel(), (count,), generator=generator).to(flat.device)
    return flat[index]


def quantization_mse(x: Tensor, alphas: Tensor, bits: int, signed: bool) -> Tensor:
    """Mean squared error of fake-quantizing ``x`` at each range in ``alphas``: one value per range.

    Uses the quantizers' own formula (`lightning_nipq.integer_codes` times ``alpha / n``),
    vectorised over the ranges and chunked over the elements.
    """
    flat = x.detach().reshape(-1).float()
    alphas = torch.as_tensor(alphas, dtype=torch.float32, device=flat.device).reshape(-1, 1)
    b = torch.tensor(float(bits), device=flat.device)
    scale = alphas / num_levels(b, signed)
    total = torch.zeros(alphas.shape[0], dtype=torch.float64, device=flat.device)
    rows = max(1, _CHUNK // alphas.shape[0])
    for part in flat.split(rows):
        error = integer_codes(part.unsqueeze(0), alphas, b, signed) * scale - part.unsqueeze(0)
        total += error.square().sum(dim=1, dtype=torch.float64)
    return total / max(flat.numel(), 1)


def mse_alpha(x: Tensor, bits: int, signed: bool, grid: int = MSE_GRID) -> float:
    """The range minimising `quantization_mse` of ``x``: ``grid`` clipping ratios of ``max|x|``, then as many around the best.

    Never worse than min-max: the ratio 1 is among the candidates.
    """
    flat = x.detach().reshape(-1).float()
    top = float(flat.abs().max()) if flat.numel() else 0.0
    if top == 0.0:
        return 1e-8
    coarse = torch.linspace(1.0 / grid, 1.0, grid)
    best = float(coarse[torch.argmin(quantization_mse(flat, coarse * top, bits, signed))])
    fine = torch.linspace(max(best - 1.0 / grid, 1.0 / grid**2), min(best + 1.0 / grid, 1.0), grid)
    fine = torch.cat([fine, torch.tensor([best])])  # the fine stage can only improve on the coarse one
    return float(fine[torch.argmin(quantization_mse(flat, fine * top, bits, signed))]) * top


def abs_percentile(x: Tensor, percentile: float, generator: Optional[torch.Generator] = None) -> float:
    """The ``percentile`` (0-100) of ``|x|``, from a random subset above `MAX_SAMPLES` elements."""
    flat = x.detach().reshape(-1).float().abs()
    return float(torch.quantile(_sample(flat, MAX_SAMPLES, generator), percentile / 100.0))


def choose_alpha(x: Tensor, bits: int, signed: bool, method: str = "minmax", percentile: float = 99.99) -> float:
    """The range of one tensor by ``method``: ``"minmax"`` (``max|x|``), ``"percentile"`` or ``"mse"``."""
    _check_method(method, percentile)
    if method == "minmax":
        alpha = float(x.detach().abs().max())
    elif method == "percentile":
        alpha = abs_percentile(x, percentile)
    else:
        alpha = mse_alpha(x, bits, signed)
    return max(alpha, 1e-8)


def _check_method(method: str, percentile: float) -> None:
    if method not in PTQ_METHODS:
        raise ValueError(f"method must be one of {PTQ_METHODS}, got {method!r}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


class RangeObserver(InputObserver):
    """Records the inputs of uncalibrated quantizers over the calibration batches and sets their ranges.

    Min-max takes ``max|x|`` over all batches, percentile the mean over batches of each
    batch's percentile of ``|x|`` (as NIPQ's calibration does), and MSE searches a
    sample of every batch. The sign comes from every element.
    """

    def __init__(self, method: str, percentile: float = 99.99) -> None:
        super().__init__()
        _check_method(method, percentile)
        self.method = method
        self.percentile = percentile
        self._generator = torch.Generator().manual_seed(0)  # the same calibration gives the same ranges
        self._max: dict[int, float] = {}
        self._min: dict[int, float] = {}
        self._values: dict[int, list[float]] = {}
        self._samples: dict[int, list[Tensor]] = {}

    def record(self, key: int, flat: Tensor) -> None:
        self._max[key] = max(self._max.get(key, 0.0), float(flat.abs().max()))
        self._min[key] = min(self._min.get(key, float("inf")), float(flat.min()))
        if self.method == "percentile":
            self._values.setdefault(key, []).append(abs_percentile(flat, self.percentile, self._generator))
        elif self.method == "mse":
            self._samples.setdefault(key, []).append(_sample(flat, MSE_SAMPLES_PER_BATCH, self._generator))

    def finish(self) -> None:
        """Set every watched quantizer's range and sign, and stop observing."""
        unseen = [q for key, q in self._quantizers.items() if key not in self._max]
        if unseen:
            raise RuntimeError(
                f"{len(unseen)} input quantizer(s) saw no calibration data: give at least one batch, and check "
                "that forward (or input_fn) calls every quantized layer, or exclude the layers it skips"
            )
        for key, quantizer in self._quantizers.items():
            signed = self._min[key] < 0.0
            bits = quantizer.rounded_bits()
            if self.method == "minmax":
                alpha = self._max[key]
            elif self.method == "percentile":
                alpha = sum(self._values[key]) / len(self._values[key])
            else:
                alpha = mse_alpha(torch.cat(self._samples[key]), bits, signed)
            quantizer.set_range(alpha if alpha > 0 else 1.0, signed=signed)
            quantizer.observer = None
        self._quantizers.clear()
        self._samples.clear()


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
    _check_method(method, percentile)
    config = LSQConfig(weight_bits=weight_bits, act_bits=act_bits)
    result = attach_quantizers(model, config, include, exclude, float_input_layers)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            alpha = choose_alpha(layer.weight, weight_bits, signed=True, method=method, percentile=percentile)
            layer.weight_quantizer.set_range(alpha, signed=True)
    observer = RangeObserver(method, percentile)
    run = forward if forward is not None else (lambda batch: call_model(model, batch, input_fn))
    observe_inputs(model, calibration_batches, run, observer)
    observer.finish()
    return result
