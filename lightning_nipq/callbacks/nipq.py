"""NIPQCallback: learnable-bit pseudo-quantization training for any LightningModule."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_nipq.attach import QuantizerConfig, attach_quantizers, quantized_layers, quantizers
from lightning_nipq.bit_budget import BUDGETS, BitBudget, average_bits, fit_bits_to_budget, pair_average_bits
from lightning_nipq.calibration import ActivationObserver
from lightning_nipq.callbacks.loss_injection import add_to_loss
from lightning_nipq.callbacks.strategy_support import check_strategy, spawns_processes
from lightning_nipq.checkpoint import MANIFEST_KEY, install_load_hook, quantization_manifest
from lightning_nipq.distillation import Distiller, frozen_copy
from lightning_nipq.layer_metrics import is_logging_step, per_layer_metrics
from lightning_nipq.noise import NOISE_KINDS
from lightning_nipq.quantizer_base import MAX_SUPPORTED_BITS, MIN_SIGNED_BITS, BaseQuantizer
from lightning_nipq.quantizer_param_groups import split_quantizer_params
from lightning_nipq.schedule import PhaseSchedule

log = logging.getLogger(__name__)

#: Ways to start a weight's range (see `lightning_nipq.QuantizerConfig`).
WEIGHT_INITS = ("max", "mse")
#: Learned bits further above the target than this when freezing get a warning.
UNMET_BUDGET_WARNING = 0.5


class NIPQCallback(Callback):
    r"""Quantization-aware training with NIPQ: learned bit-widths under an average-bit budget.

    In ``setup`` every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of the LightningModule gets a
    learnable-bit, learnable-range quantizer on its weight and its input (the first layer
    keeps a float input), so your ``configure_optimizers`` and DDP see the new parameters.
    Training then runs in three phases, decided at each batch from the epoch counter (so
    resuming lands in the right one):

    1. noise: pseudo-quantization noise on weights and inputs, learned bits with
       stochastic rounding, and the bit-budget regulariser added to your training loss;
    2. ``anneal_epochs`` of hand-over, in which layers switch to hard quantization one by
       one (the share rises linearly from 0 to 1);
    3. ``hard_epochs`` of straight-through fake quantization with the bits frozen (fitted
       to the budget) and the regulariser off.

    Add `lightning_nipq.HardQuantize` to turn the result into a validated integer model.

    Args:
        target_bits: the average weight bit-width you can afford, weighted by element count.
        target_act_bits: the same for layer inputs; defaults to ``target_bits``.
        budget: ``"avg_bits"`` (average bits) or ``"bops"`` (MAC-weighted ``b_w * b_a``,
            with target ``target_bits * target_act_bits``).
        min_bits: lowest learnable bit-width (signed tensors, such as weights, never go below 2).
        max_bits: highest learnable bit-width.
        weight_bits: freeze every weight at this bit-width instead of learning it (W4A4: 4).
        act_bits: freeze every input at this bit-width.
        noise: ``"uniform"`` (default, as accurate and faster) or ``"histogram"`` (the
            released code's sampling of the actual rounding error).
        stochastic_bits: add ``U(-0.5, 0.5)`` to the bits before rounding in the noise phase.
        hard_epochs: final epochs of hard quantization with frozen bits.
        anneal_epochs: epochs of gradual hand-over from noise to hard quantization before them.
        reg_weight: strength of the bit-budget regulariser (the penalty is in bits).
        quantizer_lr_factor: learning-rate factor for quantizer parameters, which also get
            ``weight_decay=0`` (their groups are split off your optimizer's groups at fit start).
        include: shell-style module-name patterns to quantize (default: all supported layers).
        exclude: module-name patterns to leave in float.
        float_input_layers: layers whose input stays float (default: the first supported
            layer, which usually takes the raw model input).
        calibration_batches: training batches used to measure input ranges and signs before
            input quantization starts.
        calibration_percentile: percentile of ``|x|`` taken as the initial input range.
        init_bits: starting learned bit-width (default ``max_bits - 0.5``).
        weight_init: starting weight range: ``"mse"`` (the clipping with the least rounding
            error at the starting bit-width; at fixed 2 bits it gained 1.75 points on the
            benchmark ResNet) or ``"max"`` (``max|W|``, as the paper's released code).
        distillation: distil from a frozen copy of the float model taken at setup.
        distillation_weight: weight of the distillation loss.
        distillation_temperature: softmax temperature of the distillation loss.
        log_per_layer: log each layer's learned and rounded bits and ranges
            (``nipq_weight_bits/<layer>``, ``nipq_input_alpha/<layer>``, ...) on the steps
            the loggers write, besides the averages.

    Example:

        ```python
        from lightning.pytorch import Trainer
        from lightning_nipq import HardQuantize, NIPQCallback

        trainer = Trainer(max_epochs=10, callbacks=[NIPQCallback(target_bits=3), HardQuantize()])
        trainer.fit(model, datamodule=dm)  # model now holds integer layers
        ```
    """

    def __init__(
        self,
        target_bits: float = 4.0,
        target_act_bits: Optional[float] = None,
        budget: str = "avg_bits",
        min_bits: int = 2,
        max_bits: int = 8,
        weight_bits: Optional[int] = None,
        act_bits: Optional[int] = None,
        noise: str = "uniform",
        stochastic_bits: bool = True,
        hard_epochs: int = 1,
        anneal_epochs: int = 0,
        reg_weight: float = 1.0,
        quantizer_lr_factor: float = 10.0,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        float_input_layers: Optional[Sequence[str]] = None,
        calibration_batches: int = 4,
        calibration_percentile: float = 99.9,
        init_bits: Optional[float] = None,
        weight_init: str = "mse",
        distillation: bool = False,
        distillation_weight: float = 1.0,
        distillation_temperature: float = 1.0,
        log_per_layer: bool = True,
    ) -> None:
        _check_bits(min_bits, max_bits, target_bits, target_act_bits, weight_bits, act_bits, init_bits)
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        for name, value in (("hard_epochs", hard_epochs), ("anneal_epochs", anneal_epochs)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        if quantizer_lr_factor <= 0:
            raise ValueError(f"quantizer_lr_factor must be > 0, got {quantizer_lr_factor}")
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be a whole number >= 1, got {calibration_batches!r}")
        if not 0 < calibration_percentile <= 100:
            raise ValueError(f"calibration_percentile must be in (0, 100], got {calibration_percentile}")
        if distillation_weight < 0 or distillation_temperature <= 0:
            raise ValueError("distillation_weight must be >= 0 and distillation_temperature > 0")
        for name, patterns in (("include", include), ("exclude", exclude), ("float_input_layers", float_input_layers)):
            if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
                raise ValueError(f"{name} must be a list of module-name patterns, got {patterns!r}")

        self.target_bits = float(target_bits)
        self.target_act_bits = float(target_act_bits) if target_act_bits is not None else float(target_bits)
        self.budget = budget
        self.quantizer_config = QuantizerConfig(
            min_bits=min_bits,
            max_bits=max_bits,
            init_bits=init_bits,
            weight_bits=weight_bits,
            act_bits=act_bits,
            noise=noise,
            stochastic_bits=stochastic_bits,
            weight_init=weight_init,
        )
        self.hard_epochs = hard_epochs
        self.anneal_epochs = anneal_epochs
        self.reg_weight = float(reg_weight)
        self.quantizer_lr_factor = float(quantizer_lr_factor)
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.float_input_layers = list(float_input_layers) if float_input_layers is not None else None
        self.calibration_batches = calibration_batches
        self.calibration_percentile = calibration_percentile
        self.distillation = distillation
        self.distillation_weight = float(distillation_weight)
        self.distillation_temperature = float(distillation_temperature)
        self.log_per_layer = log_per_layer

        self.bit_budget = BitBudget(self.target_bits, self.target_act_bits, budget)
        self.schedule: Optional[PhaseSchedule] = None
        self.skipped: list[tuple[str, str]] = []
        self._observer: Optional[ActivationObserver] = None
        self._distiller: Optional[Distiller] = None
        self._wrapped_module: Optional[LightningModule] = None
        self._last_bit_loss: Optional[Tensor] = None
        self._bit_loss_calls = 0
        self._layers: list[Any] = []
        self._named_layers: list[tuple[str, Any]] = []
        self._calibrating: list[BaseQuantizer] = []
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[Tensor] = None
        self._remove_load_hook: Optional[Callable[[], None]] = None
        self._training_step_wrapper: Optional[Callable[..., Any]] = None
        self._replaced_training_step: Optional[Callable[..., Any]] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "NIPQCallback")
        # Any stage may restore a checkpoint (fit resuming, validate/test with ckpt_path):
        # rebuild the layers it holds before Lightning loads its state dict.
        self._remove_load_hook = install_load_hook(pl_module)
        if stage != "fit":
            return
        if spawns_processes(trainer.strategy):
            rank_zero_warn(
                "NIPQ: with a spawning strategy (ddp_spawn, ddp_fork, ddp_notebook) the model is quantized in the "
                "worker processes; Lightning copies back only the float tensors that fit your model, so the model in "
                "this process is not quantized after fit. Load the quantized model from a checkpoint "
                "(load_nipq_checkpoint) or use strategy='ddp'."
            )
        self.schedule = self._make_schedule(trainer)
        if not any(True for _ in quantized_layers(pl_module)):
            if self.distillation:
                self._distiller = Distiller(
                    frozen_copy(pl_module), self.distillation_weight, self.distillation_temperature
                )
            result = attach_quantizers(
                pl_module, self.quantizer_config, self.include, self.exclude, self.float_input_layers
            )
            self.skipped = result.skipped
            rank_zero_info(
                f"NIPQ: quantizing {len(result.quantized)} layers (float input: {result.float_input})"
                + (f"; left in float: {[n for n, _ in result.skipped]}" if result.skipped else "")
            )
        self._named_layers = list(quantized_layers(pl_module))
        self._layers = [layer for _, layer in self._named_layers]
        if self._distiller is not None:
            self._distiller.attach(pl_module)
        if pl_module.automatic_optimization:
            self._wrap_training_step(pl_module)

    def _make_schedule(self, trainer: Trainer) -> PhaseSchedule:
        max_epochs = trainer.max_epochs
        if (self.hard_epochs or self.anneal_epochs) and (max_epochs is None or max_epochs < 1):
            raise ValueError(
                "NIPQCallback places its hard phase in the last epochs and needs Trainer(max_epochs=N); "
                "or set hard_epochs=0 and anneal_epochs=0"
            )
        return PhaseSchedule(max(max_epochs or 1, 1), self.hard_epochs, self.anneal_epochs)

    def _wrap_training_step(self, pl_module: LightningModule) -> None:
        # Lightning offers no hook that returns a new loss. The strategy calls
        # ``training_step`` through the instance attribute, inside the DDP wrapper, so an
        # instance-level wrapper adds the regulariser before accumulation scaling, AMP
        # scaling and gradient sync, exactly as if the user had written it.
        if self._wrapped_module is pl_module:
            return
        original = pl_module.training_step
        # An instance attribute may already be there: Lightning puts the compiled
        # training_step there for trainer.fit(torch.compile(model)). Teardown restores it.
        self._replaced_training_step = vars(pl_module).get("training_step")

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            extra = self._extra_loss(pl_module)
            return output if extra is None else add_to_loss(output, extra, "NIPQCallback")

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped_module = pl_module
        self._training_step_wrapper = training_step

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Model weights (and so calibration flags) are restored from ckpt_path before this
        # hook; optimizer state is restored after it, onto the groups split here.
        params = [p for _, q in quantizers(pl_module) for p in q.parameters()]
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for line in split_quantizer_params(trainer.optimizers, params, self.quantizer_lr_factor, schedulers):
            log.info("NIPQ: %s", line)
        if self._distiller is not None:
            self._distiller.teacher.to(pl_module.device)
        self._generator = self._make_generator(pl_module.device)
        uncalibrated = []
        for _, q in quantizers(pl_module):
            q.generator = self._generator
            if not q.calibrated:
                uncalibrated.append(q)
        self._observer = None
        self._calibrating = uncalibrated
        if uncalibrated:
            self._observer = ActivationObserver(self.calibration_percentile)
            for q in uncalibrated:
                self._observer.watch(q)
                q.deferred_observations = []

    def _make_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(torch.initial_seed())
        if self._generator_state is not None:
            try:
                generator.set_state(self._generator_state)
            except (RuntimeError, ValueError):
                rank_zero_warn("NIPQ: the checkpoint's noise generator state does not fit this device; reseeding it")
            self._generator_state = None
        return generator

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._remove_load_hook is not None:
            self._remove_load_hook()
            self._remove_load_hook = None
        module = self._wrapped_module
        if module is not None and vars(module).get("training_step") is self._training_step_wrapper:
            if self._replaced_training_step is None:
                del module.training_step
            else:
                module.training_step = self._replaced_training_step  # type: ignore[method-assign]
        self._wrapped_module = self._training_step_wrapper = self._replaced_training_step = None
        if self._distiller is not None:
            self._distiller.detach()

    # ------------------------------------------------------------------ the loss
    def bit_loss(self, pl_module: LightningModule) -> Tensor:
        """``reg_weight`` times the bit-budget penalty now (zero in the hard phase).

        With automatic optimisation it is added to your loss for you; with manual
        optimisation add ``lightning_nipq.bit_loss(self)`` to the loss you backpropagate.
        """
        self._bit_loss_calls += 1
        phase = self._phase(pl_module)
        if phase == "hard" or self.reg_weight == 0:
            loss = torch.zeros((), device=pl_module.device)
        else:
            loss = self.bit_budget.loss_of(self._pairs()) * self.reg_weight
        self._last_bit_loss = loss.detach()
        return loss

    def _extra_loss(self, pl_module: LightningModule) -> Optional[Tensor]:
        total = self.bit_loss(pl_module)
        if self._distiller is not None:
            kd = self._distiller.pop()
            if kd is None:
                raise RuntimeError(
                    "distillation is on but training_step never called the LightningModule itself; call "
                    "self(...) (not a submodule) for the outputs to distil"
                )
            total = total + kd
        return total

    def _pairs(self) -> list[tuple[BaseQuantizer, Optional[BaseQuantizer]]]:
        return [(layer.weight_quantizer, layer.input_quantizer) for layer in self._layers]

    def _phase(self, pl_module: LightningModule) -> str:
        if self.schedule is None:
            return "noise"
        return self.schedule.phase(pl_module.current_epoch)

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.schedule is not None
        self._bit_loss_calls = 0
        epoch = trainer.current_epoch
        total = trainer.num_training_batches
        progress = batch_idx / total if isinstance(total, int) and total > 0 else 0.0
        share = self.schedule.hard_share(epoch, progress)
        layers = self._layers
        hard_count = self.schedule.hard_layer_count(share, len(layers))
        blend = self.schedule.phase(epoch) == "anneal"
        for index, layer in enumerate(layers):
            mode = "hard" if index < hard_count else "noise"
            for q in (layer.weight_quantizer, layer.input_quantizer):
                if q is not None:
                    q.mode = mode
                    q.blend_modes = blend

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for q in self._calibrating:
            q.flush_observations()
        if self._observer is not None and self._observer.batches_seen >= self.calibration_batches:
            self._finish_calibration(trainer)
            if self._phase(pl_module) == "hard":  # inputs calibrated inside the hard phase freeze now
                self.finalize_bits(pl_module)
        if not pl_module.automatic_optimization and self._bit_loss_calls == 0 and self._phase(pl_module) != "hard":
            raise RuntimeError(
                "NIPQCallback: with manual optimisation, add lightning_nipq.bit_loss(self) to the loss you "
                "backpropagate in training_step; the bit budget is not applied otherwise"
            )
        self._log_bits(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Bits freeze when the hard phase starts: always at an epoch boundary, so nothing
        # needs checking per step. Idempotent, so a resumed hard epoch is unaffected.
        if self._phase(pl_module) == "hard":
            self.finalize_bits(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # An epoch shorter than calibration_batches still ends calibration.
        for q in self._calibrating:
            q.flush_observations()
        if self._observer is not None and self._observer.batches_seen > 0:
            self._finish_calibration(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Walked afresh: a HardQuantize listed before this callback has converted the layers already.
        for _, q in quantizers(pl_module):
            q.blend_modes = False
        self.finalize_bits(pl_module)

    def _finish_calibration(self, trainer: Trainer) -> None:
        assert self._observer is not None
        strategy = trainer.strategy
        self._observer.finish(
            reduce_mean=lambda t: strategy.reduce(t.to(strategy.root_device), reduce_op="mean").cpu(),
            reduce_min=lambda t: -strategy.reduce(-t.to(strategy.root_device), reduce_op="max").cpu(),
        )
        self._observer = None
        for q in self._calibrating:
            q.deferred_observations = None
        self._calibrating = []

    def _log_bits(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            avg_w, avg_a = pair_average_bits(self._pairs())
            # Hundreds of per-layer series cost real time in self.log; loggers only keep
            # every log_every_n_steps-th value anyway.
            if self.log_per_layer and is_logging_step(trainer):
                pl_module.log_dict(per_layer_metrics(self._named_layers), on_step=True, on_epoch=False)
        if avg_w is not None:
            pl_module.log("nipq/avg_weight_bits", avg_w, prog_bar=True, on_step=True, on_epoch=False)
        if avg_a is not None:
            pl_module.log("nipq/avg_act_bits", avg_a, prog_bar=True, on_step=True, on_epoch=False)
        if self._last_bit_loss is not None:
            pl_module.log("nipq/bit_loss", self._last_bit_loss, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ freezing
    def finalize_bits(self, pl_module: LightningModule) -> None:
        """Freeze learned bits at whole values that meet the average-bit budget (idempotent)."""
        layers = [layer for _, layer in quantized_layers(pl_module)]
        weights = [layer.weight_quantizer for layer in layers]  # walked afresh: works before setup too
        inputs = [layer.input_quantizer for layer in layers if layer.input_quantizer is not None]
        for group, target in ((weights, self.target_bits), (inputs, self.target_act_bits)):
            learning = [q for q in group if q.learns_bits and q.calibrated]
            if not learning:
                continue
            if self.budget == "avg_bits":
                with torch.no_grad():
                    learned = average_bits(group)
                if learned is not None and float(learned) > target + UNMET_BUDGET_WARNING:
                    rank_zero_warn(
                        f"NIPQ: the learned average bits ({float(learned):.2f}) are still {float(learned) - target:.2f} "
                        f"above the target {target:g} when freezing; whole bits are cut to fit, which costs accuracy. "
                        "Raise quantizer_lr_factor or reg_weight, or train longer before the hard phase."
                    )
                chosen = fit_bits_to_budget(group, target)
                for q in learning:
                    q.freeze_bits(chosen.get(id(q), q.rounded_bits()))
            else:
                for q in learning:
                    q.freeze_bits()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "target_bits": self.target_bits,
            "target_act_bits": self.target_act_bits,
            "budget": self.budget,
            "hard_epochs": self.hard_epochs,
            "anneal_epochs": self.anneal_epochs,
        }
        if self._generator is not None:
            state["generator_state"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        settings = {k: v for k, v in state_dict.items() if k != "generator_state"}
        changed = [k for k, v in settings.items() if getattr(self, k, v) != v]
        if changed:
            rank_zero_warn(f"NIPQ: resuming with changed settings {changed}; the new values are used")
        self._generator_state = state_dict.get("generator_state")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[MANIFEST_KEY] = quantization_manifest(
            pl_module,
            phase=self._phase(pl_module),
            epoch=trainer.current_epoch,
            config={k: v for k, v in self.state_dict().items() if k != "generator_state"},
        )


def _check_bits(
    min_bits: int,
    max_bits: int,
    target_bits: float,
    target_act_bits: Optional[float],
    weight_bits: Optional[int],
    act_bits: Optional[int],
    init_bits: Optional[float],
) -> None:
    if not isinstance(min_bits, int) or min_bits < 1:
        raise ValueError(f"min_bits must be a whole number >= 1, got {min_bits!r}")
    if not isinstance(max_bits, int) or not min_bits <= max_bits <= MAX_SUPPORTED_BITS:
        raise ValueError(f"max_bits must be a whole number in [min_bits={min_bits}, {MAX_SUPPORTED_BITS}], got {max_bits!r}")
    if weight_bits is not None and (not isinstance(weight_bits, int) or not MIN_SIGNED_BITS <= weight_bits <= MAX_SUPPORTED_BITS):
        raise ValueError(f"weight_bits must be a whole number in [2, {MAX_SUPPORTED_BITS}] (weights are signed), got {weight_bits!r}")
    if act_bits is not None and (not isinstance(act_bits, int) or not 1 <= act_bits <= MAX_SUPPORTED_BITS):
        raise ValueError(f"act_bits must be a whole number in [1, {MAX_SUPPORTED_BITS}], got {act_bits!r}")
    if weight_bits is None:
        low = max(min_bits, MIN_SIGNED_BITS)
        if not low <= target_bits <= max_bits:
            raise ValueError(
                f"target_bits={target_bits} is outside [{low}, {max_bits}], the range learned weight bits can take "
                f"(weights are signed and need at least {MIN_SIGNED_BITS}); change target_bits or min_bits/max_bits"
            )
    if act_bits is None:
        act_target = target_bits if target_act_bits is None else target_act_bits
        if not min_bits <= act_target <= max_bits:
            raise ValueError(
                f"target_act_bits={act_target} is outside [min_bits={min_bits}, max_bits={max_bits}]; "
                "change it or the bit range"
            )
    if init_bits is not None and not min_bits <= init_bits <= max_bits:
        raise ValueError(f"init_bits={init_bits} is outside [min_bits={min_bits}, max_bits={max_bits}]")


def bit_loss(pl_module: LightningModule) -> Tensor:
    """The bit-budget loss of the `NIPQCallback` training ``pl_module``, for manual optimisation.

    Example:

        ```python
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = self.task_loss(batch) + lightning_nipq.bit_loss(self)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        ```
    """
    for callback in pl_module.trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, NIPQCallback):
            return callback.bit_loss(pl_module)
    raise RuntimeError("bit_loss needs a NIPQCallback among the Trainer's callbacks")
