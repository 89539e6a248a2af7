"""QuantizationAwareTraining: what every quantization-aware-training callback does, whatever its method.

`lightning_nipq.NIPQCallback` and `lightning_nipq.LSQCallback` subclass it and add only
what is theirs (NIPQ: the bit budget, the noise schedule, distillation; LSQ: nothing but
its config).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_nipq.callbacks.module_hooks import (
    install_load_hook,
    keep_logging_eager,
    remove_pending_seal,
    seal_when_saved,
    wrap_method,
)
from lightning_nipq.callbacks.strategy_support import check_strategy, spawns_processes
from lightning_nipq.layers.attach import attach_quantizers, check_input_choice, check_products_choice
from lightning_nipq.layers.model_walk import check_patterns, product_quantizers, quantized_layers, quantized_products, quantizers
from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.quant.methods import QuantizerFactory
from lightning_nipq.quant.observers import RangeObserver
from lightning_nipq.saving.checkpoint import MANIFEST_KEY, quantization_manifest
from lightning_nipq.training.bit_budget import pair_average_bits, product_pairs
from lightning_nipq.training.layer_metrics import is_logging_step, per_layer_metrics
from lightning_nipq.training.param_groups import split_quantizer_params

log = logging.getLogger(__name__)


class QuantizationAwareTraining(Callback):
    """The shared base of the quantization-aware-training callbacks.

    In ``setup`` it attaches the quantizers ``config`` builds to every quantizable layer of
    the LightningModule (before ``configure_optimizers`` and DDP), or, if the model holds
    quantizers already, makes them follow ``config`` (refusing what cannot change). At fit
    start, after a checkpoint's weights are restored, it does the same again, moves the
    quantizer parameters into their own optimizer groups, and starts calibrating the inputs
    on the first training batches. It logs the average (and per-layer) bits, writes a
    manifest into checkpoints, freezes the bits when training ends (`finalize_bits`), and
    takes off whatever it wrapped at teardown.

    Args:
        config: builds the quantizers (`lightning_nipq.NIPQConfig`, `lightning_nipq.LSQConfig`).
        quantizer_lr_factor: learning-rate factor for the quantizer parameters, which also get
            ``weight_decay=0``.
        include: shell-style module-name patterns to quantize (default: all supported layers).
        exclude: module-name patterns to leave in float.
        float_input_layers: layers whose input stays float (default: those fed the model's own
            input, found by data flow on the first calibration batch).
        calibration_batches: training batches used to measure input ranges and signs before
            input quantization starts.
        calibration_percentile: percentile of ``|x|`` taken as the initial input range.
        log_per_layer: log each layer's bits and ranges on the steps the loggers write.
        quantize_inputs: ``False`` quantizes weights only (no input quantizer anywhere).
        quantize_products: ``True`` also quantizes both operands of the activation products
            inside attention (see `lightning_nipq.layers.attach_quantizers`).
    """

    def __init__(
        self,
        config: QuantizerFactory,
        quantizer_lr_factor: float,
        include: Optional[Sequence[str]],
        exclude: Optional[Sequence[str]],
        float_input_layers: Optional[Sequence[str]],
        calibration_batches: int,
        calibration_percentile: float,
        log_per_layer: bool,
        quantize_inputs: bool = True,
        quantize_products: bool = False,
    ) -> None:
        check_input_choice(quantize_inputs, float_input_layers)
        check_products_choice(quantize_products, quantize_inputs)
        if not quantize_inputs and getattr(config, "input_zero_point", "off") != "off":
            raise ValueError(
                "input_zero_point gives quantized inputs a zero point, but quantize_inputs=False quantizes no input; "
                "pass one or the other"
            )
        if isinstance(quantizer_lr_factor, bool) or not isinstance(quantizer_lr_factor, (int, float)) or not (
            0 < quantizer_lr_factor < math.inf
        ):
            raise ValueError(f"quantizer_lr_factor must be a finite number > 0, got {quantizer_lr_factor!r}")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be a whole number >= 1, got {calibration_batches!r}")
        if isinstance(calibration_percentile, bool) or not isinstance(calibration_percentile, (int, float)) or not (
            0 < calibration_percentile <= 100
        ):
            raise ValueError(f"calibration_percentile must be a number in (0, 100], got {calibration_percentile!r}")
        if not isinstance(log_per_layer, bool):
            raise ValueError(f"log_per_layer must be True or False, got {log_per_layer!r}")
        self.quantizer_config = config
        self.quantizer_lr_factor = float(quantizer_lr_factor)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.float_input_layers = check_patterns("float_input_layers", float_input_layers)
        self.calibration_batches = calibration_batches
        self.calibration_percentile = float(calibration_percentile)
        self.log_per_layer = log_per_layer
        self.quantize_inputs = quantize_inputs
        self.quantize_products = quantize_products
        #: ``(name, reason)`` of the layers left in float when the quantizers were attached.
        self.skipped: list[tuple[str, str]] = []
        self._named_layers: list[tuple[str, Any]] = []
        self._layers: list[Any] = []
        self._product_pairs: list[tuple[None, BaseQuantizer]] = []
        self._observer: Optional[RangeObserver] = None
        self._calibrating: list[BaseQuantizer] = []
        #: Calibration statistics from a checkpoint written mid-calibration, restored at fit start.
        self._calibration_state: Optional[dict[str, Any]] = None
        self._batch_idx = 0
        #: Undo functions of what was wrapped on the module, run at teardown.
        self._undo: list[Callable[[], None]] = []
        self._stop_tracing: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------------ for subclasses
    def settings(self) -> dict[str, Any]:
        """The callback's settings, saved in its state and the checkpoint manifest."""
        return {
            "method": self.quantizer_config.method,
            "weight_granularity": self.quantizer_config.weight_granularity,
            "quantize_inputs": self.quantize_inputs,
            "quantize_products": self.quantize_products,
            "input_zero_point": getattr(self.quantizer_config, "input_zero_point", "off"),
        }

    def _before_attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs in ``setup`` for fit before the quantizers are attached (the model is still float if new)."""

    def _after_attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs in ``setup`` for fit once the model holds its quantizers."""

    def _after_calibration(self, pl_module: LightningModule) -> None:
        """Runs once the input quantizers have their ranges."""

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        name = type(self).__name__
        check_strategy(trainer.strategy, name)
        # Any stage may restore a checkpoint (fit resuming, validate/test with ckpt_path):
        # rebuild the layers it holds before Lightning loads its state dict.
        for undo in (install_load_hook(pl_module), keep_logging_eager(pl_module)):
            if undo is not None:
                self._undo.append(undo)
        if stage != "fit":
            return
        if spawns_processes(trainer.strategy):
            rank_zero_warn(
                f"{name}: with a spawning strategy (ddp_spawn, ddp_fork, ddp_notebook) the model is quantized in the "
                "worker processes; Lightning copies back only the float tensors that fit your model, so the model in "
                "this process is not quantized after fit. Load the quantized model from a checkpoint "
                "(load_nipq_checkpoint) or use strategy='ddp'."
            )
        self._before_attach(trainer, pl_module)
        if any(True for _ in quantized_layers(pl_module)):
            self._adopt_quantizers(pl_module)
        else:
            result = attach_quantizers(
                pl_module,
                self.quantizer_config,
                self.include,
                self.exclude,
                self.float_input_layers,
                self.quantize_inputs,
                self.quantize_products,
            )
            self.skipped = result.skipped
            rank_zero_info(
                f"{name}: quantizing {len(result.quantized)} layers (float input: "
                + ("the layers fed the model's own input, seen on the first batch" if result.float_input_by_data_flow else str(result.float_input))
                + ")"
                + (f"; {len(result.products)} activation products" if result.products else "")
                + (f"; left in float: {[n for n, _ in result.skipped]}" if result.skipped else "")
            )
        self._walk_layers(pl_module)
        self._after_attach(trainer, pl_module)

    def _adopt_quantizers(self, pl_module: LightningModule) -> None:
        """Make the quantizers on the model follow the config, or refuse (before changing any) if one cannot."""
        pairs = [
            (name, role, q)
            for name, layer in quantized_layers(pl_module)
            for role, q in (("weight", layer.weight_quantizer), ("input", layer.input_quantizer))
            if q is not None
        ] + [(name, "input", q) for name, product in quantized_products(pl_module) for q in product_quantizers(product)]
        problems = [f"{name}: {d}" for name, role, q in pairs if (d := self.quantizer_config.difference(q, role)) is not None]
        if not self.quantize_inputs:
            problems += [f"{name}: it quantizes its input, and quantize_inputs=False" for name, role, _ in pairs if role == "input"]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(
                f"{type(self).__name__}: the model already holds quantizers that differ from this callback's settings: "
                + "; ".join(problems[:3])
                + more
                + ". Give the callback the settings the model was quantized with, or start from the float model "
                "(lightning_nipq.layers.detach_quantizers)."
            )
        for _, role, q in pairs:
            self.quantizer_config.adopt(q, role)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Model weights (and so the quantizers' saved settings and calibration flags) are
        # restored from ckpt_path before this hook; optimizer state is restored after it,
        # onto the groups split here. This callback's settings win over the restored ones.
        self._adopt_quantizers(pl_module)
        self._walk_layers(pl_module)
        params = [p for _, q in quantizers(pl_module) for p in q.parameters()]
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for line in split_quantizer_params(trainer.optimizers, params, self.quantizer_lr_factor, schedulers):
            log.info("%s: %s", type(self).__name__, line)
        uncalibrated = [(name, q) for name, q in quantizers(pl_module) if not q.calibrated and not q.stays_float]
        self._observer = None
        self._calibrating = [q for _, q in uncalibrated]
        if uncalibrated:
            self._observer = RangeObserver("percentile", self.calibration_percentile)
            for name, q in uncalibrated:
                self._observer.watch(q, name)
                q.deferred_observations = []
            self._trace_model_inputs(pl_module, self._observer)
            if self._calibration_state is not None:
                try:
                    self._observer.load_state_dict(self._calibration_state)
                except ValueError as e:
                    rank_zero_warn(f"{type(self).__name__}: the checkpoint's calibration statistics are not used ({e})")
        self._calibration_state = None

    def _trace_model_inputs(self, pl_module: LightningModule, observer: RangeObserver) -> None:
        # While calibrating, training_step runs inside the observer's tracing: a layer fed the
        # batch's tensors (or values computed from them alone) keeps a float input. Compiled
        # code cannot run under the op-following mode, so there only the batch's own tensors
        # (and views of them) are recognised, from their memory.
        compiled = getattr(pl_module, "_compiler_ctx", None) is not None or any(
            isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in pl_module.modules()
        )

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                with observer.tracing_model_inputs(args[0] if args else kwargs.get("batch"), follow_ops=not compiled):
                    return original(*args, **kwargs)

            return training_step

        undo = wrap_method(pl_module, "training_step", make)
        self._undo.append(undo)
        self._stop_tracing = undo

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_wrappers(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning runs no teardown hook of the callbacks when fit raises: a wrapper left on
        # the module would add this dead callback's loss to every later fit.
        self._remove_wrappers(pl_module)

    def _remove_wrappers(self, pl_module: LightningModule) -> None:
        while self._undo:
            self._undo.pop()()
        remove_pending_seal(pl_module)

    # ------------------------------------------------------------------ numeric guard
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        # A NaN or Inf loss would otherwise train on, poison every learned range and bit-width,
        # and fail much later far from its cause. One host sync per step; under DDP the flag
        # is summed over the processes first (one collective), so that every process stops
        # or none does: one stopping alone would leave the others waiting in the all-reduce.
        broken = (~torch.isfinite(loss.detach())).any().float()
        if trainer.world_size > 1:
            broken = trainer.strategy.reduce(broken, reduce_op="sum")
        if float(broken) > 0:
            where = "on this process" if bool((~torch.isfinite(loss.detach())).any()) else "on another process"
            raise FloatingPointError(
                f"{type(self).__name__}: the training loss is not finite ({where}) at epoch {trainer.current_epoch}, "
                f"batch {self._batch_idx} (global step {trainer.global_step}). Check that batch for NaN or Inf inputs; "
                "if the inputs are finite, lower the learning rate or quantizer_lr_factor. On one process, returning "
                "None from training_step for such batches skips them instead."
            )

    # ------------------------------------------------------------------ calibration and logging
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for q in self._calibrating:
            q.flush_observations()
        if self._observer is not None and self._observer.batches_seen >= self.calibration_batches:
            self._finish_calibration(trainer, pl_module)
        self._log_bits(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # An epoch shorter than calibration_batches still ends calibration.
        for q in self._calibrating:
            q.flush_observations()
        if self._observer is not None and self._observer.batches_seen > 0:
            self._finish_calibration(trainer, pl_module)

    def _finish_calibration(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._observer is not None
        strategy = trainer.strategy
        self._observer.finish(
            reduce_mean=lambda t: strategy.reduce(t.to(strategy.root_device), reduce_op="mean").cpu(),
            reduce_min=lambda t: -strategy.reduce(-t.to(strategy.root_device), reduce_op="max").cpu(),
            # The largest magnitudes decide the zero points too: every rank must decide alike.
            reduce_max=lambda t: strategy.reduce(t.to(strategy.root_device), reduce_op="max").cpu(),
        )
        self._observer = None
        if self._stop_tracing is not None:
            self._stop_tracing()
            self._stop_tracing = None
        for q in self._calibrating:
            q.deferred_observations = None
        self._calibrating = []
        self._agree_on_sizes(trainer, pl_module)
        self._after_calibration(pl_module)

    @staticmethod
    def _agree_on_sizes(trainer: Trainer, pl_module: LightningModule) -> None:
        # Each process measured the quantizers' sizes (elements of an input, MACs of a layer)
        # on its own first batches, which differ with dynamic padding. The budget weighs the
        # layers by them: take the largest everywhere, so that every process weighs them alike.
        if trainer.world_size <= 1:
            return
        found = [q for _, q in quantizers(pl_module)]
        counts = torch.tensor([[q.size, q.macs] for q in found], dtype=torch.float64, device=trainer.strategy.root_device)
        counts = trainer.strategy.reduce(counts, reduce_op="max").cpu()
        for q, (size, macs) in zip(found, counts.tolist()):
            q.size, q.macs = int(size), int(macs)

    def _pairs(self) -> list[tuple[Optional[BaseQuantizer], Optional[BaseQuantizer]]]:
        # Layers, then the operands of activation products (``(None, quantizer)``: inputs without a weight).
        return [(layer.weight_quantizer, layer.input_quantizer) for layer in self._layers] + self._product_pairs

    def _walk_layers(self, pl_module: LightningModule) -> None:
        self._named_layers = list(quantized_layers(pl_module))
        self._layers = [layer for _, layer in self._named_layers]
        self._product_pairs = product_pairs(pl_module)

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

    # ------------------------------------------------------------------ freezing
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finalize_bits(pl_module)

    def finalize_bits(self, pl_module: LightningModule) -> None:
        """Freeze every calibrated quantizer that still learns its bits at its rounded bits (idempotent).

        A quantizer whose input stays float is frozen too: its bits are never used, but frozen
        bits mark the end of training for every quantizer alike.
        """
        for _, q in quantizers(pl_module):  # walked afresh: works before setup and after a conversion
            if q.learns_bits and (q.calibrated or q.stays_float):
                q.freeze_bits()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = self.settings()
        if self._observer is not None:
            # A checkpoint written mid-calibration carries the statistics gathered so far, so a
            # run resumed from it calibrates exactly as an uninterrupted one.
            state["calibration"] = self._observer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        current = self.settings()
        changed = [k for k, v in state_dict.items() if k in current and current[k] != v]
        if changed:
            rank_zero_warn(f"{type(self).__name__}: resuming with changed settings {changed}; the new values are used")
        self._calibration_state = state_dict.get("calibration")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[MANIFEST_KEY] = quantization_manifest(
            pl_module, epoch=trainer.current_epoch, config=self.settings(), **self._manifest_extra(pl_module)
        )
        if trainer.is_global_zero:  # only rank zero writes the file
            seal_when_saved(pl_module)

    def _manifest_extra(self, pl_module: LightningModule) -> dict[str, Any]:
        return {}
