"""NIPQCallback: learnable-bit pseudo-quantization training for any LightningModule."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_nipq.callbacks.loss_injection import add_to_loss
from lightning_nipq.callbacks.module_hooks import find_callback, wrap_method
from lightning_nipq.callbacks.quantization_aware import QuantizationAwareTraining
from lightning_nipq.layers.model_walk import quantized_layers, quantizers
from lightning_nipq.quant.codes import MIN_SIGNED_BITS
from lightning_nipq.quant.nipq_quantizer import NIPQConfig
from lightning_nipq.training.bit_budget import BUDGETS, BitBudget, model_pairs, unique
from lightning_nipq.training.bit_sensitivity import BitSensitivity
from lightning_nipq.training.bit_vector import LogitTap
from lightning_nipq.training.distillation import Distiller, frozen_copy
from lightning_nipq.training.phase_schedule import PhaseSchedule

log = logging.getLogger(__name__)

#: Learned bits further above the target than this when freezing get a warning.
UNMET_BUDGET_WARNING = 0.5
#: The hard phase's share of the optimizer steps when the Trainer is limited by max_steps.
DEFAULT_HARD_FRACTION = 0.1
#: How the learned bits become whole bits when they freeze (see ``allocation``).
ALLOCATIONS = ("sensitivity", "nearest")


class NIPQCallback(QuantizationAwareTraining):
    r"""Quantization-aware training with NIPQ: learned bit-widths under an average-bit budget.

    In ``setup`` every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of the LightningModule gets a
    learnable-bit, learnable-range quantizer on its weight and its input (the first layer
    keeps a float input), so your ``configure_optimizers`` and DDP see the new parameters.
    Training then runs in three phases, decided at each batch from the epoch counter (so
    resuming lands in the right one):

    1. noise: pseudo-quantization noise on weights and inputs, learned bits with
       stochastic rounding, and the bit-budget regulariser added to your training loss;
    2. ``anneal_epochs`` (or ``anneal_fraction`` of the steps) of hand-over, in which layers switch to hard quantization one by
       one (the share rises linearly from 0 to 1);
    3. ``hard_epochs`` (or ``hard_fraction`` of the steps) of straight-through fake quantization with the bits frozen (fitted
       to the budget) and the regulariser off.

    Add `lightning_nipq.HardQuantize` to turn the result into a validated integer model.
    On a model that holds NIPQ quantizers already (a second fit, a resumed run), the
    quantizers take this callback's ``noise`` and ``stochastic_bits``; another bit range or
    another method is refused with an error.

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
        hard_epochs: final epochs of hard quantization with frozen bits (default 1, or
            ``hard_fraction=0.1`` when the Trainer is limited by ``max_steps``).
        anneal_epochs: epochs of gradual hand-over from noise to hard quantization before
            them (default 0).
        hard_fraction: the hard phase as a share of all optimizer steps (the last
            ``hard_fraction`` of them), instead of ``hard_epochs``; for step-based runs.
        anneal_fraction: the hand-over as a share of all optimizer steps, instead of
            ``anneal_epochs``.
        reg_weight: strength of the bit-budget regulariser (the penalty is in bits).
        enforce_budget: before every optimizer step of the noise and hand-over phases, shift
            all learned bits together (their logits by one amount) so that their average (or BOPs) meets the
            budget (`lightning_nipq.training.BitBudget.project`; the continuous bits, which
            stochastic rounding trains at on average), and fill the budget with whole bits
            when they freeze: the budget holds however short the run, and the task loss decides
            which layers sit above and which below. ``False`` leaves the average to the
            regulariser, which moves it about one bit per hundred steps.
        allocation: how the bits freeze into whole bits that meet the budget. ``"sensitivity"``
            (default): each learned bit-width's gradients over the noise phase measure how much
            loss a bit less would cost that layer (`lightning_nipq.training.bit_sensitivity`),
            and the whole bits with the least predicted loss are chosen: sensitive layers above
            the target, robust ones below, even at a whole-bit target, where the learned bits of
            a short run sit within half a bit of it and would all round to it. ``"nearest"``:
            the whole bits nearest the learned ones (used too when a quantizer saw fewer than
            8 noise-phase steps).
        quantizer_lr_factor: learning-rate factor for quantizer parameters, which also get
            ``weight_decay=0`` (their groups are split off your optimizer's groups at fit start).
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
        quantize_products: ``True`` also quantizes both operands of the two
            activation-by-activation products inside attention (``Q @ K^T`` and
            ``weights @ V`` of every ``nn.MultiheadAttention``, and any
            `lightning_nipq.layers.ActivationProduct` of your model), for all-integer
            attention. Each operand counts in the average input bits like a layer's input and
            learns its bits the same way; the integer model multiplies their codes exactly.
            Needs ``budget="avg_bits"``.
        input_zero_point: ``"off"`` (default: symmetric signed codes for inputs that take
            negative values, unsigned ones otherwise) or ``"auto"``: calibration gives a zero
            point to each input whose most negative value is at most half its largest magnitude
            (GELU and SiLU outputs), whose unsigned codes then cover ``[min, alpha]`` instead of
            wasting half a symmetric grid on ``[-alpha, 0]``. Exact in the integer layers, saved
            and exported.
        calibration_batches: training batches used to measure input ranges and signs before
            input quantization starts.
        calibration_percentile: percentile of ``|x|`` taken as the initial input range.
        init_bits: starting learned bit-width. By default ``target_bits`` under ``enforce_budget``
            (where the projection puts the bits on the first step anyway), so that the weight
            ranges start at the clipping for the bits they train at; else ``max_bits - 0.5``.
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
        hard_epochs: Optional[int] = None,
        anneal_epochs: Optional[int] = None,
        hard_fraction: Optional[float] = None,
        anneal_fraction: Optional[float] = None,
        reg_weight: float = 1.0,
        enforce_budget: bool = True,
        allocation: str = "sensitivity",
        quantizer_lr_factor: float = 10.0,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        float_input_layers: Optional[Sequence[str]] = None,
        weight_granularity: Union[str, int] = "channel",
        quantize_inputs: bool = True,
        quantize_products: bool = False,
        input_zero_point: str = "off",
        calibration_batches: int = 4,
        calibration_percentile: float = 99.9,
        init_bits: Optional[float] = None,
        weight_init: str = "mse",
        distillation: bool = False,
        distillation_weight: float = 1.0,
        distillation_temperature: float = 1.0,
        log_per_layer: bool = True,
    ) -> None:
        #: The ``init_bits`` argument as given (None: the default, which depends on enforce_budget).
        self.init_bits = init_bits
        if init_bits is None and enforce_budget and isinstance(enforce_budget, bool) and _is_bit_count(target_bits):
            # The projection puts the learned bits at the target from the first step: start them,
            # and the weight ranges' MSE clipping, there rather than at max_bits - 0.5.
            bounds_valid = all(isinstance(b, int) and not isinstance(b, bool) for b in (min_bits, max_bits))
            if bounds_valid and max(min_bits, MIN_SIGNED_BITS) <= target_bits <= max_bits:
                init_bits = float(target_bits)
        config = NIPQConfig(
            min_bits=min_bits,
            max_bits=max_bits,
            init_bits=init_bits,
            weight_bits=weight_bits,
            act_bits=act_bits,
            noise=noise,
            stochastic_bits=stochastic_bits,
            weight_init=weight_init,
            weight_granularity=weight_granularity,
            input_zero_point=input_zero_point,
        )
        _check_targets(config, target_bits, target_act_bits)
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        for name, value in (("hard_epochs", hard_epochs), ("anneal_epochs", anneal_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        for name, value in (("hard_fraction", hard_fraction), ("anneal_fraction", anneal_fraction)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
                raise ValueError(f"{name} must be a number in [0, 1), a share of all optimizer steps, got {value!r}")
        if (hard_epochs is not None or anneal_epochs is not None) and (hard_fraction is not None or anneal_fraction is not None):
            raise ValueError(
                "give the phases either in epochs (hard_epochs, anneal_epochs) or as shares of the steps "
                "(hard_fraction, anneal_fraction), not both"
            )
        if (hard_fraction or 0) + (anneal_fraction or 0) >= 1:
            raise ValueError("hard_fraction + anneal_fraction must leave a noise phase: keep their sum below 1")
        for name, value, low in (
            ("reg_weight", reg_weight, 0.0),
            ("distillation_weight", distillation_weight, 0.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
        if isinstance(distillation_temperature, bool) or not isinstance(distillation_temperature, (int, float)) or not (
            0 < distillation_temperature < math.inf
        ):
            raise ValueError(f"distillation_temperature must be a finite number > 0, got {distillation_temperature!r}")
        if not isinstance(enforce_budget, bool):
            raise ValueError(f"enforce_budget must be True or False, got {enforce_budget!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if quantize_products is True and budget == "bops":
            raise ValueError(
                "quantize_products=True counts the products' operands in the average input bits; the BOPs budget "
                "weighs layers by their weight's multiply-accumulates and has no place for them. Use budget='avg_bits'"
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
        self.quantizer_config: NIPQConfig = config
        self.target_bits = float(target_bits)
        self.target_act_bits = float(target_act_bits) if target_act_bits is not None else float(target_bits)
        self.budget = budget
        self.hard_epochs = hard_epochs
        self.anneal_epochs = anneal_epochs
        self.hard_fraction = hard_fraction
        self.anneal_fraction = anneal_fraction
        self.reg_weight = float(reg_weight)
        self.enforce_budget = enforce_budget
        self.allocation = allocation
        self.distillation = distillation
        self.distillation_weight = float(distillation_weight)
        self.distillation_temperature = float(distillation_temperature)

        self.bit_budget = BitBudget(self.target_bits, self.target_act_bits, budget)
        self.schedule: Optional[PhaseSchedule] = None
        self._bits_frozen = False
        self._projected_at: Optional[tuple[int, bool]] = None
        self._distiller: Optional[Distiller] = None
        self._last_bit_loss: Optional[Tensor] = None
        self._bit_loss_calls = 0
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[Tensor] = None
        self.sensitivity = BitSensitivity()
        self._sensitivity_state: Optional[dict[str, Any]] = None
        self._named_quantizers: dict[str, Any] = {}
        self._quantizer_names: dict[int, str] = {}
        # (tap, quantizer names, global step) of each micro-batch's bit loss in this optimizer step.
        self._taps: list[tuple[LogitTap, list[str], int]] = []

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "target_bits": self.target_bits,
            "target_act_bits": self.target_act_bits,
            "budget": self.budget,
            "enforce_budget": self.enforce_budget,
            "allocation": self.allocation,
            "hard_epochs": self.hard_epochs,
            "anneal_epochs": self.anneal_epochs,
            "hard_fraction": self.hard_fraction,
            "anneal_fraction": self.anneal_fraction,
            "noise": self.quantizer_config.noise,
            "stochastic_bits": self.quantizer_config.stochastic_bits,
        }

    # ------------------------------------------------------------------ set-up
    def _before_attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.schedule = self._make_schedule(trainer)
        self._bits_frozen = False
        self._projected_at = None
        if self.distillation and self._distiller is None and not any(True for _ in quantized_layers(pl_module)):
            # The teacher is the float model, copied before it is quantized.
            self._distiller = Distiller(frozen_copy(pl_module), self.distillation_weight, self.distillation_temperature)

    def _after_attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._distiller is not None:
            self._distiller.attach(pl_module)
            self._undo.append(self._distiller.detach)
        if pl_module.automatic_optimization:
            self._undo.append(wrap_method(pl_module, "training_step", self._training_step_wrapper(pl_module)))

    def _counts_in_steps(self, trainer: Trainer) -> bool:
        if self.hard_fraction is not None or self.anneal_fraction is not None:
            return True
        given_in_epochs = self.hard_epochs is not None or self.anneal_epochs is not None
        return not given_in_epochs and trainer.max_steps is not None and trainer.max_steps > 0

    def _make_schedule(self, trainer: Trainer) -> Optional[PhaseSchedule]:
        """The schedule in epochs, checked now; None for one in steps, made at train start (`_step_schedule`)."""
        if self._counts_in_steps(trainer):
            return None
        hard = 1 if self.hard_epochs is None else self.hard_epochs
        anneal = self.anneal_epochs or 0
        max_epochs = trainer.max_epochs
        if (hard or anneal) and (max_epochs is None or max_epochs < 1):
            raise ValueError(
                "NIPQCallback places its hard phase in the last epochs and needs Trainer(max_epochs=N); give "
                "Trainer(max_steps=N) (the hard phase is then the last hard_fraction=0.1 of the steps), or set "
                "hard_epochs=0 and anneal_epochs=0"
            )
        return PhaseSchedule(max(max_epochs or 1, 1), hard, anneal, unit="epoch")

    def _step_schedule(self, trainer: Trainer) -> PhaseSchedule:
        # The number of optimizer steps is known once the dataloaders are (max_steps, or
        # max_epochs times the epoch's length over the accumulation).
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                "NIPQCallback's hard_fraction/anneal_fraction need a known number of optimizer steps: set "
                "Trainer(max_steps=N), or give the training dataloader a length, or use hard_epochs/anneal_epochs"
            )
        total = int(total)
        hard_fraction = DEFAULT_HARD_FRACTION if self.hard_fraction is None else self.hard_fraction
        # At least one step of each phase asked for, however short the run.
        hard = max(1, round(total * hard_fraction)) if hard_fraction > 0 else 0
        anneal = max(1, round(total * self.anneal_fraction)) if self.anneal_fraction else 0
        return PhaseSchedule(total, min(hard, total), min(anneal, total - min(hard, total)), unit="step")

    def _training_step_wrapper(self, pl_module: LightningModule) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                output = original(*args, **kwargs)
                return add_to_loss(output, self._extra_loss(pl_module), "NIPQCallback")

            return training_step

        return make

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.schedule is None:
            self.schedule = self._step_schedule(trainer)
        if self._distiller is not None:
            self._distiller.teacher.to(pl_module.device)
        self._generator = self._make_generator(pl_module.device)
        self._named_quantizers = dict(quantizers(pl_module))
        self._quantizer_names = {id(q): name for name, q in self._named_quantizers.items()}
        for q in self._named_quantizers.values():
            q.generator = self._generator
        if self._sensitivity_state is not None:
            self.sensitivity.load_state_dict(self._sensitivity_state, pl_module.device)
            self._sensitivity_state = None
        elif not trainer.ckpt_path:
            self.sensitivity.reset()

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

    # ------------------------------------------------------------------ the loss
    def bit_loss(self, pl_module: LightningModule) -> Tensor:
        """``reg_weight`` times the bit-budget penalty now (zero in the hard phase).

        With automatic optimisation it is added to your loss for you; with manual
        optimisation add ``lightning_nipq.callbacks.bit_loss(self)`` to the loss you backpropagate.
        """
        self._bit_loss_calls += 1
        if self._phase(pl_module) == "hard" or self.reg_weight == 0:
            loss = torch.zeros((), device=pl_module.device)
        else:
            pairs = self._pairs()
            tap = None
            if self.allocation == "sensitivity" and pl_module.automatic_optimization and not self._bits_frozen:
                # The sensitivities need the task's share of the bits' gradients: the tap records
                # the regulariser's share in the backward that runs anyway.
                learning = unique([q for pair in pairs for q in pair if q is not None and q.learns_bits])
                tap = LogitTap([q.logistic_bits()[0] for q in learning])
                names = [self._quantizer_names.get(id(q), "") for q in learning]  # "": not observed
            loss = self.bit_budget.loss_of(pairs, tap) * self.reg_weight
            if tap is not None:
                tap.watch(loss)
                step = pl_module.global_step  # a skipped optimizer step leaves taps of an earlier one behind: drop them
                self._taps = [entry for entry in self._taps if entry[2] == step] + [(tap, names, step)]
        self._last_bit_loss = loss.detach()
        return loss

    def _extra_loss(self, pl_module: LightningModule) -> Tensor:
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

    def _position(self, pl_module: LightningModule) -> int:
        assert self.schedule is not None
        return pl_module.current_epoch if self.schedule.unit == "epoch" else pl_module.global_step

    def _phase(self, pl_module: LightningModule) -> str:
        if self.schedule is None:
            return "noise"
        return self.schedule.phase(self._position(pl_module))

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        assert self.schedule is not None
        self._bit_loss_calls = 0
        position = self._position(pl_module)
        phase = self.schedule.phase(position)
        if phase == "hard" and not self._bits_frozen:
            # Bits freeze as the hard phase starts (an epoch or a step); idempotent, so a
            # resumed hard phase is unaffected.
            self.finalize_bits(pl_module)
            self._bits_frozen = True
        progress = 0.0
        total = trainer.num_training_batches
        if self.schedule.unit == "epoch" and isinstance(total, int) and total > 0:
            progress = batch_idx / total
        if self.enforce_budget and phase != "hard":
            # Only when the bits may have changed: after an optimizer step, or once the inputs
            # are calibrated (not between the micro-batches of an accumulated step).
            key = (trainer.global_step, self._observer is None)
            if key != self._projected_at:
                self.bit_budget.project(self._pairs())
                self._projected_at = key
        share = self.schedule.hard_share(position, progress)
        # Layers in order, then the activation products' operands: they turn hard last.
        units = self._pairs()
        hard_count = self.schedule.hard_layer_count(share, len(units))
        blend = phase == "anneal"
        hard: set[int] = set()
        for index, unit in enumerate(units):
            mode = "hard" if index < hard_count else "noise"
            for q in unit:
                if q is None or (mode == "noise" and id(q) in hard):
                    continue  # a weight quantizer shared by tied layers is hard once the first of them is
                q.mode = mode
                q.blend_modes = blend
                if mode == "hard":
                    hard.add(id(q))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.allocation == "sensitivity" and not self._bits_frozen and self._phase(pl_module) != "hard":
            # The bits' gradients are complete here (accumulated, unscaled, all-reduced).
            self.sensitivity.observe(self._named_quantizers, self._regulariser_gradients(trainer, pl_module))

    def _regulariser_gradients(self, trainer: Trainer, pl_module: LightningModule) -> Optional[dict[str, Tensor]]:
        """The budget regulariser's share of each bit logit's gradient, which is not the task's.

        Each micro-batch's backward recorded its own (`LogitTap`); Lightning divides every
        micro-batch's loss by ``accumulate_grad_batches``, and so the shares are summed and
        divided alike (the first micro-batch may precede the end of calibration, and count
        fewer inputs). With manual optimisation the user adds the regulariser as they see fit;
        nothing is taken out then.
        """
        recorded = [(gradient, names) for tap, names, _ in self._taps if (gradient := tap.gradient()) is not None]
        self._taps = []
        if not recorded or not pl_module.automatic_optimization:
            return None
        scale = 1.0 / trainer.accumulate_grad_batches
        if all(names == recorded[0][1] for _, names in recorded):
            total = sum(gradient for gradient, _ in recorded[1:]) + recorded[0][0]  # type: ignore[operator]
            return dict(zip(recorded[0][1], (total * scale).unbind()))
        shares: dict[str, Tensor] = {}
        for gradient, names in recorded:
            for name, value in zip(names, gradient.unbind()):  # type: ignore[union-attr]
                shares[name] = shares[name] + value * scale if name in shares else value * scale
        return shares

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not pl_module.automatic_optimization and self._bit_loss_calls == 0 and self._phase(pl_module) != "hard":
            raise RuntimeError(
                "NIPQCallback: with manual optimisation, add lightning_nipq.callbacks.bit_loss(self) to the loss you "
                "backpropagate in training_step; the bit budget is not applied otherwise"
            )
        if self._last_bit_loss is not None:
            pl_module.log("nipq/bit_loss", self._last_bit_loss, on_step=True, on_epoch=False)

    def _after_calibration(self, pl_module: LightningModule) -> None:
        if self._phase(pl_module) == "hard":  # inputs calibrated inside the hard phase freeze now
            self.finalize_bits(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Walked afresh: a HardQuantize listed before this callback has converted the layers already.
        for _, q in quantizers(pl_module):
            q.blend_modes = False
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ freezing
    def finalize_bits(self, pl_module: LightningModule) -> None:
        """Freeze learned bits at whole values that meet the budget (idempotent)."""
        pairs = model_pairs(pl_module)  # walked afresh: works before setup too
        if not any(q is not None and q.learns_bits and q.calibrated for pair in pairs for q in pair):
            return
        with torch.no_grad():
            for label, learned, target in self.bit_budget.excess(pairs):
                if learned > target + UNMET_BUDGET_WARNING:
                    rank_zero_warn(
                        f"NIPQ: when freezing, the learned {label} ({learned:.2f}) is {learned - target:.2f} above the "
                        f"target {target:g}; whole bits are cut to fit, which costs accuracy. Raise "
                        "quantizer_lr_factor or reg_weight, or train longer before the hard phase."
                    )
            costs = None
            if self.allocation == "sensitivity":
                costs = self.sensitivity.costs(dict(quantizers(pl_module)))
                if costs is None:
                    log.info("NIPQ: too few noise-phase steps to measure sensitivities; whole bits nearest the learned ones")
            # Under enforce_budget the learned bits meet the budget on average; rounding a few
            # large layers can still leave much of it unused, so the fit fills it.
            chosen = self.bit_budget.fit(pairs, fill=self.enforce_budget, costs=costs)
        for weight_q, input_q in pairs:
            for q in (weight_q, input_q):
                # An input that stays float is frozen as it is: its bits are never used.
                if q is not None and q.learns_bits and (q.calibrated or q.stays_float):
                    q.freeze_bits(chosen.get(id(q), q.rounded_bits()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._generator is not None:
            state["generator_state"] = self._generator.get_state()
        state["bit_sensitivity"] = self.sensitivity.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = ("generator_state", "bit_sensitivity")
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in own})
        self._generator_state = state_dict.get("generator_state")
        self._sensitivity_state = state_dict.get("bit_sensitivity")

    def _manifest_extra(self, pl_module: LightningModule) -> dict[str, Any]:
        return {"phase": self._phase(pl_module)}


def _is_bit_count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_targets(config: NIPQConfig, target_bits: Any, target_act_bits: Any) -> None:
    for name, value in (("target_bits", target_bits), ("target_act_bits", target_act_bits)):
        if value is None and name == "target_act_bits":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of bits, got {value!r}")
    if config.weight_bits is None:
        low = max(config.min_bits, MIN_SIGNED_BITS)
        if not low <= target_bits <= config.max_bits:
            raise ValueError(
                f"target_bits={target_bits} is outside [{low}, {config.max_bits}], the range learned weight bits can "
                f"take (weights are signed and need at least {MIN_SIGNED_BITS}); change target_bits or min_bits/max_bits"
            )
    if config.act_bits is None:
        act_target = target_bits if target_act_bits is None else target_act_bits
        if not config.min_bits <= act_target <= config.max_bits:
            raise ValueError(
                f"target_act_bits={act_target} is outside [min_bits={config.min_bits}, max_bits={config.max_bits}]; "
                "change it or the bit range"
            )


def bit_loss(pl_module: LightningModule) -> Tensor:
    """The bit-budget loss of the `NIPQCallback` training ``pl_module``, for manual optimisation.

    Example:

        ```python
        from lightning_nipq.callbacks import bit_loss

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = self.task_loss(batch) + bit_loss(self)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        ```
    """
    callback = find_callback(pl_module.trainer, NIPQCallback)
    if callback is None:
        raise RuntimeError("bit_loss needs a NIPQCallback among the Trainer's callbacks")
    return callback.bit_loss(pl_module)
