"""Saving integer models as bit-packed safetensors artifacts and loading them back."""

import json
import math
import struct

import pytest
import torch
from models import MLP, GroupedConvNet, TinyTransformer, blobs, image_blobs
from safetensors import safe_open
from torch import nn

from lightning_nipq import ArtifactError, attach_quantizers, hard_quantize, load_quantized, save_quantized
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations, quantizers
from lightning_nipq.saving import artifact_sizes, read_manifest
from lightning_nipq.saving.artifact import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY
from lightning_nipq.saving.bit_packing import CHUNK, pack_codes, packed_size, unpack_codes

CASES = [
    (MLP, lambda: blobs(64).tensors[0]),
    (GroupedConvNet, lambda: image_blobs(32).tensors[0]),
    (TinyTransformer, lambda: blobs(64).tensors[0]),
]


def integer_model(make, x, low=2, high=8, seed=0):
    """``make()`` with quantizers attached, calibrated on ``x``, random bits in [low, high], converted."""
    torch.manual_seed(seed)
    model = make()
    attach_quantizers(model)
    calibrate_activations(model, list(x.split(16))[:2], forward=lambda b: model(b))
    g = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        q.freeze_bits(int(torch.randint(max(low, q.lowest_bits), high + 1, (1,), generator=g)))
    hard_quantize(model)
    return model.eval()


def fresh(make):
    torch.manual_seed(123)  # other weights than the saved model: everything must come from the file
    return make()


def header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return data, length, json.loads(data[8 : 8 + length])


@pytest.mark.parametrize("make,data", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_round_trip_gives_identical_outputs(tmp_path, make, data):
    x = data()
    model = integer_model(make, x)
    path = save_quantized(model, tmp_path / "model.safetensors")
    loaded = load_quantized(path, fresh(make))
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for key, value in saved_state.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == loaded_state[key].dtype and torch.equal(value, loaded_state[key]), key
        else:
            assert value == loaded_state[key], key
    bits = {m.weight_bits for m in loaded.modules() if isinstance(m, IntegerLayerMixin)}
    assert len(bits) > 1  # mixed precision really went through


def test_packed_codes_take_exactly_their_bits(tmp_path):
    model = integer_model(GroupedConvNet, image_blobs(32).tensors[0])
    path = save_quantized(model, tmp_path / "m.safetensors")
    layers = {e["name"]: e for e in read_manifest(path)["layers"]}
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for name, entry in layers.items():
            packed = f.get_tensor(f"{name}.weight_codes.packed")
            expected = math.ceil(entry["weight_bits"] * math.prod(entry["weight_shape"]) / 8)
            assert packed.dtype == torch.uint8 and packed.numel() == expected
            total += expected
    sizes = artifact_sizes(path)
    assert sizes.packed_code_bytes == total
    assert sizes.ideal_bytes == sum(e["weight_bits"] * math.prod(e["weight_shape"]) for e in layers.values()) / 8 + sizes.other_bytes
    assert sizes.float32_bytes > 3 * sizes.ideal_bytes


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_unpack_any_width_and_length(bits):
    n = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    for numel in (0, 1, 7, 8, 9, 1001, CHUNK + 3):
        codes = torch.randint(-n, n + 1, (numel,), generator=g)
        if numel:
            codes[0], codes[-1] = -n, n  # both ends of the range
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(numel, bits) == math.ceil(bits * numel / 8)
        assert torch.equal(unpack_codes(packed, bits, numel).long(), codes)


def test_bit_layout_is_lsb_first():
    # 2-bit codes -1, 0, 1, 0 are stored as 0, 1, 2, 1 -> bits 00 10 01 10 (LSB first) -> 0b01100100
    assert pack_codes(torch.tensor([-1, 0, 1, 0]), 2).tolist() == [100]
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([2]), 2)


def test_manifest_and_atomic_write(tmp_path):
    model = integer_model(MLP, blobs(32).tensors[0])
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old content")
    save_quantized(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # replaced, no temporary file left
    _, _, head = header(path)
    manifest = json.loads(head["__metadata__"][METADATA_KEY])
    assert manifest["format"] == FORMAT_NAME and manifest["version"] == FORMAT_VERSION
    assert manifest["model_class"] == "MLP" and len(manifest["checksum"]) == 64
    stem = manifest["layers"][0]
    assert stem["name"] == "stem" and stem["kind"] == "Linear" and stem["weight_shape"] == [32, 16]
    assert stem["input_bits"] is None and manifest["layers"][1]["input_bits"] >= 2
    head = manifest["layers"][-1]
    if head["weight_granularity"] == "tensor":
        assert float(model.head.weight_scale) == head["weight_scale"]  # exact in JSON
    else:  # per channel (the default): the steps are a float32 tensor beside the codes
        assert head["weight_scale"] is None and head["weight_granularity"] == "channel"
        with safe_open(str(path), "pt") as f:
            assert torch.equal(f.get_tensor("head.weight_scale.ranges"), model.head.weight_scale)


class Shared(nn.Module):
    """One layer reachable under two names (``body.2`` and ``alias``), and a buffer viewing another."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.alias = self.body[2]
        self.register_buffer("table", torch.randn(8))
        self.register_buffer("tail", self.table[5:])

    def forward(self, x):
        return self.body(x) + self.tail


def test_shared_layer_and_refusing_float_models(tmp_path):
    x = torch.randn(32, 6)
    model = integer_model(Shared, x)
    path = save_quantized(model, tmp_path / "m.safetensors")
    assert read_manifest(path)["layers"][-1]["aliases"] == ["alias"]
    loaded = load_quantized(path, fresh(Shared))
    assert loaded.alias is loaded.body[2] and isinstance(loaded.alias, IntegerLayerMixin)
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(ArtifactError, match="hard_quantize"):
        save_quantized(Shared(), tmp_path / "float.safetensors")


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    model = integer_model(MLP, blobs(32).tensors[0])
    return save_quantized(model, tmp_path_factory.mktemp("art") / "mlp.safetensors")


def assert_untouched(model, before):
    assert not any(isinstance(m, IntegerLayerMixin) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def load_fails(path, model, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArtifactError, match=match):
        load_quantized(path, model)
    assert_untouched(model, before)


def test_missing_and_truncated_files(tmp_path, saved_mlp):
    load_fails(tmp_path / "nothing.safetensors", MLP(), "no such file")
    data = saved_mlp.read_bytes()
    for cut in (len(data) - 10, 20, 4):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        load_fails(broken, MLP(), "truncated or damaged.*re-save")


def test_flipped_data_byte_fails_the_checksum(tmp_path, saved_mlp):
    data, length, _ = header(saved_mlp)
    for offset in (8 + length, len(data) - 1, (8 + length + len(data)) // 2):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x10
        path = tmp_path / "flipped.safetensors"
        path.write_bytes(bytes(corrupted))
        load_fails(path, MLP(), "checksum mismatch")


def test_unknown_format_version(tmp_path, saved_mlp):
    data = saved_mlp.read_bytes()
    old = f'\\"version\\":{FORMAT_VERSION},'.encode()
    assert data.count(old) == 1
    path = tmp_path / "v9.safetensors"
    path.write_bytes(data.replace(old, old.replace(str(FORMAT_VERSION).encode(), b"9")))
    load_fails(path, MLP(), "format version 9; this lightning-nipq reads version")


def test_other_architectures_are_named(saved_mlp):
    load_fails(saved_mlp, MLP(hidden=24), r"another shape: stem\.weight \(\[32, 16\] in the artifact, \[24, 16\]")
    load_fails(saved_mlp, MLP(classes=5), r"head\.weight \(\[4, 32\] in the artifact, \[5, 32\] in the model\)")
    load_fails(saved_mlp, GroupedConvNet(), r"layers missing from the model: stem, blocks\.0\.inner\.0")
    wrong_type = MLP()
    wrong_type.head = nn.Conv1d(32, 4, 1)
    load_fails(saved_mlp, wrong_type, r"another type: head \(Linear in the artifact, Conv1d in the model\)")
    extra = MLP()
    extra.norm = nn.LayerNorm(4)
    load_fails(saved_mlp, extra, r"not in the artifact: norm\.bias, norm\.weight")
    already = integer_model(MLP, blobs(32).tensors[0])
    with pytest.raises(ArtifactError, match="already quantized: pass a fresh float model"):
        load_quantized(saved_mlp, already)
