"""per_layer_metrics: values, names, devices, and per-layer series through CSVLogger and TensorBoardLogger."""

import csv
import math
import re

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import MLP, blobs, fast_trainer, loader
from torch import nn

from lightning_nipq import NIPQConfig, attach_quantizers
from lightning_nipq.layers import quantized_layers
from lightning_nipq.training import per_layer_metrics
from lightning_nipq.training.layer_metrics import METRIC_GROUPS, is_logging_step

NAME = re.compile(r"^nipq_[a-z_]+/[A-Za-z0-9_.\-]+$")


def _quantized_mlp(calibrate=("blocks.0.inner.0", "blocks.1.inner.0"), **config):
    model = MLP()
    attach_quantizers(model, NIPQConfig(**config))
    layers = dict(model.named_modules())
    for name in calibrate:
        layers[name].input_quantizer.set_range(3.0, signed=False)
    return model


def test_values_are_the_quantizers_own_and_inputs_appear_only_once_calibrated():
    model = _quantized_mlp(init_bits=3.3)
    metrics = per_layer_metrics(quantized_layers(model))
    assert all(NAME.match(k) for k in metrics), list(metrics)
    layers = dict(quantized_layers(model))
    for name, layer in layers.items():
        w = layer.weight_quantizer
        assert metrics[f"nipq_weight_bits/{name}"].item() == pytest.approx(3.3, abs=1e-4)
        assert metrics[f"nipq_weight_bits_rounded/{name}"].item() == w.rounded_bits() == 3
        assert metrics[f"nipq_weight_alpha/{name}"].item() == pytest.approx(w.alpha.max().item())  # the largest range
    # stem keeps a float input and head's input quantizer is not calibrated: no input series.
    input_layers = {k.split("/", 1)[1] for k in metrics if k.startswith("nipq_input_bits/")}
    assert input_layers == {"blocks.0.inner.0", "blocks.1.inner.0"}
    assert metrics["nipq_input_alpha/blocks.0.inner.0"].item() == pytest.approx(3.0, rel=1e-5)
    assert len(metrics) == 3 * len(layers) + 3 * 2
    for value in metrics.values():
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad


def test_frozen_bits_are_logged_as_the_frozen_whole_value():
    model = _quantized_mlp(weight_bits=5, act_bits=3)
    metrics = per_layer_metrics(quantized_layers(model))
    assert metrics["nipq_weight_bits/head"].item() == metrics["nipq_weight_bits_rounded/head"].item() == 5.0
    assert metrics["nipq_input_bits/blocks.1.inner.0"].item() == 3.0


def test_no_host_sync_and_float32_on_any_device_and_dtype():
    # On the meta device any .item() or host copy raises, so this shows none happens.
    model = _quantized_mlp().to(torch.bfloat16).to("meta")
    metrics = per_layer_metrics(quantized_layers(model))
    assert metrics and all(v.device.type == "meta" and v.dtype == torch.float32 for v in metrics.values())


def test_non_quantized_modules_are_skipped_and_odd_names_are_sanitised():
    model = nn.Sequential()
    model.add_module("a/b,c", nn.Linear(4, 4))
    model.add_module("act", nn.ReLU())
    attach_quantizers(model)
    with torch.no_grad():
        metrics = per_layer_metrics(model.named_modules())
    assert set(metrics) == {"nipq_weight_bits/a_b_c", "nipq_weight_bits_rounded/a_b_c", "nipq_weight_alpha/a_b_c"}
    assert {k.split("/")[0] for k in metrics} <= set(METRIC_GROUPS)


class _LogLayers(Callback):
    def __init__(self):
        self.logged_at = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if is_logging_step(trainer):
            self.logged_at.append(trainer.global_step)
            pl_module.log_dict(per_layer_metrics(quantized_layers(pl_module)), on_step=True, on_epoch=False)


def test_per_layer_series_reach_csv_and_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = _quantized_mlp()
    csv_logger, tb_logger = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    trainer = fast_trainer(2, [_LogLayers()], logger=[csv_logger, tb_logger], log_every_n_steps=1)
    trainer.fit(model, loader(blobs(128), shuffle=True), loader(blobs(32)))  # 4 steps an epoch
    steps = trainer.global_step
    assert steps == 8
    final = {k: v.item() for k, v in per_layer_metrics(quantized_layers(model)).items()}
    assert len(final) == 4 * 3 + 2 * 3

    with open(f"{csv_logger.log_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    csv_series = {k: [float(r[k]) for r in rows if r.get(k)] for k in final}
    tb = event_accumulator.EventAccumulator(tb_logger.log_dir, size_guidance={"scalars": 0}).Reload()
    assert set(final) <= set(tb.Tags()["scalars"])
    for key, value in final.items():
        tb_events = tb.Scalars(key)
        assert len(csv_series[key]) == len(tb_events) == steps, key
        assert [e.step for e in tb_events] == list(range(steps))
        assert [e.value for e in tb_events] == pytest.approx(csv_series[key], rel=1e-6)
        # Logged after each optimizer step, so the last point is the trained model's value.
        assert csv_series[key][-1] == pytest.approx(value, rel=1e-5), key
    # Training moves the learned ranges and bits: the series are a history, not a constant.
    assert any(len(set(csv_series[k])) > 1 for k in final if k.startswith("nipq_weight_alpha/"))
    assert any(len(set(csv_series[k])) > 1 for k in final if k.startswith("nipq_weight_bits/"))
    assert all(math.isfinite(v) for series in csv_series.values() for v in series)


def test_is_logging_step_picks_exactly_the_steps_the_loggers_write(tmp_path):
    logged = _LogLayers()
    csv_logger = CSVLogger(tmp_path)
    trainer = fast_trainer(2, [logged], logger=csv_logger, log_every_n_steps=3)
    trainer.fit(_quantized_mlp(), loader(blobs(128), shuffle=True), loader(blobs(32)))  # 8 steps
    with open(f"{csv_logger.log_dir}/metrics.csv", newline="") as f:
        written = [int(r["step"]) for r in csv.DictReader(f) if r.get("nipq_weight_bits/head")]
    # Loggers number steps from 0 and global_step already counts this step's optimizer step:
    # every 3rd step is written, and none that was computed is lost.
    assert [step - 1 for step in logged.logged_at] == written == [2, 5]
    assert not is_logging_step(fast_trainer(logger=False))
