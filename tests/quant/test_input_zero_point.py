"""Asymmetric input ranges with a zero point (``input_zero_point="auto"``): calibration's rule, the
fake quantization in every mode, the exact integer layer, checkpoints, the artifact and ONNX."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from models import blobs, fast_trainer, image_blobs, loader
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq import (
    ArtifactError,
    LSQCallback,
    LSQConfig,
    LSQQuantizer,
    NIPQCallback,
    NIPQConfig,
    NIPQQuantizer,
    attach_quantizers,
    export_onnx,
    hard_quantize,
    load_nipq_checkpoint,
    load_quantized,
    post_training_quantize,
    save_quantized,
)
from lightning_nipq.layers import calibrate_activations, kind_of, quantizers
from lightning_nipq.layers.forms import IntegerLayerMixin
from lightning_nipq.quant import RangeObserver, integer_codes, quantizer_from_state
from lightning_nipq.quant.observers import AUTO_ZERO_POINT_RATIO, wants_zero_point
from lightning_nipq.saving import CheckpointMismatchError, compare_onnx, prepare_for_state_dict, read_manifest
from lightning_nipq.saving.artifact import METADATA_KEY, _checksum
from lightning_nipq.saving.onnx_export import onnx_outputs

METHODS: dict[str, Callable[..., Any]] = {
    "nipq": lambda bits, **kw: NIPQQuantizer(fixed_bits=bits, min_bits=min(bits, 2), max_bits=max(bits, 2), **kw),
    "lsq": lambda bits, **kw: LSQQuantizer(bits=bits, **kw),
}


def gelu_like(n: int = 4096, seed: int = 0) -> Tensor:
    """GELU outputs: minimum about -0.17 against a maximum of several units."""
    g = torch.Generator().manual_seed(seed)
    return F.gelu(torch.randn(n, generator=g) * 3.0)


def calibrated(method: str, bits: int, x: Tensor, rule: str = "auto", range_method: str = "percentile") -> Any:
    """An input quantizer of ``method`` at ``bits``, calibrated on ``x`` by a RangeObserver with the zero-point ``rule``."""
    q = METHODS[method](bits, signed=False, calibrated=False, zero_point=rule)
    observer = RangeObserver(range_method, 99.9)
    observer.watch(q, "input")
    q.train()
    for part in x.split(1024):
        q(part)
    observer.finish()
    return q.eval()


# ---------------------------------------------------------------------- calibration's rule
def test_the_auto_rule_wants_a_small_negative_side():
    assert wants_zero_point(-0.17, 10.0) and wants_zero_point(-AUTO_ZERO_POINT_RATIO, 1.0)
    assert not wants_zero_point(-0.51, 1.0)  # nearly symmetric: signed codes
    assert not wants_zero_point(0.0, 1.0) and not wants_zero_point(0.3, 1.0)  # no negative value: unsigned


@pytest.mark.parametrize("range_method", ["percentile", "minmax", "mse"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_auto_calibration_gives_a_zero_point_to_a_gelu_like_input_only(method, range_method):
    g = torch.Generator().manual_seed(1)
    gelu = gelu_like()
    symmetric = torch.randn(4096, generator=g)
    relu = F.relu(torch.randn(4096, generator=g))
    q = calibrated(method, 6, gelu, range_method=range_method)
    assert not q.signed and q.has_zero_point
    alpha, low = float(q.alpha), float(gelu.min())
    assert q.negative_share == pytest.approx(-low / (alpha - low), rel=1e-6)
    assert int(q.zero_point_code()) == round(q.negative_share * 63) > 0
    for x, signed in ((symmetric, True), (relu, False)):
        other = calibrated(method, 6, x, range_method=range_method)
        assert other.signed == signed and not other.has_zero_point and other.negative_share == 0.0
    off = calibrated(method, 6, gelu, rule="off", range_method=range_method)
    assert off.signed and not off.has_zero_point


def test_the_mse_search_of_a_zero_point_range_beats_the_symmetric_one():
    x = gelu_like()
    zero = calibrated("lsq", 4, x, range_method="mse")
    symmetric = calibrated("lsq", 4, x, rule="off", range_method="mse")
    error = [float((q(x) - x).square().mean()) for q in (zero, symmetric)]
    assert error[0] < 0.8 * error[1]


# ---------------------------------------------------------------------- fake quantization
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_hard_outputs_take_at_most_2_to_the_b_levels_inside_the_zero_point_range(method, bits):
    share = 0.2
    q = METHODS[method](bits, signed=False, negative_share=share, init_alpha=2.0).eval()
    n = 2**bits - 1
    z = round(share * n)
    step = 2.0 / (n - z)
    x = torch.linspace(-4, 4, 20001)
    with torch.no_grad():
        out = q(x)
    assert int(q.zero_point_code()) == z
    assert torch.unique(out).numel() <= 2**bits
    assert float(out.min()) == pytest.approx(-z * step, rel=1e-5) and float(out.max()) == pytest.approx(2.0, rel=1e-6)
    codes = out / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert float(q(torch.zeros(3)).abs().max()) == 0.0  # zero is a code: exactly representable


def test_noise_mode_clips_to_the_same_range_and_adds_one_step_of_noise():
    q = NIPQQuantizer(signed=False, min_bits=2, max_bits=8, init_bits=5.0, negative_share=0.25, init_alpha=2.0)
    q.train()
    q.mode = "noise"
    q.configure(stochastic_bits=False)
    x = torch.linspace(-4, 4, 20001)
    bits = q.rounded_bits()
    n = 2**bits - 1
    z = round(0.25 * n)
    step = 2.0 / (n - z)
    out = q(x)
    low = -z * step
    assert float(out.min()) >= low - 0.5 * step - 1e-6 and float(out.max()) <= 2.0 + 0.5 * step + 1e-6
    below, above = x < low - 1e-4, x > 2.0 + 1e-4
    assert torch.allclose(out[below], torch.full_like(out[below], low), atol=1e-5)
    assert torch.allclose(out[above], torch.full_like(out[above], 2.0), atol=1e-5)
    inside = ~below & ~above
    assert float((out[inside] - x[inside]).abs().max()) <= 0.5 * step + 1e-5
    assert float((out[inside] - x[inside]).abs().max()) > 0.3 * step  # noise of one step, not none


@pytest.mark.parametrize("mode", ["noise", "hard"])
def test_gradients_reach_the_range_and_the_bits(mode):
    q = NIPQQuantizer(signed=False, min_bits=2, max_bits=8, init_bits=4.3, negative_share=0.2, init_alpha=1.5, stochastic_bits=False)
    q.train()
    q.mode = mode
    x = torch.cat([gelu_like(2000) / 2, torch.tensor([-1.0, 3.0])]).requires_grad_()
    weights = torch.linspace(-1, 1, x.numel())
    (q(x) * weights).sum().backward()
    for grad in (q.alpha_raw.grad, q.theta.grad):
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    n = 2 ** q.rounded_bits() - 1
    z = round(0.2 * n)
    inside = (x > -z * 1.5 / (n - z) + 1e-4) & (x < 1.5 - 1e-4)
    assert x.grad is not None and not bool(inside[-2:].any())
    assert torch.allclose(x.grad[inside], weights[inside], rtol=1e-4) and float(x.grad[-2:].abs().max()) == 0.0


def test_the_zero_point_follows_the_bits_nipq_learns():
    q = NIPQQuantizer(signed=False, min_bits=2, max_bits=8, negative_share=0.3, init_alpha=1.0).eval()
    x = torch.linspace(-1, 1, 4001)
    for bits in (3, 5, 8):
        with torch.no_grad():
            q.theta.fill_(q._theta_for(bits))
        assert q.rounded_bits() == bits
        n = 2**bits - 1
        z = round(0.3 * n)
        assert int(q.zero_point_code()) == z
        # The range keeps about the calibrated share below zero whatever the bits.
        assert float(q(x).min()) == pytest.approx(-z / (n - z), rel=1e-5)


# ---------------------------------------------------------------------- the integer layer
def install(method: str, layer: nn.Module, x: Tensor, bits: int) -> Any:
    """Quantizers of ``method`` on ``layer``: the weight's from its max, the input calibrated on ``x`` with "auto"."""
    kind = kind_of(layer)
    weight_q = METHODS[method](bits, signed=True, init_alpha=float(layer.weight.detach().abs().max()) * 0.9)
    input_q = calibrated(method, bits, x.reshape(-1))
    kind.install_quantizers(layer, weight_q, input_q)
    return kind


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", ["linear", "conv"])
def test_the_integer_layer_equals_the_fake_quantized_layer(method, bits, shape):
    torch.manual_seed(0)
    if shape == "linear":
        layer: nn.Module = nn.Linear(24, 10)
        x = F.gelu(torch.randn(64, 24) * 2)
    else:
        layer = nn.Conv2d(4, 6, 3, padding=1)  # zero padding: the centred codes keep it exact
        x = F.silu(torch.randn(8, 4, 9, 9) * 2)
    kind = install(method, layer, x, bits)
    zero = int(layer.input_quantizer.zero_point_code())
    layer.eval()
    with torch.no_grad():
        fake = layer(x)
        kind.to_integer(layer)
        integer = layer(x)
    assert type(layer) is kind.integer and layer.input_zero_point == zero and not layer.input_signed
    if bits == 8:
        assert zero > 0
    assert torch.allclose(integer, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))


def test_the_integer_linear_multiplies_centred_codes_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(300, 20)
    x = F.gelu(torch.randn(64, 300) * 2)
    kind = install("lsq", layer, x, 8)
    kind.to_integer(layer.eval())
    z = layer.input_zero_point
    assert z > 0
    centred = integer_codes(x, layer.input_alpha, torch.tensor(8.0), False, torch.tensor(float(z))).long()
    assert int(centred.min()) >= -z and int(centred.max()) <= 255 - z
    exact = centred @ layer.weight_codes.long().t()  # int64 reference
    with torch.no_grad():
        out = layer(x)
    scale = (layer.input_scale() * layer.weight_scale.reshape(-1)).double()
    reconstructed = (out.double() - layer.bias.double()) / scale
    assert torch.allclose(reconstructed, exact.double(), atol=1e-2 * float(exact.abs().max()) / 2**20 + 0.02)


# ---------------------------------------------------------------------- end to end
class GeluNet(LightningModule):
    """GELU and SiLU between linear layers, a ReLU branch and a raw (symmetric) branch: every kind of input."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Linear(dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.side = nn.Linear(hidden, hidden)
        self.relu_in = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        a = F.silu(self.mid(F.gelu(h)))
        b = self.relu_in(F.relu(self.side(h)))
        return self.head(F.gelu(a + b))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class GeluConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.conv2(F.gelu(self.conv1(x))))
        return self.head(F.gelu(h.mean(dim=(2, 3))))


def fake_model(make: Callable[[], nn.Module], x: Tensor, config: Any, bits: int = 6) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    attach_quantizers(model, config)
    calibrate_activations(model, list(x.split(32))[:4], forward=lambda b: model(b))
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits(max(bits, q.lowest_bits))
    return model.eval()


def zero_points(model: nn.Module) -> dict[str, int]:
    return {n: m.input_zero_point for n, m in model.named_modules() if isinstance(m, IntegerLayerMixin) and m.input_zero_point}


@pytest.mark.parametrize(
    "make,data,config",
    [
        (GeluNet, lambda: blobs(256).tensors[0], NIPQConfig(input_zero_point="auto")),
        (GeluNet, lambda: blobs(256).tensors[0], LSQConfig(weight_bits=5, input_zero_point="auto")),
        (GeluConvNet, lambda: image_blobs(64).tensors[0], NIPQConfig(input_zero_point="auto")),
    ],
    ids=["nipq", "lsq", "conv"],
)
def test_the_integer_model_equals_the_fake_quantized_model(make, data, config):
    x = data()
    model = fake_model(make, x, config)
    with torch.no_grad():
        fake = model(x)
    report = hard_quantize(model)
    with torch.no_grad():
        integer = model(x)
    found = zero_points(model)
    assert found and all(z > 0 for z in found.values())
    if make is GeluNet:
        assert set(found) == {"mid", "head"}  # GELU and SiLU inputs; the ReLU and raw ones stay as they were
        assert not model.relu_in.input_signed and model.side.input_signed
    assert (integer.argmax(-1) == fake.argmax(-1)).all()
    assert torch.allclose(integer, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
    assert "zp" in report.table()


def gelu_integer_model(config: Any = None) -> tuple[nn.Module, Tensor]:
    x = blobs(256).tensors[0]
    model = fake_model(GeluNet, x, config or NIPQConfig(input_zero_point="auto"))
    hard_quantize(model)
    return model, x


def test_onnxruntime_agrees_with_a_zero_point_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    model, x = gelu_integer_model()
    path = export_onnx(model, tmp_path / "zp.onnx", x[:2])
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # constant zero points may be initializers or Constant nodes
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(int(p) for p in points if p.dtype.name == "uint8" and int(p) > 0) == sorted(zero_points(model).values())
    agreement, _, _ = compare_onnx(model, path, list(x.split(64)))
    assert agreement is not None and agreement >= 0.999
    # Float accumulation order differs, so an input lying on a rounding boundary may take the
    # neighbouring code on one side: rare, one step; every other output agrees to float rounding.
    with torch.no_grad():
        reference = model(x)
    diff = (onnx_outputs(path, x) - reference).abs().amax(dim=1) / reference.abs().max()
    assert float((diff < 1e-5).float().mean()) >= 0.99


def test_state_dict_round_trips_give_identical_outputs():
    x = blobs(256).tensors[0]
    model = fake_model(GeluNet, x, LSQConfig(weight_bits=4, input_zero_point="auto"))
    for form in ("fake", "integer"):
        if form == "integer":
            hard_quantize(model)
        state = model.state_dict()
        torch.manual_seed(7)
        fresh = GeluNet()
        prepare_for_state_dict(fresh, state)
        fresh.load_state_dict(state)
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
        if form == "fake":
            assert {n for n, q in quantizers(fresh) if q.has_zero_point} == {"mid.input_quantizer", "head.input_quantizer"}
    assert zero_points(fresh) == zero_points(model) != {}


def test_a_lightning_checkpoint_keeps_the_zero_points(tmp_path):
    data = blobs(128)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = GeluNet()
    trainer = fast_trainer(1, [LSQCallback(weight_bits=4, input_zero_point="auto", calibration_batches=2), ckpt], enable_checkpointing=True)
    trainer.fit(model, loader(data))
    shares = {n: q.negative_share for n, q in quantizers(model) if q.has_zero_point}
    assert shares and all(0 < s <= 0.5 for s in shares.values())
    loaded = load_nipq_checkpoint(GeluNet, ckpt.last_model_path).eval()
    assert {n: q.negative_share for n, q in quantizers(loaded) if q.has_zero_point} == shares
    x = data.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_nipq_training_with_zero_points_runs_every_phase():
    data = blobs(128)
    model = GeluNet()
    callback = NIPQCallback(target_bits=4, input_zero_point="auto", noise="histogram", calibration_batches=2, hard_epochs=1)
    fast_trainer(2, [callback]).fit(model, loader(data))
    assert callback.settings()["input_zero_point"] == "auto"
    assert any(q.has_zero_point for _, q in quantizers(model))
    x = data.tensors[0]
    with torch.no_grad():
        fake = model.eval()(x)
    hard_quantize(model)
    with torch.no_grad():
        assert torch.allclose(model(x), fake, rtol=0, atol=1e-5 * float(fake.abs().max()))


def test_post_training_quantization_gives_zero_points():
    x = blobs(128).tensors[0]
    torch.manual_seed(0)
    model = GeluNet()
    post_training_quantize(model, list(x.split(32)), weight_bits=4, method="mse", input_zero_point="auto")
    assert {n for n, q in quantizers(model) if q.has_zero_point} == {"mid.input_quantizer", "head.input_quantizer"}


# ---------------------------------------------------------------------- the artifact
def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """``src`` with its manifest edited and its checksum recomputed."""
    with safe_open(str(src), framework="pt") as f:
        manifest = json.loads(f.metadata()[METADATA_KEY])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    edit(manifest)
    manifest["checksum"] = _checksum(manifest, tensors)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(manifest)})
    return dst


def test_artifact_round_trip_keeps_the_zero_points(tmp_path):
    model, x = gelu_integer_model()
    path = save_quantized(model, tmp_path / "zp.safetensors")
    entries = {e["name"]: e for e in read_manifest(path)["layers"]}
    assert {n: e["input_zero_point"] for n, e in entries.items() if e["input_zero_point"]} == zero_points(model)
    loaded = load_quantized(path, GeluNet())
    assert zero_points(loaded) == zero_points(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_artifact_entry_without_a_zero_point_reads_as_none(tmp_path):
    model, x = gelu_integer_model(NIPQConfig())  # "off": no zero points
    assert not zero_points(model)
    path = save_quantized(model, tmp_path / "plain.safetensors")

    def drop(manifest: dict[str, Any]) -> None:
        for entry in manifest["layers"]:
            del entry["input_zero_point"]

    old = rewrite(path, tmp_path / "old.safetensors", drop)
    loaded = load_quantized(old, GeluNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "layer,value",
    [("mid", -1), ("mid", True), ("mid", 1.5), ("mid", "3"), ("mid", 10**6), ("side", 3), ("stem", 2)],
    ids=["negative", "bool", "fraction", "string", "beyond-the-codes", "signed-input", "float-input"],
)
def test_invalid_artifact_zero_points_are_refused(tmp_path, layer, value):
    model, _ = gelu_integer_model()
    path = save_quantized(model, tmp_path / "zp.safetensors")

    def edit(manifest: dict[str, Any]) -> None:
        next(e for e in manifest["layers"] if e["name"] == layer)["input_zero_point"] = value

    bad = rewrite(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ArtifactError, match="input_zero_point"):
        load_quantized(bad, GeluNet())


# ---------------------------------------------------------------------- saved states of other versions
def test_old_quantizer_states_without_zero_point_settings_load():
    for method in METHODS:
        q = METHODS[method](4, signed=False, init_alpha=1.2)
        state = q.state_dict()
        config = {k: v for k, v in state["_extra_state"]["config"].items() if k not in ("zero_point", "negative_share")}
        state["_extra_state"] = {**state["_extra_state"], "config": config}
        rebuilt = quantizer_from_state(state["_extra_state"])
        rebuilt.load_state_dict(state)
        assert rebuilt.zero_point == "off" and rebuilt.negative_share == 0.0
        x = torch.linspace(-1, 2, 301)
        assert torch.equal(rebuilt.eval()(x), q.eval()(x))


def test_old_integer_states_without_a_zero_point_load_and_bad_ones_are_refused():
    model, x = gelu_integer_model(NIPQConfig())
    state = model.state_dict()
    old = {k: ({kk: vv for kk, vv in v.items() if kk != "input_zero_point"} if k.endswith("_extra_state") else v) for k, v in state.items()}
    fresh = GeluNet()
    prepare_for_state_dict(fresh, old)
    fresh.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    for key, value in (("side._extra_state", 5), ("mid._extra_state", 2**20), ("mid._extra_state", -3)):
        bad = dict(state)
        bad[key] = {**state[key], "input_zero_point": value}
        with pytest.raises(CheckpointMismatchError, match="input_zero_point"):
            prepare_for_state_dict(GeluNet(), bad)


# ---------------------------------------------------------------------- invalid arguments
@pytest.mark.parametrize("value", ["on", "AUTO", None, True, 1])
def test_invalid_zero_point_rules_are_refused_at_construction(value):
    for make in (
        lambda: NIPQCallback(input_zero_point=value),
        lambda: LSQCallback(input_zero_point=value),
        lambda: NIPQConfig(input_zero_point=value),
        lambda: LSQConfig(input_zero_point=value),
        lambda: NIPQQuantizer(zero_point=value),
        lambda: LSQQuantizer(zero_point=value),
        lambda: post_training_quantize(GeluNet(), [], input_zero_point=value),
    ):
        with pytest.raises(ValueError, match="zero_point"):
            make()


@pytest.mark.parametrize("share", [-0.1, 0.6, math.nan, math.inf, True, "0.2"])
def test_invalid_negative_shares_are_refused(share):
    for cls in (NIPQQuantizer, LSQQuantizer):
        with pytest.raises(ValueError, match="negative_share"):
            cls(signed=False, negative_share=share)


def test_a_zero_point_needs_unsigned_codes_and_quantized_inputs():
    for cls in (NIPQQuantizer, LSQQuantizer):
        with pytest.raises(ValueError, match="unsigned"):
            cls(signed=True, negative_share=0.2)
        q = cls(signed=False, init_alpha=1.0)
        with pytest.raises(ValueError, match="unsigned"):
            q.set_range(2.0, signed=True, negative_share=0.2)
        assert float(q.alpha) == pytest.approx(1.0) and not q.signed and not q.has_zero_point  # unchanged
    with pytest.raises(ValueError, match="quantize_inputs"):
        NIPQCallback(input_zero_point="auto", quantize_inputs=False)
    with pytest.raises(ValueError, match="quantize_inputs"):
        post_training_quantize(GeluNet(), [], input_zero_point="auto", quantize_inputs=False)
