"""Loading damaged or hostile integer-model artifacts: every failure is an ArtifactError, before the model changes.

The manifest's checksum is no signature: these tests edit manifests the way anyone can,
recomputing the checksum with the library's own function, and check that no value from
the file is trusted.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from models import MLP, blobs
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_nipq import ArtifactError, NIPQConfig, attach_quantizers, hard_quantize, load_quantized, save_quantized
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations, quantizers
from lightning_nipq.layers.forms import LayerKind
from lightning_nipq.saving import artifact_sizes, read_manifest
from lightning_nipq.saving.artifact import METADATA_KEY, ArtifactSizes, _checksum
from lightning_nipq.saving.bit_packing import pack_codes, unpack_codes

# Odd sizes: 5 * 7 weights at 3 bits leave padding bits in the last packed byte.
SIZES = {"dim": 5, "hidden": 7, "classes": 3}


def integer_model(make: Callable[[], nn.Module], x: torch.Tensor) -> nn.Module:
    """``make()`` quantized, calibrated on ``x`` and converted, at mixed widths from 3 to 6 bits."""
    torch.manual_seed(0)
    model = make()
    attach_quantizers(model, NIPQConfig(weight_granularity="tensor"))  # one scale per layer, in the manifest
    calibrate_activations(model, list(x.split(16)), forward=lambda b: model(b))
    for index, (_, q) in enumerate(quantizers(model)):
        q.freeze_bits(max(q.lowest_bits, 3 + index % 4))
    hard_quantize(model)
    return model.eval()


def fresh() -> MLP:
    torch.manual_seed(123)  # weights unlike the saved ones: everything loaded must come from the file
    return MLP(**SIZES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The artifact of a small integer MLP, an input, and the saved model's output on it."""
    x = blobs(32, dim=SIZES["dim"], classes=SIZES["classes"]).tensors[0]
    model = integer_model(lambda: MLP(**SIZES), x)
    path = save_quantized(model, tmp_path_factory.mktemp("hostile") / "mlp.safetensors")
    with torch.no_grad():
        return path, x, model(x)


def rewrite(
    src: Path,
    dst: Path,
    edit: Optional[Callable[[dict[str, Any]], None]] = None,
    edit_tensors: Optional[Callable[[dict[str, torch.Tensor]], None]] = None,
) -> Path:
    """``src`` with its manifest and tensors edited and the checksum recomputed, as anyone can."""
    with safe_open(str(src), framework="pt") as f:
        manifest = json.loads(f.metadata()[METADATA_KEY])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if edit is not None:
        edit(manifest)
    if edit_tensors is not None:
        edit_tensors(tensors)
    manifest["checksum"] = _checksum(manifest, tensors)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(manifest)})
    return dst


def with_header(
    src: Path,
    dst: Path,
    edit: Optional[Callable[[dict[str, Any]], None]] = None,
    text: Optional[bytes] = None,
    length: Optional[int] = None,
) -> Path:
    """``src`` with its safetensors header edited (or replaced by ``text``) and its length field set."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if edit is not None:
        edit(header)
    if text is None:
        text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data[8 + n :])
    return dst


Snapshot = tuple[list[tuple[str, type]], dict[str, int], dict[str, Any]]


def state_of(model: nn.Module) -> Snapshot:
    """Everything a failed load must leave as it was: classes, parameter objects, state values."""
    classes = [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    params = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    return classes, params, state


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    assert not any(isinstance(m, IntegerLayerMixin) for m in model.modules())
    classes, params, state = state_of(model)
    assert classes == before[0] and params == before[1]
    assert state.keys() == before[2].keys() and all(torch.equal(state[k], before[2][k]) for k in state)


def refused(path: Path, *named: str, manifest_only: bool = False) -> None:
    """Loading, reading the manifest and the sizes of ``path`` raise an ArtifactError that names the file,
    each of ``named`` and the fix; the model given to the load is unchanged. With ``manifest_only``
    the damage is in the codes, which only loading reads."""
    model = fresh()
    before = state_of(model)
    calls: list[Callable[[], Any]] = [lambda: load_quantized(path, model)]
    if not manifest_only:
        calls += [lambda: read_manifest(path), lambda: artifact_sizes(path)]
    for call in calls:
        with pytest.raises(ArtifactError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and "save_quantized" in message, message
        assert all(text in message for text in named), message
    assert_unchanged(model, before)


REQUIRED_FIELDS = [
    "name", "type", "kind", "weight_shape", "weight_bits", "input_bits", "input_signed", "input_numel",
    "weight_scale", "weight_alpha", "input_alpha",
]  # fmt: skip


def set_field(index: int, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["layers"][index].update(values)

    return edit


def drop_field(index: int, key: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        del manifest["layers"][index][key]

    return edit


# ---------------------------------------------------------------------- problem 1: absurd bit widths
@pytest.mark.parametrize("field,index", [("input_bits", 1), ("weight_bits", 0), ("weight_bits", 2)])
def test_huge_bit_widths_are_refused_before_any_use(tmp_path, saved, field, index):
    # Accepted, input_bits = 10**30 made the first forward compute 2 ** (10**30 - 1) forever.
    path = rewrite(saved[0], tmp_path / "huge.safetensors", set_field(index, **{field: 10**30}))
    start = time.perf_counter()
    refused(path, f"layers[{index}].{field}", "[")
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------- problem 2: values that load and compute garbage
NAN, INF = float("nan"), float("inf")
INVALID_VALUES = [
    *[(1, "weight_scale", v) for v in (NAN, INF, -INF, 0.0, -0.01, 1e39, 1e-50, 10**400, "0.1", None, True)],
    *[(1, "input_alpha", v) for v in (NAN, INF, 0.0, -1.0, 1e39, None, "1")],
    *[(0, "input_alpha", v) for v in (NAN, INF, -INF, 1e39, "0")],  # layer 0 has float input: alpha unused, still a number
    *[(1, "input_bits", v) for v in (0, -1, 17, 4.5, True, "4", [4])],
    *[(1, "weight_bits", v) for v in (0, 1, 17, 4.0, False, "4")],
    *[(1, "input_signed", v) for v in (1, 0, "true", None)],
    *[(1, "input_numel", v) for v in (-1, 1.5, True, "32", None, 2**63)],
    *[(1, "weight_shape", v) for v in ([7, -7], [7, 0], [7, 7.0], [True, 7], "7x7", [], 49, [7, 6], [7, 7] + [1] * 63)],
    *[(1, "weight_shape", v) for v in ([7, 7, 1, 1, 10**30], [2**40, 2**40])],  # absurd: bounded by the stored bytes
    *[(1, "name", v) for v in (5, None, ["blocks.0.inner.0"])],
    *[(1, "type", v) for v in (5, None, "Conv9d", "linear")],
    *[(1, "aliases", v) for v in ("blocks.0", [1], {"a": "b"})],
    (1, "kind", 7),
    (1, "weight_alpha", 1.0),  # inconsistent with weight_scale * n: one of the two was edited
]


@pytest.mark.parametrize("index,field,value", INVALID_VALUES, ids=lambda v: repr(v)[:20])
def test_invalid_values_are_refused(tmp_path, saved, index, field, value):
    path = rewrite(saved[0], tmp_path / "bad.safetensors", set_field(index, **{field: value}))
    refused(path, f"layers[{index}].{field}")


def test_bit_width_ranges_follow_the_sign(tmp_path, saved):
    # Signed inputs need 2 bits at least; unsigned ones may have 1, and 16 is the widest either way.
    refused(rewrite(saved[0], tmp_path / "s1.safetensors", set_field(1, input_signed=True, input_bits=1)), "layers[1].input_bits")
    for signed, bits in ((False, 1), (True, 2), (False, 16)):
        path = rewrite(saved[0], tmp_path / f"ok{bits}.safetensors", set_field(1, input_signed=signed, input_bits=bits))
        model = load_quantized(path, fresh())
        assert (model.blocks[0].inner[0].input_bits, model.blocks[0].inner[0].input_signed) == (bits, signed)
        assert torch.isfinite(model(saved[1])).all()


@pytest.mark.parametrize("key", REQUIRED_FIELDS)
def test_missing_entry_fields_are_named(tmp_path, saved, key):
    refused(rewrite(saved[0], tmp_path / "missing.safetensors", drop_field(2, key)), f"layers[2].{key}", "missing")


def test_codes_beyond_their_width_or_padding_are_refused(tmp_path, saved):
    with safe_open(str(saved[0]), framework="pt") as f:
        manifest = json.loads(f.metadata()[METADATA_KEY])
    stem = manifest["layers"][0]
    key, bits, numel = "stem.weight_codes.packed", stem["weight_bits"], math.prod(stem["weight_shape"])
    assert bits * numel % 8, "the test model must leave padding bits"

    def above_range(tensors: dict[str, torch.Tensor]) -> None:
        codes = unpack_codes(tensors[key], bits, numel).long()
        packed = pack_codes(torch.zeros_like(codes), bits)  # all codes 0: stored as n
        packed[0] = 0xFF  # the first code all ones: 2**bits - 1 > 2n
        tensors[key] = packed

    def padding(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][-1] |= 0x80

    refused(rewrite(saved[0], tmp_path / "range.safetensors", edit_tensors=above_range), key, "above", manifest_only=True)
    refused(rewrite(saved[0], tmp_path / "pad.safetensors", edit_tensors=padding), key, "padding", manifest_only=True)
    with pytest.raises(ValueError, match="numel"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 4, True)


# ---------------------------------------------------------------------- problem 3: duplicates, and failures part-way
def duplicate_entry(manifest: dict[str, Any]) -> None:
    manifest["layers"].append(dict(manifest["layers"][1]))


def alias_of_another_entry(manifest: dict[str, Any]) -> None:
    manifest["layers"][0]["aliases"] = [manifest["layers"][3]["name"]]


@pytest.mark.parametrize("edit,field", [(duplicate_entry, "layers[4].name"), (alias_of_another_entry, "layers[3].name")])
def test_duplicated_entries_are_refused_before_the_model_changes(tmp_path, saved, edit, field):
    refused(rewrite(saved[0], tmp_path / "dup.safetensors", edit), field, "already named by")


class Shared(nn.Module):
    """One layer under two names, ``body.2`` and ``alias``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.alias = self.body[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_one_layer_listed_as_two_entries_is_refused(tmp_path):
    # Two entries with distinct names for what is one module in the model: the second
    # conversion would meet a layer the first already converted.
    x = torch.randn(32, 6)
    path = save_quantized(integer_model(Shared, x), tmp_path / "shared.safetensors")

    def split(manifest: dict[str, Any]) -> None:
        entry = manifest["layers"][-1]
        del entry["aliases"]
        manifest["layers"].append({**entry, "name": "alias"})

    def copy_codes(tensors: dict[str, torch.Tensor]) -> None:
        tensors["alias.weight_codes.packed"] = tensors["body.2.weight_codes.packed"].clone()

    split_path = rewrite(path, tmp_path / "split.safetensors", split, copy_codes)
    torch.manual_seed(1)
    model = Shared()
    before = state_of(model)
    shared = r"shared under other names.*body\.2 \(body\.2 in the artifact, body\.2, alias in the model\)"
    with pytest.raises(ArtifactError, match=shared):
        load_quantized(split_path, model)
    assert_unchanged(model, before)
    assert torch.equal(load_quantized(path, model)(x), load_quantized(path, Shared())(x))


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("where", ["conversion", "load_state_dict"])
def test_failure_while_applying_puts_the_model_back(monkeypatch, saved, where, error):
    path, x, expected = saved
    model = fresh()
    before = state_of(model)
    if where == "conversion":
        real = LayerKind.integer_from_codes
        calls = []

        def failing(self, layer, *args, **kwargs):
            calls.append(layer)
            if len(calls) == 3:  # two layers converted already
                raise error("interrupted")
            return real(self, layer, *args, **kwargs)

        monkeypatch.setattr(LayerKind, "integer_from_codes", failing)
    else:
        real_load = nn.Module.load_state_dict

        def failing(self, *args, **kwargs):
            real_load(self, *args, **kwargs)  # every tensor copied in when the failure comes
            raise error("interrupted")

        monkeypatch.setattr(nn.Module, "load_state_dict", failing)
    with pytest.raises(ArtifactError if error is RuntimeError else KeyboardInterrupt) as info:
        load_quantized(path, model)
    if error is RuntimeError:
        assert "left as it was" in str(info.value) and "save_quantized" in str(info.value)
    monkeypatch.undo()
    assert_unchanged(model, before)
    # What was put back is a working float model: loading into it now succeeds, exactly.
    assert torch.equal(load_quantized(path, model)(x), expected)


# ---------------------------------------------------------------------- problem 4: malformed manifests
def top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest[key] = value

    return edit


def without(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        del manifest[key]

    return edit


def replace_entry(index: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["layers"][index] = value

    return edit


def alias(key: str, target: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["tensor_aliases"][key] = target

    return edit


MALFORMED = [
    (top("layers", {"stem": {}}), "layers"),
    (top("layers", "stem"), "layers"),
    (top("layers", []), "layers"),
    (without("layers"), "layers"),
    (replace_entry(2, 5), "layers[2]"),
    (replace_entry(2, ["name", "stem"]), "layers[2]"),
    (replace_entry(0, None), "layers[0]"),
    (top("tensor_aliases", ["a", "b"]), "tensor_aliases"),
    (top("tensor_aliases", None), "tensor_aliases"),
    (without("tensor_aliases"), "tensor_aliases"),
    (alias("extra.bias", 5), "tensor_aliases['extra.bias']"),
    (alias("extra.bias", "nowhere.bias"), "tensor_aliases['extra.bias']"),
    (alias("extra.bias", "stem.weight_codes.packed"), "tensor_aliases['extra.bias']"),
    (alias("stem.bias", "head.bias"), "tensor_aliases['stem.bias']"),  # a stored key aliased too
    (alias("stem.weight_scale", "head.bias"), "'stem.weight_scale'"),  # inside an integer layer's own state
    (top("model_class", 5), "model_class"),
]


@pytest.mark.parametrize("edit,field", MALFORMED, ids=[f"{i}-{f}" for i, (_, f) in enumerate(MALFORMED)])
def test_malformed_manifests_raise_artifact_errors(tmp_path, saved, edit, field):
    refused(rewrite(saved[0], tmp_path / "malformed.safetensors", edit), field)


def test_stray_tensors_are_refused(tmp_path, saved):
    def stray_codes(tensors: dict[str, torch.Tensor]) -> None:
        tensors["ghost.weight_codes.packed"] = torch.zeros(4, dtype=torch.uint8)

    def integer_state(tensors: dict[str, torch.Tensor]) -> None:
        tensors["stem.weight"] = torch.zeros(7, 5)

    def wide_codes(tensors: dict[str, torch.Tensor]) -> None:
        tensors["stem.weight_codes.packed"] = tensors["stem.weight_codes.packed"].to(torch.int16)

    refused(rewrite(saved[0], tmp_path / "ghost.safetensors", edit_tensors=stray_codes), "'ghost.weight_codes.packed'")
    refused(rewrite(saved[0], tmp_path / "weight.safetensors", edit_tensors=integer_state), "'stem.weight'", "layers[0].name")
    refused(rewrite(saved[0], tmp_path / "wide.safetensors", edit_tensors=wide_codes), "'stem.weight_codes.packed'", "uint8")


@pytest.mark.parametrize(
    "manifest_text",
    [
        '{"format":"lightning-nipq-integer","version":1,"layers":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"format":"lightning-nipq-integer","version":1,"layers":' + "9" * 5000 + "}",  # beyond Python's int digits
        '{"format":"lightning-nipq-integer","version":true,"layers":[]}',
    ],
    ids=["deep", "long-int", "bool-version"],
)
def test_unparseable_manifests_raise_artifact_errors(tmp_path, manifest_text):
    path = tmp_path / "text.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={METADATA_KEY: manifest_text})
    for call in (read_manifest, artifact_sizes):
        with pytest.raises(ArtifactError, match="save_quantized"):
            call(path)


# ---------------------------------------------------------------------- problem 5: damaged headers, read alone
def entry_of(key: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        if values.get("drop"):
            del header[key][values["drop"]]
        else:
            header[key] = values["value"] if "value" in values else {**header[key], **values}

    return edit


def bad_metadata(header: dict[str, Any]) -> None:
    header["__metadata__"] = {METADATA_KEY: 5}


HEADERS = {
    "length-2**62": {"length": 2**62},  # made artifact_sizes allocate 4 EiB: MemoryError
    "length-2**40": {"length": 2**40},
    "length-10**9": {"length": 10**9},  # over safetensors' 100 MB cap even in a file that big
    "list": {"text": b"[1, 2, 3]"},
    "deep": {"text": b"{" + b'"a":{' * 50_000 + b"}" * 50_001},
    "not-utf8": {"text": b"\xff\xfe{not json"},
    "entry-int": {"edit": entry_of("stem.bias", value=5)},
    "no-offsets": {"edit": entry_of("stem.bias", drop="data_offsets")},
    "no-shape": {"edit": entry_of("stem.bias", drop="shape")},
    "dtype-int": {"edit": entry_of("stem.bias", dtype=5)},
    "huge-shape": {"edit": entry_of("stem.bias", shape=[2**62, 2**62])},
    "negative-shape": {"edit": entry_of("stem.bias", shape=[7, -1])},
    "offsets-past-end": {"edit": entry_of("stem.bias", data_offsets=[0, 10**12])},
    "offsets-reversed": {"edit": entry_of("stem.bias", data_offsets=[8, 4])},
    "offsets-2**64": {"edit": entry_of("stem.bias", data_offsets=[0, 2**64])},
    "huge-packed": {"edit": entry_of("stem.weight_codes.packed", shape=[2**62])},
    "metadata-int": {"edit": bad_metadata},
}


@pytest.mark.parametrize("damage", HEADERS.values(), ids=HEADERS.keys())
def test_damaged_headers_raise_artifact_errors(tmp_path, saved, damage):
    path = with_header(saved[0], tmp_path / "header.safetensors", **damage)
    refused(path)


def test_short_files_raise_artifact_errors(tmp_path, saved):
    data = saved[0].read_bytes()
    for cut in (0, 3, 8, 9, 100):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        refused(path)


# ---------------------------------------------------------------------- fuzz
def test_flipped_and_truncated_bytes_never_escape(tmp_path, saved):
    """Each damaged copy raises an ArtifactError everywhere, or loads to the very same outputs."""
    path, x, expected = saved
    data = path.read_bytes()
    # Every byte flipped once (a different bit from byte to byte), and cuts across the whole file.
    copies = [data[:cut] for cut in range(0, len(data), 37)]
    for position in range(len(data)):
        copies.append(data[:position] + bytes([data[position] ^ (1 << position % 8)]) + data[position + 1 :])
    damaged = tmp_path / "damaged.safetensors"
    model = fresh()
    before = state_of(model)
    loaded = 0
    for copy in copies:
        damaged.write_bytes(copy)
        try:
            result = load_quantized(damaged, model)
        except ArtifactError:
            assert_unchanged(model, before)
        else:
            assert torch.equal(result(x), expected)
            loaded += 1
            model = fresh()
            before = state_of(model)
        for call in (read_manifest, artifact_sizes):
            try:
                value = call(damaged)
            except ArtifactError:
                continue
            assert isinstance(value, (dict, ArtifactSizes))
    assert loaded < len(copies) // 10  # almost every copy is caught


FUZZ_VALUES = [None, True, -1, 0, 1, 2, 4.5, 17, 10**30, float("nan"), float("inf"), 1e-50, 1e39, "3", [], {}, [3], [-1, 5]]
ENTRY_FIELDS = [*REQUIRED_FIELDS, "aliases"]


def test_edited_manifest_values_never_escape(tmp_path, saved):
    """Any value in any field, checksum recomputed: an ArtifactError, or a model that runs to an output of the right shape."""
    path, x, expected = saved
    edits = [set_field(index, **{field: value}) for index in (0, 1) for field in ENTRY_FIELDS for value in FUZZ_VALUES]
    edits += [top(key, value) for key in ("layers", "tensor_aliases", "model_class", "version") for value in FUZZ_VALUES]
    edited = tmp_path / "edited.safetensors"
    model = fresh()
    before = state_of(model)
    for edit in edits:
        rewrite(path, edited, edit)
        try:
            result = load_quantized(edited, model)
        except ArtifactError:
            assert_unchanged(model, before)
        else:
            with torch.no_grad():
                assert result(x).shape == expected.shape
            model = fresh()
            before = state_of(model)
        for call in (read_manifest, artifact_sizes):
            try:
                call(edited)
            except ArtifactError:
                pass
