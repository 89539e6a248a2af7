"""LSQ: the quantizer's forward and step gradient against the paper's formulas, and the callback end to end."""

import math

import pytest
import torch
from models import MLP, blobs, fast_trainer, loader

from lightning_nipq import HardQuantize, LSQCallback, LSQConfig, LSQQuantizer, attach_quantizers
from lightning_nipq.layers import IntegerLayerMixin, quantizers
from lightning_nipq.saving import prepare_for_state_dict


def _codes_range(bits, signed):
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return (qp if signed else 0), qp


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_forward_is_the_lsq_formula_on_2_to_the_b_levels(bits, signed):
    qn, qp = _codes_range(bits, signed)
    q = LSQQuantizer(bits=bits, signed=signed, init_alpha=0.37 * qp)
    s = q.step.detach()
    x = torch.randn(4000) * 0.37 * qp
    out = q(x)
    expected = torch.round(torch.clamp(x / s, -qn, qp)) * s
    assert torch.allclose(out, expected, atol=1e-6)
    codes = out / s
    assert torch.allclose(codes, torch.round(codes), atol=1e-5)
    assert codes.min() >= -qn - 1e-5 and codes.max() <= qp + 1e-5
    levels = torch.unique(torch.round(codes))
    assert levels.numel() == qn + qp + 1 and levels.numel() <= 2**bits
    assert torch.equal(q.eval()(x), out)  # no noise mode: training and eval both round


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_step_gradient_is_lsqs_with_its_gradient_scale(per_sample, signed):
    bits = 3
    qn, qp = _codes_range(bits, signed)
    q = LSQQuantizer(bits=bits, signed=signed, init_alpha=0.25 * qp, per_sample=per_sample)
    s = q.step.item()
    x = torch.randn(6, 10).double() * 0.6  # a quarter of a step per 0.25: inside and clipped both occur
    x = x.float().requires_grad_(True)
    upstream = torch.randn(6, 10)
    (q(x) * upstream).sum().backward()

    # By hand, from the paper: d out / d s is -v + round(v) inside, -Qn below, Qp above,
    # and the step's gradient is scaled by g = 1 / sqrt(numel * Qp).
    v = x.detach() / s
    below, above = v <= -qn, v >= qp
    inside = ~(below | above)
    local = torch.where(inside, torch.round(v) - v, torch.where(below, torch.tensor(-float(qn)), torch.tensor(float(qp))))
    numel = 10 if per_sample else 60
    g = 1.0 / math.sqrt(numel * qp)
    assert inside.any() and (below | above).any()
    assert q.step.grad.item() == pytest.approx(g * float((upstream * local).sum()), rel=1e-4, abs=1e-6)
    # and the input's gradient is the straight-through one: 1 inside the range, 0 where clipped
    assert torch.allclose(x.grad, upstream * inside, atol=1e-6)


def test_weights_start_from_the_papers_step_and_bits_are_fixed():
    torch.manual_seed(0)
    weight = torch.randn(64, 32) * 0.1
    for bits in (2, 3, 4):
        q = LSQConfig(weight_bits=bits, weight_granularity="tensor").weight_quantizer(weight)
        qp = 2 ** (bits - 1) - 1
        paper = 2 * weight.abs().mean() / math.sqrt(qp)
        assert q.step.item() == pytest.approx(min(paper.item(), weight.abs().max().item() / qp), rel=1e-5)
        assert q.rounded_bits() == bits and not q.learns_bits and q.frozen_bits == bits
        with pytest.raises(ValueError):
            q.freeze_bits(bits + 1)
        with pytest.raises(ValueError):
            q.mode = "noise"
    # 8 bits: the paper's rule would overshoot max|W|, the cap keeps every level in use
    q8 = LSQConfig(weight_bits=8, weight_granularity="tensor").weight_quantizer(weight)
    assert q8.alpha.item() == pytest.approx(weight.abs().max().item(), rel=1e-5)


@pytest.mark.parametrize("kwargs", [dict(weight_bits=1), dict(weight_bits=17), dict(weight_bits=4, act_bits=0), dict(weight_bits=3.5)])
def test_invalid_bits_raise(kwargs):
    with pytest.raises(ValueError):
        LSQConfig(**kwargs)
    with pytest.raises(ValueError):
        LSQCallback(**kwargs)


def test_a_signed_input_refuses_one_bit():
    q = LSQConfig(weight_bits=2, act_bits=1).input_quantizer()
    q.set_range(1.0, signed=False)
    assert q.rounded_bits() == 1 and torch.unique(q(torch.linspace(-1, 2, 50))).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="at least 2 bits"):
        q.set_range(1.0, signed=True)


def test_lsq_checkpoint_reloads_into_a_fresh_model():
    torch.manual_seed(0)
    model = MLP()
    attach_quantizers(model, LSQConfig(weight_bits=3, act_bits=4))
    for _, q in quantizers(model):
        if not q.calibrated:
            q.set_range(2.0, signed=False)
    x = blobs(32).tensors[0]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = MLP()
    prepare_for_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    kinds = {(type(q).__name__, q.rounded_bits(), q.signed, q.per_sample) for _, q in quantizers(fresh)}
    assert kinds == {("LSQQuantizer", 3, True, False), ("LSQQuantizer", 4, False, True)}
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


def test_lsq_callback_then_hard_quantize_gives_an_exact_integer_model_at_the_fixed_bits():
    torch.manual_seed(0)
    model = MLP(lr=3e-3)
    steps_at_start = {}

    class RecordSteps(LSQCallback):
        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            steps_at_start.update({name: q.step.detach().clone() for name, q in quantizers(pl_module)})
            assert all(isinstance(q, LSQQuantizer) for _, q in quantizers(pl_module))

        def on_train_end(self, trainer, pl_module):
            super().on_train_end(trainer, pl_module)
            # Calibration's tracing of the model's inputs is gone; nothing is added to the loss.
            assert "training_step" not in vars(pl_module)
            assert pl_module.stem.input_quantizer.stays_float  # fed the model's input: stays float
            used = [(name, q) for name, q in quantizers(pl_module) if not q.stays_float]
            moved = [bool((q.step.detach() - steps_at_start[name]).abs().max() > 1e-6) for name, q in used]
            assert all(moved), "every step size is learned"
            assert all(q.mode == "hard" and q.calibrated for _, q in used)

    lsq = RecordSteps(weight_bits=3, act_bits=4, calibration_batches=2)
    hard = HardQuantize(compare_batches=4, save_figure=False, verbose=False)
    data = blobs(256)
    trainer = fast_trainer(max_epochs=3, callbacks=[lsq, hard])
    trainer.fit(model, loader(data, shuffle=True), loader(blobs(128, seed=0)))

    report = hard.report
    assert report.agreement == 1.0 and report.max_rel_diff < 1e-5
    assert {r.weight_bits for r in report.layers} == {3}
    assert [r.input_bits for r in report.layers] == [None, 4, 4, 4]  # the stem keeps a float input
    assert report.avg_weight_bits == 3.0 and report.avg_act_bits == 4.0
    assert all(isinstance(m, IntegerLayerMixin) for m in (model.stem, model.blocks[0].inner[0], model.head))
    assert report.integer_metrics["val_acc"] > 0.9
