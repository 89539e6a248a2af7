"""LSQCallback: quantization-aware training with LSQ, the fixed-bit baseline, on NIPQCallback's machinery."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer

from lightning_nipq.callbacks.nipq import NIPQCallback
from lightning_nipq.lsq import LSQConfig
from lightning_nipq.schedule import PhaseSchedule


class LSQCallback(NIPQCallback):
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
        float_input_layers: layers whose input stays float (default: the first supported
            layer, which usually takes the raw model input).
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
        calibration_batches: int = 4,
        calibration_percentile: float = 99.9,
        log_per_layer: bool = True,
    ) -> None:
        act_bits = weight_bits if act_bits is None else act_bits
        super().__init__(
            target_bits=weight_bits,
            target_act_bits=act_bits,
            weight_bits=weight_bits,
            act_bits=act_bits,
            hard_epochs=0,
            reg_weight=0.0,
            quantizer_lr_factor=quantizer_lr_factor,
            include=include,
            exclude=exclude,
            float_input_layers=float_input_layers,
            calibration_batches=calibration_batches,
            calibration_percentile=calibration_percentile,
            log_per_layer=log_per_layer,
        )
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.quantizer_config = LSQConfig(weight_bits=weight_bits, act_bits=act_bits)  # type: ignore[assignment]

    def _make_schedule(self, trainer: Trainer) -> PhaseSchedule:
        # LSQ has no noise phase: the whole run is the "hard" phase, which also keeps the
        # bit-budget loss (and its check under manual optimisation) off.
        epochs = max(trainer.max_epochs or 1, 1)
        return PhaseSchedule(epochs, hard_epochs=epochs)

    def _wrap_training_step(self, pl_module: LightningModule) -> None:
        # Nothing to add to the loss: training_step stays the user's own.
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"method": "lsq", "weight_bits": self.weight_bits, "act_bits": self.act_bits}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "method"})
