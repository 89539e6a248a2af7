"""The integer model as one safetensors file: bit-packed codes, exact scales, and a manifest.

Layout of the file written by `save_quantized`:

* ``<layer>.weight_codes.packed``: the weight codes of each integer layer, offset to
  unsigned (``code + n``, ``n = 2**(bits - 1) - 1``) and bit-packed at their true width
  into a ``uint8`` tensor of ``ceil(bits * numel / 8)`` bytes; see `pack_codes`.
* every other tensor of the state dict (biases, BatchNorm parameters and buffers, layers
  left in float) under its state-dict key, unchanged.
* the header metadata key ``"lightning_nipq"``: a JSON manifest with the format name and
  version, the model class, one entry per integer layer (name, kind, weight shape, bits,
  input bits and sign, the exact float32 scale and alphas) and a sha256 checksum.

The scales and alphas live in the manifest rather than as tensors: as JSON numbers they
round-trip a float32 exactly, they cost no safetensors header entry each, and the checksum
covers the manifest too. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nipq.layers.attach import disable_transformer_fast_path
from lightning_nipq.layers.forms import INTEGER_STATE_KEYS, IntegerLayerMixin, is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import describe_layer, kind_named, kind_of
from lightning_nipq.layers.model_walk import named_layers, require_integer_model
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.saving.bit_packing import pack_codes, unpack_codes

FORMAT_NAME = "lightning-nipq-integer"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_KEY = "lightning_nipq"
PACKED_SUFFIX = "weight_codes.packed"

PathLike = Union[str, "os.PathLike[str]"]


class ArtifactError(ValueError):
    """A quantized-model file that cannot be read, or does not fit the model it is loaded into."""


@dataclass
class ArtifactSizes:
    """Sizes of a saved integer model, in bytes.

    ``ideal_bytes`` is what the content needs and nothing more: every weight code at its
    bit width (``sum(bits * numel) / 8``) plus every other stored number at its own size
    (float32 for the scales and alphas); ``float32_bytes`` is the float model's state dict
    with the quantized weights in float32.
    """

    file_bytes: int
    packed_code_bytes: int
    other_bytes: int
    ideal_bytes: float
    float32_bytes: int

    @property
    def ratio_to_ideal(self) -> float:
        """File size over the ideal packed size: the cost of the header and manifest."""
        return self.file_bytes / self.ideal_bytes

    @property
    def float32_ratio(self) -> float:
        """How many times smaller the file is than the float32 state dict."""
        return self.float32_bytes / self.file_bytes

    def summary(self) -> str:
        """One line for a log or a demo's output."""
        return (
            f"artifact {self.file_bytes / 1024:.1f} KiB: {self.ratio_to_ideal:.3f}x the ideal packed size "
            f"({self.ideal_bytes / 1024:.1f} KiB), {self.float32_ratio:.1f}x smaller than float32 "
            f"({self.float32_bytes / 1024:.1f} KiB)"
        )


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _layer_entry(names: list[str], layer: IntegerLayerMixin) -> dict[str, Any]:
    kind = kind_of(layer)  # type: ignore[arg-type]
    assert kind is not None
    n_w = num_levels(layer.weight_bits, True)
    entry: dict[str, Any] = {
        "name": names[0],
        "type": kind.name,
        "kind": describe_layer(layer),  # type: ignore[arg-type]
        "weight_shape": list(layer.weight_codes.shape),
        "weight_bits": layer.weight_bits,
        "input_bits": layer.input_bits,
        "input_signed": layer.input_signed,
        "input_numel": layer.input_numel,
        "weight_scale": float(layer.weight_scale),
        "weight_alpha": float(layer.weight_scale) * n_w,
        "input_alpha": float(layer.input_alpha),
    }
    if len(names) > 1:
        entry["aliases"] = names[1:]
    return entry


def _tensor_bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _checksum(manifest: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """sha256 over the manifest (less the checksum) and every tensor's key, dtype, shape and bytes, by key."""
    digest = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"\0{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def save_quantized(model: nn.Module, path: PathLike) -> Path:
    """Write the integer ``model`` (after `lightning_nipq.hard_quantize`) to one safetensors file.

    The file is written to a temporary file beside ``path`` and renamed over it, so a
    crash never leaves a half-written artifact under the final name. Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    require_integer_model(model, "saving", ArtifactError)
    layers = named_layers(model, is_integer)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    entries = []
    for names, layer in layers:
        for name in names:
            for key in INTEGER_STATE_KEYS:
                state.pop(_prefix(name) + key, None)
        tensors[_prefix(names[0]) + PACKED_SUFFIX] = pack_codes(layer.weight_codes, layer.weight_bits)
        entries.append(_layer_entry(names, layer))
    aliases: dict[str, str] = {}
    stored_by_memory: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ArtifactError(f"state {key!r} is a {type(value).__name__}, not a tensor; it cannot be stored without pickling")
        # safetensors refuses tensors that share memory: the same tensor under two keys (tied
        # weights, a layer under two names) is stored once, a view into another one is copied.
        storage = value.untyped_storage().data_ptr()
        memory = (storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if value.numel() and memory in stored_by_memory:
            aliases[key] = stored_by_memory[memory]
            continue
        stored_by_memory[memory] = key
        stored = value.detach().cpu().contiguous()
        if value.numel() and storage in storages:
            stored = stored.clone()
        storages.add(storage)
        tensors[key] = stored
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_class": type(model).__qualname__,
        "layers": entries,
        "tensor_aliases": aliases,
    }
    manifest["checksum"] = _checksum(manifest, tensors)
    metadata = {METADATA_KEY: json.dumps(manifest, separators=(",", ":"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # safetensors writes its files with mode 0600; give the artifact the usual umask mode instead.
        tmp.touch(exist_ok=False)
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _parse_manifest(path: Path, metadata: Optional[dict[str, str]]) -> dict[str, Any]:
    if not metadata or METADATA_KEY not in metadata:
        raise ArtifactError(f"{path} is a safetensors file but not a lightning-nipq artifact (no {METADATA_KEY!r} metadata)")
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: the manifest is not valid JSON ({e}); the file is corrupted, re-save it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: the manifest does not name the {FORMAT_NAME!r} format")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{path} has format version {version!r}; this lightning-nipq reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Load it with the lightning-nipq that wrote it, or re-save it"
        )
    return manifest


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The checked manifest and every tensor of the file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(
            f"{path} cannot be read as a safetensors file ({e}); it is truncated or damaged: "
            "copy it again or re-save the model with save_quantized"
        ) from e
    manifest = _parse_manifest(path, metadata)
    expected = manifest.get("checksum")
    actual = _checksum(manifest, tensors)
    if actual != expected:
        raise ArtifactError(
            f"{path}: checksum mismatch (stored sha256 {str(expected)[:16]}..., computed {actual[:16]}...): the file "
            "was modified or corrupted after it was written; copy it again or re-save the model"
        )
    needed = [_prefix(e["name"]) + PACKED_SUFFIX for e in manifest.get("layers", [])]
    needed += list(manifest.get("tensor_aliases", {}).values())
    absent = [key for key in needed if key not in tensors]
    if absent:
        raise ArtifactError(f"{path}: the manifest names tensors the file lacks: {_listed(absent)}; re-save the model")
    return manifest, tensors


def _listed(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _architecture_problems(manifest: dict[str, Any], tensors: dict[str, Tensor], model: nn.Module) -> list[str]:
    """Every way ``model`` differs from the model the artifact was saved from."""
    modules = dict(model.named_modules(remove_duplicate=False))
    missing, wrong_type, wrong_shape = [], [], []
    expected: dict[str, tuple[int, ...]] = {}
    reported: list[str] = []  # layers already named; their tensors are not listed again
    for entry in manifest["layers"]:
        shape = tuple(entry["weight_shape"])
        for name in [entry["name"], *entry.get("aliases", [])]:
            expected[_prefix(name) + "weight"] = shape
            module = modules.get(name)
            if module is None:
                missing.append(name)
            elif is_quantized(module) or is_integer(module):
                wrong_type.append(f"{name} (already quantized: pass a fresh float model)")
            elif kind_named(entry["type"]) is None or type(module) is not kind_named(entry["type"]).float_type:  # type: ignore[union-attr]
                wrong_type.append(f"{name} ({entry['type']} in the artifact, {type(module).__name__} in the model)")
            elif tuple(module.weight.shape) != shape:
                wrong_shape.append(f"{name}.weight ({list(shape)} in the artifact, {list(module.weight.shape)} in the model)")
            else:
                continue
            reported.append(_prefix(name))
    for key, tensor in tensors.items():
        if not key.endswith(PACKED_SUFFIX):
            expected[key] = tuple(tensor.shape)
    for alias, target in manifest["tensor_aliases"].items():
        expected[alias] = tuple(tensors[target].shape)
    skip = tuple(reported)
    model_state = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    expected = {k: v for k, v in expected.items() if not (skip and k.startswith(skip))}
    absent = sorted(k for k in expected if k not in model_state)
    extra = sorted(k for k in model_state if k not in expected)
    for key in sorted(set(expected) & set(model_state)):
        value = model_state[key]
        shape = tuple(value.shape) if isinstance(value, Tensor) else None
        if shape != expected[key]:
            wrong_shape.append(f"{key} ({list(expected[key])} in the artifact, {shape and list(shape)} in the model)")
    problems = []
    for label, items in (
        ("layers missing from the model", missing),
        ("layers of another type", wrong_type),
        ("tensors of another shape", wrong_shape),
        ("tensors missing from the model", absent),
        ("tensors of the model not in the artifact", extra),
    ):
        if items:
            problems.append(f"{label}: {_listed(items)}")
    return problems


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The checked manifest of an artifact (the whole file is read to verify the checksum)."""
    return _read(Path(path))[0]


def load_quantized(path: PathLike, model: nn.Module) -> nn.Module:
    """Load an artifact written by `save_quantized` into a fresh float instance, in place.

    ``model`` must be the same architecture built afresh (plain ``nn.Linear``/``nn.Conv``
    layers, no quantizers). Its quantized layers become integer layers holding the stored
    codes, every other tensor is loaded, and the model is put in eval mode and returned;
    its outputs equal those of the saved model bit for bit.

    Raises:
        ArtifactError: the file is missing, truncated, corrupted (checksum), of an unknown
            format version, or saved from another architecture. Raised before ``model`` is
            modified.
    """
    path = Path(path)
    manifest, tensors = _read(path)
    problems = _architecture_problems(manifest, tensors, model)
    if problems:
        raise ArtifactError(
            f"{path} was saved from a model ({manifest['model_class']}) that does not match this {type(model).__name__}: "
            + "; ".join(problems)
        )
    codes = []
    for entry in manifest["layers"]:
        shape = entry["weight_shape"]
        packed = tensors[_prefix(entry["name"]) + PACKED_SUFFIX]
        try:
            flat = unpack_codes(packed, entry["weight_bits"], math.prod(shape))
        except ValueError as e:
            raise ArtifactError(f"{path}: layer {entry['name']}: {e}") from e
        codes.append(flat.view(shape))
    modules = dict(model.named_modules(remove_duplicate=False))
    full_state: dict[str, Any] = {k: v for k, v in tensors.items() if not k.endswith(PACKED_SUFFIX)}
    full_state.update({alias: tensors[target] for alias, target in manifest["tensor_aliases"].items()})
    for entry, layer_codes in zip(manifest["layers"], codes):
        layer = modules[entry["name"]]
        kind = kind_named(entry["type"])
        assert kind is not None  # checked with the architecture
        kind.integer_from_codes(
            layer,
            layer_codes,
            weight_scale=torch.tensor(entry["weight_scale"], dtype=torch.float32),
            input_alpha=torch.tensor(entry["input_alpha"], dtype=torch.float32),
            weight_bits=entry["weight_bits"],
            input_bits=entry["input_bits"],
            input_signed=entry["input_signed"],
            input_numel=entry["input_numel"],
        )
        for name in [entry["name"], *entry.get("aliases", [])]:
            full_state.update({_prefix(name) + k: v for k, v in layer.state_dict().items() if k in INTEGER_STATE_KEYS})
    disable_transformer_fast_path(model)
    model.load_state_dict(full_state, strict=True)
    return model.eval()


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def artifact_sizes(path: PathLike) -> ArtifactSizes:
    """File size against the ideal packed size and the float32 state dict, from the header alone."""
    path = Path(path)
    try:
        header = _header(path)
    except (OSError, struct.error, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read as a safetensors file ({e})") from e
    manifest = _parse_manifest(path, header.pop("__metadata__", None))
    code_bits = sum(e["weight_bits"] * math.prod(e["weight_shape"]) for e in manifest["layers"])
    weights = sum(math.prod(e["weight_shape"]) for e in manifest["layers"])
    packed = other = float32 = 0
    for key, info in header.items():
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        if key.endswith(PACKED_SUFFIX):
            packed += nbytes
            continue
        other += nbytes
        numel = math.prod(info["shape"])
        float32 += 4 * numel if info["dtype"].startswith(("F", "BF")) else nbytes
    other += 8 * len(manifest["layers"])  # the float32 weight scale and input alpha of each layer
    return ArtifactSizes(
        file_bytes=path.stat().st_size,
        packed_code_bytes=packed,
        other_bytes=other,
        ideal_bytes=code_bits / 8 + other,
        float32_bytes=4 * weights + float32,
    )
