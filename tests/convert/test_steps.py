"""The conversion steps: each one public, and hard_quantize exactly their composition."""

import copy

import pytest
import torch
from models import GroupedConvNet, image_blobs

from lightning_nipq import IntegerMismatchError, attach_quantizers, hard_quantize
from lightning_nipq.convert import check_report, convert_and_compare, freeze_quantizers, recalibrate_batchnorm
from lightning_nipq.layers import IntegerLayerMixin, LayerKind, calibrate_activations, quantizers


@pytest.fixture
def calibrated():
    torch.manual_seed(0)
    model = GroupedConvNet()
    x = image_blobs(64).tensors[0]
    attach_quantizers(model)
    calibrate_activations(model, x.split(16), forward=model)
    return model, x


def test_hard_quantize_is_the_four_steps_in_order(calibrated):
    model, x = calibrated
    stepwise = copy.deepcopy(model)
    report = hard_quantize(model, bn_batches=x.split(16), compare_batches=x.split(32))

    freeze_quantizers(stepwise)
    assert all(not q.learns_bits and q.mode == "hard" for _, q in quantizers(stepwise))
    assert recalibrate_batchnorm(stepwise, x.split(16)) == 4
    by_steps = convert_and_compare(stepwise, x.split(32))
    check_report(by_steps)

    assert isinstance(stepwise.conv, IntegerLayerMixin)
    assert [(r.name, r.weight_bits, r.input_bits) for r in by_steps.layers] == [(r.name, r.weight_bits, r.input_bits) for r in report.layers]
    assert (by_steps.agreement, by_steps.compared_batches) == (report.agreement, report.compared_batches) == (1.0, 2)
    assert by_steps.layer_rel_diffs.keys() == report.layer_rel_diffs.keys()
    with torch.no_grad():
        assert torch.equal(stepwise.eval()(x), model.eval()(x))


def test_the_comparison_runs_eagerly_when_the_forward_is_compiled(calibrated):
    # Lightning compiles a module's forward in place; traced, the layer check's hooks would
    # recompile once per layer name, up to Dynamo's limit and its warning.
    model, x = calibrated
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    model.eval()(x[:8])
    compiled_frames = torch._dynamo.utils.counters["frames"]["total"]
    report = convert_and_compare(model, x.split(32))
    assert torch._dynamo.utils.counters["frames"]["total"] == compiled_frames
    assert report.agreement == 1.0 and len(report.layer_rel_diffs) == len(report.layers)
    torch._dynamo.reset()


@pytest.mark.parametrize("batches", [[], "raises", "interrupted"])
def test_batchnorm_statistics_survive_failed_re_estimation(calibrated, batches):
    model, x = calibrated
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    momentum = model.bn.momentum

    def failing():
        yield x[:16]
        if batches == "raises":
            yield x[:16, :2]  # wrong channel count: the convolution raises
        raise KeyboardInterrupt

    error = ValueError if batches == [] else (RuntimeError if batches == "raises" else KeyboardInterrupt)
    with pytest.raises(error):
        recalibrate_batchnorm(model, [] if batches == [] else failing())
    assert all(torch.equal(v, before[k]) for k, v in model.bn.state_dict().items())
    assert model.bn.momentum == momentum and model.training


def test_check_report_refuses_bad_tolerances_and_a_bypassed_layer(calibrated):
    model, x = calibrated
    report = convert_and_compare(model, x.split(32))
    for bad in ({"min_agreement": float("nan")}, {"min_agreement": 1.5}, {"max_rel_diff": 0.0}, {"max_rel_diff": float("nan")}):
        with pytest.raises(ValueError):
            check_report(report, **bad)
    report.layer_rel_diffs["conv"] = 0.5
    with pytest.raises(IntegerMismatchError, match="conv by 0.5"):
        check_report(report)


def test_a_conversion_that_fails_leaves_the_model_as_it_was(calibrated, monkeypatch):
    # The fourth layer's conversion is interrupted.
    model, x = calibrated
    freeze_quantizers(model)
    model.eval()
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    classes = {name: type(m) for name, m in model.named_modules()}
    calls = []
    original = LayerKind.to_integer

    def failing(self, layer):
        calls.append(layer)
        if len(calls) == 4:
            raise KeyboardInterrupt
        original(self, layer)

    monkeypatch.setattr(LayerKind, "to_integer", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_and_compare(model, x.split(32))
    assert {name: type(m) for name, m in model.named_modules()} == classes
    after = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    monkeypatch.undo()
    convert_and_compare(model, x.split(32))  # and it still converts afterwards
    assert isinstance(model.conv1d, IntegerLayerMixin)
