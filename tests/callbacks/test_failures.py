"""Careless and hostile use of the callbacks: bad values refused at construction or setup, failed fits
that leave nothing behind, non-finite numbers caught where they appear, resumes mid-calibration."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from models import MLP, blobs, fast_trainer, loader
from torch.utils.data import DataLoader

from lightning_nipq import HardQuantize, IntegerMismatchError, LSQCallback, NIPQCallback, post_training_quantize
from lightning_nipq.convert import check_report, compare_outputs
from lightning_nipq.convert.report import QuantizationReport
from lightning_nipq.layers import quantized_layers, quantizers


@pytest.mark.parametrize(
    "name,make",
    [
        ("reg_weight", lambda: NIPQCallback(reg_weight=float("nan"))),
        ("quantizer_lr_factor", lambda: NIPQCallback(quantizer_lr_factor=float("nan"))),
        ("distillation_weight", lambda: NIPQCallback(distillation_weight=float("nan"))),
        ("distillation_temperature", lambda: NIPQCallback(distillation_temperature=float("nan"))),
        ("target_bits", lambda: NIPQCallback(target_bits=float("nan"))),
        ("target_bits", lambda: NIPQCallback(target_bits="3")),
        ("min_bits", lambda: NIPQCallback(min_bits=None)),
        ("calibration_percentile", lambda: NIPQCallback(calibration_percentile="99")),
        ("stochastic_bits", lambda: NIPQCallback(stochastic_bits="False")),
        ("hard_epochs", lambda: NIPQCallback(hard_epochs=True)),
        ("log_per_layer", lambda: NIPQCallback(log_per_layer=1)),
        ("weight_bits", lambda: LSQCallback(weight_bits="4")),
        ("max_rel_diff", lambda: HardQuantize(max_rel_diff=float("nan"))),
        ("min_agreement", lambda: HardQuantize(min_agreement="0.9")),
        ("input_fn", lambda: HardQuantize(input_fn="x")),
        ("verbose", lambda: HardQuantize(verbose="no")),
        ("bn_batches", lambda: HardQuantize(bn_batches=(b for b in []))),
    ],
)
def test_bad_values_raise_a_value_error_naming_the_argument(name, make):
    with pytest.raises(ValueError, match=name):
        make()


class Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def test_problems_known_before_training_raise_before_any_step():
    ds = blobs(64)
    steps = Steps()
    with pytest.raises(ValueError, match="add NIPQCallback or LSQCallback"):
        fast_trainer(1, [HardQuantize(), steps]).fit(MLP(), loader(ds), loader(ds))
    assert steps.steps == 0

    class DictBatches(MLP):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["features"], batch["label"]), batch_idx)

    x, y = ds.tensors
    dict_loader = DataLoader([{"features": x[i], "label": y[i]} for i in range(64)], batch_size=16)
    with pytest.raises(ValueError, match="cannot find the model input in a training batch"):
        fast_trainer(2, [NIPQCallback(target_bits=4, calibration_batches=1), HardQuantize(bn_batches=2), steps]).fit(
            DictBatches(), dict_loader
        )
    assert steps.steps == 0


class NoBatches:
    """An iterable with no length that yields nothing."""

    def __iter__(self):
        return iter(())


def test_batches_that_yield_nothing_are_refused_before_training():
    steps = Steps()
    with pytest.raises(ValueError, match="bn_batches yields no batch"):
        fast_trainer(1, [NIPQCallback(target_bits=4), HardQuantize(bn_batches=NoBatches()), steps]).fit(MLP(), loader(blobs(64)))
    assert steps.steps == 0


def test_a_fit_with_no_training_step_says_nothing_was_converted():
    model = MLP()
    with pytest.raises(RuntimeError, match="ran no training step"):
        fast_trainer(1, [NIPQCallback(target_bits=4), HardQuantize(verbose=False)], limit_train_batches=0).fit(
            model, loader(blobs(64))
        )


def test_a_reused_hard_quantize_does_not_claim_a_conversion_it_has_not_made(tmp_path):
    ds = blobs(64)
    hard = HardQuantize(verbose=False)
    fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=1), hard]).fit(MLP(), loader(ds), loader(ds))
    assert hard.report is not None

    class Save(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.save_checkpoint(tmp_path / "mid.ckpt")

    fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=1), hard, Save()]).fit(MLP(), loader(ds), loader(ds))
    assert torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"]["HardQuantize"]["converted"] is False


class Fails(MLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_raises_takes_its_wrappers_off_the_model():
    model = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        fast_trainer(2, [NIPQCallback(target_bits=4, distillation=True, calibration_batches=1), HardQuantize()]).fit(
            model, loader(blobs(128))
        )
    assert "training_step" not in vars(model) and "on_load_checkpoint" not in vars(model)
    assert not model._forward_hooks  # the distillation hook


def test_a_non_finite_batch_stops_training_naming_the_batch_and_step():
    ds = blobs(128)
    ds.tensors[0][70, 3] = float("nan")  # in the third batch of 32
    model = MLP()
    with pytest.raises(FloatingPointError, match=r"batch 2 \(global step 2\)"):
        fast_trainer(2, [NIPQCallback(target_bits=4, calibration_batches=1)]).fit(model, loader(ds))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # stopped before the NaN reached a step


def test_non_finite_calibration_data_is_refused_with_the_layer_named():
    ds = blobs(64)
    x = ds.tensors[0].clone()
    x[5, 0] = float("inf")
    model = MLP()
    with pytest.raises(ValueError, match=r"input of stem\.input_quantizer holds NaN or Inf"):
        post_training_quantize(model, [x], method="mse")


def test_nan_outputs_fail_the_comparison():
    reference = [torch.randn(8, 4)]
    candidate = [reference[0].clone()]
    candidate[0][3, 1] = float("nan")
    agreement, max_abs, _ = compare_outputs(reference, candidate)
    assert agreement == pytest.approx(7 / 8) and max_abs == float("inf")
    both_nan = [torch.full((8, 4), float("nan"))]
    agreement, max_abs, _ = compare_outputs(both_nan, both_nan)
    assert agreement == 0.0 and max_abs == float("inf")
    report = QuantizationReport(layers=[], skipped=[], total_params=0, agreement=1.0, typical_rel_diff=float("nan"))
    with pytest.raises(IntegerMismatchError, match="relative difference is up to nan"):
        check_report(report)


def test_a_layer_whose_weight_is_all_zeros_still_learns():
    torch.manual_seed(0)
    ds = blobs(256)
    model = MLP()
    with torch.no_grad():
        model.head.weight.zero_()
    fast_trainer(6, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1)]).fit(model, loader(ds, shuffle=True))
    head = dict(quantized_layers(model))["head"]
    assert float(head.weight_quantizer.alpha.min()) > 0.05 and float(head.weight.abs().max()) > 0.05
    x, y = ds.tensors
    with torch.no_grad():
        accuracy = float((model.eval()(x).argmax(-1) == y).float().mean())
    assert accuracy > 0.9


class ListLoader:
    """A loader Lightning can resume mid-epoch: it remembers how many batches it gave."""

    def __init__(self, batches):
        self.batches, self.start, self._given = batches, 0, 0

    def __iter__(self):
        start, self.start = self.start, 0
        for index in range(start, len(self.batches)):
            self._given = index + 1
            yield self.batches[index]

    def __len__(self):
        return len(self.batches)

    def state_dict(self):
        return {"given": self._given}

    def load_state_dict(self, state):
        self.start = state["given"]


def _run(batches, ckpt_path=None, save_at=None, tmp_path=None):
    torch.manual_seed(0)
    model = MLP()

    class SaveAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == save_at:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                raise KeyboardInterrupt  # stopped mid-calibration

    callbacks = [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=4)] + ([SaveAt()] if save_at else [])
    trainer = fast_trainer(1, callbacks)
    try:
        trainer.fit(model, ListLoader(batches), ckpt_path=ckpt_path)
    except SystemExit:
        pass
    return model


def test_resuming_mid_calibration_matches_an_uninterrupted_run(tmp_path):
    ds = blobs(256)
    batches = list(zip(ds.tensors[0].split(32), ds.tensors[1].split(32)))
    straight = _run(batches)
    _run(batches, save_at=2, tmp_path=tmp_path)
    assert "calibration" in torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"][
        next(k for k in torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"] if "NIPQ" in k)
    ]
    resumed = _run(batches, ckpt_path=str(tmp_path / "mid.ckpt"))
    for (name, a), (_, b) in zip(quantizers(resumed), quantizers(straight)):
        assert torch.equal(a.alpha, b.alpha), name
    for (name, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
