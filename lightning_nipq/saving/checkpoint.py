"""Loading NIPQ checkpoints into any instance of the model, in any state.

A state dict already says which layers are quantized and how: a layer ``X`` with the key
``X.weight_quantizer._extra_state`` is fake-quantized, and that state names the quantizer's
method and holds its whole configuration; one with ``X.input_quantizer._extra_state`` also
quantizes its input; one with ``X.weight_codes`` is an integer layer (its bits in
``X._extra_state``). So `prepare_for_state_dict` can give a fresh float model, or one in
another state (say, converted to integers after training), exactly the structure the state
dict needs, with quantizers rebuilt from their saved settings, never from defaults.
``load_state_dict`` then fills it. A BatchNorm folded into the integer layer before it
(`lightning_nipq.layers.folded_batchnorm`) is saved as ``X._extra_state`` in the fold format,
naming that layer, so the BatchNorm of a fresh model is replaced before loading too (and
built back for a state dict that does not fold it). Layers of the fresh model that hold one
weight (tied, see `lightning_nipq.layers.tied_weights`) get one weight quantizer, or one
tensor of codes and of steps, where the state dict saves them alike. Lightning checkpoints also carry a readable manifest
under ``checkpoint["nipq"]``, which is checked for its format version and holds a digest of
the quantization state (`quantization_state_digest`), checked before anything is loaded.

Nothing here unpickles: checkpoints are read with ``torch.load(weights_only=True)``, which
restores tensors and plain data only, and every saved quantization value is checked (the
quantizers' settings and parameters, the integer layers' bits, codes and scales) before
the model is changed, so a damaged or hostile file is refused instead of loading values
that would make the outputs NaN or wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import torch
from torch import Tensor, nn

from lightning_nipq.layers.attach import disable_transformer_fast_path, give_saved_products_undoably
from lightning_nipq.layers.attention import attention_in_state, split_attention_undoably
from lightning_nipq.layers.folded_batchnorm import (
    FoldedBatchNorm,
    FoldSettings,
    check_fold_target,
    check_folded_state,
    folded_batchnorms,
    give_zero_bias,
    is_folded_state,
    remove_bias,
    replace_everywhere,
)
from lightning_nipq.layers.forms import (
    WEIGHT_TIE_ATTRIBUTE,
    LayerKind,
    check_saved_integer_layer,
    check_saved_quantizer,
    is_integer,
    is_quantized,
)
from lightning_nipq.layers.layer_kinds import describe_layer, kind_of, supported_names
from lightning_nipq.layers.model_walk import named_layers
from lightning_nipq.layers.module_names import COMPILED_SEGMENT, canonical_name, model_key, model_keys, model_names
from lightning_nipq.layers.tensor_lifting import lift_learned_tensors_undoably, lifted_in_state
from lightning_nipq.layers.tied_weights import tie_integer_layers, tied_groups
from lightning_nipq.quant.base_quantizer import DAMAGED_STATE_FIX, BaseQuantizer

MANIFEST_KEY = "nipq"
MANIFEST_FORMAT = "lightning-nipq/checkpoint"
#: 2: quantizers save their method and whole configuration in ``_extra_state``. Manifests
#: may also hold ``DIGEST_KEY`` (readers of version 2 without it ignore it).
MANIFEST_VERSION = 2
#: The manifest entry holding `quantization_state_digest` of the saved state dict.
DIGEST_KEY = "state_sha256"
_WEIGHT_STATE = ".weight_quantizer._extra_state"
_CODES = ".weight_codes"
_EXTRA_STATE = "._extra_state"
#: The manifest entry listing the folded BatchNorms (``name``, ``into``, and ``aliases`` if shared).
FOLDED_KEY = "folded_batchnorms"

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into, or is damaged."""


def _prefixed(name: str, suffix: str) -> str:
    return f"{name}{suffix}" if name else suffix[1:]


def _layer_name(key: str, suffix: str) -> Optional[str]:
    if key == suffix[1:]:
        return ""  # the model itself is the layer
    return key[: -len(suffix)] if key.endswith(suffix) else None


def _saved_forms(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """``name -> form`` (``"fake"`` or ``"integer"``) of the quantized and integer layers of a state dict."""
    forms: dict[str, str] = {}
    for key in state_dict:
        name = _layer_name(key, _WEIGHT_STATE)
        if name is not None:
            forms[name] = "fake"
        name = _layer_name(key, _CODES)
        if name is not None:
            forms[name] = "integer"
    return forms


def _saved_folds(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``name -> saved state`` of the folded BatchNorms of a state dict (extra states in the fold format)."""
    folds: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = _layer_name(key, _EXTRA_STATE)
        if name is not None and is_folded_state(value):
            folds[name] = value
    return folds


def _check_saved_folds(state_dict: Mapping[str, Any], problems: list[str]) -> dict[str, FoldSettings]:
    """The checked settings of every folded BatchNorm of a state dict; what is wrong goes to ``problems``.

    A fold must name a layer the state dict holds as integer, hold nothing but its extra
    state, and, if folding made the layer's bias, come with that bias of its width.
    """
    forms = _saved_forms(state_dict)
    folds: dict[str, FoldSettings] = {}
    for name, value in _saved_folds(state_dict).items():
        key = _prefixed(name, _EXTRA_STATE)
        try:
            settings = check_folded_state(value, where=f"{key}: ")
        except ValueError as e:
            problems.append(str(e))
            continue
        bias = state_dict.get(_prefixed(settings.into, ".bias"))
        others = [k for k in state_dict if k != key and k.startswith(f"{name}.")]
        if not name:
            problems.append("the model itself is saved as a folded BatchNorm, which only a submodule can be")
        elif forms.get(settings.into) != "integer":
            problems.append(f"{key}: folded into {settings.into!r}, which the state dict does not hold as an integer layer")
        elif others:
            problems.append(f"{key}: a folded BatchNorm holds no other state, but the state dict has {others[:3]}")
        elif settings.created_bias and not (isinstance(bias, Tensor) and tuple(bias.shape) == (settings.num_features,)):
            problems.append(f"{key}: folding gave {settings.into!r} a bias of {settings.num_features} values, which the state dict lacks")
        else:
            folds[name] = settings
    return folds


def check_saved_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Check every quantized and integer layer a state dict holds, without a model; ``name -> what to build``.

    For a fake-quantized layer, its quantizers rebuilt from their saved ``_extra_state``
    (``(weight quantizer, input quantizer or None)``), their parameters checked; for an
    integer layer, its checked ``(weight_bits, input_bits, input_signed, input_numel, weight_granularity)``, its
    codes and scales checked. Folded BatchNorms are checked too (their settings are read by
    `prepare_for_state_dict`).

    Raises:
        CheckpointMismatchError: naming each invalid entry, its problem and the fix.
    """
    built: dict[str, Any] = {}
    problems: list[str] = []
    for name, form in _saved_forms(state_dict).items():
        prefix = f"{name}." if name else ""
        try:
            if form == "fake":
                weight_q = check_saved_quantizer(state_dict, prefix + "weight_quantizer.", role="weight")
                built[name] = (weight_q, check_saved_quantizer(state_dict, prefix + "input_quantizer.", role="input"))
            else:
                built[name] = check_saved_integer_layer(state_dict, prefix)
        except (ValueError, TypeError, AttributeError) as e:
            problems.append(str(e))
    _check_saved_folds(state_dict, problems)
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint's quantization state is invalid: " + "; ".join(problems) + ". " + DAMAGED_STATE_FIX + "."
        )
    return built


def _current_form(layer: nn.Module, kind: LayerKind) -> tuple[str, Optional[str], Optional[str]]:
    """``(form, weight quantizer method, input quantizer method or None)`` of a layer now."""
    form = kind.form_of(layer) or "float"
    if form != "fake":
        return form, None, None
    inputs = layer.input_quantizer
    return form, layer.weight_quantizer.kind, None if inputs is None else inputs.kind


def _range_shape_problem(
    kind: LayerKind, module: nn.Module, form: str, built: Any, state_dict: Mapping[str, Any], name: str
) -> Optional[str]:
    """Whether the saved ranges (a weight quantizer's, or an integer layer's scales) fit this layer's weight."""
    if form == "fake":
        weight_q = built[0]
        if weight_q is None:
            return None
        granularity, have = weight_q.granularity, weight_q.range_shape
    else:
        granularity = built[4]
        scale = state_dict.get(_prefixed(name, ".weight_scale"))
        if not isinstance(scale, Tensor):
            return None
        have = tuple(scale.shape)
    try:
        expected = kind.layer_range_shape(module, granularity)
    except ValueError as e:
        return str(e)
    if tuple(have) != tuple(expected):
        return f"ranges of shape {tuple(have)} in the checkpoint, where the layer's {granularity!r} ranges have shape {expected}"
    return None


def state_dict_for_model(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with its keys, and the layers its folded BatchNorms name, as ``model`` names them.

    A submodule wrapped in ``torch.compile`` is named with an extra ``_orig_mod`` segment
    (``net._orig_mod.fc1.weight``), and ``load_state_dict`` does not translate: this maps the
    keys of a state dict saved with or without compiled submodules onto ``model``'s own
    (`lightning_nipq.layers.module_names.model_keys`). The values are not copied.

    Raises:
        CheckpointMismatchError: two keys name the same entry, one with ``_orig_mod`` and one without.
    """
    try:
        translated = model_keys(model, state_dict)
    except ValueError as e:
        raise CheckpointMismatchError(f"the checkpoint's state dict is damaged: {e}. {DAMAGED_STATE_FIX}.") from None
    names = model_names(model)
    for key, value in translated.items():
        into = value.get("into") if is_folded_state(value) else None
        if isinstance(into, str) and model_key(names, into) != into:
            translated[key] = {**value, "into": model_key(names, into)}
    return translated


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Give every quantizable layer of ``model`` the form (float, fake-quantized, integer) ``state_dict`` has.

    Quantizers are rebuilt from the method and settings saved in their ``_extra_state``. A
    BatchNorm the state dict holds as folded is replaced by a
    `lightning_nipq.layers.folded_batchnorm.FoldedBatchNorm` (and the layer it went into is
    given the bias folding made, if it had none); a ``FoldedBatchNorm`` of the model that the
    state dict does not fold becomes a BatchNorm again.

    Layers are found by name whether or not ``model``'s submodules, or those of the model that
    saved ``state_dict``, are wrapped in ``torch.compile``. Returns the state dict to load:
    ``state_dict`` with its keys as ``model`` names them (`state_dict_for_model`), which
    ``model.load_state_dict`` needs when the two differ in what is compiled.

    Raises:
        CheckpointMismatchError: a saved quantizer or integer layer state is invalid
            (`check_saved_state`), or a layer of the state dict is missing from the model, is
            not a quantizable layer, or has another weight shape, or a folded BatchNorm does not
            fit the model's module (all checked before anything is changed).
    """
    state_dict = state_dict_for_model(model, state_dict)
    built = check_saved_state(state_dict)
    # Attention modules whose projections the state dict quantizes are split first, so that those layers exist.
    undo_split = split_attention_undoably(model, attention_in_state(model, state_dict))
    # So are the learned tensors it holds as layers of their own (keys under ``<module>.<tensor>.``).
    undo_lift = lift_learned_tensors_undoably(model, lifted_in_state(model, state_dict))
    try:
        # And the activation products it holds, each in its saved form.
        undo_products = give_saved_products_undoably(model, state_dict)
    except ValueError as e:
        undo_lift()
        undo_split()
        raise CheckpointMismatchError(f"{e}. {DAMAGED_STATE_FIX}") from e
    try:
        _prepare(model, state_dict, built)
    except BaseException:
        undo_products()
        undo_lift()
        undo_split()
        raise
    return state_dict


def _prepare(model: nn.Module, state_dict: Mapping[str, Any], built: dict[str, Any]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    problems: list[str] = []
    folds = _check_saved_folds(state_dict, problems)
    for name, settings in folds.items():
        if name not in modules:
            problems.append(f"{name}: no such module in {type(model).__name__}")
            continue
        problem = check_fold_target(modules[name], settings, modules.get(settings.into))
        if problem is not None:
            problems.append(f"{name}: {problem}")
    # name -> (kind, form, new quantizers or integer settings), built before any layer changes.
    plan: dict[str, tuple[LayerKind, str, Any]] = {}
    for name, form in _saved_forms(state_dict).items():
        module = modules.get(name)
        kind = None if module is None else kind_of(module)
        if module is None:
            problems.append(f"{name or '(the model)'}: no such module in {type(model).__name__}")
            continue
        if kind is None:
            problems.append(f"{name}: a {type(module).__name__}, not a quantizable layer ({supported_names()})")
            continue
        codes = state_dict.get(_prefixed(name, _CODES))
        if form == "integer" and isinstance(codes, Tensor) and tuple(codes.shape) != kind.weight_shape(module):
            problems.append(
                f"{name}: weight codes of shape {tuple(codes.shape)} in the checkpoint, a weight of shape "
                f"{kind.weight_shape(module)} in the model"
            )
            continue
        problem = _range_shape_problem(kind, module, form, built[name], state_dict, name)
        if problem is not None:
            problems.append(f"{name}: {problem}")
            continue
        plan[name] = (kind, form, built[name])
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint does not match the model: " + "; ".join(problems) + ". Load it into the architecture that saved it."
        )
    layers = named_layers(model, lambda m: kind_of(m) is not None)
    # Layers holding one weight (tied, as GPT-2's lm_head and wte), found before any form changes.
    ties = tied_groups([(next((n for n in names if n in plan), names[0]), layer) for names, layer in layers])
    for names, layer in layers:
        kind = kind_of(layer)
        assert kind is not None
        target = next((plan[n] for n in names if n in plan), None)
        now = _current_form(layer, kind)
        if target is None:
            if now[0] != "float":
                kind.to_float(layer)
            continue
        _, form, built = target
        if form == "fake":
            weight_q, input_q = built
            if now == ("fake", weight_q.kind, None if input_q is None else input_q.kind):
                continue  # the loaded state sets the settings of the quantizers already there
            if now[0] != "float":
                kind.to_float(layer)
            kind.install_quantizers(layer, weight_q, input_q)
        else:
            if now[0] == "integer":
                continue
            if now[0] != "float":
                kind.to_float(layer)
            weight_bits, input_bits, input_signed, input_numel, granularity = built
            shape = kind.weight_shape(layer)
            kind.integer_from_codes(
                layer,
                weight_codes=torch.zeros(shape, dtype=torch.int8),
                weight_scale=torch.ones(kind.layer_range_shape(layer, granularity)),
                input_alpha=torch.zeros(()),
                weight_bits=weight_bits,
                input_bits=input_bits,
                input_signed=input_signed,
                input_numel=input_numel,
                weight_granularity=granularity,
            )
    for group in ties:
        _tie_saved(group, state_dict)
    _prepare_folds(model, state_dict, modules, folds)
    disable_transformer_fast_path(model)


def _saved_under(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _same_saved(first: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two saved states (suffix -> value) hold the same keys and values."""
    if first.keys() != other.keys():
        return False
    for key, value in first.items():
        if isinstance(value, Tensor) or isinstance(other[key], Tensor):
            same = isinstance(value, Tensor) and isinstance(other[key], Tensor) and value.shape == other[key].shape
            if not (same and value.dtype == other[key].dtype and torch.equal(value, other[key].to(value.device))):
                return False
        elif value != other[key]:
            return False
    return True


def _tie_saved(group: list[tuple[str, nn.Module]], state_dict: Mapping[str, Any]) -> None:
    """Give layers holding one weight one weight quantizer, or one set of codes, where the state dict saves them alike.

    Where the saved states differ (a checkpoint of an untied model), each layer keeps its
    own, so that loading gives each its saved values instead of the last one to both.
    """
    names = [name for name, _ in group]
    layers = [layer for _, layer in group]
    first = layers[0]
    if all(is_quantized(layer) for layer in layers):
        saved = [_saved_under(state_dict, _prefixed(name, ".weight_quantizer.")) for name in names]
        alike = all(_same_saved(saved[0], other) for other in saved[1:])
        for layer in layers[1:]:
            if alike:
                layer.weight_quantizer = first.weight_quantizer
            elif layer.weight_quantizer is first.weight_quantizer:
                layer.weight_quantizer = copy.deepcopy(first.weight_quantizer)  # its own, filled by the load
    elif all(is_integer(layer) for layer in layers):
        saved = [_saved_weight(state_dict, name) for name in names]
        if all(_same_saved(saved[0], other) for other in saved[1:]):
            # The loaded values will be equal: share now, whatever the layers hold before loading.
            tie_integer_layers(layers, check=False)
        else:
            for layer in layers:
                layer.__dict__.pop(WEIGHT_TIE_ATTRIBUTE, None)
                for key in ("weight_codes", "weight_scale"):
                    layer.register_buffer(key, getattr(layer, key).clone())  # its own, filled by the load


def _saved_weight(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What a tied integer layer shares, as saved: its codes, steps, weight bits and granularity."""
    extra = state_dict.get(_prefixed(name, _EXTRA_STATE))
    extra = extra if isinstance(extra, Mapping) else {}
    return {
        "weight_codes": state_dict.get(_prefixed(name, _CODES)),
        "weight_scale": state_dict.get(_prefixed(name, ".weight_scale")),
        "weight_bits": extra.get("weight_bits"),
        "weight_granularity": extra.get("weight_granularity", "tensor"),
    }


def _prepare_folds(model: nn.Module, state_dict: Mapping[str, Any], modules: dict[str, nn.Module], folds: dict[str, FoldSettings]) -> None:
    """Fold the BatchNorms ``folds`` names (checked), and build back those the model folds and the state dict does not."""
    for names, folded in folded_batchnorms(model):
        if any(name in folds for name in names):
            continue
        layer = modules.get(folded.into)
        tensors = [*layer.parameters(), *layer.buffers()] if layer is not None else []
        device = tensors[0].device if tensors else None
        replace_everywhere(model, folded, folded.to_batchnorm(device))
        if folded.created_bias and layer is not None and _prefixed(folded.into, ".bias") not in state_dict:
            remove_bias(layer)
    for name, settings in folds.items():
        bn = modules[name]
        if isinstance(bn, FoldedBatchNorm) or model.get_submodule(name) is not bn:
            continue  # folded already, or under another of its names just now
        layer = modules[settings.into]
        replace_everywhere(model, bn, FoldedBatchNorm.replacing(bn, settings.into, settings.created_bias))
        if settings.created_bias and layer.bias is None:
            give_zero_bias(layer)


def quantization_manifest(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A readable description of what is quantized and how, for ``checkpoint["nipq"]``; `seal_manifest` adds the digest."""
    layers = []
    for names, module in named_layers(model, lambda m: kind_of(m) is not None):
        kind = kind_of(module)
        assert kind is not None
        form = kind.form_of(module)
        if form == "float":
            continue
        entry: dict[str, Any] = {"name": canonical_name(names[0]), "kind": describe_layer(module), "form": form}
        if form == "fake":
            entry["method"] = module.weight_quantizer.kind
            entry["weight"] = _quantizer_entry(module.weight_quantizer)
            iq = module.input_quantizer
            entry["input"] = None if iq is None else _quantizer_entry(iq)
        else:
            entry["weight"] = {"bits": module.weight_bits}
            entry["input"] = None if module.input_bits is None else {
                "bits": module.input_bits,
                "signed": module.input_signed,
                "zero_point": module.input_zero_point,
            }
        layers.append(entry)
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "layers": layers}
    folds = []
    for names, module in folded_batchnorms(model):
        names = list(dict.fromkeys(map(canonical_name, names)))  # as the digest names them: compiled or not
        folds.append({"name": names[0], "into": canonical_name(module.into), **({"aliases": names[1:]} if len(names) > 1 else {})})
    if folds:
        manifest[FOLDED_KEY] = folds
    return {**manifest, **extra}


def seal_manifest(checkpoint: dict[str, Any]) -> None:
    """Store `quantization_state_digest` of ``checkpoint["state_dict"]`` in its manifest (if it has one).

    Call it once the state dict is final: `check_manifest` refuses a checkpoint whose
    quantization state no longer matches.
    """
    manifest = checkpoint.get(MANIFEST_KEY)
    if isinstance(manifest, dict) and isinstance(checkpoint.get("state_dict"), Mapping):
        manifest[DIGEST_KEY] = quantization_state_digest(checkpoint["state_dict"])


def _quantizer_entry(quantizer: BaseQuantizer) -> dict[str, Any]:
    return {
        "bits": quantizer.rounded_bits(),
        "frozen": quantizer.frozen_bits is not None,
        "calibrated": quantizer.calibrated,
        **quantizer.config(),
    }


def _quantization_entries(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of the quantized and integer layers (their own weights and biases, quantizers, buffers, extra states)."""
    layers = set(_saved_forms(state_dict))
    entries: dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if "" in layers or any(".".join(parts[:i]) in layers for i in range(1, len(parts))) or is_folded_state(value):
            entries[key] = value
    return entries


def quantization_state_digest(state_dict: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` over every entry of the quantized and integer layers of ``state_dict``, by key.

    Tensors count by key, dtype, shape and bytes, and other entries (the extra states) by
    key and canonical JSON, so any change of a quantizer, an integer buffer or a quantized
    layer's weight or bias changes it, wherever the tensors live (they are read on the CPU).
    Keys, and the layer a folded BatchNorm names, count without the ``_orig_mod`` segment of
    ``torch.compile`` (`lightning_nipq.layers.module_names.canonical_name`): translating them
    to a model compiled otherwise (`state_dict_for_model`) leaves the digest as it was.
    """
    return _digest(state_dict, canonical=True)


def _digest(state_dict: Mapping[str, Any], canonical: bool) -> str:
    """`quantization_state_digest`; ``canonical=False``: keys as they are, the digest written before canonical names."""
    digest = hashlib.sha256()
    entries = list(_quantization_entries(state_dict).items())
    if canonical:
        entries = [(canonical_name(key), _canonical_fold(value)) for key, value in entries]
    for key, value in sorted(entries, key=lambda entry: entry[0]):  # stable: a key twice counts twice
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"\0{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        else:
            try:
                text = json.dumps(value, sort_keys=True, default=repr)
            except (TypeError, ValueError):  # keys json cannot sort
                text = repr(value)
            digest.update(f"\0{key}\0json\0{text}".encode())
    return f"sha256:{digest.hexdigest()}"


def _canonical_fold(value: Any) -> Any:
    """A folded BatchNorm's saved state with the layer it names canonical; any other value as it is."""
    into = value.get("into") if is_folded_state(value) else None
    return {**value, "into": canonical_name(into)} if isinstance(into, str) and COMPILED_SEGMENT in into else value


def _names_compiled(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict names a module inside a ``torch.compile`` wrapper (a key, or a fold's layer)."""
    return any(
        (isinstance(key, str) and COMPILED_SEGMENT in key) or _canonical_fold(value) is not value for key, value in state_dict.items()
    )


def check_manifest(checkpoint: Mapping[str, Any]) -> None:
    """Check ``checkpoint["nipq"]`` (absent: nothing to check), and the state digest it holds, if any.

    Raises:
        CheckpointMismatchError: the manifest is not this package's, is of a newer version, or
            its digest does not match the checkpoint's state dict.
    """
    manifest = checkpoint.get(MANIFEST_KEY)
    if manifest is None:
        return
    if not isinstance(manifest, Mapping) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("version"), int):
        raise CheckpointMismatchError(f"checkpoint['{MANIFEST_KEY}'] is not a lightning-nipq manifest")
    if manifest["version"] > MANIFEST_VERSION:
        raise CheckpointMismatchError(
            f"the checkpoint was written with manifest version {manifest['version']}, newer than this "
            f"lightning-nipq reads ({MANIFEST_VERSION}); upgrade lightning-nipq"
        )
    if FOLDED_KEY in manifest:
        _check_manifest_folds(manifest[FOLDED_KEY], checkpoint.get("state_dict"))
    expected = manifest.get(DIGEST_KEY)
    if expected is None:
        return  # written before digests, or by hand
    state_dict = checkpoint.get("state_dict")
    matches = isinstance(expected, str) and isinstance(state_dict, Mapping) and quantization_state_digest(state_dict) == expected
    if not matches and isinstance(expected, str) and isinstance(state_dict, Mapping) and _names_compiled(state_dict):
        # Written before digests were of canonical names: over the keys as they are.
        matches = _digest(state_dict, canonical=False) == expected
    if not matches:
        raise CheckpointMismatchError(
            f"the checkpoint's quantization state does not match the digest written with it "
            f"(checkpoint['{MANIFEST_KEY}']['{DIGEST_KEY}']): the file was modified or damaged after it was written. "
            "Load an intact copy. If its state dict was changed on purpose (by you, or by a callback or an "
            "on_save_checkpoint hook that replaced checkpoint['state_dict'] after lightning-nipq's callbacks, such as "
            "WeightAveraging), store the new digest: "
            f"checkpoint['{MANIFEST_KEY}']['{DIGEST_KEY}'] = quantization_state_digest(checkpoint['state_dict'])."
        )


def _check_manifest_folds(entries: Any, state_dict: Any) -> None:
    """The manifest's list of folded BatchNorms must be well formed and name exactly the folds of the state dict."""
    field = f"checkpoint['{MANIFEST_KEY}']['{FOLDED_KEY}']"
    listed: dict[str, Any] = {}
    if not isinstance(entries, list):
        raise CheckpointMismatchError(f"{field} must be a list of folded BatchNorms, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        aliases = entry.get("aliases", []) if isinstance(entry, Mapping) else None
        names = [entry.get("name"), *aliases] if isinstance(aliases, list) else [None]
        if not (all(isinstance(n, str) for n in names) and isinstance(entry.get("into"), str)):
            raise CheckpointMismatchError(
                f"{field}[{index}] must be an object with a module name, the layer it went into, and optional aliases"
            )
        listed.update({canonical_name(name): canonical_name(entry["into"]) for name in names})
    # Compared without torch.compile's _orig_mod: the state dict may have been translated to a model compiled otherwise.
    saved_folds = _saved_folds(state_dict) if isinstance(state_dict, Mapping) else {}
    saved = {canonical_name(name): _canonical_fold(value).get("into") for name, value in saved_folds.items()}
    if listed != saved:
        raise CheckpointMismatchError(
            f"{field} lists {sorted(listed.items())[:5]} but the state dict folds {sorted(saved.items())[:5]}: the "
            "checkpoint was modified or damaged after it was written. Load an intact copy."
        )


def prepare_for_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """`prepare_for_state_dict` for a Lightning checkpoint dictionary, after `check_manifest` (its version and digest).

    Where ``model`` names the checkpoint's entries otherwise (a submodule wrapped in
    ``torch.compile`` in one and not in the other), ``checkpoint["state_dict"]`` is rewritten
    in place with ``model``'s names, for Lightning's strict ``load_state_dict`` that follows
    the ``on_load_checkpoint`` hook this is called from (the digest does not change).
    """
    check_manifest(checkpoint)
    state_dict = _state_dict_of(checkpoint)
    translated = prepare_for_state_dict(model, state_dict)
    if list(translated) == list(state_dict) and all(translated[k] is v for k, v in state_dict.items()):
        return
    if isinstance(state_dict, MutableMapping):
        metadata = getattr(translated, "_metadata", None)
        state_dict.clear()
        state_dict.update(translated)
        if metadata is not None:
            try:
                state_dict._metadata = metadata  # type: ignore[attr-defined]
            except AttributeError:  # a mapping that takes no attributes had no _metadata either
                pass
    elif isinstance(checkpoint, MutableMapping):
        checkpoint["state_dict"] = translated


def _state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointMismatchError(
            "not a Lightning checkpoint: it has no 'state_dict' dictionary. Load a file written by "
            "trainer.save_checkpoint or ModelCheckpoint."
        )
    return state_dict


class NIPQCheckpointMixin:
    """Put first in your LightningModule's bases to load NIPQ checkpoints anywhere.

    With it, ``MyModel.load_from_checkpoint(path)`` and
    ``trainer.validate(model, ckpt_path=...)`` rebuild the quantized (or integer) layers the
    checkpoint holds before the weights are loaded:

        ```python
        class MyModel(NIPQCheckpointMixin, LightningModule):
            ...

        model = MyModel.load_from_checkpoint("epoch=9.ckpt")
        ```
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prepare_for_checkpoint(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


#: Errors that say the file cannot be reached, not that it is damaged: raised as they are.
_ACCESS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _default_map_location(storage: Any, location: str) -> Any:
    # Lightning's default: tensors go back to the device they were saved from when this
    # machine has it, else to the CPU (None keeps torch's default placement).
    device = location.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return None if available.get(device, False) else storage.cpu()


def read_checkpoint(checkpoint_path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint file read without unpickling anything: tensors and plain data only.

    ``torch.load(weights_only=True)`` restores only tensors and plain Python data, so a file
    whose pickle names a function (code that would run while loading) is refused instead.
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot undo that: torch (2.6 and later; earlier
    versions do not read it) applies it only to calls that leave ``weights_only`` unset.

    Raises:
        CheckpointMismatchError: the file is damaged, is not a checkpoint, or holds objects
            other than tensors and plain data.
    """
    path = Path(checkpoint_path)
    try:
        checkpoint = torch.load(path, map_location=map_location or _default_map_location, weights_only=True)
    except _ACCESS_ERRORS:
        raise
    except pickle.UnpicklingError as e:
        refused = _first_line(str(e))
        raise CheckpointMismatchError(
            f"cannot read {path}: it is damaged, or holds objects other than tensors and plain data"
            + (f" ({refused})" if refused else "")
            + ", which lightning-nipq never unpickles: unpickling them could run code from the file. Do not load a "
            "file you did not write; use an intact copy. If it is your own checkpoint and its hyper-parameters hold "
            "an object of one of your classes, allow that class with torch.serialization.add_safe_globals([YourClass]) "
            "and load it again."
        ) from None
    except Exception as e:
        # Damage shows up as whatever the zip or pickle reader trips on: OSError (errno 22),
        # EOFError, UnicodeDecodeError, KeyError, RuntimeError...
        detail = _first_line(str(e))
        raise CheckpointMismatchError(
            f"cannot read {path}: the file is damaged or truncated, or is not a PyTorch checkpoint "
            f"({type(e).__name__}{': ' + detail if detail else ''}). Use an intact copy "
            "(a complete download, or the checkpoint saved again)."
        ) from e
    _state_dict_of(checkpoint)
    return checkpoint


def _first_line(message: str) -> str:
    """What torch's loader tripped on, from its message, without its advice.

    torch advises ``weights_only=False`` (which would run whatever the file holds) and
    allowlisting the refused global (for a hostile file, a function such as ``exec``): keep
    only what its restricted unpickler refused, or the first line of another error.
    """
    text = message.partition("WeightsUnpickler error:")[2] or message
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(" was not an allowed global")[0].split("In PyTorch 2.6")[0].strip()
    return "" if "weights_only" in line else line


def _build_module(cls: type[ModuleT], checkpoint: dict[str, Any], hyper_parameters: dict[str, Any]) -> ModuleT:
    """``cls`` built from the checkpoint's hyper-parameters (``hyper_parameters`` override them), its float weights loaded.

    Lightning's ``_load_state`` is what ``load_from_checkpoint`` builds the module with, from
    an already-read checkpoint: its handling of the saved hyper-parameters (and its allowlist
    of instantiators), ``configure_model`` and ``on_load_checkpoint``. It loads non-strictly:
    the quantizer and integer keys do not fit the float model yet.
    """
    from lightning.pytorch.core.saving import _load_state

    key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")
    # As load_from_checkpoint does: the overrides are also what on_load_checkpoint sees.
    checkpoint.setdefault(key, {})
    checkpoint[key].update(hyper_parameters)
    with warnings.catch_warnings():
        # The quantizer keys are expected to be missing here; they are loaded strictly afterwards.
        warnings.filterwarnings("ignore", message=".*keys that are not in the model state dict.*")
        warnings.filterwarnings("ignore", message=".*keys that are missing.*")
        warnings.filterwarnings("ignore", message=".*keys that are in the model state dict but not in the checkpoint.*")
        try:
            model = _load_state(cls, checkpoint, strict=False, **hyper_parameters)  # type: ignore[arg-type]
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            raise CheckpointMismatchError(
                f"the checkpoint does not match {cls.__name__}: {e}. Load it into the architecture that saved it."
            ) from e
    device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, Tensor)), None)
    return model if device is None else model.to(device)  # type: ignore[return-value]


def load_nipq_checkpoint(cls: type[ModuleT], checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any) -> ModuleT:
    """``cls.load_from_checkpoint`` for a LightningModule class without `NIPQCheckpointMixin`, and without unpickling.

    The file is read once with `read_checkpoint` (tensors and plain data only), its manifest,
    digest and quantization state are checked, the model is built from its hyper-parameters
    (``kwargs`` override them) as Lightning builds it, the quantization structure is
    rebuilt from the checkpoint and every tensor is loaded strictly.

    Raises:
        CheckpointMismatchError: the file is damaged, holds more than tensors and plain data,
            does not match ``cls``, or its quantization state is invalid or was modified.
    """
    for name in ("weights_only", "hparams_file"):
        if name in kwargs:
            raise TypeError(
                f"load_nipq_checkpoint does not take {name}: it reads the file with weights_only=True, and its "
                "keyword arguments override the checkpoint's hyper-parameters"
            )
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    # Checked before the model is built, so a damaged file never reaches Lightning's load.
    check_manifest(checkpoint)
    check_saved_state(checkpoint["state_dict"])
    model = _build_module(cls, checkpoint, kwargs)
    state_dict = prepare_for_state_dict(model, checkpoint["state_dict"])  # with model's names, compiled or not
    model.load_state_dict(state_dict, strict=True)
    return model
