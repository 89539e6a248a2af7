"""Attaching quantizers to plain torch models and converting them to integer layers."""

import copy

import pytest
import torch
from models import MLP, GroupedConvNet, TinyTransformer, blobs, image_blobs
from torch import nn

from lightning_nipq import NIPQConfig, attach_quantizers, hard_quantize
from lightning_nipq.layers import (
    IntegerLayerMixin,
    QuantizedLayerMixin,
    SplitMultiheadAttention,
    calibrate_activations,
    detach_quantizers,
    quantized_layers,
    quantizers,
    split_attention,
)
from lightning_nipq.quant import integer_codes


def _random_bits(model, low=2, high=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        q.freeze_bits(int(torch.randint(max(low, q.lowest_bits), high + 1, (1,), generator=g)))


def _prepared(model, batches):
    attach_quantizers(model)
    calibrate_activations(model, batches, forward=lambda b: model(b))
    _random_bits(model)
    return model


def test_parameter_names_and_float_checkpoints_survive_attaching():
    model = MLP()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = attach_quantizers(model)
    assert result.quantized == ["stem", "blocks.0.inner.0", "blocks.1.inner.0", "head"]
    assert result.float_input == [] and result.float_input_by_data_flow  # calibration decides
    keys = set(model.state_dict())
    assert set(float_state) <= keys
    assert isinstance(model.head, nn.Linear) and isinstance(model.head, QuantizedLayerMixin)
    model.load_state_dict(float_state)  # strict: the quantizer keys may be absent
    assert torch.equal(model.head.weight, float_state["head.weight"])
    logits, _ = model(torch.randn(3, 16), scale=2.0, return_features=True)
    assert logits.shape == (3, 4)


def test_every_conv_kind_is_quantized_and_reported():
    model = GroupedConvNet()
    result = attach_quantizers(model)
    assert set(result.quantized) == {"conv", "grouped", "depthwise", "conv1d", "conv3d", "head"}
    assert result.skipped == []


def test_transformer_layer_quantizes_its_attention_projections_and_linears():
    model = TinyTransformer()
    float_keys = set(model.state_dict())
    result = attach_quantizers(model)
    attention = [f"encoder.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert set(result.quantized) == {"encoder.linear1", "encoder.linear2", "embed", "head", *attention}
    assert result.skipped == []
    assert isinstance(model.encoder.self_attn, SplitMultiheadAttention)
    # Quantized projections save under their own names, beside their quantizers.
    keys = set(model.state_dict())
    projections = {f"{name}.{p}" for name in attention for p in ("weight", "bias")}
    assert keys - float_keys == projections - {"encoder.self_attn.out_proj.weight", "encoder.self_attn.out_proj.bias"} | {
        k for k in keys if ".weight_quantizer." in k or ".input_quantizer." in k
    }
    assert float_keys - keys == {"encoder.self_attn.in_proj_weight", "encoder.self_attn.in_proj_bias"}


def test_split_attention_in_float_keeps_torchs_keys_and_loads_torchs_state():
    reference = TinyTransformer()
    model = copy.deepcopy(reference)
    assert split_attention(model) == ["encoder.self_attn"]
    assert isinstance(model.encoder.self_attn, SplitMultiheadAttention)
    saved = reference.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in saved.items()}
    fresh = TinyTransformer()
    split_attention(fresh)
    fresh.load_state_dict(saved)
    x = blobs(16).tensors[0]
    with torch.no_grad():
        assert torch.allclose(fresh(x), reference(x), atol=1e-6)


def test_attention_whose_projections_are_all_excluded_stays_whole_with_a_reason():
    model = TinyTransformer()
    result = attach_quantizers(model, exclude=["encoder.self_attn.*"])
    assert type(model.encoder.self_attn) is nn.MultiheadAttention
    skipped = dict(result.skipped)
    assert "include/exclude left out its projections" in skipped["encoder.self_attn"]
    assert "F.multi_head_attention_forward" in skipped["encoder.self_attn.out_proj"]


def test_a_failed_attach_puts_the_attention_back_unsplit():
    model = TinyTransformer()
    attention = model.encoder.self_attn
    with pytest.raises(ValueError, match="not among the quantized layers"):
        attach_quantizers(model, float_input_layers=["nowhere"])
    assert model.encoder.self_attn is attention and type(attention) is nn.MultiheadAttention
    assert not any(True for _ in quantized_layers(model))


def test_include_exclude_and_shared_layers():
    model = MLP()
    model.alias = model.head  # one layer under two names stays one object
    result = attach_quantizers(model, include=["blocks.*", "head"], exclude=["blocks.1.*"])
    assert result.quantized == ["blocks.0.inner.0", "head"]
    assert ("blocks.1.inner.0", "matched by exclude") in result.skipped
    assert ("stem", "not matched by include") in result.skipped
    assert model.alias is model.head and isinstance(model.alias, QuantizedLayerMixin)
    detach_quantizers(model)
    assert type(model.head) is nn.Linear and not hasattr(model.head, "weight_quantizer")


def test_bad_patterns_and_models_without_layers_raise_value_errors():
    with pytest.raises(ValueError, match="matches no module"):
        attach_quantizers(MLP(), include=["hed"])
    with pytest.raises(ValueError, match="no layer to quantize"):
        attach_quantizers(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    class OwnAttention(nn.MultiheadAttention):
        pass

    with pytest.raises(ValueError, match="no layer to quantize.*subclasses nn.MultiheadAttention"):
        attach_quantizers(nn.Sequential(OwnAttention(8, 2)))
    model = MLP()
    attach_quantizers(model)
    with pytest.raises(ValueError, match="already quantized"):
        attach_quantizers(model)
    calibrate_activations(model, [blobs(32).tensors[0]], forward=model)
    hard_quantize(model)
    with pytest.raises(ValueError, match="integer layer, whose float weights are gone"):  # detaching would not help
        attach_quantizers(model)


@pytest.mark.parametrize(
    "make,data",
    [
        (MLP, lambda: blobs(64).tensors[0]),
        (GroupedConvNet, lambda: image_blobs(32).tensors[0]),
        (TinyTransformer, lambda: blobs(64).tensors[0]),
    ],
)
def test_integer_model_equals_fake_quantized_model(make, data):
    torch.manual_seed(0)
    model = make()
    float_model = copy.deepcopy(model).eval()
    x = data()
    batches = list(x.split(16))
    _prepared(model, batches[:2])
    model.eval()
    with torch.no_grad():
        fake = torch.cat([model(b) for b in batches])
        # eval really runs the quantizers (no fused kernel bypassing them)
        assert not torch.allclose(fake, torch.cat([float_model(b) for b in batches]), atol=1e-3)
    report = hard_quantize(model, compare_batches=batches, input_fn=lambda b: b)
    with torch.no_grad():
        integer = torch.cat([model(b) for b in batches])
    assert all(isinstance(m, IntegerLayerMixin) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear))
    assert torch.equal(fake.argmax(-1), integer.argmax(-1))
    assert (fake - integer).abs().max() <= 1e-5 * fake.abs().max()
    assert report.agreement == 1.0 and report.max_rel_diff < 1e-5


def test_integer_layers_hold_codes_and_compute_exactly_in_integers():
    torch.manual_seed(0)
    layer = nn.Linear(300, 20)
    model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), layer)
    attach_quantizers(model, NIPQConfig(weight_granularity="tensor"))  # one scale: per channel is in test_granularity_layers
    x = torch.randn(64, 8)
    calibrate_activations(model, [x], forward=lambda b: model(b))
    for _, q in quantizers(model):
        q.freeze_bits(4)
    hard_quantize(model)
    assert layer.weight_codes.dtype == torch.int8
    assert layer.weight_codes.abs().max() <= 7 and layer.weight_bits == 4
    hidden = model[1](model[0](x))
    codes_in = integer_codes(hidden, layer.input_alpha, torch.tensor(4.0), layer.input_signed).long()
    exact = codes_in @ layer.weight_codes.long().t()  # int64 reference
    out = layer(hidden)
    scale = (layer.input_scale() * layer.weight_scale).double()
    reconstructed = (out.double() - layer.bias.double()) / scale
    assert torch.equal(torch.round(reconstructed).long(), exact)
    assert (reconstructed - exact.double()).abs().max() < 1e-2


def test_report_counts_bits_and_storage():
    model = _prepared(MLP(), [blobs(32).tensors[0]])
    report = hard_quantize(model)
    weights = sum(r.weight_numel for r in report.layers)
    assert report.avg_weight_bits == pytest.approx(sum(r.weight_bits * r.weight_numel for r in report.layers) / weights)
    assert report.quantized_bytes < report.float32_bytes / 4
    table = report.table()
    for name in ("stem", "blocks.0.inner.0", "head", "average weight bits"):
        assert name in table


def test_typical_difference_ignores_a_few_flipped_codes_but_not_a_shifted_model():
    from lightning_nipq.convert.comparison import typical_rel_diff

    torch.manual_seed(0)
    reference = [torch.randn(100, 10) for _ in range(5)]
    flipped = [r.clone() for r in reference]
    flipped[2][7, 3] += 0.5  # one sample of 500: a code flip's worth
    assert typical_rel_diff(reference, flipped) < 1e-6
    shifted = [r * 1.05 for r in reference]  # every sample off, as a bypassed layer does
    assert typical_rel_diff(reference, shifted) > 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_weight_init_starts_at_the_least_rounding_error(bits):
    from lightning_nipq import NIPQConfig
    from lightning_nipq.quant import choose_alpha, quantization_mse

    torch.manual_seed(0)
    weight = torch.randn(64, 32) * 0.1
    weight[0, 0] = 1.0  # one outlier: max|W| wastes most levels on it
    by_max = NIPQConfig(weight_bits=bits, weight_granularity="tensor").weight_quantizer(weight)
    by_mse = NIPQConfig(weight_bits=bits, weight_init="mse", weight_granularity="tensor").weight_quantizer(weight)
    assert float(by_max.alpha) == pytest.approx(1.0, rel=1e-5)
    assert float(by_mse.alpha) == pytest.approx(choose_alpha(weight, bits, signed=True, method="mse"), rel=1e-5)
    errors = quantization_mse(weight, torch.tensor([float(by_max.alpha), float(by_mse.alpha)]), bits, signed=True)
    assert errors[1] < 0.5 * errors[0]
    # learned bits: the MSE range is taken at the rounded starting bit-width
    learned = NIPQConfig(max_bits=4, init_bits=3.4, weight_init="mse", weight_granularity="tensor").weight_quantizer(weight)
    assert float(learned.alpha) == pytest.approx(choose_alpha(weight, 3, signed=True, method="mse"), rel=1e-5)


def test_nipq_callback_rejects_an_unknown_weight_init():
    from lightning_nipq import NIPQCallback

    with pytest.raises(ValueError, match="weight_init must be one of"):
        NIPQCallback(weight_init="percentile")
