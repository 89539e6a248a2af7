"""Saturating nonlinearity (SatNL): train each weight through a bounded, odd, saturating map. Plain torch.

Reconstructed from Park, Jang and Park, "Symmetry Regularization and Saturating
Nonlinearity for Robust Quantization" (ECCV 2022), whose full text was not available.
A layer's weight is computed from a free latent tensor ``V`` as

    W = s * tanh(V / s)

with one fixed scale ``s`` per layer. The range of ``W`` can never leave ``(-s, s)``,
so the quantization range (``max|W|``) and with it the step stay small, and weights
near the edge move slower (``dW/dV = 1 - (W/s)^2``) while small ones move almost
freely: outliers are damped without clipping. At the end of training the map is folded
back into a plain ``weight``.

The map is registered with ``torch.nn.utils.parametrize``, so ``layer.weight`` stays
readable everywhere and the optimizer trains ``V``, which state dicts store under
``<layer>.parametrizations.weight.original`` next to ``s`` under
``<layer>.parametrizations.weight.0.scale``. `fold_state_dict` and `unfold_state_dict`
convert between that form and a plain state dict (``<layer>.weight``), which is what
checkpoints hold.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: Where a saturated layer's latent and scale sit in its state dict, after ``<layer>.``.
LATENT_KEY = "parametrizations.weight.original"
SCALE_KEY = "parametrizations.weight.0.scale"
#: ``s`` is this multiple of the initial ``max|W|`` by default.
DEFAULT_SATURATION_SCALE = 1.5


def _inside(scale: Tensor) -> Tensor:
    # The largest value strictly below s: tanh rounds to exactly 1 in float32 beyond |V/s| ~ 9.
    return torch.nextafter(scale, torch.zeros_like(scale))


def saturate(latent: Tensor, scale: Tensor) -> Tensor:
    """``s * tanh(V / s)``, kept strictly inside ``(-s, s)`` even where tanh rounds to 1."""
    bound = _inside(scale)
    return (scale * torch.tanh(latent / scale)).clamp(-bound, bound)


def desaturate(weight: Tensor, scale: Tensor) -> Tensor:
    """The inverse of `saturate`: ``s * atanh(W / s)``, with ``W / s`` clamped just inside ``(-1, 1)``.

    Exact up to rounding inside the range; ill-conditioned where ``|W|`` is close to ``s``
    (``tanh`` is flat there), which is why checkpoints also carry the latent itself.
    """
    one = torch.ones_like(scale)
    edge = torch.nextafter(one, torch.zeros_like(one))
    return scale * torch.atanh((weight / scale).clamp(-edge, edge))


def initial_scale(weight: Tensor, factor: float = DEFAULT_SATURATION_SCALE) -> float:
    """``factor * max|W|``: above every initial weight, so the map starts out representing the model exactly.

    A weight that is all zeros (a zero-initialised last layer) gets ``factor / sqrt(fan_in)``,
    the bound of PyTorch's default initialisation, instead of a useless zero range.
    """
    if factor <= 1.0:
        raise ValueError(f"the saturation scale factor must be > 1 (s above max|W|), got {factor}")
    top = float(weight.detach().abs().max()) if weight.numel() else 0.0
    if not math.isfinite(top):
        raise ValueError("the weight holds inf or nan; cannot choose a saturation scale")
    if top == 0.0:
        fan_in = max(weight[0].numel(), 1) if weight.dim() > 1 else max(weight.numel(), 1)
        top = 1.0 / math.sqrt(fan_in)
    return factor * top


class Saturation(nn.Module):
    """The parametrisation ``V -> s * tanh(V / s)`` of one weight, with a fixed scale ``s`` (a buffer).

    ``s`` is not learned: its gradient would push it up whenever the loss wants larger
    weights, and nothing but weight decay would pull it back, so the bound would drift.
    """

    scale: Tensor

    def __init__(self, scale: float | Tensor) -> None:
        super().__init__()
        value = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())
        if not bool(torch.isfinite(value)) or float(value) <= 0:
            raise ValueError(f"the saturation scale must be a finite number > 0, got {float(value)}")
        self.register_buffer("scale", value)

    def forward(self, latent: Tensor) -> Tensor:
        return saturate(latent, self.scale.to(latent.dtype))

    def right_inverse(self, weight: Tensor) -> Tensor:
        return desaturate(weight, self.scale.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}"


def saturation_of(layer: nn.Module) -> Optional[Saturation]:
    """The `Saturation` on ``layer.weight``, or None."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations.weight:  # type: ignore[union-attr]
        if isinstance(p, Saturation):
            return p
    return None


def attach_saturation(layer: nn.Module, scale: Optional[float] = None, factor: float = DEFAULT_SATURATION_SCALE) -> Saturation:
    """Parametrise ``layer.weight`` as ``s * tanh(V / s)`` in place, with ``V`` chosen so the weight is unchanged.

    ``s`` is ``scale`` if given, otherwise `initial_scale` of the weight with ``factor``.
    The weight's ``nn.Parameter`` object becomes the latent ``V``, so an optimizer built
    before this call would still hold it; build optimizers after it all the same, since
    the parameter's name changes to ``parametrizations.weight.original``.
    """
    if saturation_of(layer) is not None:
        raise ValueError(f"{type(layer).__name__}.weight is already saturated")
    weight = layer.weight
    s = initial_scale(weight, factor) if scale is None else float(scale)
    if s <= float(weight.detach().abs().max()):
        raise ValueError(f"saturation scale {s} is not above max|W| = {float(weight.detach().abs().max())}")
    module = Saturation(s).to(weight.device)
    module.parameter_order = list(layer._parameters)  # fold_saturation restores it: state-dict key order
    parametrize.register_parametrization(layer, "weight", module)
    return module


def fold_saturation(layer: nn.Module) -> None:
    """Replace the parametrisation by a plain ``weight`` parameter holding ``s * tanh(V / s)``.

    The parameter object (the latent's) stays, so it keeps its optimizer state and
    ``requires_grad``, and ``type(layer)`` is the plain class again. The outputs do not
    change: the folded weight is the very tensor the parametrisation computed.
    """
    saturation = saturation_of(layer)
    if saturation is None:
        return
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    # Removal re-registers ``weight`` after ``bias``; put it back where it was.
    order = getattr(saturation, "parameter_order", [])
    params = dict(layer._parameters)
    layer._parameters.clear()
    for key in [k for k in order if k in params] + [k for k in params if k not in order]:
        layer._parameters[key] = params[key]


def saturated_layers(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer of ``model`` whose weight carries a `Saturation`."""
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if saturation_of(module) is not None:
            yield name, module


def fold_all(model: nn.Module) -> list[str]:
    """`fold_saturation` on every saturated layer of ``model``; returns their names."""
    names = []
    for name, layer in list(saturated_layers(model)):
        fold_saturation(layer)
        names.append(name)
    return names


def _key(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def _owner(key: str) -> str:
    """The name of the module a state-dict key belongs to (a parametrised tensor belongs to its layer)."""
    if key.startswith("parametrizations."):
        return ""
    if ".parametrizations." in key:
        return key.split(".parametrizations.", 1)[0]
    return key.rsplit(".", 1)[0] if "." in key else ""


def fold_state_dict(state_dict: MutableMapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """Turn the saturated layers ``names`` of ``state_dict`` into plain ``<layer>.weight`` entries, in place.

    Returns ``{layer: {"scale": s, "latent": V}}`` for what was folded, so that
    `unfold_state_dict` can restore the latent exactly. Entries keep their position,
    so the result reads like a plain model's state dict. Layers not in the saturated
    form are left alone.
    """
    saved: dict[str, dict[str, Tensor]] = {}
    replace: dict[str, tuple[str, Tensor]] = {}
    for name in names:
        latent_key, scale_key = _key(name, LATENT_KEY), _key(name, SCALE_KEY)
        if latent_key not in state_dict or scale_key not in state_dict:
            continue
        latent, scale = state_dict[latent_key], state_dict[scale_key]
        replace[latent_key] = (_key(name, "weight"), saturate(latent, scale.to(latent.dtype)).detach())
        saved[name] = {"scale": scale.detach().clone(), "latent": latent.detach()}
    if not replace:
        return saved
    # The plain weight goes where a plain layer has it: before the layer's other entries.
    drop = {_key(name, SCALE_KEY) for name in saved} | set(replace)
    first: dict[str, str] = {}
    for key in state_dict:
        owner = _owner(key)
        if owner in saved and owner not in first:
            first[owner] = key
    insert_before = {first[name]: replace[_key(name, LATENT_KEY)] for name in saved}
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key in insert_before:
            weight_key, weight = insert_before[key]
            state_dict[weight_key] = weight
        if key not in drop:
            state_dict[key] = value
    return saved


def unfold_state_dict(
    state_dict: MutableMapping[str, Any],
    names: Sequence[str],
    saved: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
    factor: float = DEFAULT_SATURATION_SCALE,
) -> list[str]:
    """Turn plain ``<layer>.weight`` entries of the layers ``names`` back into the saturated form, in place.

    The scale comes from ``saved`` (what `fold_state_dict` returned), or for a layer it
    lacks, from `initial_scale` of the stored weight with ``factor`` (a plain float
    checkpoint). The latent is ``saved``'s own when it still folds to the stored weight
    (exact, even where ``atanh`` is ill-conditioned), otherwise `desaturate` of the
    weight. Returns the names of the layers whose scale was chosen afresh.
    """
    saved = saved or {}
    fresh = []
    for name in names:
        weight_key = _key(name, "weight")
        if weight_key not in state_dict or _key(name, LATENT_KEY) in state_dict:
            continue
        weight = state_dict.pop(weight_key)
        entry = saved.get(name)
        if entry is not None:
            scale = torch.as_tensor(entry["scale"], dtype=torch.float32).reshape(())
        else:
            scale = torch.tensor(initial_scale(weight, factor), dtype=torch.float32)
            fresh.append(name)
        s = scale.to(device=weight.device, dtype=weight.dtype)
        latent = None if entry is None else entry.get("latent")
        if latent is not None:
            latent = latent.to(device=weight.device, dtype=weight.dtype)
            folded = saturate(latent, s)
            if latent.shape != weight.shape or not torch.allclose(folded, weight, rtol=1e-5, atol=1e-7 * float(s)):
                latent = None  # the weight was changed after saving: it is the truth
        state_dict[_key(name, LATENT_KEY)] = desaturate(weight, s) if latent is None else latent
        state_dict[_key(name, SCALE_KEY)] = scale.to(weight.device)
    return fresh
