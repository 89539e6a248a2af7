"""HardQuantize: turn the NIPQ-trained model into a validated integer model when training ends."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_nipq.callbacks.module_hooks import find_callback, install_load_hook, remove_pending_seal, seal_when_saved
from lightning_nipq.callbacks.quantization_aware import QuantizationAwareTraining
from lightning_nipq.callbacks.strategy_support import check_strategy, spawns_processes
from lightning_nipq.convert.batchnorm_folding import check_fold_batchnorm
from lightning_nipq.convert.comparison import check_report, check_tolerances
from lightning_nipq.convert.report import QuantizationReport
from lightning_nipq.convert.report_rendering import logger_directory, print_report, save_bit_allocation_figure
from lightning_nipq.convert.steps import convert_and_compare, freeze_quantizers, recalibrate_batchnorm
from lightning_nipq.layers.model_calls import InputFn, default_input_fn
from lightning_nipq.layers.model_walk import batchnorm_layers, quantized_layers
from lightning_nipq.saving.checkpoint import MANIFEST_KEY, quantization_manifest

_NOTHING = object()
#: File name of the bit-allocation figure in the logger's directory.
FIGURE_NAME = "nipq_bit_allocation.png"


class HardQuantize(Callback):
    r"""Freeze the learned bits and ranges, convert to integer layers, and validate, at the end of fit.

    At ``on_train_end`` (after the last checkpoint of the fit is written) it:

    1. freezes every quantizer at its whole bit-width (through the quantization-aware-training
       callback, so that `NIPQCallback`'s bits meet its budget) and switches to hard quantization;
    2. optionally re-estimates BatchNorm statistics on ``bn_batches`` training batches, or
       on the batches you give (e.g. calibration images generated without the training data,
       see `lightning_nipq.data.generate_calibration_data`), averaged over DDP processes;
    3. converts every quantized layer into an integer layer (integer weight codes and a
       scale; inputs quantized to codes; the matmul or convolution computed exactly on codes),
       with ``fold_batchnorm=True`` folds each BatchNorm that directly follows one into it,
       and compares the integer model with the fake-quantized one on ``compare_batches``;
    4. raises `lightning_nipq.IntegerMismatchError` if, combined over DDP processes, the
       argmax agreement is under ``min_agreement`` or the relative difference over
       ``max_rel_diff``;
    5. runs your ``validation_step`` on the integer model, so its metrics are logged;
    6. prints the per-layer report on rank zero and keeps it as `report`.

    These are the steps of `lightning_nipq.hard_quantize`, with the same arguments; a count
    of batches here means that many batches of the Trainer's loader.

    Args:
        bn_batches: how many training batches to re-estimate BatchNorm on (0 turns it off), or
            an iterable of batches to use instead (a list of tensors, a DataLoader), moved to the
            model's device; a one-shot iterator is read into a list at once.
        compare_batches: how many validation batches (training batches if there is no validation
            loader) the integer model is compared on (0 turns the comparison off), or an iterable
            of batches to use instead, as for ``bn_batches``.
        min_agreement: lowest acceptable argmax agreement between the two.
        max_rel_diff: highest acceptable ``|diff| / max |output|`` for 99% of the compared
            samples, end to end (each converted layer must also match its fake-quantized self
            on the same input to float rounding); codes on a rounding boundary may flip.
        input_fn: maps a batch to the model input; by default the batch's first tensor.
        run_validation: run the validation loop on the integer model.
        verbose: print the report (a rich table when rich is installed) on rank zero.
        save_figure: save a PNG of the bit allocation per layer to the logger's directory
            (needs matplotlib: ``pip install 'lightning-nipq[plot]'``); its path is kept in
            `figure_path`.
        fold_batchnorm: fold every BatchNorm that directly follows a quantized layer (its only
            input is that layer's output, which feeds nothing else) into the integer layer's
            per-channel steps and bias, and put a ``FoldedBatchNorm`` (an identity) in its
            place, so the integer model runs no float BatchNorm after a quantized layer. Which
            BatchNorm follows which layer is seen by running the model once on the first
            compared batch (else the first re-estimation batch, else the first training batch);
            see `lightning_nipq.convert.batchnorm_folding`. The report says which BatchNorm went
            into which layer. Checkpoints, `lightning_nipq.save_quantized` and ONNX export carry
            the fold, and a fresh float model loads them. False by default, which keeps the
            model's modules as they are: folding replaces them (``model.bn`` becomes a
            ``FoldedBatchNorm``), which code that reads them after fit may not expect.

    Example:

        ```python
        trainer = Trainer(max_epochs=10, callbacks=[NIPQCallback(target_bits=3), HardQuantize(bn_batches=20)])
        trainer.fit(model, datamodule=dm)
        print(trainer.callbacks[1].report.avg_weight_bits)
        ```
    """

    def __init__(
        self,
        bn_batches: Union[int, Iterable[Any]] = 0,
        compare_batches: Union[int, Iterable[Any]] = 8,
        min_agreement: float = 0.999,
        max_rel_diff: float = 1e-2,
        input_fn: Optional[InputFn] = None,
        run_validation: bool = True,
        verbose: bool = True,
        save_figure: bool = True,
        fold_batchnorm: bool = False,
    ) -> None:
        self.bn_batches = _check_batches("bn_batches", bn_batches, "re-estimation")
        self.compare_batches = _check_batches("compare_batches", compare_batches, "the comparison")
        check_tolerances(min_agreement, max_rel_diff)
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"input_fn must be a function from a batch to the model input, got {type(input_fn).__name__}")
        for name, value in (("run_validation", run_validation), ("verbose", verbose), ("save_figure", save_figure)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.fold_batchnorm = check_fold_batchnorm(fold_batchnorm)
        self.min_agreement = min_agreement
        self.max_rel_diff = max_rel_diff
        self.input_fn = input_fn
        self.run_validation = run_validation
        self.verbose = verbose
        self.save_figure = save_figure
        self.figure_path: Optional[Path] = None
        self.report: Optional[QuantizationReport] = None
        self._remove_hooks: Optional[Callable[[], None]] = None
        self._checked_batches: set[str] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "HardQuantize")
        if stage == "fit" and spawns_processes(trainer.strategy):
            raise ValueError(
                "HardQuantize cannot hand the integer model back from a spawning strategy (ddp_spawn, ddp_fork, "
                "ddp_notebook): Lightning copies only the float tensors that fit your model back to this process. "
                "Use strategy='ddp', or convert afterwards with lightning_nipq.hard_quantize on a model loaded with "
                "load_nipq_checkpoint."
            )
        if stage == "fit":
            if find_callback(trainer, QuantizationAwareTraining) is None and not any(True for _ in quantized_layers(pl_module)):
                raise ValueError(
                    f"HardQuantize converts a model with quantizers, and {type(pl_module).__name__} has none: add "
                    "NIPQCallback or LSQCallback to the Trainer's callbacks, or quantize the model before fit "
                    "(attach_quantizers, post_training_quantize)"
                )
            self.report = None  # a reused callback converts afresh
            self.figure_path = None
            self._checked_batches = set()
        # trainer.validate/test(ckpt_path=...) after conversion: the checkpoint may hold the
        # fake-quantized model; rebuild its layers before Lightning loads the state dict.
        self._remove_hooks = install_load_hook(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hook(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hook(pl_module)  # Lightning runs no teardown hook of the callbacks when fit raises

    def _remove_hook(self, pl_module: LightningModule) -> None:
        if self._remove_hooks is not None:
            self._remove_hooks()
            self._remove_hooks = None
        remove_pending_seal(pl_module)

    # ------------------------------------------------------------------ early checks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Empty lists are refused in __init__; an iterable without a length can only be
        # asked for its first batch, which is cheap now and costly after training.
        for name, batches in (("bn_batches", self.bn_batches), ("compare_batches", self.compare_batches)):
            if not isinstance(batches, (int, Sized)) and next(iter(batches), _NOTHING) is _NOTHING:
                raise ValueError(f"{name} yields no batch: give at least one, or {name}=0 to turn it off")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if "training" in self._checked_batches:
            return
        counts_from_training = bool(isinstance(self.bn_batches, int) and self.bn_batches) or (
            isinstance(self.compare_batches, int)
            and self.compare_batches > 0
            and self._compare_loader(trainer) is trainer.train_dataloader
        )
        if counts_from_training:
            self._check_batch("training", batch)
        self._checked_batches.add("training")

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and isinstance(self.compare_batches, int) and self.compare_batches:
            self._check_batch("validation", batch)

    def _check_batch(self, loader: str, batch: Any) -> None:
        # The batches are only used after training: find out now, not hours later, that
        # the model input cannot be told in them.
        if loader in self._checked_batches:
            return
        self._checked_batches.add(loader)
        try:
            (self.input_fn or default_input_fn)(batch)
        except Exception as e:
            raise ValueError(
                f"HardQuantize cannot find the model input in a {loader} batch ({type(e).__name__}: {e}); pass "
                "HardQuantize(input_fn=lambda batch: ...) returning it (a tuple is passed as *args, a dict as **kwargs)"
            ) from e

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.report is None and not trainer.interrupted:
            raise RuntimeError(
                "HardQuantize: the fit ran no training step, so nothing was calibrated or converted; check the "
                "training dataloader and limit_train_batches/max_steps"
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if MANIFEST_KEY not in checkpoint:  # NIPQCallback, when present, writes a fuller one
            checkpoint[MANIFEST_KEY] = quantization_manifest(pl_module, converted=self.report is not None)
            if trainer.is_global_zero:  # only rank zero writes the file
                seal_when_saved(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        training = find_callback(trainer, QuantizationAwareTraining)
        if training is not None:
            training.finalize_bits(pl_module)  # NIPQ's bits meet its budget
        freeze_quantizers(pl_module)
        bn = self._batches(trainer, self.bn_batches, trainer.train_dataloader)
        if bn:
            recalibrate_batchnorm(pl_module, bn, self.input_fn)
            # Under DDP each process saw its own batches (or the same given ones): average the statistics
            # so that every process converts the same model (that of one process seeing all the batches).
            _average_batchnorm_statistics(trainer, pl_module)
        compare = self._batches(trainer, self.compare_batches, self._compare_loader(trainer))
        fold_batch = self._fold_batch(trainer, compare, bn) if self.fold_batchnorm else None
        self.report = convert_and_compare(pl_module, compare, self.input_fn, self.fold_batchnorm, fold_batch)
        # Checked on figures combined over all processes, so that every process raises or none does.
        _combine_agreement(trainer, self.report)
        check_report(self.report, self.min_agreement, self.max_rel_diff)
        if self.run_validation and self._has_validation(trainer):
            self.report.integer_metrics = self._validate(trainer)
        if trainer.is_global_zero:
            self._show(trainer)

    def _show(self, trainer: Trainer) -> None:
        assert self.report is not None
        if self.verbose:
            print_report(self.report)
        directory = logger_directory(trainer) if self.save_figure else None
        if directory is None:
            return
        try:
            self.figure_path = save_bit_allocation_figure(self.report, directory / FIGURE_NAME)
        except ImportError as e:
            rank_zero_warn(f"HardQuantize: no bit-allocation figure ({e})")

    @staticmethod
    def _fold_batch(trainer: Trainer, compare: list[Any], bn: list[Any]) -> Any:
        """The batch on which to see which BatchNorm follows which layer: compared, re-estimation, or training."""
        if compare or bn:
            return (compare or bn)[0]
        first = HardQuantize._batches(trainer, 1, trainer.train_dataloader)
        if not first:
            raise ValueError(
                "HardQuantize(fold_batchnorm=True) found no batch to see which BatchNorm follows which layer: give "
                "compare_batches or bn_batches, or fold_batchnorm=False"
            )
        return first[0]

    @staticmethod
    def _compare_loader(trainer: Trainer) -> Any:
        val = trainer.val_dataloaders
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        return val if val is not None else trainer.train_dataloader

    @staticmethod
    def _batches(trainer: Trainer, batches: Union[int, Iterable[Any]], loader: Any) -> list[Any]:
        """The given batches, or the first ``batches`` of ``loader`` for a count, on the model's device."""
        if isinstance(batches, int):
            if loader is None or batches == 0:
                return []
            batches = itertools.islice(iter(loader), batches)
        with torch.no_grad():
            return [trainer.strategy.batch_to_device(b) for b in batches]

    @staticmethod
    def _has_validation(trainer: Trainer) -> bool:
        return trainer.val_dataloaders is not None and bool(trainer.num_val_batches) and sum(trainer.num_val_batches) > 0

    @staticmethod
    def _validate(trainer: Trainer) -> dict[str, float]:
        # ``trainer.validate`` cannot run inside ``fit``; the fit loop's own validation loop
        # can, exactly as it runs after each epoch, and logs through the same loggers.
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        trainer.validating = True
        try:
            outputs = val_loop.run()
        finally:
            trainer.training = True
        return {k: float(v) for per_loader in outputs for k, v in per_loader.items() if torch.as_tensor(v).numel() == 1}

    def state_dict(self) -> dict[str, Any]:
        return {"converted": self.report is not None}


def _check_batches(name: str, batches: Any, what: str) -> Union[int, Iterable[Any]]:
    if isinstance(batches, bool):
        raise ValueError(f"{name} must be a whole number >= 0 or an iterable of batches, got {batches!r}")
    if isinstance(batches, int):
        if batches < 0:
            raise ValueError(f"{name} must be a whole number >= 0 or an iterable of batches, got {batches!r}")
        return batches
    if isinstance(batches, torch.Tensor):
        raise ValueError(
            f"{name} got one tensor, which would be iterated sample by sample: pass a list of batches, "
            "e.g. list(images.split(64)) or lightning_nipq.data.as_batches(images, 64)"
        )
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise ValueError(
            f"{name} must be a count of batches from the Trainer's loader (a whole number >= 0) or an iterable of input "
            f"batches (a list of tensors, a DataLoader), got {type(batches).__name__}"
        )
    if isinstance(batches, Iterator):
        # A generator would be used up by the first fit and leave a later one nothing.
        batches = list(batches)
    if isinstance(batches, Sized) and len(batches) == 0:
        raise ValueError(f"{name} is empty: give at least one batch, or {name}=0 to turn {what} off")
    return batches


def _average_batchnorm_statistics(trainer: Trainer, model: nn.Module) -> None:
    norms = batchnorm_layers(model)
    if not norms or trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.detach().reshape(-1).double() for t in stats]).to(strategy.root_device)
    flat = strategy.reduce(flat, reduce_op="mean")
    offset = 0
    for t in stats:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    tracked = [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None]
    if tracked:
        counts = strategy.reduce(torch.stack([t.detach() for t in tracked]).to(strategy.root_device), reduce_op="sum")
        for t, count in zip(tracked, counts):
            t.copy_(count)


def _combine_agreement(trainer: Trainer, report: QuantizationReport) -> None:
    """Worst agreement and largest differences over all processes, and the batches compared by all."""
    if trainer.world_size <= 1:
        return
    # Every process takes part, compared or not, so the collective never waits on one that skipped.
    missing = -math.inf  # neutral for a maximum
    values = [
        missing if report.agreement is None else -report.agreement,
        missing if report.max_abs_diff is None else report.max_abs_diff,
        missing if report.max_rel_diff is None else report.max_rel_diff,
        missing if report.typical_rel_diff is None else report.typical_rel_diff,
        float(report.compared_batches),
    ]
    strategy = trainer.strategy
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64, device=strategy.root_device)
    worst = strategy.reduce(as_tensor(values[:4]), reduce_op="max")
    batches = strategy.reduce(as_tensor(values[4:]), reduce_op="sum")
    negative_agreement, max_abs, max_rel, typical = (float(v) for v in worst)
    report.agreement = None if negative_agreement == missing else -negative_agreement
    report.max_abs_diff = None if max_abs == missing else max_abs
    report.max_rel_diff = None if max_rel == missing else max_rel
    report.typical_rel_diff = None if typical == missing else typical
    report.compared_batches = int(batches[0])
