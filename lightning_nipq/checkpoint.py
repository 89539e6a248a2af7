"""Loading NIPQ checkpoints into any instance of the model, in any state.

A state dict already says which layers are quantized and how: a layer ``X`` with the key
``X.weight_quantizer.theta`` is fake-quantized with NIPQ (``X.weight_quantizer.step``:
with LSQ), one with ``X.input_quantizer.theta`` (``.step``) also quantizes its input, and
one with ``X.weight_codes`` is an integer layer. The full
quantizer state (sign, frozen bits, bit range, sizes) travels in ``_extra_state``. So
`prepare_for_state_dict` can give a fresh float model, or one in another state
(say, converted to integers after training), exactly the structure the state dict
needs. ``load_state_dict`` then fills it. Lightning checkpoints also carry a readable
manifest under ``checkpoint["nipq"]``, which is checked for its format version.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch
from torch import nn

from lightning_nipq.attach import (
    QuantizerConfig,
    QuantizerFactory,
    attach_layer,
    detach_layer,
    disable_transformer_fast_path,
)
from lightning_nipq.integer_layers import INTEGER_CLASS, integer_layer_from_codes, is_integer
from lightning_nipq.layers import FLOAT_CLASS, QUANTIZABLE_TYPES, is_quantized, layer_kind
from lightning_nipq.lsq import LSQConfig

MANIFEST_KEY = "nipq"
MANIFEST_FORMAT = "lightning-nipq/checkpoint"
MANIFEST_VERSION = 1
#: Per quantizer kind: the parameter whose key marks it in a state dict, and a config that
#: builds one (bits, range and sign then come from the state dict's ``_extra_state``).
_QUANTIZER_KINDS: dict[str, tuple[str, Callable[[], QuantizerFactory]]] = {
    "nipq": ("theta", QuantizerConfig),
    "lsq": ("step", LSQConfig),
}
_CODES_SUFFIX = ".weight_codes"
_FLOAT_OF = {**FLOAT_CLASS, **{v: k for k, v in INTEGER_CLASS.items()}}

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


#: ``(form, quantizes its input, quantizer kind)``: form is "float", "fake" or "integer";
#: the kind ("nipq", "lsq") is empty unless fake-quantized.
Form = tuple[str, bool, str]


def _form(layer: nn.Module) -> Form:
    if is_quantized(layer):
        return "fake", layer.input_quantizer is not None, layer.weight_quantizer.kind
    if is_integer(layer):
        return "integer", layer.input_bits is not None, ""
    return "float", False, ""


def _forms_in(state_dict: Mapping[str, Any]) -> dict[str, Form]:
    forms: dict[str, Form] = {}
    for key in state_dict:
        for kind, (parameter, _) in _QUANTIZER_KINDS.items():
            suffix = f".weight_quantizer.{parameter}"
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                forms[name] = ("fake", f"{name}.input_quantizer.{parameter}" in state_dict, kind)
        if key.endswith(_CODES_SUFFIX):
            name = key[: -len(_CODES_SUFFIX)]
            extra = state_dict.get(f"{name}._extra_state") or {}
            forms[name] = ("integer", extra.get("input_bits") is not None, "")
    return forms


def _to_float(layer: nn.Module) -> None:
    if is_quantized(layer):
        detach_layer(layer)
    elif is_integer(layer):
        shape, device = layer.weight_codes.shape, layer.weight_codes.device
        for name in ("weight_codes", "weight_scale", "input_alpha"):
            delattr(layer, name)
        layer.__class__ = _FLOAT_OF[type(layer)]
        layer.weight = nn.Parameter(torch.zeros(shape, device=device))


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Give every supported layer of ``model`` the form (float, fake-quantized, integer) ``state_dict`` has.

    Raises:
        CheckpointMismatchError: a layer of the state dict is missing from the model or is
            not a supported layer (checked before anything is changed).
    """
    forms = _forms_in(state_dict)
    modules = dict(model.named_modules(remove_duplicate=False))
    problems = []
    for name in forms:
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: no such module in {type(model).__name__}")
        elif not isinstance(module, QUANTIZABLE_TYPES) or _FLOAT_OF.get(type(module), type(module)) not in INTEGER_CLASS:
            problems.append(f"{name}: a {type(module).__name__}, not a Linear/Conv1d/Conv2d/Conv3d")
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint does not match the model: " + "; ".join(problems) + ". Load it into the architecture that saved it."
        )
    done: set[int] = set()
    for name, module in modules.items():
        if id(module) in done or not isinstance(module, QUANTIZABLE_TYPES):
            continue
        if _FLOAT_OF.get(type(module), type(module)) not in INTEGER_CLASS:
            continue
        done.add(id(module))
        target = forms.get(name, ("float", False, ""))
        if _form(module) == target:
            continue
        _to_float(module)
        kind, has_input, method = target
        if kind == "fake":
            attach_layer(module, _QUANTIZER_KINDS[method][1](), float_input=not has_input)
        elif kind == "integer":
            extra = state_dict.get(f"{name}._extra_state") or {}
            bits = int(extra.get("weight_bits", 8))
            integer_layer_from_codes(
                module,
                weight_codes=torch.zeros(module.weight.shape, dtype=torch.int8),
                weight_scale=torch.zeros(()),
                input_alpha=torch.zeros(()),
                weight_bits=bits,
                input_bits=extra.get("input_bits"),
                input_signed=bool(extra.get("input_signed", True)),
                input_numel=int(extra.get("input_numel", 0)),
            )
    disable_transformer_fast_path(model)


def quantization_manifest(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A readable description of what is quantized and how, for ``checkpoint["nipq"]``."""
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        kind, has_input, method = _form(module)
        if kind == "float" or id(module) in seen:
            continue
        seen.add(id(module))
        entry: dict[str, Any] = {"name": name, "kind": layer_kind(module), "form": kind}
        if kind == "fake":
            entry["method"] = method
            wq, iq = module.weight_quantizer, module.input_quantizer
            entry["weight"] = {"bits": wq.rounded_bits(), "frozen": wq.frozen_bits is not None, "range": [wq.min_bits, wq.max_bits]}
            entry["input"] = None if iq is None else {
                "bits": iq.rounded_bits(),
                "signed": iq.signed,
                "calibrated": iq.calibrated,
                "frozen": iq.frozen_bits is not None,
                "range": [iq.min_bits, iq.max_bits],
            }
        else:
            entry["weight"] = {"bits": module.weight_bits}
            entry["input"] = None if module.input_bits is None else {"bits": module.input_bits, "signed": module.input_signed}
        layers.append(entry)
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "layers": layers, **extra}


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


def install_load_hook(pl_module: nn.Module) -> Optional[Callable[[], None]]:
    """Wrap ``pl_module.on_load_checkpoint`` so a Trainer restore rebuilds the structure first.

    Lightning calls the module's hook through the instance attribute right before it loads
    the state dict, so the callbacks can serve modules without the mixin. Returns a function
    that removes the wrapper, or None if nothing was needed.
    """
    if isinstance(pl_module, NIPQCheckpointMixin) or "on_load_checkpoint" in vars(pl_module):
        return None
    original = pl_module.on_load_checkpoint  # type: ignore[attr-defined]

    @functools.wraps(original)
    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        prepare_for_checkpoint(pl_module, checkpoint)
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[attr-defined]

    def remove() -> None:
        if vars(pl_module).get("on_load_checkpoint") is on_load_checkpoint:
            del pl_module.on_load_checkpoint

    return remove
