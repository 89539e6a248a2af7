"""The integer model as one safetensors file: bit-packed codes, exact scales, and a manifest.

Layout of the file written by `save_quantized`:

* ``<layer>.weight_codes.packed``: the weight codes of each integer layer, offset to
  unsigned (``code + n``, ``n = 2**(bits - 1) - 1``) and bit-packed at their true width
  into a ``uint8`` tensor of ``ceil(bits * numel / 8)`` bytes; see `pack_codes`.
* every other tensor of the state dict (biases, BatchNorm parameters and buffers, layers
  left in float) under its state-dict key, unchanged.
* ``<layer>.weight_scale.ranges``: for layers with ranges per channel or per group, their
  float32 steps, in the layer's range shape.
* the header metadata key ``"lightning_nipq"``: a JSON manifest with the format name and
  version, the model class, one entry per integer layer (name, kind, weight shape, bits,
  granularity, input bits and sign, the exact float32 scale of a per-tensor weight, the
  input alpha and the input zero point), the BatchNorms folded into an integer layer
  (``folded_batchnorms``: name, the layer it went into, its type and width, whether folding
  made the layer's bias; absent when none is) and a sha256 checksum.

Layers that hold one weight (tied weights, as GPT-2's ``lm_head`` and ``wte``) store it
once: the later layer's entry is ``tied_to`` the earlier one, has no codes or steps of its
own, and repeats the shape, bits, granularity and per-tensor step, which reading checks
against the entry it names (version 3). Loading makes the two integer layers share one
tensor of codes and one of steps.

A single scale or alpha lives in the manifest rather than as a tensor: as a JSON number it
round-trips a float32 exactly, it costs no safetensors header entry, and the checksum
covers the manifest too. Many steps (per channel or group) are a tensor. Nothing is ever
unpickled. Version 1 files (every layer per tensor, no ``weight_granularity``) still load, and
so do entries without ``input_zero_point`` (written before zero points existed: 0). A
folded BatchNorm stores no tensor: loading replaces the fresh model's BatchNorm by a
`lightning_nipq.layers.folded_batchnorm.FoldedBatchNorm` before the state is loaded.

Module names and keys are stored canonical: without the ``_orig_mod`` segment that a
submodule wrapped in ``torch.compile`` adds (`lightning_nipq.layers.module_names`), so a file
saved from a model whose submodules are compiled loads into a plain instance and the reverse;
files that name ``_orig_mod`` (written before) are read in canonical names too.

The checksum catches accidents, not edits (anyone can recompute it), so reading checks
every value of the manifest and header against the format before using it, and loading
touches the model only once the whole file has passed, putting it back if it fails anyway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import reprlib
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nipq.layers.attach import disable_transformer_fast_path, give_saved_products_undoably
from lightning_nipq.layers.attention import attention_in_state, separate_all_projection_keys, split_attention_undoably
from lightning_nipq.layers.folded_batchnorm import (
    FOLDABLE_TYPES,
    FOLDED_FORMAT,
    FoldedBatchNorm,
    FoldSettings,
    check_folded_state,
    folded_batchnorms,
    give_zero_bias,
    replace_everywhere,
)
from lightning_nipq.layers.forms import (
    INTEGER_STATE_KEYS,
    IntegerLayerMixin,
    LayerKind,
    check_input_zero_point,
    check_integer_state,
    check_steps,
    is_integer,
    is_quantized,
)
from lightning_nipq.layers.layer_kinds import describe_layer, kind_named, kind_of, supported_names
from lightning_nipq.layers.model_walk import named_layers, require_integer_model
from lightning_nipq.layers.module_names import (
    COMPILED_SEGMENT,
    canonical_modules,
    canonical_name,
    model_key,
    model_keys,
    model_names,
    unwrap_compiled,
)
from lightning_nipq.layers.restore_point import restore_point
from lightning_nipq.layers.tensor_lifting import lift_learned_tensors_undoably, lifted_in_state
from lightning_nipq.layers.tied_weights import integer_ties, tie_integer_layers
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.saving.bit_packing import pack_codes, packed_size, unpack_codes

FORMAT_NAME = "lightning-nipq-integer"
#: 3: an entry may be ``tied_to`` an earlier one, whose codes and steps it shares (tied weights).
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
METADATA_KEY = "lightning_nipq"
PACKED_SUFFIX = "weight_codes.packed"
#: The per-channel or per-group steps of a layer's weight.
SCALES_SUFFIX = "weight_scale.ranges"
#: Keys the manifest's layers own: never loaded as plain state.
_LAYER_SUFFIXES = (PACKED_SUFFIX, SCALES_SUFFIX)
#: The manifest entry listing the BatchNorms folded into integer layers.
FOLDED_KEY = "folded_batchnorms"

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


def _canonical_names(names: list[str]) -> list[str]:
    """A module's names without the ``_orig_mod`` segments of ``torch.compile`` (`canonical_name`), each once."""
    return list(dict.fromkeys(canonical_name(name) for name in names))


def _layer_entry(names: list[str], layer: IntegerLayerMixin, tied_to: Optional[str] = None) -> dict[str, Any]:
    kind = kind_of(layer)  # type: ignore[arg-type]
    assert kind is not None
    n_w = num_levels(layer.weight_bits, True)
    per_tensor = layer.weight_granularity == "tensor"
    entry: dict[str, Any] = {
        "name": names[0],
        "type": kind.name,
        "kind": describe_layer(layer),  # type: ignore[arg-type]
        "weight_shape": list(layer.weight_codes.shape),
        "weight_bits": layer.weight_bits,
        "weight_granularity": layer.weight_granularity,
        "input_bits": layer.input_bits,
        "input_signed": layer.input_signed,
        "input_numel": layer.input_numel,
        # Per channel or group, the steps are the tensor <name>.weight_scale.ranges.
        "weight_scale": float(layer.weight_scale) if per_tensor else None,
        "weight_alpha": float(layer.weight_scale) * n_w if per_tensor else None,
        "input_alpha": float(layer.input_alpha),
        # Unsigned input codes q stand for (q - input_zero_point) * input_alpha / (2**input_bits - 1 - input_zero_point).
        "input_zero_point": layer.input_zero_point,
    }
    if len(names) > 1:
        entry["aliases"] = names[1:]
    if tied_to is not None:
        # Tied weights: the codes and steps are those of the entry named tied_to, stored there only.
        entry["tied_to"] = tied_to
    return entry


def _fold_entry(names: list[str], module: FoldedBatchNorm) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": names[0],
        "into": canonical_name(module.into),
        "type": module.batchnorm_type,
        "num_features": module.num_features,
        "created_bias": module.created_bias,
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
    # Names are stored canonical (no torch.compile _orig_mod segment): the file loads whichever submodules are compiled.
    layers = [(_canonical_names(names), layer) for names, layer in named_layers(model, is_integer)]
    ties = integer_ties([(names[0], layer) for names, layer in layers])
    state = {canonical_name(key): value for key, value in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    entries = []
    for names, layer in layers:
        for name in names:
            for key in INTEGER_STATE_KEYS:
                state.pop(_prefix(name) + key, None)
        tied_to = ties.get(id(layer))
        entries.append(_layer_entry(names, layer, tied_to))
        if tied_to is not None:
            continue  # one weight, stored once: under the layer it is tied to
        tensors[_prefix(names[0]) + PACKED_SUFFIX] = pack_codes(layer.weight_codes, layer.weight_bits)
        if layer.weight_granularity != "tensor":
            tensors[_prefix(names[0]) + SCALES_SUFFIX] = layer.weight_scale.detach().float().cpu().contiguous()
    folds = [(_canonical_names(names), module) for names, module in folded_batchnorms(model)]
    for names, _ in folds:
        for name in names:
            state.pop(_prefix(name) + "_extra_state", None)  # the manifest says it, as JSON
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
        "model_class": type(unwrap_compiled(model)).__qualname__,
        "layers": entries,
        "tensor_aliases": aliases,
    }
    if folds:
        manifest[FOLDED_KEY] = [_fold_entry(names, module) for names, module in folds]
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


# ---------------------------------------------------------------------- reading: every value is checked
# The checksum only catches accidents: whoever edits a manifest can recompute it. So every
# value taken from the file is checked below against the format before anything is
# allocated from it, and a model is touched only once the whole file has passed.

#: safetensors' own cap on the JSON header: a longer header is damage, not a model.
MAX_HEADER_BYTES = 100_000_000
#: The most dimensions a torch tensor can have.
MAX_DIMS = 64
#: The largest size of one dimension torch can index (int64).
MAX_DIM_SIZE = 2**63 - 1
#: Bits per element of the safetensors dtypes, to check a header's shapes against its byte ranges.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64,
    "C64": 64,
}  # fmt: skip
_FIX = "copy the file again, or re-save the model with save_quantized"
_REPR = reprlib.Repr()  # a value quoted in a message stays short however long it is in the file
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxdict = 4


def _shown(value: Any) -> str:
    return _REPR.repr(value)


def _damaged(path: Path, field: str, problem: str) -> ArtifactError:
    """The error for a value of the file that the format does not allow: the file, the field, the fix."""
    return ArtifactError(f"{path}: {field} {problem}; the file was damaged or edited after it was written: {_FIX}")


def _unreadable(path: Path, problem: str) -> ArtifactError:
    return ArtifactError(f"{path} cannot be read as a safetensors file ({problem}); it is truncated or damaged: {_FIX}")


@dataclass(frozen=True)
class _Stored:
    """What the manifest check needs of a stored tensor, known from the tensor or from the header alone."""

    is_uint8: bool
    shape: tuple[int, ...]
    is_float32: bool = False

    @classmethod
    def of(cls, tensor: Tensor) -> _Stored:
        return cls(tensor.dtype == torch.uint8, tuple(tensor.shape), tensor.dtype == torch.float32)


@dataclass(frozen=True)
class _Layer:
    """One checked manifest entry: each value of its type and range, its packed codes of the right size."""

    names: tuple[str, ...]  # the name the codes are stored under, then the layer's other names
    kind: LayerKind
    weight_shape: tuple[int, ...]
    weight_bits: int
    input_bits: Optional[int]
    input_signed: bool
    input_numel: int
    weight_scale: Optional[float]  # None: per channel or group, the steps are the tensor at scales_key
    input_alpha: float
    weight_granularity: Any = "tensor"
    input_zero_point: int = 0
    #: The name of the earlier entry whose codes and steps this one shares (tied weights), or None.
    tied_to: Optional[str] = None

    @property
    def packed_key(self) -> str:
        return _prefix(self.tied_to if self.tied_to is not None else self.names[0]) + PACKED_SUFFIX

    @property
    def scales_key(self) -> str:
        return _prefix(self.tied_to if self.tied_to is not None else self.names[0]) + SCALES_SUFFIX

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)


@dataclass(frozen=True)
class _Fold:
    """One checked entry of ``folded_batchnorms``: the BatchNorm's names, and the fold's settings."""

    names: tuple[str, ...]
    settings: FoldSettings


@dataclass(frozen=True)
class _Manifest:
    """A checked manifest: ``raw`` as stored, the rest checked and normalised."""

    raw: dict[str, Any]
    model_class: str
    layers: tuple[_Layer, ...]
    tensor_aliases: dict[str, str]
    folds: tuple[_Fold, ...] = ()


def _parse_manifest(path: Path, metadata: Optional[dict[str, str]]) -> dict[str, Any]:
    if not metadata or METADATA_KEY not in metadata:
        raise ArtifactError(
            f"{path} is a safetensors file but not a lightning-nipq artifact (no {METADATA_KEY!r} metadata); "
            "write one with save_quantized"
        )
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer over Python's digit limit
        raise ArtifactError(f"{path}: the manifest is not valid JSON ({e}); the file is corrupted: {_FIX}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: the manifest does not name the {FORMAT_NAME!r} format; {_FIX}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:  # 1.0 == True == 1
        raise ArtifactError(
            f"{path} has format version {_shown(version)}; this lightning-nipq reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Load it with the lightning-nipq that wrote it, "
            "or re-save the model with save_quantized"
        )
    return manifest


def _count(value: Any, low: int = 0, high: int = MAX_DIM_SIZE) -> bool:
    """Whether ``value`` is a whole number (bool excluded: JSON true is no count) in ``[low, high]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _shape(path: Path, field: str, value: Any, max_numel: int, min_dim: int) -> tuple[int, ...]:
    """``value`` as a shape of dimensions >= ``min_dim`` holding at most ``max_numel`` elements."""
    low_dims = 1 if min_dim else 0
    if not isinstance(value, list) or not low_dims <= len(value) <= MAX_DIMS:
        raise _damaged(path, field, f"must be a list of {low_dims} to {MAX_DIMS} sizes, got {_shown(value)}")
    numel = 1
    for size in value:
        if not _count(size, min_dim):
            raise _damaged(path, field, f"must hold whole numbers >= {min_dim}, got {_shown(value)}")
        # Multiplied one size at a time so that an absurd shape stops at the bound, not after a huge product.
        numel *= size
        if numel > max_numel:
            raise _damaged(path, field, f"{_shown(value)} has more elements than the stored data holds ({max_numel} at most)")
    return tuple(value)


def _number(path: Path, field: str, value: Any, positive: bool) -> float:
    """``value`` as a float that is finite (and above zero if ``positive``) once held in float32, as the layer holds it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _damaged(path, field, f"must be a number, got {_shown(value)}")
    try:
        as_float32 = float(torch.tensor(float(value), dtype=torch.float32))
    except OverflowError:  # an integer beyond float64
        as_float32 = math.inf
    if not math.isfinite(as_float32) or (positive and as_float32 <= 0):
        wanted = "finite and above zero" if positive else "finite"
        raise _damaged(path, field, f"must be {wanted} in float32, got {_shown(value)}")
    return float(value)


def _check_layer(
    path: Path, field: str, entry: Any, stored: Mapping[str, _Stored], owners: Optional[Mapping[str, _Layer]] = None
) -> _Layer:
    """One entry of ``layers``, checked against the format and against its packed tensor.

    ``owners`` are the earlier entries that store their own codes, by name: an entry
    ``tied_to`` one of them shares its codes and steps, so its shape, bits, granularity and
    per-tensor step must be that entry's.
    """
    if not isinstance(entry, dict):
        raise _damaged(path, field, f"must be an object, got {type(entry).__name__}")

    def value(key: str) -> Any:
        if key not in entry:
            raise _damaged(path, f"{field}.{key}", "is missing")
        return entry[key]

    name = value("name")
    if not isinstance(name, str):
        raise _damaged(path, f"{field}.name", f"must be a module name (a string), got {_shown(name)}")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise _damaged(path, f"{field}.aliases", f"must be a list of module names (strings), got {_shown(aliases)}")
    type_name = value("type")
    kind = kind_named(type_name) if isinstance(type_name, str) else None
    if kind is None:
        raise _damaged(path, f"{field}.type", f"must name a supported layer type ({supported_names()}), got {_shown(type_name)}")
    if not isinstance(value("kind"), str):
        raise _damaged(path, f"{field}.kind", f"must be a description (a string), got {_shown(entry['kind'])}")
    settings = {key: value(key) for key in ("weight_bits", "input_bits", "input_signed", "input_numel")}
    if "weight_granularity" in entry:  # absent in version 1: every layer per tensor
        settings["weight_granularity"] = entry["weight_granularity"]
    if "input_zero_point" in entry:  # absent before zero points: none
        settings["input_zero_point"] = entry["input_zero_point"]
    try:
        checked = check_integer_state(settings, where=f"{field}.")
        input_zero_point = check_input_zero_point(settings, checked, where=f"{field}.")
        weight_bits, input_bits, input_signed, input_numel, granularity = checked
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}; the file was damaged or edited after it was written: {_FIX}") from None

    tied_to = entry.get("tied_to")
    owner = None
    if tied_to is not None:
        owner = (owners or {}).get(tied_to) if isinstance(tied_to, str) else None
        if owner is None:
            raise _damaged(path, f"{field}.tied_to", f"must name an earlier layer that stores its own codes, got {_shown(tied_to)}")
        if (owner.weight_bits, owner.weight_granularity) != (weight_bits, granularity):
            raise _damaged(
                path, field, f"is tied to {tied_to!r}, whose codes are {owner.weight_bits}-bit {owner.weight_granularity!r}, not {weight_bits}-bit {granularity!r}"
            )
    key = _prefix(tied_to if owner is not None else name) + PACKED_SUFFIX
    packed = stored.get(key)
    if packed is None:
        raise _damaged(path, f"{field}.name", f"names layer {name!r}, but the file lacks its codes {key!r}")
    if not packed.is_uint8 or len(packed.shape) != 1:
        raise _damaged(path, f"tensor {key!r}", f"must be a flat uint8 tensor of packed codes, got shape {list(packed.shape)}")
    # The shape is bounded by the bytes actually stored before anything is sized from it.
    packed_bytes = packed.shape[0]
    shape = _shape(path, f"{field}.weight_shape", value("weight_shape"), packed_bytes * 8 // weight_bits, min_dim=1)
    numel = math.prod(shape)
    if packed_size(numel, weight_bits) != packed_bytes:
        raise _damaged(
            path,
            f"{field}.weight_shape",
            f"{list(shape)} at {weight_bits} bits needs {packed_size(numel, weight_bits)} packed bytes, "
            f"but {key!r} holds {packed_bytes}",
        )

    if owner is not None and shape != owner.weight_shape:
        raise _damaged(path, f"{field}.weight_shape", f"is {list(shape)}, but the layer it is tied to, {tied_to!r}, has {list(owner.weight_shape)}")
    weight_scale: Optional[float] = None
    if granularity == "tensor":
        weight_scale = _number(path, f"{field}.weight_scale", value("weight_scale"), positive=True)
        if owner is not None and weight_scale != owner.weight_scale:
            raise _damaged(path, f"{field}.weight_scale", f"is {weight_scale!r}, but the layer it is tied to, {tied_to!r}, has {owner.weight_scale!r}")
        weight_alpha = _number(path, f"{field}.weight_alpha", value("weight_alpha"), positive=True)
        # Written as weight_scale * n and never read back: a disagreement means one of them was edited.
        if not math.isclose(weight_alpha, weight_scale * num_levels(weight_bits, True), rel_tol=1e-6):
            raise _damaged(path, f"{field}.weight_alpha", f"{weight_alpha!r} is not weight_scale * {num_levels(weight_bits, True)}")
    else:
        scales_key = _prefix(tied_to if owner is not None else name) + SCALES_SUFFIX
        try:
            expected = kind.range_shape(shape, granularity)
        except ValueError as e:
            raise _damaged(path, f"{field}.weight_granularity", f"does not fit the layer: {e}") from None
        scales = stored.get(scales_key)
        if scales is None or not scales.is_float32 or scales.shape != expected:
            got = "nothing" if scales is None else f"shape {list(scales.shape)}" + ("" if scales.is_float32 else ", not float32")
            raise _damaged(path, f"tensor {scales_key!r}", f"must hold the float32 steps of shape {list(expected)}, got {got}")
    # A layer with float input never reads its input alpha (it is saved as 0), but it is still a tensor of the layer.
    input_alpha = _number(path, f"{field}.input_alpha", value("input_alpha"), positive=input_bits is not None)
    return _Layer(
        names=(name, *aliases),
        kind=kind,
        weight_shape=shape,
        weight_bits=weight_bits,
        input_bits=input_bits,
        input_signed=input_signed,
        input_numel=input_numel,
        weight_scale=weight_scale,
        input_alpha=input_alpha,
        weight_granularity=granularity,
        input_zero_point=input_zero_point,
        tied_to=tied_to if owner is not None else None,
    )


def _check_aliases(path: Path, aliases: Any, stored: Mapping[str, _Stored]) -> dict[str, str]:
    """``tensor_aliases``: state-dict keys stored once under another key, each pointing at a stored tensor."""
    if not isinstance(aliases, dict):
        raise _damaged(path, "tensor_aliases", f"must be an object of state-dict keys to stored keys, got {_shown(aliases)}")
    for alias, target in aliases.items():
        field = f"tensor_aliases[{_shown(alias)}]"
        if not isinstance(target, str):
            raise _damaged(path, field, f"must be the key of a stored tensor (a string), got {_shown(target)}")
        if alias in stored:
            raise _damaged(path, field, "is also the key of a stored tensor; a key is stored or aliased, not both")
        if target not in stored or target.endswith(_LAYER_SUFFIXES):
            raise _damaged(path, field, f"points at {_shown(target)}, which the file does not store as a state-dict tensor")
    return dict(aliases)


def _check_manifest(path: Path, manifest: dict[str, Any], stored: Mapping[str, _Stored]) -> _Manifest:
    """The whole manifest checked against the format and the stored tensors, once, before any use.

    ``stored`` describes the tensors: from the tensors themselves when loading, from the
    header when only sizes are wanted. Raises `ArtifactError` naming the first bad field.
    """
    model_class = manifest.get("model_class")
    if not isinstance(model_class, str):
        raise _damaged(path, "model_class", f"must be a class name (a string), got {_shown(model_class)}")
    entries = manifest.get("layers")
    if not isinstance(entries, list) or not entries:
        raise _damaged(path, "layers", f"must be a non-empty list of integer layers, got {_shown(entries)}")
    layers = []
    owner: dict[str, str] = {}  # each module name to the field that names it
    storing: dict[str, _Layer] = {}  # the entries that store their own codes, by name: what a later one may be tied to
    for index, entry in enumerate(entries):
        layer = _check_layer(path, f"layers[{index}]", entry, stored, storing)
        if layer.tied_to is None:
            storing[layer.names[0]] = layer
        for position, name in enumerate(layer.names):
            field = f"layers[{index}].name" if position == 0 else f"layers[{index}].aliases[{position - 1}]"
            if name in owner:
                raise _damaged(path, field, f"{name!r} is already named by {owner[name]}: each layer is listed once")
            owner[name] = field
        layers.append(layer)
    aliases = _check_aliases(path, manifest.get("tensor_aliases"), stored)
    claimed = {layer.packed_key for layer in layers} | {
        layer.scales_key for layer in layers if layer.weight_granularity != "tensor"
    }
    # An integer layer's state comes from its entry; a stored or aliased tensor at one of its
    # keys would be loaded over it, or rejected by the model after conversion.
    reserved = {
        _prefix(name) + key: owner[name] for layer in layers for name in layer.names for key in ("weight", *INTEGER_STATE_KEYS)
    }
    for key in [*stored, *aliases]:
        if key.endswith(_LAYER_SUFFIXES) and key not in claimed:
            raise _damaged(path, f"tensor {_shown(key)}", "holds codes or steps that no entry of layers names")
        if key in reserved:
            problem = f"is part of the integer layer of {reserved[key]}, whose state the manifest gives"
            raise _damaged(path, f"tensor {_shown(key)}", problem)
    folds = _check_folds(path, manifest.get(FOLDED_KEY, []), layers, owner, stored, aliases)
    return _Manifest(raw=manifest, model_class=model_class, layers=tuple(layers), tensor_aliases=aliases, folds=folds)


def _check_folds(
    path: Path,
    entries: Any,
    layers: list[_Layer],
    owner: dict[str, str],
    stored: Mapping[str, _Stored],
    aliases: dict[str, str],
) -> tuple[_Fold, ...]:
    """``folded_batchnorms``: each BatchNorm named once, folded into one integer layer of its width, storing nothing itself."""
    if not isinstance(entries, list):
        raise _damaged(path, FOLDED_KEY, f"must be a list of folded BatchNorms, got {_shown(entries)}")
    by_name = {name: layer for layer in layers for name in layer.names}
    folded_into: dict[int, str] = {}
    folds = []
    for index, entry in enumerate(entries):
        field = f"{FOLDED_KEY}[{index}]"
        if not isinstance(entry, dict):
            raise _damaged(path, field, f"must be an object, got {type(entry).__name__}")
        name, names = entry.get("name"), entry.get("aliases", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in [name, *names]):
            raise _damaged(path, field, f"must name the BatchNorm (and its aliases) by non-empty module names, got {_shown(entry)}")
        try:
            settings = check_folded_state({**entry, "format": FOLDED_FORMAT}, where=f"{field}.")
        except ValueError as e:
            raise ArtifactError(f"{path}: {e}; the file was damaged or edited after it was written: {_FIX}") from None
        layer = by_name.get(settings.into)
        if layer is None:
            raise _damaged(path, f"{field}.into", f"must name an integer layer of layers, got {_shown(settings.into)}")
        if id(layer) in folded_into:
            raise _damaged(path, f"{field}.into", f"{settings.into!r} already takes {folded_into[id(layer)]}: one BatchNorm per layer")
        folded_into[id(layer)] = field
        if not layer.kind.foldable or layer.tied_to is not None or any(other.tied_to == layer.names[0] for other in layers):
            raise _damaged(
                path, f"{field}.into", f"names {settings.into!r}, a {layer.kind.name} into which no BatchNorm folds (or one with a tied weight)"
            )
        channels = layer.weight_shape[layer.kind.output_axis]
        if settings.num_features != channels:
            raise _damaged(path, f"{field}.num_features", f"is {settings.num_features}, but {settings.into!r} has {channels} output channels")
        if settings.created_bias:
            key = _prefix(layer.names[0]) + "bias"
            bias = stored.get(aliases.get(key, key))
            if bias is None or bias.shape != (channels,):
                raise _damaged(path, f"{field}.created_bias", f"says folding made the bias {key!r}, which the file lacks")
        for position, module_name in enumerate([name, *names]):
            where = f"{field}.name" if position == 0 else f"{field}.aliases[{position - 1}]"
            if module_name in owner:
                raise _damaged(path, where, f"{module_name!r} is already named by {owner[module_name]}: each module is listed once")
            owner[module_name] = where
            inside = [key for key in [*stored, *aliases] if key.startswith(_prefix(module_name))]
            if inside:
                raise _damaged(path, where, f"is a folded BatchNorm, which stores no tensor, but the file has {_shown(inside)}")
        folds.append(_Fold(names=(name, *names), settings=settings))
    return tuple(folds)


def _read(path: Path) -> tuple[_Manifest, dict[str, Tensor]]:
    """The checked manifest and every tensor of the file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        # safetensors bounds the header (100 MB) and every tensor by the file's size before allocating.
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise _unreadable(path, str(e)) from e
    manifest = _parse_manifest(path, metadata)
    expected = manifest.get("checksum")
    try:
        actual = _checksum(manifest, tensors)
    except RecursionError as e:  # nesting deep enough for the parser but not for the encoder
        raise _damaged(path, "the manifest", "is nested too deeply") from e
    if actual != expected:
        shown = expected[:16] if isinstance(expected, str) else _shown(expected)
        raise ArtifactError(
            f"{path}: checksum mismatch (stored sha256 {shown}..., computed {actual[:16]}...): the file "
            f"was modified or corrupted after it was written; {_FIX}"
        )
    canonical, tensors = _canonical_contents(path, manifest, tensors)
    checked = _check_manifest(path, canonical, {key: _Stored.of(t) for key, t in tensors.items()})
    return dataclasses.replace(checked, raw=manifest), tensors


def _canonical_contents(path: Path, manifest: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The manifest's module names and the tensors' keys without ``_orig_mod`` segments (`canonical_name`).

    `save_quantized` writes canonical names; files written before it did may name the module a
    ``torch.compile`` wrapper holds. Only names of the expected types are rewritten: the
    manifest check refuses the rest, and two names that become one (each layer is listed once).
    """
    renamed: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = canonical_name(key)
        if name in renamed:
            raise _damaged(path, f"tensor {_shown(key)}", f"is stored twice, also as {_shown(name)} (without {COMPILED_SEGMENT!r})")
        renamed[name] = tensor
    if renamed.keys() == tensors.keys() and COMPILED_SEGMENT not in json.dumps(manifest):
        return manifest, tensors

    def named(entry: Any, fields: tuple[str, ...]) -> Any:
        if not isinstance(entry, dict):
            return entry
        entry = dict(entry)
        for field in fields:
            if isinstance(entry.get(field), str):
                entry[field] = canonical_name(entry[field])
        if isinstance(entry.get("aliases"), list):
            entry["aliases"] = [canonical_name(a) if isinstance(a, str) else a for a in entry["aliases"]]
        return entry

    manifest = dict(manifest)
    if isinstance(manifest.get("layers"), list):
        manifest["layers"] = [named(entry, ("name", "tied_to")) for entry in manifest["layers"]]
    if isinstance(manifest.get(FOLDED_KEY), list):
        manifest[FOLDED_KEY] = [named(entry, ("name", "into")) for entry in manifest[FOLDED_KEY]]
    aliases = manifest.get("tensor_aliases")
    if isinstance(aliases, dict):
        manifest["tensor_aliases"] = {}
        for alias, target in aliases.items():
            if canonical_name(alias) in manifest["tensor_aliases"]:
                raise _damaged(path, f"tensor_aliases[{_shown(alias)}]", f"is listed twice, also without {COMPILED_SEGMENT!r}")
            manifest["tensor_aliases"][canonical_name(alias)] = canonical_name(target) if isinstance(target, str) else target
    return manifest, renamed


def _listed(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _architecture_problems(manifest: _Manifest, tensors: dict[str, Tensor], model: nn.Module) -> list[str]:
    """Every way ``model`` differs from the model the artifact was saved from (in canonical names: compiled or not)."""
    modules = canonical_modules(model)
    names_of: dict[int, list[str]] = {}
    for name, module in modules.items():
        names_of.setdefault(id(module), []).append(name)
    missing, wrong_type, wrong_shape, shared = [], [], [], []
    expected: dict[str, tuple[int, ...]] = {}
    reported: list[str] = []  # layers already named; their tensors are not listed again
    for layer in manifest.layers:
        shape = layer.weight_shape
        for name in layer.names:
            expected[_prefix(name) + "weight"] = shape
            module = modules.get(name)
            if module is None:
                missing.append(name)
            elif is_quantized(module) or is_integer(module):
                wrong_type.append(f"{name} (already quantized: pass a fresh float model)")
            elif type(module) is not layer.kind.float_type:
                wrong_type.append(f"{name} ({layer.kind.name} in the artifact, {type(module).__name__} in the model)")
            elif tuple(module.weight.shape) != shape:
                wrong_shape.append(f"{name}.weight ({list(shape)} in the artifact, {list(module.weight.shape)} in the model)")
            elif sorted(names_of[id(module)]) != sorted(layer.names):
                # Only one module object is converted per entry: its names must be the entry's names.
                in_model = ", ".join(names_of[id(module)])
                shared.append(f"{name} ({', '.join(layer.names)} in the artifact, {in_model} in the model)")
            else:
                continue
            reported.append(_prefix(name))
    # A folded BatchNorm's state is not in the artifact, and a bias its fold made is, though the fresh layer has none.
    made_biases: dict[str, Tensor] = {}
    for fold in manifest.folds:
        settings = fold.settings
        for name in fold.names:
            reported.append(_prefix(name))
            module = modules.get(name)
            if module is None:
                missing.append(name)
            elif isinstance(module, FoldedBatchNorm):
                wrong_type.append(f"{name} (already folded: pass a fresh float model)")
            elif type(module) is not FOLDABLE_TYPES[settings.batchnorm_type]:
                wrong_type.append(f"{name} ({settings.batchnorm_type} in the artifact, {type(module).__name__} in the model)")
            elif module.num_features != settings.num_features:
                wrong_shape.append(f"{name} ({settings.num_features} features in the artifact, {module.num_features} in the model)")
            elif sorted(names_of[id(module)]) != sorted(fold.names):
                in_model = ", ".join(names_of[id(module)])
                shared.append(f"{name} ({', '.join(fold.names)} in the artifact, {in_model} in the model)")
        layer = modules.get(settings.into)
        if settings.created_bias and layer is not None and getattr(layer, "bias", None) is not None:
            wrong_type.append(f"{settings.into} (built without a bias in the artifact, with one in the model)")
        elif settings.created_bias:
            owner = next(entry for entry in manifest.layers if settings.into in entry.names)
            made_biases.update({_prefix(n) + "bias": torch.empty(settings.num_features, device="meta") for n in owner.names})
    for key, tensor in tensors.items():
        if not key.endswith(_LAYER_SUFFIXES):
            expected[key] = tuple(tensor.shape)
    for alias, target in manifest.tensor_aliases.items():
        expected[alias] = tuple(tensors[target].shape)
    skip = tuple(reported)
    # Split attention saves float projections under nn.MultiheadAttention's keys; the artifact names each layer's.
    own_state = {canonical_name(k): v for k, v in separate_all_projection_keys(model, model.state_dict()).items()}
    model_state = {k: v for k, v in {**own_state, **made_biases}.items() if not (skip and k.startswith(skip))}
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
        ("layers shared under other names (artifact names, model names)", shared),
        ("tensors missing from the model", absent),
        ("tensors of the model not in the artifact", extra),
    ):
        if items:
            problems.append(f"{label}: {_listed(items)}")
    return problems


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The checked manifest of an artifact (the whole file is read to verify the checksum).

    Raises:
        ArtifactError: the file is unreadable, corrupted, or its manifest holds a value the format does not allow.
    """
    return _read(Path(path))[0].raw


def _unpack(path: Path, index: int, layer: _Layer, tensors: dict[str, Tensor]) -> Tensor:
    try:
        flat = unpack_codes(tensors[layer.packed_key], layer.weight_bits, layer.numel)
    except ValueError as e:
        raise _damaged(path, f"tensor {layer.packed_key!r} (codes of layers[{index}])", f"is invalid: {e}") from e
    return flat.view(layer.weight_shape)


def _scales(path: Path, index: int, layer: _Layer, tensors: dict[str, Tensor]) -> Tensor:
    """The layer's weight steps: its one manifest number, or its checked tensor of steps."""
    if layer.weight_scale is not None:
        return torch.tensor(layer.weight_scale, dtype=torch.float32)
    steps = tensors[layer.scales_key]
    try:
        check_steps(steps, f"tensor {layer.scales_key!r} (steps of layers[{index}])", None, positive=True)
    except ValueError as e:
        raise _damaged(path, str(e).split(" is ", 1)[0], "holds " + str(e).split(" is ", 1)[1]) from None
    return steps


def load_quantized(path: PathLike, model: nn.Module) -> nn.Module:
    """Load an artifact written by `save_quantized` into a fresh float instance, in place.

    ``model`` must be the same architecture built afresh (plain ``nn.Linear``/``nn.Conv``
    layers, no quantizers). Its quantized layers become integer layers holding the stored
    codes, its BatchNorms that were folded into them become ``FoldedBatchNorm`` modules,
    every other tensor is loaded, and the model is put in eval mode and returned; its
    outputs equal those of the saved model bit for bit. Whether its submodules are wrapped
    in ``torch.compile`` need not match the saved model's.

    Raises:
        ArtifactError: the file is missing, truncated, corrupted (checksum), of an unknown
            format version, holds a value the format does not allow, or was saved from
            another architecture. Raised before ``model`` is modified; if loading fails
            part-way anyway (``KeyboardInterrupt`` included), ``model`` is put back as it was.
    """
    path = Path(path)
    manifest, tensors = _read(path)
    # Attention modules whose projections were quantized are split first, so that those layers exist.
    layer_keys = [f"{name}.weight_codes" for layer in manifest.layers for name in layer.names]
    names = model_names(model)  # the file's canonical names are found under the model's own (compiled or not)
    saved_keys = [model_key(names, k) for k in [*tensors, *layer_keys]]
    undo_split = split_attention_undoably(model, attention_in_state(model, saved_keys))
    # So are the learned tensors stored as layers of their own.
    undo_lift = lift_learned_tensors_undoably(model, lifted_in_state(model, saved_keys))
    # And the activation products stored in integer form (their two buffers are ordinary tensors of the file).
    undo_products = give_saved_products_undoably(model, {model_key(names, k): v for k, v in tensors.items()})
    problems = _architecture_problems(manifest, tensors, model)
    if problems:
        undo_products()
        undo_lift()
        undo_split()
        raise ArtifactError(
            f"{path} was saved from a model ({manifest.model_class}) that does not match this {type(model).__name__}: "
            + "; ".join(problems)
        )
    unpacked: dict[str, Tensor] = {}  # tied entries share their owner's codes: unpacked once
    for index, layer in enumerate(manifest.layers):
        if layer.packed_key not in unpacked:
            unpacked[layer.packed_key] = _unpack(path, index, layer, tensors)
    codes = [unpacked[layer.packed_key] for layer in manifest.layers]
    modules = canonical_modules(model)
    names = model_names(model)
    scales = [_scales(path, index, layer, tensors) for index, layer in enumerate(manifest.layers)]
    full_state: dict[str, Any] = {k: v for k, v in tensors.items() if not k.endswith(_LAYER_SUFFIXES)}
    full_state.update({alias: tensors[target] for alias, target in manifest.tensor_aliases.items()})
    restore = restore_point(model, [model_key(names, key) for key in full_state])
    try:
        for layer, layer_codes, layer_scales in zip(manifest.layers, codes, scales):
            module = modules[layer.names[0]]
            layer.kind.integer_from_codes(
                module,
                layer_codes,
                weight_scale=layer_scales,
                weight_granularity=layer.weight_granularity,
                input_alpha=torch.tensor(layer.input_alpha, dtype=torch.float32),
                weight_bits=layer.weight_bits,
                input_bits=layer.input_bits,
                input_signed=layer.input_signed,
                input_numel=layer.input_numel,
                input_zero_point=layer.input_zero_point,
            )
            integer_state = {k: v for k, v in module.state_dict().items() if k in INTEGER_STATE_KEYS}
            for name in layer.names:
                full_state.update({_prefix(name) + k: v for k, v in integer_state.items()})
        tied: dict[str, list[nn.Module]] = {}
        for layer in manifest.layers:
            tied.setdefault(layer.packed_key, []).append(modules[layer.names[0]])
        for group in tied.values():
            tie_integer_layers(group)  # one weight again: one tensor of codes and of steps
        for fold in manifest.folds:
            into = fold.settings.into
            # The layer's name in this model (under torch.compile's _orig_mod if compiled), as folding names it.
            folded = FoldedBatchNorm.replacing(modules[fold.names[0]], names.get(into, into), fold.settings.created_bias)
            replace_everywhere(model, modules[fold.names[0]], folded)
            if fold.settings.created_bias:
                give_zero_bias(modules[into])  # filled by the stored bias
            full_state.update({_prefix(name) + "_extra_state": folded.get_extra_state() for name in fold.names})
        disable_transformer_fast_path(model)
        model.load_state_dict(model_keys(model, full_state), strict=True)
    except BaseException as e:
        restore()
        undo_products()
        undo_lift()
        undo_split()
        if isinstance(e, Exception) and not isinstance(e, ArtifactError):
            raise ArtifactError(
                f"{path} could not be loaded into this {type(model).__name__} ({type(e).__name__}: {e}); "
                f"the model was left as it was; {_FIX}"
            ) from e
        raise
    return model.eval()


@dataclass(frozen=True)
class _HeaderEntry:
    dtype: str
    numel: int
    shape: tuple[int, ...]
    nbytes: int


def _header(path: Path) -> tuple[Optional[dict[str, str]], dict[str, _HeaderEntry]]:
    """The metadata and tensor entries of the safetensors header, read without the data and checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _unreadable(path, f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            # Bounded before reading: the length field is what a damaged file gets wrong.
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _unreadable(path, f"a header of {length} bytes in a file of {size} (at most {MAX_HEADER_BYTES} allowed)")
            text = f.read(length)
    except OSError as e:
        raise _unreadable(path, str(e)) from e
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _unreadable(path, f"its header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _unreadable(path, f"its header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - length
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _unreadable(path, "its __metadata__ is not an object of strings")
    entries = {}
    for key, info in header.items():
        field = f"header[{_shown(key)}]"
        if not isinstance(info, dict):
            raise _damaged(path, field, f"must be an object with dtype, shape and data_offsets, got {_shown(info)}")
        dtype, offsets = info.get("dtype"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise _damaged(path, f"{field}.dtype", f"must be a dtype name, got {_shown(dtype)}")
        pair = isinstance(offsets, list) and len(offsets) == 2 and _count(offsets[0])
        if not (pair and _count(offsets[1], offsets[0], data_bytes)):
            problem = f"must be [begin, end] within the {data_bytes} data bytes, got {_shown(offsets)}"
            raise _damaged(path, f"{field}.data_offsets", problem)
        nbytes = offsets[1] - offsets[0]
        bits = _DTYPE_BITS.get(dtype)
        # An unknown (newer) dtype is bounded as if one bit wide, the loosest possible.
        shape = _shape(path, f"{field}.shape", info.get("shape"), 8 * nbytes // (bits or 1), min_dim=0)
        numel = math.prod(shape)
        if bits is not None and (numel * bits + 7) // 8 != nbytes:
            raise _damaged(path, field, f"{numel} elements of {dtype} do not fill its {nbytes} bytes")
        entries[key] = _HeaderEntry(dtype, numel, shape, nbytes)
    return metadata, entries


def artifact_sizes(path: PathLike) -> ArtifactSizes:
    """File size against the ideal packed size and the float32 state dict, from the header alone.

    Raises:
        ArtifactError: the header or the manifest holds a value the format does not allow.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    metadata, entries = _header(path)
    manifest = _check_manifest(
        path,
        _parse_manifest(path, metadata),
        {key: _Stored(e.dtype == "U8", e.shape, e.dtype == "F32") for key, e in entries.items()},
    )
    stored = [layer for layer in manifest.layers if layer.tied_to is None]  # a tied weight is stored (and counted) once
    code_bits = sum(layer.weight_bits * layer.numel for layer in stored)
    weights = sum(layer.numel for layer in stored)
    packed = other = float32 = 0
    for key, entry in entries.items():
        if key.endswith(PACKED_SUFFIX):
            packed += entry.nbytes
            continue
        other += entry.nbytes
        if key.endswith(SCALES_SUFFIX):
            continue  # steps of the quantized weights: the float model has none
        float32 += 4 * entry.numel if entry.dtype.startswith(("F", "BF")) else entry.nbytes
    # The float32 input alpha of each layer, and the one weight step of each per-tensor layer (the manifest's).
    other += 4 * len(manifest.layers) + 4 * sum(layer.weight_scale is not None for layer in stored)
    return ArtifactSizes(
        file_bytes=path.stat().st_size,
        packed_code_bytes=packed,
        other_bytes=other,
        ideal_bytes=code_bits / 8 + other,
        float32_bytes=4 * weights + float32,
    )
