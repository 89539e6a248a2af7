"""nn.Embedding, nn.ConvTranspose1d/2d/3d and transformers' Conv1D through the registry; tied weights; user kinds; coverage."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_nipq import LSQConfig, NIPQConfig, attach_quantizers, export_onnx, hard_quantize, load_quantized, save_quantized
from lightning_nipq.layers import (
    IntegerLayerMixin,
    LayerKind,
    QuantizedLayerMixin,
    calibrate_activations,
    detach_quantizers,
    integer_layers,
    is_integer,
    is_quantized,
    kind_of,
    plan_layers,
    quantized_layers,
    quantizers,
    register_layer_kind,
    unregister_layer_kind,
)
from lightning_nipq.layers.model_walk import left_in_float
from lightning_nipq.saving import artifact_sizes, compare_onnx
from lightning_nipq.saving.artifact import PACKED_SUFFIX, read_manifest
from lightning_nipq.saving.checkpoint import prepare_for_state_dict
from lightning_nipq.training import BitBudget
from lightning_nipq.training.bit_budget import weight_and_act_average_bits

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- small models, one per new kind
class EmbeddingNet(nn.Module):
    """Token ids -> embedding (with a padding row) -> linear classifier over the sequence's mean."""

    def __init__(self, vocab: int = 40, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.relu(self.emb(ids)).mean(dim=1))


class TransposeNet(nn.Module):
    """A decoder: conv, transposed conv (strided, ``output_size`` given) and a 1x1 conv head."""

    def __init__(self, dims: int = 2, groups: int = 1) -> None:
        super().__init__()
        conv, transpose = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}[dims]
        self.dims = dims
        self.stem = conv(3, 8, 3, padding=1)
        self.up = transpose(8, 8, 3, stride=2, padding=1, groups=groups)
        self.head = conv(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        size = [2 * s for s in x.shape[2:]]  # output_size picks output_padding=1
        h = torch.relu(self.up(h, output_size=size))
        return self.head(h).mean(dim=tuple(range(2, 2 + self.dims)))


def gpt2(vocab: int = 100) -> nn.Module:
    """A tiny GPT-2 (no download) returning logits; eager attention, no cache, so it exports."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=32, use_cache=False)
    config.bos_token_id = config.eos_token_id = 0
    config._attn_implementation = "eager"
    return LogitsOnly(transformers.GPT2LMHeadModel(config))


class LogitsOnly(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids).logits


class Conv1DNet(nn.Module):
    """Two transformers Conv1D layers, as a GPT-2 MLP."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = Conv1D(32, 16)
        self.proj = Conv1D(4, 32)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x))).mean(dim=1)


class TiedLM(nn.Module):
    """Embedding and output layer sharing one weight (GPT-2's lm_head and wte), a hidden layer between."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.relu(self.mid(self.emb(ids))))


def ids(n: int = 64, length: int = 8, vocab: int = 40, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def images(dims: int, n: int = 16, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, *([6] * dims), generator=torch.Generator().manual_seed(seed))


def conv1d_net() -> nn.Module:
    pytest.importorskip("transformers")
    return Conv1DNet()


#: name -> (model builder, input batch builder)
KINDS = {
    "Embedding": (EmbeddingNet, lambda: ids()),
    "ConvTranspose1d": (lambda: TransposeNet(1), lambda: images(1)),
    "ConvTranspose2d": (lambda: TransposeNet(2), lambda: images(2)),
    "ConvTranspose3d": (lambda: TransposeNet(3), lambda: images(3, n=8)),
    "Conv1D": (conv1d_net, lambda: torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(0))),
    "TiedLM": (TiedLM, lambda: ids(vocab=50)),
}


def integer_model(make, x, config=None, bits=None, seed=0):
    """``make()`` attached, calibrated on ``x``, bits frozen (``bits`` or random in [3, 8]), converted and checked."""
    torch.manual_seed(seed)
    model = make().eval()
    attach_quantizers(model, config)
    calibrate_activations(model, list(x.split(16))[:2], forward=lambda b: model(b))
    g = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits(bits or int(torch.randint(max(3, q.lowest_bits), 9, (1,), generator=g)))
    report = hard_quantize(model, compare_batches=list(x.split(16)))
    return model.eval(), report


# ---------------------------------------------------------------------- each new kind, float to integer
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "TiedLM"])
def test_float_mode_equals_the_torch_layer_at_16_bits_and_detached(kind):
    make, data = KINDS[kind]
    model = make().eval()
    x = data()
    with torch.no_grad():
        reference = model(x)
        attach_quantizers(model, LSQConfig(weight_bits=16, act_bits=16))
        assert any(type(layer).__name__.endswith(kind) for _, layer in quantized_layers(model))
        sixteen = model(x)  # weights at 16 bits; inputs uncalibrated, so passed through
        detach_quantizers(model)
        detached = model(x)
    assert torch.allclose(sixteen, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))
    assert torch.equal(detached, reference)
    assert not any(is_quantized(m) or is_integer(m) for m in model.modules())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_integer_model_equals_the_fake_quantized_one(kind, granularity):
    make, data = KINDS[kind]
    x = data()
    _, report = integer_model(make, x, NIPQConfig(weight_granularity=granularity))
    # hard_quantize checked the whole model; each layer matches its fake-quantized self to float rounding.
    assert report.agreement is None or report.agreement >= 0.999
    assert report.layer_rel_diffs and max(report.layer_rel_diffs.values()) < 1e-4
    assert not report.uncalled_layers
    assert report.coverage == 1.0 and not report.skipped


def test_per_channel_ranges_lie_on_each_kinds_output_axis():
    emb = EmbeddingNet()
    attach_quantizers(emb)
    assert tuple(emb.emb.weight_quantizer.range_shape) == (40, 1)  # one range per row
    assert emb.emb.input_quantizer is None  # indices are not quantized
    up = TransposeNet(2)
    attach_quantizers(up)
    assert tuple(up.up.weight_quantizer.range_shape) == (1, 8, 1, 1)  # weight (C_in, C_out, k, k): axis 1
    net = conv1d_net()
    attach_quantizers(net)
    assert tuple(net.fc.weight_quantizer.range_shape) == (1, 32)  # weight (inputs, outputs): axis 1
    model, _ = integer_model(conv1d_net, KINDS["Conv1D"][1]())
    assert tuple(model.fc.weight_scale.shape) == (1, 32)


def test_granularities_a_kind_cannot_have_are_refused_naming_the_layer_and_fix():
    with pytest.raises(ValueError, match=r"'up' \(ConvTranspose2d\).*ungrouped.*groups=2.*weight_granularity='tensor'"):
        attach_quantizers(TransposeNet(2, groups=2), NIPQConfig(weight_granularity="channel"))
    with pytest.raises(ValueError, match=r"'fc' \(Conv1D\).*\(inputs, outputs\).*weight_granularity='channel'"):
        attach_quantizers(conv1d_net(), NIPQConfig(weight_granularity=8))
    # A grouped transposed convolution takes one range per tensor; an embedding takes groups of each row.
    model, _ = integer_model(lambda: TransposeNet(2, groups=2), images(2), NIPQConfig(weight_granularity="tensor"))
    assert model.up.weight_scale.dim() == 0
    model, _ = integer_model(EmbeddingNet, ids(), NIPQConfig(weight_granularity=8), bits=4)
    assert tuple(model.emb.weight_scale.shape) == (40, 2, 1)


def test_embedding_keeps_torchs_padding_gradient_and_stays_float_when_it_renormalises():
    model = EmbeddingNet()
    attach_quantizers(model)
    model(ids()).sum().backward()
    assert model.emb.weight.grad[0].abs().max() == 0  # padding_idx: no gradient, as nn.Embedding
    assert model.emb.weight.grad[1:].abs().max() > 0
    renorm = EmbeddingNet()
    renorm.emb.max_norm = 1.0
    targets, skipped = plan_layers(renorm)
    assert [n for n, _ in targets] == ["head"]
    assert "max_norm=1.0" in dict(skipped)["emb"] and "max_norm=None" in dict(skipped)["emb"]


def test_macs_count_lookups_as_none_and_transposed_convolutions_per_input_element():
    model = EmbeddingNet()
    attach_quantizers(model)
    model(ids(4))
    assert model.emb.weight_quantizer.macs == 0  # a lookup adds nothing to the BOPs
    up = TransposeNet(2)
    attach_quantizers(up)
    x = images(2, n=2)
    up(x)
    # every input element of the 8 channels meets the 3x3 kernel of each of the 8 output channels
    assert up.up.weight_quantizer.macs == 2 * 8 * 6 * 6 * 8 * 9


@pytest.mark.parametrize("kind", list(KINDS))
def test_artifact_round_trip_into_a_fresh_instance(kind, tmp_path):
    make, data = KINDS[kind]
    x = data()
    model, _ = integer_model(make, x)
    path = save_quantized(model, tmp_path / "model.safetensors")
    torch.manual_seed(123)
    fresh = load_quantized(path, make())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert [type(m) for _, m in integer_layers(fresh)] == [type(m) for _, m in integer_layers(model)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("form", ["fake", "integer"])
def test_checkpoint_state_reloads_into_a_fresh_instance(kind, form):
    make, data = KINDS[kind]
    x = data()
    if form == "integer":
        model, _ = integer_model(make, x)
    else:
        model = make().eval()
        attach_quantizers(model)
        calibrate_activations(model, [x], forward=lambda b: model(b))
    state = model.state_dict()
    torch.manual_seed(123)
    fresh = make().eval()
    prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_export_runs_in_onnxruntime(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    make, data = KINDS[kind]
    x = data()
    model, _ = integer_model(make, x)
    path = export_onnx(model, tmp_path / "model.onnx", x[:4])
    agreement, _, rel = compare_onnx(model, path, list(x.split(16)))
    assert agreement is None or agreement >= 0.999
    assert rel < 1e-4


# ---------------------------------------------------------------------- tied weights
def test_tied_weights_are_quantized_once_and_counted_once_in_the_budget():
    model = TiedLM()
    attach_quantizers(model)
    assert model.out.weight_quantizer is model.emb.weight_quantizer
    names = [name for name, _ in quantizers(model)]
    assert names == ["emb.weight_quantizer", "mid.weight_quantizer", "mid.input_quantizer", "out.input_quantizer"]
    assert model.emb.weight_quantizer.size == 50 * 16  # once, not twice
    calibrate_activations(model, [ids(vocab=50)], forward=lambda b: model(b))
    model.emb.weight_quantizer.freeze_bits(2)
    model.mid.weight_quantizer.freeze_bits(8)
    weights, _ = weight_and_act_average_bits(model)
    expected = (2 * 800 + 8 * 256) / (800 + 256)  # the tied weight's 800 elements count once
    assert float(weights.detach()) == pytest.approx(expected)
    # A fit to the budget gives the shared quantizer one bit width.
    model = TiedLM()
    attach_quantizers(model)
    calibrate_activations(model, [ids(vocab=50)], forward=lambda b: model(b))
    model(ids(vocab=50))
    pairs = [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)]
    for budget in ("avg_bits", "bops"):
        bits = BitBudget(4.0, budget=budget).fit(pairs)
        assert id(model.emb.weight_quantizer) in bits
        assert len(bits) == len({id(q) for _, q in quantizers(model)})


def test_tied_weights_stay_tied_through_conversion_moves_and_the_artifact(tmp_path):
    x = ids(vocab=50)
    model, report = integer_model(TiedLM, x, bits=4)
    assert model.out.weight_codes is model.emb.weight_codes and model.out.weight_scale is model.emb.weight_scale
    rows = {r.name: r for r in report.layers}
    assert rows["out"].tied_to == "emb" and rows["emb"].tied_to is None
    assert report.quantized_weight_numel == 50 * 16 + 16 * 16
    assert report.total_params == sum(p.numel() for p in TiedLM().parameters())  # the tie counted once
    assert "tied weights, stored and counted once: out -> emb" in report.table()
    moved = model.to(torch.float64)
    assert moved.out.weight_codes is moved.emb.weight_codes and moved.out.weight_scale is moved.emb.weight_scale
    model = model.float()
    path = save_quantized(model, tmp_path / "tied.safetensors")
    manifest = read_manifest(path)
    entries = {entry["name"]: entry for entry in manifest["layers"]}
    assert entries["out"]["tied_to"] == "emb" and "tied_to" not in entries["emb"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(k for k in f.keys() if k.endswith(PACKED_SUFFIX)) == ["emb." + PACKED_SUFFIX, "mid." + PACKED_SUFFIX]
    sizes = artifact_sizes(path)
    assert sizes.float32_bytes == 4 * sum(p.numel() for p in TiedLM().parameters())
    assert sizes.packed_code_bytes == (50 * 16 + 16 * 16) * 4 // 8  # the tied table once, at 4 bits
    fresh = load_quantized(path, TiedLM())
    assert fresh.out.weight_codes is fresh.emb.weight_codes
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_tied_entry_that_disagrees_with_the_layer_it_names_is_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from lightning_nipq import ArtifactError
    from lightning_nipq.saving.artifact import METADATA_KEY, _checksum

    model, _ = integer_model(TiedLM, ids(vocab=50), NIPQConfig(weight_granularity="tensor"), bits=4)
    path = save_quantized(model, tmp_path / "tied.safetensors")
    tensors = load_file(str(path))
    manifest = read_manifest(path)
    for edit, message in (
        (lambda e: e.update(tied_to="mid"), "is tied to 'mid'.*|weight_shape"),
        (lambda e: e.update(tied_to="nowhere"), "tied_to must name an earlier layer"),
        (lambda e: e.update(weight_scale=e["weight_scale"] * 2, weight_alpha=e["weight_alpha"] * 2), "weight_scale"),
    ):
        edited = json.loads(json.dumps(manifest))
        edit(next(e for e in edited["layers"] if e["name"] == "out"))
        edited["checksum"] = _checksum(edited, tensors)
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps(edited)})
        with pytest.raises(ArtifactError, match=message):
            load_quantized(bad, TiedLM())


def test_tied_checkpoint_state_reloads_tied_and_an_untied_state_does_not_tie():
    x = ids(vocab=50)
    model = TiedLM().eval()
    attach_quantizers(model)
    calibrate_activations(model, [x], forward=lambda b: model(b))
    fresh = TiedLM()
    prepare_for_state_dict(fresh, model.state_dict())
    assert fresh.out.weight_quantizer is fresh.emb.weight_quantizer
    integer, _ = integer_model(TiedLM, x)
    fresh = TiedLM()
    prepare_for_state_dict(fresh, integer.state_dict())
    fresh.load_state_dict(integer.state_dict())
    assert fresh.out.weight_codes is fresh.emb.weight_codes
    # Two layers of the same shape holding different codes are loaded apart, each its own.
    state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in integer.state_dict().items()}
    state["out.weight_codes"] = torch.zeros_like(state["out.weight_codes"])
    fresh = TiedLM()
    prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state)
    assert fresh.out.weight_codes is not fresh.emb.weight_codes
    assert fresh.out.weight_codes.abs().max() == 0 and fresh.emb.weight_codes.abs().max() > 0


def test_detach_quantizers_turns_integer_layers_into_float_layers_with_the_dequantized_weights():
    x = ids(vocab=50)
    model, _ = integer_model(TiedLM, x, bits=4)
    dequantized = model.mid.dequantized_weight(torch.float32).clone()
    table = model.emb.dequantized_weight(torch.float32).clone()
    detach_quantizers(model)
    assert type(model.mid) is nn.Linear and type(model.emb) is nn.Embedding
    assert torch.equal(model.mid.weight, dequantized) and torch.equal(model.emb.weight, table)
    assert model.out.weight is model.emb.weight  # tied again, one Parameter
    with torch.no_grad():
        model(x)
    attach_quantizers(model)  # and it can be quantized afresh
    assert model.out.weight_quantizer is model.emb.weight_quantizer


def test_tiny_gpt2_is_quantized_converted_saved_and_exported(tmp_path):
    pytest.importorskip("onnxruntime")
    make = gpt2
    x = ids(8, 16, vocab=100)
    model, report = integer_model(make, x, bits=8)
    lm = model.lm.lm_head
    kinds = {type(layer).__name__ for _, layer in integer_layers(model)}
    assert kinds == {"IntegerConv1D", "IntegerEmbedding", "IntegerLinear"}
    assert report.coverage >= 0.99 and not report.skipped
    assert lm.weight_codes is model.lm.transformer.wte.weight_codes
    assert {r.name: r.tied_to for r in report.layers}["lm.lm_head"] == "lm.transformer.wte"
    path = save_quantized(model, tmp_path / "gpt2.safetensors")
    sizes = artifact_sizes(path)
    assert sizes.file_bytes < sizes.float32_bytes / 2  # the tied table once, at its bits
    torch.manual_seed(7)
    fresh = load_quantized(path, make())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    onnx_path = export_onnx(model, tmp_path / "gpt2.onnx", x[:2])
    agreement, _, _ = compare_onnx(model, onnx_path, [x])
    assert agreement >= 0.999


def test_transformers_is_imported_only_for_a_model_that_holds_a_conv1d():
    # A fresh interpreter: quantizing a torch-only model never loads the Conv1D kind's module.
    script = (
        "import sys, torch\n"
        "from lightning_nipq import attach_quantizers, hard_quantize\n"
        "from lightning_nipq.layers import calibrate_activations\n"
        "m = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 3))\n"
        "x = torch.randint(0, 10, (4, 5))\n"
        "attach_quantizers(m); calibrate_activations(m, [x], forward=lambda b: m(b)); hard_quantize(m)\n"
        "assert 'lightning_nipq.layers.transformers_layers' not in sys.modules\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "from lightning_nipq.layers import kind_of\n"
        "assert kind_of(Conv1D(4, 4)).name == 'Conv1D'\n"
        "assert 'lightning_nipq.layers.transformers_layers' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------- a user's own kind
class Gain(nn.Module):
    """A user layer: ``gain * x @ weight.T`` with a fixed gain, no bias."""

    def __init__(self, inputs: int, outputs: int, gain: float = 2.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs) / inputs**0.5)
        self.bias = None
        self.inputs = inputs
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * F.linear(x, self.weight)


class _GainMaths:
    inputs: int
    gain: float

    def apply_weight(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self.gain * F.linear(input, weight, bias)

    def reduction_size(self) -> int:
        return self.inputs

    def per_output_channel(self, values: Tensor) -> Tensor:
        return values


class QuantizedGain(QuantizedLayerMixin, _GainMaths, Gain):
    pass


class IntegerGain(IntegerLayerMixin, _GainMaths, Gain):
    pass


class GainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.gain = Gain(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.gain(torch.relu(self.stem(x)))


@pytest.fixture
def gain_kind():
    kind = register_layer_kind(LayerKind(Gain, QuantizedGain, IntegerGain, groupable=True))
    yield kind
    unregister_layer_kind(kind)


def test_a_user_registered_kind_goes_through_attach_conversion_and_the_artifact(gain_kind, tmp_path):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    assert kind_of(GainNet().gain) is gain_kind
    model, report = integer_model(GainNet, x)
    assert type(model.gain) is IntegerGain
    assert max(report.layer_rel_diffs.values()) < 1e-4
    path = save_quantized(model, tmp_path / "gain.safetensors")
    assert read_manifest(path)["layers"][1]["type"] == "Gain"
    with torch.no_grad():
        assert torch.equal(load_quantized(path, GainNet())(x), model(x))


def test_registering_a_kind_that_does_not_fit_is_refused(gain_kind):
    with pytest.raises(ValueError, match="already belongs to the registered kind 'Gain'"):
        register_layer_kind(LayerKind(Gain, QuantizedGain, IntegerGain))
    with pytest.raises(ValueError, match="a kind named 'Linear' is registered already.*type_name"):

        class Linear(nn.Linear):
            pass

        class QuantizedMine(QuantizedLayerMixin, _GainMaths, Linear):
            pass

        class IntegerMine(IntegerLayerMixin, _GainMaths, Linear):
            pass

        register_layer_kind(LayerKind(Linear, QuantizedMine, IntegerMine))

    class Other(nn.Module):
        pass

    with pytest.raises(ValueError, match="fake_quantized must be a class subclassing QuantizedLayerMixin and Other"):
        register_layer_kind(LayerKind(Other, QuantizedGain, IntegerGain))
    with pytest.raises(ValueError, match="takes a LayerKind"):
        register_layer_kind(Gain)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- coverage and the reasons for float layers
class WithRawParameters(nn.Module):
    """A learned position tensor on the model itself, a ViT-like embeddings container, and recurrent layers."""

    def __init__(self) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, 6, 8))
        self.patches = Patches()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patches(x) + self.position
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        return self.head(h.mean(dim=1))


class Patches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)


def test_layers_left_in_float_have_reasons_the_user_can_act_on_and_the_report_shows_coverage():
    x = torch.randn(16, 5, 4, generator=torch.Generator().manual_seed(0))
    model, report = integer_model(WithRawParameters, x)
    reasons = dict(left_in_float(model))
    assert reasons["lstm"].startswith("recurrent layers are not supported: LSTM") and "nn.Linear" in reasons["lstm"]
    assert reasons["gru"].startswith("recurrent layers are not supported: GRU")
    # The container's class token is a layer of its own; the model's own position tensor stays, with how to quantize it.
    assert "patches" not in reasons and "patches.cls_token" in {row.name for row in report.layers}
    assert "position" in reasons["(the model)"] and "submodule" in reasons["(the model)"]
    assert dict(report.skipped) == reasons
    quantized = 4 * 8 + 8 * 3 + 8
    float_weights = 6 * 8 + 2 * (4 * 8 * 8) + 2 * (3 * 8 * 8)  # position, LSTM and GRU matrices
    assert report.float_weight_numel == float_weights
    assert report.coverage == pytest.approx(quantized / (quantized + float_weights))
    assert f"coverage {100 * report.coverage:.2f}%" in report.table()


# ---------------------------------------------------------------------- training with Lightning, and its checkpoint
class TiedLMModule(LightningModule):
    """TiedLM predicting the next token, as a LightningModule."""

    def __init__(self, vocab: int = 50, dim: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TiedLM(vocab, dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def test_a_tied_model_trains_under_the_budget_and_its_integer_checkpoint_reloads_tied(tmp_path):
    from models import fast_trainer, loader

    from lightning_nipq import HardQuantize, NIPQCallback, load_nipq_checkpoint

    tokens = ids(96, 9, vocab=50)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    model = TiedLMModule()
    callback = NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1)
    hard = HardQuantize(verbose=False)
    trainer = fast_trainer(2, [callback, hard])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*duplicate parameters.*")  # the shared quantizer is one param group entry
        trainer.fit(model, loader(data), loader(data))
    net = model.net
    assert net.out.weight_codes is net.emb.weight_codes
    # The budget counts the tied table once: the frozen bits meet it on the weights as stored.
    assert hard.report.avg_weight_bits <= 4.0 + 1e-6
    assert [r.name for r in hard.report.layers if r.tied_to] == ["net.out"]
    trainer.save_checkpoint(tmp_path / "tied.ckpt")
    fresh = load_nipq_checkpoint(TiedLMModule, tmp_path / "tied.ckpt").eval()
    assert fresh.net.out.weight_codes is fresh.net.emb.weight_codes
    with torch.no_grad():
        assert torch.equal(fresh(data.tensors[0]), model.eval()(data.tensors[0]))


def test_a_tied_weight_turns_hard_in_the_anneal_with_the_first_of_its_layers():
    from lightning.pytorch import Callback
    from models import fast_trainer, loader

    from lightning_nipq import NIPQCallback

    class Modes(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, str]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            net = pl_module.net
            # Runs after NIPQCallback's hook (callbacks are called in order): the modes of this step.
            self.seen.append((net.emb.weight_quantizer.mode, net.mid.weight_quantizer.mode, net.out.input_quantizer.mode))

    tokens = ids(64, 9, vocab=50)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    modes = Modes()
    callback = NIPQCallback(target_bits=4, hard_epochs=1, anneal_epochs=1, calibration_batches=1, log_per_layer=False)
    fast_trainer(3, [callback, modes]).fit(TiedLMModule(), loader(data, batch_size=8))
    # Layers in order: emb (its weight shared with out), mid, out. In the anneal they turn hard one by one.
    annealing = modes.seen[8:16]
    assert any(emb == "hard" and mid == "noise" for emb, mid, _ in annealing), annealing
    for emb, mid, out_input in annealing:
        # The shared weight quantizer is hard from the moment emb is, even while out's input is still noisy.
        assert emb == "hard" or (mid == "noise" and out_input == "noise")
