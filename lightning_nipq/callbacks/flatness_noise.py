"""FlatnessNoise: float training with rounding-sized noise, so that post-training quantization finds a flat minimum."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_nipq.callbacks.strategy_support import check_strategy
from lightning_nipq.layers.model_walk import check_patterns
from lightning_nipq.robust.flatness import FlatnessNoiseHandle, attach_flatness_noise, check_target_bits


class FlatnessNoise(Callback):
    r"""Pre-condition a float model for quantization: rounding-sized Gaussian noise on weights and inputs in training.

    A reconstruction of Xia, Pang and Cai (2025) from its summary (the full text was not
    available). At fit start every layer the package would quantize (``nn.Linear``,
    ``nn.Conv1d/2d/3d``, the same selection as `lightning_nipq.NIPQCallback`) gets noise
    on its weight (per output channel) and its input (per tensor; not on the first layer's
    input) with the variance ``step**2 / 12`` of rounding at ``target_bits``. Training
    then also lowers the Hessian's trace, so `lightning_nipq.post_training_quantize`
    afterwards costs less accuracy. Validation and test see the clean model. Nothing is
    added to the model's parameters or state dict: checkpoints stay plain float
    checkpoints, DDP sees the same parameters, and after fit the model is the plain model.

    Each training batch re-keys the noise from ``(seed, rank, epoch, batch_idx)``, so a
    run is reproducible and a resumed run draws the same noise as an uninterrupted one.

    Args:
        target_bits: the bit-width you will quantize to, or several (``(3, 4, 8)``): then
            every call of every layer draws one of them uniformly (the same draw on all ranks).
        weight_noise: add noise to the weights.
        input_noise: add noise to the layer inputs.
        include: shell-style module-name patterns of the layers to perturb (default: all supported layers).
        exclude: module-name patterns to leave clean.
        float_input_layers: layers whose input gets no noise because it stays float when
            quantized (default: the first supported layer, which usually takes the raw model input).
        noise_scale: multiplies the noise's standard deviation (1: exactly the rounding error's).
        seed: seeds the noise and the bit draws; ``None`` takes ``torch.initial_seed()`` at fit
            start (set by ``seed_everything``).

    Example:

        ```python
        from lightning.pytorch import Trainer
        from lightning_nipq import hard_quantize, post_training_quantize
        from lightning_nipq import FlatnessNoise

        trainer = Trainer(max_epochs=10, callbacks=[FlatnessNoise(target_bits=4)])
        trainer.fit(model, datamodule=dm)  # model is a plain float model again
        post_training_quantize(model, calibration_batches, weight_bits=4, act_bits=4)
        hard_quantize(model)
        ```
    """

    def __init__(
        self,
        target_bits: Union[int, Sequence[int]] = 4,
        weight_noise: bool = True,
        input_noise: bool = True,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        float_input_layers: Optional[Sequence[str]] = None,
        noise_scale: float = 1.0,
        seed: Optional[int] = None,
    ) -> None:
        self.target_bits = check_target_bits(target_bits)
        if not weight_noise and not input_noise:
            raise ValueError("weight_noise and input_noise are both off, so there is nothing to add; turn one on")
        if not isinstance(noise_scale, (int, float)) or isinstance(noise_scale, bool) or not noise_scale > 0:
            raise ValueError(f"noise_scale must be a number > 0 (1: the rounding error's size), got {noise_scale!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.weight_noise = bool(weight_noise)
        self.input_noise = bool(input_noise)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.float_input_layers = check_patterns("float_input_layers", float_input_layers)
        self.noise_scale = float(noise_scale)
        self.seed = seed
        self.handle: Optional[FlatnessNoiseHandle] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "FlatnessNoise")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Attached here rather than in setup: after a checkpoint's seed has been loaded, and
        # after any other callback's setup, so quantizers attached there are caught below.
        if self.seed is None:
            self.seed = torch.initial_seed() & ((1 << 63) - 1)
        self.handle = attach_flatness_noise(
            pl_module,
            target_bits=self.target_bits,
            weight_noise=self.weight_noise,
            input_noise=self.input_noise,
            include=self.include,
            exclude=self.exclude,
            float_input_layers=self.float_input_layers,
            noise_scale=self.noise_scale,
            seed=self.seed,
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.handle is not None:
            self.handle.reseed(trainer.current_epoch, batch_idx, rank=trainer.global_rank)

    def _detach(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "target_bits": list(self.target_bits),
            "weight_noise": self.weight_noise,
            "input_noise": self.input_noise,
            "noise_scale": self.noise_scale,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.seed is None:
            # seed=None means "whatever the run used": keep the checkpoint's, so the resumed noise continues it.
            self.seed = state_dict.get("seed")
        current = self.state_dict()
        changed = [k for k, v in state_dict.items() if k in current and current[k] != v]
        if changed:
            rank_zero_warn(f"FlatnessNoise: resuming with changed settings {changed}; the new values are used")
