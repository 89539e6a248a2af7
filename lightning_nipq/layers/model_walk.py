"""Walking a model: its quantized, integer and BatchNorm layers, its quantizers, and which layers to quantize.

Every other module finds layers through these functions. A layer reachable under several
names (a shared or tied module) is one layer: it is listed once, under its first name in
registration order, and the alias-aware walk also returns its other names.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import nn

from lightning_nipq.layers.activation_products import SIDES, is_integer_product, is_quantized_product
from lightning_nipq.layers.attention import SplitMultiheadAttention
from lightning_nipq.layers.forms import is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import LAYER_KINDS, kind_of, supported_names
from lightning_nipq.layers.tensor_lifting import liftable_tensors, lifted_name
from lightning_nipq.quant.base_quantizer import BaseQuantizer


def named_layers(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> list[tuple[list[str], nn.Module]]:
    """``([name, *aliases], module)`` for every module that satisfies ``predicate``, each once, in registration order."""
    found: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if predicate(module):
            found.setdefault(id(module), ([], module))[0].append(name)
    return list(found.values())


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every fake-quantized layer, each once, in registration order."""
    for names, layer in named_layers(model, is_quantized):
        yield names[0], layer


def integer_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every integer layer, each once, in registration order."""
    for names, layer in named_layers(model, is_integer):
        yield names[0], layer


def quantized_products(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, product)`` for every fake-quantized activation product, each once, in registration order."""
    for names, product in named_layers(model, is_quantized_product):
        yield names[0], product


def integer_products(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, product)`` for every integer activation product, each once, in registration order."""
    for names, product in named_layers(model, is_integer_product):
        yield names[0], product


def product_quantizers(product: nn.Module) -> tuple[BaseQuantizer, BaseQuantizer]:
    """A fake-quantized product's ``(left, right)`` operand quantizers."""
    return product.left_quantizer, product.right_quantizer


def quantizers(model: nn.Module) -> Iterator[tuple[str, BaseQuantizer]]:
    """``(name, quantizer)`` for every quantizer, each once: the layers' (weights before inputs within a layer), then the activation products' (left before right).

    Layers with one weight (tied, see `lightning_nipq.layers.tied_weights`) share one weight
    quantizer: it is listed once, under the first layer's name.
    """
    seen: set[int] = set()
    for name, layer in quantized_layers(model):
        for role, quantizer in (("weight", layer.weight_quantizer), ("input", layer.input_quantizer)):
            if quantizer is not None and id(quantizer) not in seen:
                seen.add(id(quantizer))
                yield f"{name}.{role}_quantizer", quantizer
    for name, product in quantized_products(model):
        for side, quantizer in zip(SIDES, product_quantizers(product)):
            yield f"{name}.{side}_quantizer", quantizer


def _tracks_statistics(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.running_mean is not None
        and module.running_var is not None
    )


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (1d, 2d, 3d, sync) of ``model`` that keeps running statistics, once each."""
    return [m for _, m in named_layers(model, _tracks_statistics)]  # type: ignore[misc]


def require_integer_model(model: nn.Module, action: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``model`` holds integer layers and no fake quantizer (before ``action``)."""
    fake = [name for name, _ in quantized_layers(model)] + [name for name, _ in quantized_products(model)]
    if fake:
        raise error(f"{fake[:5]} still hold fake quantizers; call hard_quantize(model) before {action}")
    if not any(True for _ in integer_layers(model)):
        raise error(f"{type(model).__name__} has no integer layer; call hard_quantize(model) before {action}")


# ---------------------------------------------------------------------- which layers to quantize
def check_patterns(name: str, patterns: Any) -> Optional[list[str]]:
    """``patterns`` as a list of module-name patterns (None stays None), or a `ValueError` naming ``name``."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{name} must be a list of module-name patterns (shell-style, such as 'encoder.*'), got {patterns!r}")
    return list(patterns)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether the module name matches any shell-style pattern."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def matrix_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own parameters of two or more dimensions: what makes it a weight-bearing layer."""
    return [(name, p) for name, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def unquantizable_reason(module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """Why a module that holds a matrix-like weight is not quantized, or None if it is a target (or holds none)."""
    if isinstance(module, SplitMultiheadAttention):
        # Its projections are layers of their own; what it holds itself are the optional key and value biases.
        return "bias_k and bias_v (add_bias_kv=True) are added to the keys and values in float" if module.bias_k is not None else None
    if isinstance(parent, nn.MultiheadAttention) and not isinstance(parent, SplitMultiheadAttention):
        return "called by nn.MultiheadAttention through F.multi_head_attention_forward, not through its forward"
    if type(module) is nn.MultiheadAttention:
        return (
            "nn.MultiheadAttention left whole (include/exclude left out its projections q_proj, k_proj, v_proj and "
            "out_proj, into which attach_quantizers splits it to quantize them)"
        )
    if isinstance(module, nn.MultiheadAttention):
        return (
            f"{type(module).__name__} subclasses nn.MultiheadAttention and may override its forward, so it is not split "
            "into quantizable projections; write its projections as nn.Linear layers to quantize them"
        )
    kind = kind_of(module)
    if kind is not None:
        return kind.refusal(module) if kind.form_of(module) == "float" else None
    own = matrix_parameters(module)
    if not own:
        return None
    names = ", ".join(name for name, _ in own)
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return (
            f"recurrent layers are not supported: {type(module).__name__} multiplies its weights ({names}) inside torch's "
            "recurrent kernel, not through a layer's forward; write the cell's gates as nn.Linear layers to quantize "
            "them, or keep it in float"
        )
    if isinstance(module, tuple(kind.float_type for kind in LAYER_KINDS)):
        return f"{type(module).__name__} subclasses a supported layer and may override its forward"
    if parent is None:
        return (
            f"the model's own learned tensors ({names}) stay float: those of its submodules become quantized layers "
            "(lightning_nipq.layers.learned_tensors), the model's own class is not changed; hold them in a submodule "
            "to quantize them"
        )
    return (
        f"{type(module).__name__}'s learned tensors ({names}) stay float: include/exclude left them out (they are "
        "selected by their own names, such as '<module>.<tensor>'), or weight_granularity is a group size, which needs "
        f"(outputs, inputs) weights. Its layers, if any, are quantized as {supported_names()}; "
        "lightning_nipq.layers.register_layer_kind adds a kind"
    )


def _parents(model: nn.Module) -> dict[int, nn.Module]:
    return {id(child): module for module in model.modules() for child in module.children()}


def plan_layers(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Float layers to quantize, in registration order, and ``(name, reason)`` for what is left out.

    ``include``/``exclude`` are shell-style patterns on module names (``"encoder.*"``).
    A pattern that matches no module is an error, since it is almost always a typo.

    Raises:
        ValueError: a pattern matches nothing, or a layer is quantized already.
    """
    include = check_patterns("include", include)
    exclude = check_patterns("exclude", exclude) or []
    named = dict(model.named_modules())
    # Learned tensors left as parameters (excluded) are selected by their own names too.
    selectable = [*named, *(lifted_name(module, p) for module, p in liftable_tensors(model))]
    for pattern in (include or []) + exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in selectable if name):
            raise ValueError(
                f"pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {[n for n in list(named)[1:6]]}"
            )
    parents = _parents(model)
    targets: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []
    for name, module in named.items():
        if not name:
            continue
        if is_quantized(module):
            raise ValueError(f"{name} is already quantized; build the model afresh or call detach_quantizers first")
        if is_integer(module):
            raise ValueError(
                f"{name} is an integer layer, whose float weights are gone; build the model afresh (or load a float "
                "checkpoint into a fresh instance) to quantize it again, or call detach_quantizers(model) to quantize "
                "float layers holding the dequantized weights"
            )
        reason = unquantizable_reason(module, parents.get(id(module)))
        if reason is not None:
            skipped.append((name, reason))
        elif kind_of(module) is None:
            continue
        elif include is not None and not matches(name, include):
            skipped.append((name, "not matched by include"))
        elif matches(name, exclude):
            skipped.append((name, "matched by exclude"))
        else:
            targets.append((name, module))
    return targets, skipped


#: How `left_in_float` names the model itself, when it holds a matrix-like parameter of its own.
MODEL_ITSELF = "(the model)"


def _float_layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, why, module)`` for every module holding a matrix-like weight that is neither quantized nor integer."""
    parents = _parents(model)
    out: list[tuple[str, str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_quantized(module) or is_integer(module) or isinstance(module, BaseQuantizer) or (not name and kind_of(module) is not None):
            continue  # the model itself is never a target: a bare layer is not listed; a quantizer's ranges are not weights
        reason = unquantizable_reason(module, parents.get(id(module)))
        if reason is None and matrix_parameters(module):
            reason = "excluded (include/exclude)"
        if reason is not None and (name or matrix_parameters(module)):
            out.append((name or MODEL_ITSELF, reason, module))
    return out


def left_in_float(model: nn.Module) -> list[tuple[str, str]]:
    """Modules holding a matrix-like weight (parameters of two or more dimensions) that are neither quantized nor integer, with why.

    The model itself is listed as ``"(the model)"`` when it holds such a parameter of its own
    (a learned position tensor).
    """
    return [(name, reason) for name, reason, _ in _float_layers(model)]


def float_weight_numel(model: nn.Module) -> int:
    """Elements of the matrix-like parameters that the modules of `left_in_float` hold, each parameter counted once."""
    seen: set[int] = set()
    total = 0
    for _, _, module in _float_layers(model):
        for _, p in matrix_parameters(module):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
