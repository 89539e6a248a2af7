"""Loading NIPQ checkpoints into any instance of the model, in any state.

A state dict already says which layers are quantized and how: a layer ``X`` with the key
``X.weight_quantizer._extra_state`` is fake-quantized, and that state names the quantizer's
method and holds its whole configuration; one with ``X.input_quantizer._extra_state`` also
quantizes its input; one with ``X.weight_codes`` is an integer layer (its bits in
``X._extra_state``). So `prepare_for_state_dict` can give a fresh float model, or one in
another state (say, converted to integers after training), exactly the structure the state
dict needs, with quantizers rebuilt from their saved settings, never from defaults.
``load_state_dict`` then fills it. Lightning checkpoints also carry a readable manifest
under ``checkpoint["nipq"]``, which is checked for its format version.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import torch
from torch import nn

from lightning_nipq.layers.attach import disable_transformer_fast_path
from lightning_nipq.layers.forms import LayerKind, check_integer_state
from lightning_nipq.layers.layer_kinds import describe_layer, kind_of, supported_names
from lightning_nipq.layers.model_walk import named_layers
from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.quant.methods import quantizer_from_state

MANIFEST_KEY = "nipq"
MANIFEST_FORMAT = "lightning-nipq/checkpoint"
#: 2: quantizers save their method and whole configuration in ``_extra_state``.
MANIFEST_VERSION = 2
_WEIGHT_STATE = ".weight_quantizer._extra_state"
_INPUT_STATE = ".input_quantizer._extra_state"
_CODES = ".weight_codes"

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def _prefixed(name: str, suffix: str) -> str:
    return f"{name}{suffix}" if name else suffix[1:]


def _layer_name(key: str, suffix: str) -> Optional[str]:
    if key == suffix[1:]:
        return ""  # the model itself is the layer
    return key[: -len(suffix)] if key.endswith(suffix) else None


def _saved_forms(state_dict: Mapping[str, Any]) -> dict[str, tuple[str, Any, Any]]:
    """``name -> (form, weight or layer state, input state)`` for the quantized and integer layers of a state dict."""
    forms: dict[str, tuple[str, Any, Any]] = {}
    for key in state_dict:
        name = _layer_name(key, _WEIGHT_STATE)
        if name is not None:
            forms[name] = ("fake", state_dict[key], state_dict.get(_prefixed(name, _INPUT_STATE)))
        name = _layer_name(key, _CODES)
        if name is not None:
            forms[name] = ("integer", state_dict.get(_prefixed(name, "._extra_state")), None)
    return forms


def _current_form(layer: nn.Module, kind: LayerKind) -> tuple[str, Optional[str], Optional[str]]:
    """``(form, weight quantizer method, input quantizer method or None)`` of a layer now."""
    form = kind.form_of(layer) or "float"
    if form != "fake":
        return form, None, None
    inputs = layer.input_quantizer
    return form, layer.weight_quantizer.kind, None if inputs is None else inputs.kind


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Give every quantizable layer of ``model`` the form (float, fake-quantized, integer) ``state_dict`` has.

    Quantizers are rebuilt from the method and settings saved in their ``_extra_state``.

    Raises:
        CheckpointMismatchError: a layer of the state dict is missing from the model, is not a
            quantizable layer, or its saved quantizer or integer state is invalid (all checked
            before anything is changed).
    """
    saved = _saved_forms(state_dict)
    modules = dict(model.named_modules(remove_duplicate=False))
    problems: list[str] = []
    # name -> (kind, form, new quantizers or integer settings), built before any layer changes.
    plan: dict[str, tuple[LayerKind, str, Any]] = {}
    for name, (form, first, second) in saved.items():
        module = modules.get(name)
        kind = None if module is None else kind_of(module)
        if module is None:
            problems.append(f"{name or '(the model)'}: no such module in {type(model).__name__}")
            continue
        if kind is None:
            problems.append(f"{name}: a {type(module).__name__}, not a quantizable layer ({supported_names()})")
            continue
        try:
            if form == "fake":
                built = (quantizer_from_state(first), None if second is None else quantizer_from_state(second))
            else:
                built = check_integer_state(first)
        except (ValueError, TypeError, AttributeError) as e:
            problems.append(f"{name}: its saved {'quantizer' if form == 'fake' else 'integer layer'} state is invalid ({e})")
            continue
        plan[name] = (kind, form, built)
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint does not match the model: " + "; ".join(problems) + ". Load it into the architecture that saved it."
        )
    for names, layer in named_layers(model, lambda m: kind_of(m) is not None):
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
            weight_bits, input_bits, input_signed, input_numel = built
            kind.integer_from_codes(
                layer,
                weight_codes=torch.zeros(kind.weight_shape(layer), dtype=torch.int8),
                weight_scale=torch.zeros(()),
                input_alpha=torch.zeros(()),
                weight_bits=weight_bits,
                input_bits=input_bits,
                input_signed=input_signed,
                input_numel=input_numel,
            )
    disable_transformer_fast_path(model)


def quantization_manifest(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A readable description of what is quantized and how, for ``checkpoint["nipq"]``."""
    layers = []
    for names, module in named_layers(model, lambda m: kind_of(m) is not None):
        kind = kind_of(module)
        assert kind is not None
        form = kind.form_of(module)
        if form == "float":
            continue
        entry: dict[str, Any] = {"name": names[0], "kind": describe_layer(module), "form": form}
        if form == "fake":
            entry["method"] = module.weight_quantizer.kind
            entry["weight"] = _quantizer_entry(module.weight_quantizer)
            iq = module.input_quantizer
            entry["input"] = None if iq is None else _quantizer_entry(iq)
        else:
            entry["weight"] = {"bits": module.weight_bits}
            entry["input"] = None if module.input_bits is None else {"bits": module.input_bits, "signed": module.input_signed}
        layers.append(entry)
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "layers": layers, **extra}


def _quantizer_entry(quantizer: BaseQuantizer) -> dict[str, Any]:
    return {
        "bits": quantizer.rounded_bits(),
        "frozen": quantizer.frozen_bits is not None,
        "calibrated": quantizer.calibrated,
        **quantizer.config(),
    }


def check_manifest(checkpoint: Mapping[str, Any]) -> None:
    manifest = checkpoint.get(MANIFEST_KEY)
    if manifest is None:
        return
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("version"), int):
        raise CheckpointMismatchError(f"checkpoint['{MANIFEST_KEY}'] is not a lightning-nipq manifest")
    if manifest["version"] > MANIFEST_VERSION:
        raise CheckpointMismatchError(
            f"the checkpoint was written with manifest version {manifest['version']}, newer than this "
            f"lightning-nipq reads ({MANIFEST_VERSION}); upgrade lightning-nipq"
        )


def prepare_for_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """`prepare_for_state_dict` for a Lightning checkpoint dictionary."""
    check_manifest(checkpoint)
    prepare_for_state_dict(model, checkpoint["state_dict"])


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


def load_nipq_checkpoint(cls: type[ModuleT], checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any) -> ModuleT:
    """``cls.load_from_checkpoint`` for a LightningModule class without `NIPQCheckpointMixin`.

    The model is built and its float weights loaded by Lightning; the quantization
    structure is then rebuilt from the checkpoint and every tensor loaded strictly.
    """
    with warnings.catch_warnings():
        # The quantizer keys are expected to be missing here; they are loaded strictly below.
        warnings.filterwarnings("ignore", message=".*keys that are not in the model state dict.*")
        warnings.filterwarnings("ignore", message=".*keys that are missing.*")
        model = cls.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=False, **kwargs)  # type: ignore[attr-defined]
    checkpoint = torch.load(checkpoint_path, map_location=map_location or "cpu", weights_only=True)
    prepare_for_checkpoint(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model
