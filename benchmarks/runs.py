"""One benchmark run each: float training, PTQ, and quantization-aware training with LSQ or NIPQ.

Every quantized run starts from the same float weights and ends the same way: BatchNorm
re-estimation, conversion to integer layers, the integer-versus-fake-quant check, then
test accuracy of the integer model. Plain functions; the scripts compose them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader

from lightning_nipq import (
    HardQuantize,
    LSQCallback,
    NIPQCallback,
    QuantizationReport,
    hard_quantize,
    post_training_quantize,
)
from lightning_nipq.convert import check_report
from lightning_nipq.demo.data import ImageDataModule
from lightning_nipq.demo.models import ImageClassifier

#: The integer model must agree with the fake-quantized one this well (HardQuantize's defaults).
MIN_AGREEMENT = 0.999
MAX_REL_DIFF = 1e-2

# Benchmarks print their own one line per run.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*")
warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


@dataclass
class Result:
    """One row of an accuracy table."""

    model: str
    method: str
    setting: str
    accuracy: float
    weight_bits: float = 32.0
    act_bits: float = 32.0
    size_kib: float = 0.0
    validated: bool = True
    #: Integer against fake-quantized model: argmax agreement, and the relative difference 99% of samples stay within.
    agreement: float = 1.0
    typical_rel_diff: float = 0.0
    seconds: float = 0.0
    seed: int = 0
    #: Quantized inputs with a zero point (unsigned codes shifted to cover a small negative share).
    zero_point_inputs: int = 0
    #: ``(layer, weight bits, input bits or None)`` of every quantized layer, in model order.
    layer_bits: list[tuple[str, int, Optional[int]]] = field(default_factory=list)


def trainer(epochs: int, callbacks: Optional[list[Callback]] = None, accelerator: str = "cpu") -> Trainer:
    return Trainer(
        max_epochs=epochs,
        callbacks=callbacks or [],
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` (float, fake-quantized or integer) over ``loader``."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(dim=1) == y.to(device)).sum())
        total += len(y)
    return correct / max(total, 1)


def train_float(
    make_model: Callable[[], ImageClassifier],
    data: ImageDataModule,
    epochs: int,
    seed: int,
    cache: Optional[Path] = None,
    callbacks: Optional[list[Callback]] = None,
    method: str = "float",
) -> tuple[ImageClassifier, Result]:
    """Train the float model (or load its weights from ``cache``, written by an earlier run) and test it.

    ``callbacks`` shape the float training (robust or flatness training); ``method`` names the row.
    """
    seed_everything(seed, verbose=False)
    model = make_model()
    model.epochs = epochs
    start = time.perf_counter()
    if cache is not None and cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        trainer(epochs, callbacks).fit(model, train_dataloaders=data.train_dataloader())
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    acc = accuracy(model, data.test_dataloader())
    return model, Result(type(model).__name__, method, "FP32", acc, seconds=time.perf_counter() - start, seed=seed)


def _batches(loader: DataLoader, count: int) -> list[Any]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def passes_check(report: QuantizationReport) -> bool:
    """Whether the integer model passed HardQuantize's default check (the runs convert without refusing)."""
    try:
        check_report(report, MIN_AGREEMENT, MAX_REL_DIFF)
    except RuntimeError:
        return False
    return True


def _result(model: ImageClassifier, method: str, setting: str, report: QuantizationReport, data: ImageDataModule, start: float, seed: int) -> Result:
    return Result(
        type(model).__name__,
        method,
        setting,
        accuracy(model, data.test_dataloader()),
        weight_bits=report.avg_weight_bits,
        act_bits=report.avg_act_bits or 32.0,
        size_kib=report.quantized_bytes / 1024,
        validated=passes_check(report),
        agreement=report.agreement if report.agreement is not None else 1.0,
        typical_rel_diff=report.typical_rel_diff or 0.0,
        seconds=time.perf_counter() - start,
        seed=seed,
        zero_point_inputs=sum(1 for layer in report.layers if layer.input_zero_point),
        layer_bits=[(layer.name, layer.weight_bits, layer.input_bits) for layer in report.layers],
    )


def check_cell(results: Sequence[Any]) -> str:
    """"yes" when every integer model passed HardQuantize's default check, else the worst figures.

    ``results`` are rows with ``validated``, ``agreement`` and ``typical_rel_diff`` (a `Result`, or another script's row).
    """
    if all(r.validated for r in results):
        return "yes"
    agreement = min(r.agreement for r in results)
    diff = max(r.typical_rel_diff for r in results)
    return f"**no**: agreement {100 * agreement:.1f}%, p99 rel. diff {diff:.1e}"


def run_ptq(
    float_model: ImageClassifier,
    data: ImageDataModule,
    bits: int,
    method: str = "mse",
    calibration_batches: int = 8,
    seed: int = 0,
    calibration: Optional[list[Any]] = None,
    act_bits: Optional[int] = None,
    name: Optional[str] = None,
    reestimate_bn: bool = True,
    **quantize_kwargs: Any,
) -> Result:
    """Post-training quantization at W``bits``A``act_bits``; BatchNorm re-estimated on the calibration batches.

    The calibration batches are the first ``calibration_batches`` training batches unless
    ``calibration`` (batches of inputs, or of inputs and labels) is given. With
    ``reestimate_bn=False`` BatchNorm keeps the float model's running statistics.
    ``quantize_kwargs`` go to `post_training_quantize` (``weight_granularity``, ``exclude``, ...).
    """
    seed_everything(seed, verbose=False)
    model = copy.deepcopy(float_model)
    act_bits = bits if act_bits is None else act_bits
    start = time.perf_counter()
    if calibration is None:
        calibration = _batches(data.train_dataloader(), calibration_batches)
    post_training_quantize(model, calibration, weight_bits=bits, act_bits=act_bits, method=method, **quantize_kwargs)
    report = hard_quantize(
        model,
        bn_batches=calibration if reestimate_bn else None,
        compare_batches=calibration[:8],
        min_agreement=0.0,
        max_rel_diff=math.inf,
    )
    return _result(model, name or f"PTQ ({method})", f"W{bits}A{act_bits}", report, data, start, seed)


class FloatBatchNormInNoisePhase(Callback):
    """During NIPQ's noise phase, BatchNorm normalises with the float model's running statistics and keeps them.

    A benchmark variant (the issue's "BatchNorm handling in the noise phase"): batch
    statistics of noisy activations are replaced by the float ones; the hard phase trains
    BatchNorm as usual, and HardQuantize re-estimates the statistics at the end either way.
    """

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        nipq = next(c for c in trainer.callbacks if isinstance(c, NIPQCallback))  # type: ignore[attr-defined]
        noisy = nipq._phase(pl_module) != "hard"
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(not noisy)


def run_qat(
    float_model: ImageClassifier,
    data: ImageDataModule,
    callback: NIPQCallback,
    method: str,
    setting: str,
    epochs: int,
    lr: float,
    seed: int = 0,
    bn_batches: int = 16,
    extra_callbacks: Sequence[Callback] = (),
) -> Result:
    """Quantization-aware training with ``callback`` (NIPQ or LSQ) for ``epochs``, then HardQuantize."""
    seed_everything(seed, verbose=False)
    model = copy.deepcopy(float_model).train()  # Lightning keeps the modes it finds; accuracy() left eval
    model.lr, model.epochs = lr, epochs
    hard = HardQuantize(
        bn_batches=bn_batches, min_agreement=0.0, max_rel_diff=math.inf, run_validation=False, verbose=False, save_figure=False
    )
    start = time.perf_counter()
    # The seed also orders the data, so that seeds spread LSQ (deterministic otherwise) as well as NIPQ.
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(data.train_set, batch_size=data.batch_size, shuffle=True, generator=order)
    trainer(epochs, [callback, *extra_callbacks, hard]).fit(model, train_dataloaders=loader)
    assert hard.report is not None
    return _result(model, method, setting, hard.report, data, start, seed)


def lsq(bits: int, **kwargs: Any) -> LSQCallback:
    return LSQCallback(weight_bits=bits, act_bits=bits, log_per_layer=False, **kwargs)


def nipq_fixed(bits: int, hard_epochs: int = 1, **kwargs: Any) -> NIPQCallback:
    return NIPQCallback(weight_bits=bits, act_bits=bits, target_bits=bits, hard_epochs=hard_epochs, log_per_layer=False, **kwargs)


def nipq_mixed(target: float, hard_epochs: int = 1, **kwargs: Any) -> NIPQCallback:
    return NIPQCallback(target_bits=target, hard_epochs=hard_epochs, log_per_layer=False, **kwargs)
