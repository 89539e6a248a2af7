"""LSQCallback: quantization-aware training with LSQ, the fixed-bit baseline."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from lightning_nipq.callbacks.quantization_aware import QuantizationAwareTraining
from lightning_nipq.quant.lsq_quantizer import LSQConfig


class LSQCallback(QuantizationAwareTraining):
    r"""Quantization-aware training with LSQ (Esser et al., ICLR 2020): fixed bits, learned step sizes.

    The baseline NIPQ is measured against. It quantizes the same layers as
    `NIPQCallback` (in ``setup``, with the first layer's input left float), gives the
    step sizes their own optimizer group, and calibrates the inputs on the first
    ``calibration_batches`` training batches. Then it trains with straight-through
    rounding from the first step: no noise phase, no bit budget, nothing added to your
    loss. Weights start from the LSQ paper's step ``2 mean|W| / sqrt(Qp)`` (capped at
    ``max|W|``), inputs from the calibrated range (the same one NIPQ starts from). Add
    `lightning_nipq.HardQuantize` to convert the result to integer layers.

    Args:
        weight_bits: bits of every weight (at least 2: weights are signed).
        act_bits: bits of every quantized input; defaults to ``weight_bits``.
        quantizer_lr_factor: learning-rate factor for the step sizes, which also get
            ``weight_decay=0``. LSQ's gradient scale already sizes their updates, so the
            paper trains them at the weights' rate (1).
        include: shell-style module-name patterns to quantize (default: all supported layers).
        exclude: module-name patterns to leave in float.
        float_input_layers: layers whose input stays float (default: those fed the model's own
            input, found by data flow on the first calibration batch).
        weight_granularity: ``"channel"`` (one range per output channel), ``"tensor"`` (one
            per weight) or a group size ``g`` (one per ``g`` consecutive inputs of each output
            channel, for linear layers: weight-only transformers use 32 to 128). Bits stay one
            per layer.
        quantize_inputs: ``False`` quantizes weights only: no input quantizer anywhere, and
            the budget counts weights only.
        quantize_products: ``True`` also quantizes both operands of the activation products
            inside attention, at ``act_bits`` (see `lightning_nipq.layers.attach_quantizers`).
        input_zero_point: ``"off"`` (default: symmetric signed codes for inputs that take
            negative values, unsigned ones otherwise) or ``"auto"``: calibration gives a zero
            point to each input whose most negative value is at most half its largest magnitude
            (GELU and SiLU outputs), whose unsigned codes then cover ``[min, alpha]`` instead of
            wasting half a symmetric grid on ``[-alpha, 0]``. Exact in the integer layers, saved
            and exported.
        calibration_batches: training batches used to measure input ranges and signs before
            input quantization starts.
        calibration_percentile: percentile of ``|x|`` taken as the initial input range.
        log_per_layer: log each layer's bits and ranges (``nipq_weight_alpha/<layer>``, ...)
            on the steps the loggers write, besides the averages.

    Example:

        ```python
        from lightning.pytorch import Trainer
        from lightning_nipq import HardQuantize, LSQCallback

        trainer = Trainer(max_epochs=10, callbacks=[LSQCallback(weight_bits=3), HardQuantize()])
        trainer.fit(model, datamodule=dm)  # model now holds integer layers
        ```
    """

    def __init__(
        self,
        weight_bits: int = 4,
        act_bits: Optional[int] = None,
        quantizer_lr_factor: float = 1.0,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        float_input_layers: Optional[Sequence[str]] = None,
        weight_granularity: Union[str, int] = "channel",
        quantize_inputs: bool = True,
        quantize_products: bool = False,
        input_zero_point: str = "off",
        calibration_batches: int = 4,
        calibration_percentile: float = 99.9,
        log_per_layer: bool = True,
    ) -> None:
        config = LSQConfig(
            weight_bits=weight_bits, act_bits=act_bits, weight_granularity=weight_granularity, input_zero_point=input_zero_point
        )
        super().__init__(
            config,
            quantizer_lr_factor=quantizer_lr_factor,
            include=include,
            exclude=exclude,
            float_input_layers=float_input_layers,
            calibration_batches=calibration_batches,
            calibration_percentile=calibration_percentile,
            log_per_layer=log_per_layer,
            quantize_inputs=quantize_inputs,
            quantize_products=quantize_products,
        )
        self.quantizer_config: LSQConfig = config

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "weight_bits": self.quantizer_config.weight_bits,
            "act_bits": self.quantizer_config.act_bits,
        }
