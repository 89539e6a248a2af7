"""NIPQCallback and HardQuantize inside real Lightning fits."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from models import MLP, GroupedConvNet, TinyTransformer, blobs, fast_trainer, image_blobs, loader
from torch.nn import functional as F

import lightning_nipq
from lightning_nipq import HardQuantize, LSQCallback, NIPQCallback
from lightning_nipq.layers import IntegerLayerMixin, QuantizedLayerMixin, quantizers
from lightning_nipq.training import BitSensitivity, weight_and_act_average_bits


def _fit(model, callbacks, epochs=3, data=None, val=True, **trainer_kwargs):
    data = data or blobs(256)
    trainer = fast_trainer(epochs, callbacks, **trainer_kwargs)
    trainer.fit(model, loader(data, shuffle=True), loader(data) if val else None)
    return trainer


@pytest.mark.parametrize(
    "make,data",
    [(MLP, lambda: blobs(256)), (GroupedConvNet, lambda: image_blobs(128)), (TinyTransformer, lambda: blobs(256))],
)
def test_fit_then_hard_quantize_gives_a_validated_integer_model(make, data):
    torch.manual_seed(0)
    model = make()
    nipq = NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=2)
    hard = HardQuantize(bn_batches=2, compare_batches=4)
    trainer = _fit(model, [nipq, hard], epochs=3, data=data())
    layers = [m for m in model.modules() if isinstance(m, IntegerLayerMixin)]
    assert layers and not any(isinstance(m, QuantizedLayerMixin) for m in model.modules())
    report = hard.report
    # Each layer is exact on its own input, and nearly every sample end to end (a code on a
    # rounding boundary may flip under float rounding and move a single sample further).
    assert report.agreement == 1.0 and max(report.layer_rel_diffs.values()) < 1e-5 and report.typical_rel_diff < 1e-5
    assert report.avg_weight_bits <= 4.0 + 1e-9
    assert report.integer_metrics, "the user's validation_step ran on the integer model"
    assert {"nipq/avg_weight_bits", "nipq/avg_act_bits", "nipq/bit_loss"} <= set(trainer.logged_metrics) | set(
        trainer.callback_metrics
    )
    assert "training_step" not in vars(model), "the training_step wrapper is removed at teardown"


def test_calibration_sets_sign_from_the_data():
    model = GroupedConvNet()
    _fit(model, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=2)], epochs=1, data=image_blobs(64), val=False)
    assert model.grouped.input_quantizer.signed is False  # after BN + ReLU
    assert model.conv1d.input_quantizer.signed is True  # depthwise conv output
    assert model.conv.input_quantizer.stays_float and not model.conv.input_quantizer.calibrated  # raw model input stays float
    assert all(q.calibrated for _, q in quantizers(model) if not q.stays_float)


class _BitsRecorder(Callback):
    def __init__(self):
        self.history = []

    def on_train_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            w, a = weight_and_act_average_bits(pl_module)
        self.history.append((float(w), float(a)))


def test_the_budget_pulls_learned_bits_to_the_target():
    torch.manual_seed(0)
    recorder = _BitsRecorder()
    model = MLP(lr=5e-3)
    nipq = NIPQCallback(target_bits=3, hard_epochs=0, quantizer_lr_factor=20.0, calibration_batches=1, enforce_budget=False)
    trainer = fast_trainer(6, [nipq, recorder])
    trainer.fit(model, loader(blobs(256), batch_size=16, shuffle=True))
    start_w, start_a = recorder.history[0]
    end_w, end_a = recorder.history[-1]
    # from ~7.5 bits at the start, the regulariser alone brings both averages to the target
    assert abs(end_w - 3) <= 0.35 and abs(end_a - 3) <= 0.35, recorder.history
    assert start_w > end_w and start_a > end_a
    # and finalize fits whole bits to the budget
    w, a = weight_and_act_average_bits(model)
    assert 2.9 <= float(w) <= 3.0 + 1e-6 and 2.9 <= float(a) <= 3.0 + 1e-6


def test_bops_budget_pulls_the_bit_product_down():
    torch.manual_seed(0)
    model = MLP(lr=5e-3)
    nipq = NIPQCallback(target_bits=3, budget="bops", hard_epochs=0, quantizer_lr_factor=10.0, calibration_batches=1)
    _fit(model, [nipq], epochs=5, val=False)
    loss = nipq.bit_budget.loss(model)
    assert float(loss) < 5.0  # started at (7.5 * 7.5 - 9) bit-products away


def test_fixed_bits_give_uniform_w4a4_and_no_regulariser():
    model = MLP()
    nipq = NIPQCallback(weight_bits=4, act_bits=4, hard_epochs=1, calibration_batches=1)
    _fit(model, [nipq], epochs=2, val=False)
    assert {q.rounded_bits() for _, q in quantizers(model)} == {4}
    assert float(nipq.bit_budget.loss(model)) == 0.0


def test_phases_switch_and_bits_freeze_in_the_hard_phase():
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            qs = [q for _, q in quantizers(pl_module) if not q.stays_float]  # the stem's input stays float
            seen.append((trainer.current_epoch, batch_idx, sum(q.mode == "hard" for q in qs), all(not q.learns_bits for q in qs)))

    model = MLP()
    nipq = NIPQCallback(target_bits=4, hard_epochs=1, anneal_epochs=2, calibration_batches=1)
    _fit(model, [nipq, Spy()], epochs=4, val=False)
    by_epoch = {e: [(h, f) for ee, _, h, f in seen if ee == e] for e in range(4)}
    assert all(h == 0 and not f for h, f in by_epoch[0])  # noise
    anneal = [h for e in (1, 2) for h, _ in by_epoch[e]]
    assert anneal == sorted(anneal) and anneal[0] < anneal[-1]  # hand-over rises layer by layer
    assert all(h == 7 and f for h, f in by_epoch[3])  # hard, frozen (4 weight + 3 input quantizers)


def test_quantizer_parameters_get_their_own_group_and_scheduler_entry():
    class WithScheduler(MLP):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    model = WithScheduler()
    trainer = _fit(model, [NIPQCallback(target_bits=4, quantizer_lr_factor=5.0, hard_epochs=0)], epochs=2, val=False)
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2
    main, quant = opt.param_groups
    ids = {id(p) for _, q in quantizers(model) for p in q.parameters()}
    assert {id(p) for p in quant["params"]} == ids and not ids & {id(p) for p in main["params"]}
    assert quant["weight_decay"] == 0.0 and main["weight_decay"] == 0.1
    assert quant["lr"] == pytest.approx(main["lr"] * 5.0)  # both decayed by the scheduler
    assert main["lr"] == pytest.approx(1e-2 * 0.25)


class ManualMLP(MLP):
    def __init__(self, use_bit_loss: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.use_bit_loss = use_bit_loss

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.use_bit_loss:
            loss = loss + lightning_nipq.callbacks.bit_loss(self)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimisation_uses_the_public_bit_loss():
    model = ManualMLP()
    nipq = NIPQCallback(target_bits=3, hard_epochs=0, quantizer_lr_factor=10.0, calibration_batches=1)
    _fit(model, [nipq], epochs=3, val=False)
    w, _ = weight_and_act_average_bits(model)
    assert float(w) <= 3.0 + 1e-6
    assert "training_step" not in vars(model)  # no wrapper was installed for manual optimisation


def test_manual_optimisation_without_bit_loss_is_an_error():
    with pytest.raises(RuntimeError, match="bit_loss"):
        _fit(ManualMLP(use_bit_loss=False), [NIPQCallback(target_bits=3, hard_epochs=0)], epochs=1, val=False)


def test_distillation_adds_a_teacher_loss_and_keeps_the_teacher_frozen():
    torch.manual_seed(0)
    model = MLP()
    initial = copy.deepcopy(model.state_dict())
    losses = {}

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # the step's own logits give its task loss; the rest of the loss is distillation
            task = float(F.cross_entropy(outputs["logits"], batch[1]))
            losses["distillation"] = max(losses.get("distillation", 0.0), float(outputs["loss"]) - task)

    nipq = NIPQCallback(target_bits=4, hard_epochs=0, reg_weight=0.0, distillation=True, distillation_weight=2.0)
    _fit(model, [nipq, Probe()], epochs=1, val=False)
    teacher = nipq._distiller.teacher
    assert not any(isinstance(m, QuantizedLayerMixin) for m in teacher.modules())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in initial.items())
    # each step's loss is the task loss plus a distillation term (reg_weight=0), which grows
    # as the quantized student drifts from the float teacher
    assert losses["distillation"] > 1e-4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_bits=9), "target_bits=9"),
        (dict(target_bits=1.5), "outside"),
        (dict(min_bits=0), "min_bits"),
        (dict(target_bits=3, target_act_bits=12), "target_act_bits"),
        (dict(budget="flops"), "budget"),
        (dict(noise="gauss"), "noise"),
        (dict(weight_bits=1), "weight_bits"),
        (dict(hard_epochs=-1), "hard_epochs"),
        (dict(include="conv*"), "list of module-name patterns"),
    ],
)
def test_invalid_arguments_raise_value_errors_that_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NIPQCallback(**kwargs)


def test_problems_found_at_setup_raise_before_any_training_step():
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    class NothingToQuantize(MLP):
        def __init__(self):
            super().__init__()
            self.stem = self.blocks = self.head = None
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum() * self.p

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="no layer to quantize"):
        _fit(NothingToQuantize(), [NIPQCallback(), Count()], epochs=1, val=False)
    with pytest.raises(ValueError, match="matches no module"):
        _fit(MLP(), [NIPQCallback(exclude=["heads"]), Count()], epochs=1, val=False)
    with pytest.raises(ValueError, match=r"exceed the run \(3 epochs\)"):
        _fit(MLP(), [NIPQCallback(hard_epochs=2, anneal_epochs=2), Count()], epochs=3, val=False)
    assert steps == []


def test_integer_mismatch_is_reported_with_a_clear_error():
    class Bypass(MLP):
        # In eval this reads .weight directly, as fused kernels do: the float weight of the
        # fake-quantized layer but the dequantized codes of the integer one.
        def forward(self, x, **kwargs):
            h = super().forward(x, **kwargs)
            return self.mix(h) if self.training else F.linear(h, self.mix.weight, self.mix.bias)

        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)

    model = Bypass()
    with pytest.raises(lightning_nipq.IntegerMismatchError, match="does not reproduce"):
        _fit(model, [NIPQCallback(target_bits=4, hard_epochs=1), HardQuantize(min_agreement=1.0, max_rel_diff=1e-9)], epochs=1)


class OnlyBudget(MLP):
    """The task loss is multiplied by zero, so the quantizer gradients come from the regulariser alone."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) * 0.0


class GradProbe(Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.stack([q.theta.grad.clone() for _, q in quantizers(pl_module)]))


def test_regulariser_per_optimizer_step_is_the_same_with_gradient_accumulation():
    def first_step_grads(batch_size, accumulate):
        torch.manual_seed(0)
        probe = GradProbe()
        nipq = NIPQCallback(target_bits=3, hard_epochs=0, calibration_batches=1, enforce_budget=False)  # the regulariser alone
        trainer = fast_trainer(1, [nipq, probe], accumulate_grad_batches=accumulate, limit_train_batches=4)
        # lr=0: the bits never move, so every optimizer step after calibration sees the same ones
        trainer.fit(OnlyBudget(lr=0.0), loader(blobs(128), batch_size=batch_size))
        return probe.grads[-1]

    plain = first_step_grads(32, 1)
    accumulated = first_step_grads(16, 2)
    assert plain.abs().sum() > 0
    assert torch.allclose(plain, accumulated, atol=1e-7)


class NaiveSensitivity(Callback):
    """Observes the bits' whole gradients, the regulariser's share included."""

    def __init__(self):
        self.sensitivity = BitSensitivity()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sensitivity.observe(dict(quantizers(pl_module)))


def test_sensitivities_leave_out_the_regulariser_share_recorded_in_backward():
    """With a zero task loss the bits' gradients are the regulariser's alone: nothing is left to measure.

    Over accumulated micro-batches (each backward scales the sum by 1/2) the share recorded
    in backward matches the gradient Lightning hands the optimizer.
    """
    torch.manual_seed(0)
    naive = NaiveSensitivity()  # listed first: it sees the gradients before the callback observes them
    nipq = NIPQCallback(target_bits=3, hard_epochs=0, calibration_batches=1, enforce_budget=False)
    trainer = fast_trainer(1, [naive, nipq], accumulate_grad_batches=2, limit_train_batches=8)
    trainer.fit(OnlyBudget(), loader(blobs(128), batch_size=16))
    measured, whole = nipq.sensitivity.state_dict(), naive.sensitivity.state_dict()
    assert whole and set(measured) == set(whole)
    for name, (total, count) in whole.items():
        assert count == measured[name][1] == 4  # calibration ends within the first step
        assert abs(total) > 1.0
        assert abs(measured[name][0]) < 1e-5 * abs(total), name


def test_bf16_mixed_precision_trains_at_two_bits_without_nan():
    torch.manual_seed(0)
    model = GroupedConvNet()
    losses = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    hard = HardQuantize(verbose=False)
    _fit(model, [NIPQCallback(weight_bits=2, act_bits=2, hard_epochs=1, calibration_batches=1), hard, Record()], epochs=2, data=image_blobs(64), precision="bf16-mixed")
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert hard.report.avg_weight_bits == 2.0 and hard.report.agreement is not None


def test_loggers_get_per_layer_series_and_the_end_gives_a_table_and_a_figure(tmp_path, capsys):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    model = MLP()
    hard = HardQuantize()
    logger = CSVLogger(tmp_path, name="run")
    _fit(model, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), hard], epochs=2, logger=logger, log_every_n_steps=2)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    series = [float(r["nipq_weight_bits/head"]) for r in rows if r.get("nipq_weight_bits/head")]
    assert len(series) >= 4  # over time, not only once
    assert any(r.get("nipq_input_alpha/blocks.0.inner.0") for r in rows)
    assert hard.figure_path == Path(logger.log_dir) / "nipq_bit_allocation.png"
    assert hard.figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "blocks.1.inner.0" in out and "head" in out  # the per-layer table was printed


def test_works_alongside_checkpointing_early_stopping_lr_monitor_rich_bar_and_pruning(tmp_path):
    from lightning.pytorch.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        ModelCheckpoint,
        ModelPruning,
        RichProgressBar,
    )
    from lightning.pytorch.loggers import CSVLogger

    from lightning_nipq import load_nipq_checkpoint

    torch.manual_seed(0)
    model = MLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    hard = HardQuantize(verbose=False)
    callbacks = [
        NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1),
        hard,
        ckpt,
        EarlyStopping(monitor="val_acc", mode="max", patience=5),
        LearningRateMonitor(),
        RichProgressBar(),
        ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"]),
    ]
    trainer = _fit(model, callbacks, epochs=3, logger=CSVLogger(tmp_path), enable_checkpointing=True, enable_progress_bar=True)
    assert isinstance(model.head, IntegerLayerMixin) and hard.report.agreement == 1.0
    # pruning was folded in before conversion: the pruned weights are zero codes
    zero_share = float((model.blocks[0].inner[0].weight_codes == 0).float().mean())
    assert zero_share >= 0.3
    # the quantizer group shows up in the learning-rate monitor beside the user's group
    assert float(trainer.callback_metrics["lr-Adam/pg2"]) == pytest.approx(10 * float(trainer.callback_metrics["lr-Adam/pg1"]))
    # the best checkpoint, ranked by the quantized model's validation accuracy, reloads
    fresh = load_nipq_checkpoint(MLP, ckpt.best_model_path).eval()
    x = blobs(256).tensors[0]
    assert fresh(x).shape == (256, 4)
    assert ckpt.best_model_score is not None


def test_a_second_callback_applies_its_noise_settings_or_refuses_another_bit_range():
    ds = blobs(64)
    model = MLP()
    fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=1, noise="histogram")]).fit(model, loader(ds))
    assert {q.noise for _, q in quantizers(model)} == {"histogram"}
    before = {name: q.alpha.detach().clone() for name, q in quantizers(model)}
    fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, stochastic_bits=False)]).fit(model, loader(ds))
    assert {(q.noise, q.stochastic_bits) for _, q in quantizers(model)} == {("uniform", False)}
    assert any(not torch.equal(q.alpha, before[name]) for name, q in quantizers(model))  # the same quantizers trained on
    state = {name: q.state_dict() for name, q in quantizers(model)}
    for callback, match in (
        (NIPQCallback(target_bits=4, min_bits=3), r"learns bits in \[2, 8\], this configuration in \[3, 8\]"),
        (NIPQCallback(target_bits=4, weight_bits=4), r"weight quantizer learns bits in \[2, 8\]"),
        (LSQCallback(weight_bits=4), "is a 'nipq' quantizer, not an LSQ one"),
    ):
        with pytest.raises(ValueError, match=match):
            fast_trainer(1, [callback]).fit(model, loader(ds))
        for name, q in quantizers(model):  # refused before anything changed
            assert all(torch.equal(v, state[name][k]) if torch.is_tensor(v) else v == state[name][k] for k, v in q.state_dict().items())


def test_hard_quantize_takes_batches_or_a_count_for_both_bn_and_comparison():
    ds = blobs(128)
    given = list(ds.tensors[0][:64].split(16))
    hard = HardQuantize(bn_batches=given[:2], compare_batches=iter(given), verbose=False)
    assert hard.compare_batches == given  # a one-shot iterator is kept as a list
    _fit(MLP(), [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), hard], epochs=2)
    assert hard.report.compared_batches == 4 and hard.report.agreement == pytest.approx(1.0)
    counted = HardQuantize(compare_batches=3, verbose=False)
    _fit(MLP(), [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), counted], epochs=2)
    assert counted.report.compared_batches == 3
    with pytest.raises(ValueError, match="compare_batches is empty"):
        HardQuantize(compare_batches=[])
