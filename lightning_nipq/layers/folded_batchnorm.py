"""BatchNorm folded into the integer layer before it: the maths, and the module left in its place.

In eval mode a BatchNorm is an affine map per channel, ``bn(y) = y * f + (beta - mean * f)``
with ``f = gamma / sqrt(running_var + eps)``. An integer layer's output is
``codes_acc * step + bias`` with one step per range, so folding multiplies the steps of
output channel ``c`` by ``|f_c|`` and sets the bias to ``(bias - mean) * f + beta``:

* a per-tensor layer becomes per channel (the factor differs per channel; the codes stay);
  a per-channel layer keeps its ranges, a per-group layer keeps its groups;
* steps must stay positive, so a channel with ``f_c < 0`` has its codes negated instead
  (codes are symmetric, ``[-n, n]``, so negation is exact);
* a channel with ``f_c == 0`` outputs ``beta_c`` alone: its codes become zero and its steps stay.

The BatchNorm module is replaced by a `FoldedBatchNorm` (an ``nn.Identity``) at every name it
had. Its extra state records the layer it went into, so that checkpoints carry the fold in
the state dict itself and `lightning_nipq.saving.prepare_for_state_dict` can replace the
BatchNorm of a fresh model before loading (and build it back for a state dict without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from lightning_nipq.layers.forms import WEIGHT_TIE_ATTRIBUTE, is_integer
from lightning_nipq.layers.layer_kinds import kind_of
from lightning_nipq.layers.model_walk import named_layers

#: The ``format`` of a `FoldedBatchNorm`'s extra state: how a state dict entry is recognised as a fold.
FOLDED_FORMAT = "lightning-nipq/folded-batchnorm"
#: The BatchNorm classes that fold, by the name checkpoints and the artifact record. Exact
#: classes only: a subclass may override ``forward``, so its maths is not known.
FOLDABLE_TYPES: dict[str, type[nn.Module]] = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
    "SyncBatchNorm": nn.SyncBatchNorm,
}


class FoldSettings(NamedTuple):
    """What a fold records: the integer layer's name, the BatchNorm's class name and width, whether folding made the bias."""

    into: str
    batchnorm_type: str
    num_features: int
    created_bias: bool


class FoldProblem(ValueError):
    """A BatchNorm whose fold the integer layer cannot hold (non-finite statistics, steps beyond float32)."""


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm was folded into the integer layer ``into``, and passes its input through.

    ``batchnorm_config`` (``eps``, ``momentum``, ``affine``, ``track_running_stats``) is kept
    to build the BatchNorm back (`to_batchnorm`) when a state dict without the fold is loaded.
    """

    def __init__(
        self,
        into: str,
        batchnorm_type: str,
        num_features: int,
        created_bias: bool,
        batchnorm_config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.into, self.batchnorm_type, self.num_features, self.created_bias = check_folded_state(
            {
                "format": FOLDED_FORMAT,
                "into": into,
                "type": batchnorm_type,
                "num_features": num_features,
                "created_bias": created_bias,
            }
        )
        self.batchnorm_config = dict(batchnorm_config or {})

    @classmethod
    def replacing(cls, bn: nn.Module, into: str, created_bias: bool) -> FoldedBatchNorm:
        """The module that takes the place of ``bn`` once folded into the layer named ``into``."""
        config = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine, "track_running_stats": bn.track_running_stats}
        return cls(into, type(bn).__name__, bn.num_features, created_bias, config)

    @property
    def settings(self) -> FoldSettings:
        return FoldSettings(self.into, self.batchnorm_type, self.num_features, self.created_bias)

    def to_batchnorm(self, device: Optional[torch.device] = None) -> nn.Module:
        """A fresh BatchNorm of the folded one's class and settings (its values are for a state dict to fill)."""
        return FOLDABLE_TYPES[self.batchnorm_type](self.num_features, device=device, **self.batchnorm_config)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format": FOLDED_FORMAT,
            "into": self.into,
            "type": self.batchnorm_type,
            "num_features": self.num_features,
            "created_bias": self.created_bias,
        }

    def set_extra_state(self, state: Any) -> None:
        # prepare_for_state_dict builds this module from the very state loaded here: a
        # difference means the state dict was not prepared for this model.
        saved = check_folded_state(state)
        if saved != self.settings:
            raise ValueError(
                f"a folded BatchNorm's saved state {tuple(saved)} does not match this one's {tuple(self.settings)}; "
                "call lightning_nipq.saving.prepare_for_state_dict(model, state_dict) before load_state_dict"
            )

    def extra_repr(self) -> str:
        return f"{self.batchnorm_type}({self.num_features}) folded into {self.into!r}"


def is_folded_state(value: Any) -> bool:
    """Whether a state dict value is a `FoldedBatchNorm`'s extra state (its ``format`` says so)."""
    return isinstance(value, Mapping) and value.get("format") == FOLDED_FORMAT


def check_folded_state(state: Any, where: str = "") -> FoldSettings:
    """The settings of a folded BatchNorm's saved state, checked (``where`` prefixes names in messages).

    Raises:
        ValueError: a value is missing, of the wrong type or out of range.
    """
    if not isinstance(state, Mapping) or state.get("format") != FOLDED_FORMAT:
        raise ValueError(f"{where}a folded BatchNorm's state must be a dict with format {FOLDED_FORMAT!r}, got {type(state).__name__}")
    into = state.get("into")
    if not isinstance(into, str) or not into:
        raise ValueError(f"{where}into must name the integer layer the BatchNorm was folded into, got {into!r}")
    batchnorm_type = state.get("type")
    if batchnorm_type not in FOLDABLE_TYPES:
        raise ValueError(f"{where}type must be one of {', '.join(FOLDABLE_TYPES)}, got {batchnorm_type!r}")
    num_features = state.get("num_features")
    if isinstance(num_features, bool) or not isinstance(num_features, int) or not 1 <= num_features < 2**63:
        raise ValueError(f"{where}num_features must be a whole number >= 1, got {num_features!r}")
    created_bias = state.get("created_bias")
    if not isinstance(created_bias, bool):
        raise ValueError(f"{where}created_bias must be True or False, got {created_bias!r}")
    return FoldSettings(into, batchnorm_type, num_features, created_bias)


def folded_batchnorms(model: nn.Module) -> list[tuple[list[str], FoldedBatchNorm]]:
    """``([name, *aliases], module)`` for every `FoldedBatchNorm` of ``model``, in registration order."""
    return named_layers(model, lambda m: isinstance(m, FoldedBatchNorm))  # type: ignore[return-value]


def output_channels(layer: nn.Module) -> int:
    """How many output channels a quantizable layer (any form) has: the size of its weight's output axis."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a quantizable layer")
    return kind.weight_shape(layer)[kind.output_axis]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (its parent's attribute)."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, module)


def replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` at every name ``old`` has in ``model`` (a shared module has several); returns the names."""
    names = [name for name, module in model.named_modules(remove_duplicate=False) if module is old and name]
    for name in names:
        set_submodule(model, name, new)
    return names


def give_zero_bias(layer: nn.Module) -> None:
    """Give a layer without a bias one of zeros, for a fold that created one (a state dict then fills it)."""
    device = layer.weight_codes.device if is_integer(layer) else layer.weight.device
    layer.bias = nn.Parameter(torch.zeros(output_channels(layer), device=device))


def remove_bias(layer: nn.Module) -> None:
    """Take the bias a fold created off the layer, leaving it bias-free as it was built."""
    layer.register_parameter("bias", None)


def batchnorm_eval(bn: nn.Module, y: Tensor) -> Tensor:
    """``bn(y)`` as in eval mode, whatever mode ``bn`` is in, without touching its statistics."""
    return torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _factors(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(f, beta - mean * f)`` per channel in float64: the eval-mode BatchNorm as ``y * f + shift``."""
    mean = bn.running_mean.detach().double()
    factor = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    shift = -mean * factor
    if bn.weight is not None:
        factor = factor * bn.weight.detach().double()
        shift = -mean * factor + bn.bias.detach().double()
    return factor, shift


def folded_state(layer: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor, Any, Tensor]:
    """``(codes, steps, granularity, bias)`` of the integer ``layer`` with ``bn`` folded in; nothing is changed.

    Raises:
        FoldProblem: the result cannot be held (non-finite statistics, steps or bias beyond float32).
    """
    kind = kind_of(layer)
    if kind is None or not is_integer(layer):
        raise TypeError(f"{type(layer).__name__} is not an integer layer")
    if not kind.foldable:
        raise FoldProblem(f"a {kind.name}'s output channels are not its weight's output axis, so no BatchNorm folds into it")
    if layer.__dict__.get(WEIGHT_TIE_ATTRIBUTE) is not None:
        raise FoldProblem("the layer shares its weight with another layer (tied), whose codes folding would change too")
    channels = output_channels(layer)
    if bn.num_features != channels:
        raise FoldProblem(f"it has {bn.num_features} features and the layer {channels} output channels")
    device = layer.weight_codes.device
    factor, shift = (t.to(device) for t in _factors(bn))
    if not (torch.isfinite(factor).all() and torch.isfinite(shift).all()):
        raise FoldProblem("its statistics or affine parameters are not finite (or running_var + eps is 0)")
    granularity = "channel" if layer.weight_granularity == "tensor" else layer.weight_granularity
    weight_shape = tuple(layer.weight_codes.shape)
    range_shape = kind.range_shape(weight_shape, granularity)
    along = [1] * len(range_shape)
    along[kind.output_axis] = channels
    # A zero factor keeps the channel's step (its codes become zero): steps must stay positive.
    magnitude = torch.where(factor == 0, torch.ones_like(factor), factor.abs())
    steps = (layer.weight_scale.detach().double().expand(range_shape) * magnitude.view(along)).to(layer.weight_scale.dtype)
    if not (torch.isfinite(steps).all() and bool((steps > 0).all())):
        raise FoldProblem("the folded steps would leave float32's range")
    sign = torch.sign(factor).to(torch.int32)
    code_sign = [1] * len(weight_shape)
    code_sign[kind.output_axis] = channels
    codes = (layer.weight_codes.to(torch.int32) * sign.view(code_sign)).to(layer.weight_codes.dtype)
    old_bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(channels, dtype=torch.float64, device=device)
    bias = (old_bias * factor + shift).to(layer.bias.dtype if layer.bias is not None else torch.float32)
    if not torch.isfinite(bias).all():
        raise FoldProblem("the folded bias would leave float32's range")
    return codes, steps.contiguous(), granularity, bias


def fold_into(layer: nn.Module, bn: nn.Module) -> bool:
    """Fold the eval-mode ``bn`` into the integer ``layer``'s steps, codes and bias, in place; True if it made the bias.

    ``bn`` itself is not touched (replacing it in the model is the caller's, see `replace_everywhere`).

    Raises:
        FoldProblem: see `folded_state` (raised before the layer is changed).
    """
    codes, steps, granularity, bias = folded_state(layer, bn)
    created = layer.bias is None
    requires_grad = True if created else layer.bias.requires_grad
    # New tensors rather than in-place copies, so that a restore point puts the old ones back.
    layer.register_buffer("weight_codes", codes)
    layer.register_buffer("weight_scale", steps)
    layer.weight_granularity = granularity
    layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return created


def check_fold_target(bn: nn.Module, settings: FoldSettings, layer: Optional[nn.Module]) -> Optional[str]:
    """Why the module ``bn`` of a model cannot take the fold ``settings`` records (into ``layer``), or None if it can."""
    if isinstance(bn, FoldedBatchNorm):
        if bn.settings != settings:
            return f"already folded as {tuple(bn.settings)}, where the saved fold is {tuple(settings)}"
        return None
    expected = FOLDABLE_TYPES[settings.batchnorm_type]
    if type(bn) is not expected:
        return f"a {type(bn).__name__} in the model, a folded {settings.batchnorm_type} in the saved state"
    if bn.num_features != settings.num_features:
        return f"{bn.num_features} features in the model, {settings.num_features} in the saved state"
    if layer is None or kind_of(layer) is None:
        return f"folded into {settings.into!r}, which is not a quantizable layer of the model"
    if not kind_of(layer).foldable:  # type: ignore[union-attr]
        return f"folded into {settings.into!r}, a {kind_of(layer).name} (no BatchNorm folds into one)"  # type: ignore[union-attr]
    if output_channels(layer) != settings.num_features:
        return f"folded into {settings.into!r}, which has {output_channels(layer)} output channels, not {settings.num_features}"
    if settings.created_bias != (layer.bias is None):
        has = "has a bias" if layer.bias is not None else "has no bias"
        return f"{settings.into!r} {has} in the model, which does not fit the saved fold (created_bias={settings.created_bias})"
    return None
