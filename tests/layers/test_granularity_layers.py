"""Per-channel and per-group weight ranges and weight-only quantization, from attaching to the integer model."""

from __future__ import annotations

import pytest
import torch
from models import MLP, GroupedConvNet, TinyTransformer, blobs, fast_trainer, image_blobs, loader
from torch import nn

from lightning_nipq import (
    HardQuantize,
    LSQCallback,
    LSQConfig,
    NIPQCallback,
    NIPQConfig,
    attach_quantizers,
    hard_quantize,
    post_training_quantize,
)
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations, quantized_layers, quantizers
from lightning_nipq.quant import integer_codes
from lightning_nipq.training import BitBudget


def prepared(make, x, config, bits=(2, 6), seed=0, **attach):
    torch.manual_seed(seed)
    model = make()
    attach_quantizers(model, config, **attach)
    calibrate_activations(model, list(x.split(16))[:2], forward=lambda b: model(b))
    g = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits(int(torch.randint(max(bits[0], q.lowest_bits), bits[1] + 1, (1,), generator=g)))
    return model.eval()


CASES = [
    (MLP, lambda: blobs(64).tensors[0], "channel"),
    (MLP, lambda: blobs(64).tensors[0], 8),
    (GroupedConvNet, lambda: image_blobs(32).tensors[0], "channel"),
    (TinyTransformer, lambda: blobs(64).tensors[0], "channel"),
    (TinyTransformer, lambda: blobs(64).tensors[0], 4),
]


@pytest.mark.parametrize("make,data,granularity", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_integer_model_equals_the_fake_quantized_model_layer_by_layer_and_end_to_end(make, data, granularity):
    x = data()
    batches = list(x.split(16))
    model = prepared(make, x, NIPQConfig(weight_granularity=granularity))
    with torch.no_grad():
        fake = torch.cat([model(b) for b in batches])
    report = hard_quantize(model, compare_batches=batches, input_fn=lambda b: b)
    layers = [m for m in model.modules() if isinstance(m, IntegerLayerMixin)]
    assert layers and all(m.weight_granularity == granularity for m in layers)
    assert all(m.weight_scale.numel() > 1 for m in layers)
    with torch.no_grad():
        integer = torch.cat([model(b) for b in batches])
    assert torch.equal(fake.argmax(-1), integer.argmax(-1))
    assert (fake - integer).abs().max() <= 1e-5 * fake.abs().max()
    assert max(report.layer_rel_diffs.values()) < 1e-5
    assert report.agreement == 1.0 and report.max_rel_diff < 1e-5
    assert {r.granularity for r in report.layers} == {"channel" if granularity == "channel" else f"group of {granularity}"}


@pytest.mark.parametrize("granularity", ["channel", 16])
def test_per_channel_and_per_group_layers_accumulate_exact_integers_before_one_rescale_per_range(granularity):
    torch.manual_seed(0)
    layer = nn.Linear(64, 12)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), layer)
    attach_quantizers(model, NIPQConfig(weight_bits=4, act_bits=4, weight_granularity=granularity))
    x = torch.randn(32, 16)
    calibrate_activations(model, [x], forward=lambda b: model(b))
    hard_quantize(model)
    hidden = model[1](model[0](x))
    codes_in = integer_codes(hidden, layer.input_alpha, torch.tensor(4.0), layer.input_signed).long()
    codes_w = layer.weight_codes.long()
    assert codes_w.abs().max() <= 7
    if granularity == "channel":
        exact = (codes_in @ codes_w.t()).double() * layer.weight_scale.double().view(1, -1)
    else:
        groups = 64 // granularity
        partial = torch.einsum("ngk,cgk->ngc", codes_in.view(-1, groups, granularity), codes_w.view(12, groups, granularity))
        exact = (partial.double() * layer.weight_scale.double().view(12, groups).t()).sum(1)
    expected = exact * layer.input_scale().double() + layer.bias.double()
    assert torch.allclose(layer(hidden).double(), expected, rtol=1e-6, atol=1e-6)


def test_weight_only_quantization_is_one_argument_and_counts_weights_only():
    x, y = blobs(128).tensors
    model = MLP()
    callback = NIPQCallback(target_bits=3, quantize_inputs=False, weight_granularity=8, hard_epochs=1)
    hard = HardQuantize(compare_batches=2)
    fast_trainer(max_epochs=2, callbacks=[callback, hard]).fit(model, loader(blobs(128)))
    layers = [m for m in model.modules() if isinstance(m, IntegerLayerMixin)]
    assert layers and all(m.input_bits is None for m in layers)
    report = hard.report
    assert report.weight_only and report.avg_act_bits is None
    assert "n/a (weight-only)" in report.table()
    assert report.avg_weight_bits == pytest.approx(3.0, abs=0.25)
    # Weight-only layers compute the float input times the dequantized weight.
    first = layers[1]
    h = torch.randn(5, first.in_features)
    assert torch.allclose(first(h), nn.functional.linear(h, first.weight, first.bias), rtol=1e-6, atol=1e-6)


def test_weight_only_budget_bounds_the_weights_alone():
    model = MLP()
    attach_quantizers(model, NIPQConfig(), quantize_inputs=False)
    pairs = [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)]
    assert pairs and all(inputs is None for _, inputs in pairs)
    quantities = [what for what, _, _ in BitBudget(3.0).excess(pairs)]
    assert quantities and all("input" not in what for what in quantities)


@pytest.mark.parametrize("method", ["lsq", "ptq"])
def test_every_entry_point_takes_the_granularity_and_the_weight_only_switch(method):
    ds = blobs(128)
    model = MLP()
    if method == "lsq":
        fast_trainer(max_epochs=1, callbacks=[LSQCallback(weight_bits=3, weight_granularity="channel", quantize_inputs=False), HardQuantize()]).fit(
            model, loader(ds)
        )
    else:
        post_training_quantize(model, [ds.tensors[0][:32]], weight_bits=3, weight_granularity="channel", quantize_inputs=False, method="mse")
        hard_quantize(model)
    layers = [m for m in model.modules() if isinstance(m, IntegerLayerMixin)]
    assert layers and all(m.input_bits is None and m.weight_granularity == "channel" for m in layers)
    assert all(m.weight_scale.shape == (m.out_features, 1) for m in layers)


def test_bad_granularities_are_refused_before_training_with_the_model_untouched():
    with pytest.raises(ValueError, match="weight_granularity must be"):
        NIPQCallback(weight_granularity=0)
    with pytest.raises(ValueError, match="weight_granularity must be"):
        post_training_quantize(MLP(), [], weight_granularity="rows")
    model = GroupedConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'conv' \(Conv2d\).*linear-like layer.*'channel'"):
        attach_quantizers(model, LSQConfig(weight_granularity=8))
    assert not list(quantized_layers(model)) and model.state_dict().keys() == before.keys()
    trainer = fast_trainer(max_epochs=1, callbacks=[NIPQCallback(weight_granularity=5)])
    with pytest.raises(ValueError, match=r"weight_granularity=5 does not divide this layer's 16 inputs"):
        trainer.fit(MLP(), loader(blobs(64)))
    with pytest.raises(ValueError, match="quantize_inputs=False already leaves every input float"):
        NIPQCallback(quantize_inputs=False, float_input_layers=["net.0"])
    with pytest.raises(ValueError, match="quantize_inputs must be True or False"):
        LSQCallback(quantize_inputs="no")


def test_a_callback_refuses_a_model_quantized_with_another_granularity():
    model = MLP()
    attach_quantizers(model, NIPQConfig(weight_granularity="channel"))
    trainer = fast_trainer(max_epochs=1, callbacks=[NIPQCallback(weight_granularity="tensor")])
    with pytest.raises(ValueError, match="channel ranges, this configuration tensor ranges"):
        trainer.fit(model, loader(blobs(64)))
