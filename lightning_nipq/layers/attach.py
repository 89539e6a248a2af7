"""Attaching quantizers to the layers of a model, and taking them off again. Plain torch."""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn

from lightning_nipq.layers.activation_products import (
    SIDES,
    ActivationProduct,
    empty_integer_product,
    install_product_quantizers,
    is_product,
    product_to_float,
    quantize_product,
)
from lightning_nipq.layers.attention import (
    PRODUCTS,
    PROJECTIONS,
    SplitMultiheadAttention,
    attention_modules,
    split_attention_undoably,
)
from lightning_nipq.layers.forms import check_saved_quantizer, is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import kind_of, supported_names
from lightning_nipq.layers.model_walk import check_patterns, matches, named_layers, plan_layers
from lightning_nipq.layers.restore_point import restore_point
from lightning_nipq.layers.tensor_lifting import (
    lift_learned_tensors_undoably,
    liftable_tensors,
    lifted_name,
    lower_learned_tensors,
)
from lightning_nipq.layers.tied_weights import check_tied_ranges, share_weight_parameters, tied_groups
from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.quant.granularity import is_group_size
from lightning_nipq.quant.methods import QuantizerFactory
from lightning_nipq.quant.nipq_quantizer import NIPQConfig


@dataclass
class AttachResult:
    """What `attach_quantizers` did: the quantized layers and everything it left alone, with why."""

    quantized: list[str] = field(default_factory=list)
    #: Layers whose input stays float by ``float_input_layers`` or ``quantize_inputs=False``.
    float_input: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Whether calibration decides which inputs stay float (those fed the model's own input).
    float_input_by_data_flow: bool = False
    #: The activation products quantized on both operands (``quantize_products=True``).
    products: list[str] = field(default_factory=list)


def attach_quantizers(
    model: nn.Module,
    config: Optional[QuantizerFactory] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    float_input_layers: Optional[Sequence[str]] = None,
    quantize_inputs: bool = True,
    quantize_products: bool = False,
) -> AttachResult:
    """Quantize the weight and input of every supported layer of ``model``, in place.

    ``config`` builds the quantizers: `lightning_nipq.NIPQConfig` (the default) NIPQ ones,
    whose weights start with ``alpha = max|W|``, and `lightning_nipq.LSQConfig` LSQ ones.
    Input quantizers start uncalibrated: they pass their input through until
    `lightning_nipq.layers.calibrate_activations` (or their ``set_range``) gives them a
    range and a sign.

    ``float_input_layers`` names the layers whose input stays float. By default data flow
    decides, at calibration: every layer gets an input quantizer, and a layer that receives
    one of the model's own input tensors (or a view of one) on the first calibration batch
    keeps its input float (`lightning_nipq.quant.RangeObserver.note_model_inputs`), while a
    layer fed by an embedding or any other layer is quantized. ``quantize_inputs=False``
    quantizes weights only: no layer gets an input quantizer.

    ``quantize_products=True`` also quantizes both operands of the activation-by-activation
    products inside attention (``Q @ K^T`` and ``weights @ V``), for all-integer attention:
    every split ``nn.MultiheadAttention`` computes them through two
    `lightning_nipq.layers.ActivationProduct` modules (``<attention>.score_product`` and
    ``<attention>.value_product``), and every `ActivationProduct` of the model (one a model
    of your own calls) gets an input quantizer on each operand, selected by include/exclude
    like a layer. Their bits count in the input budget.

    Every layer's ranges are sized (``config.weight_granularity``) before any layer changes:
    a granularity that does not fit some layer raises a `ValueError` naming it, with the model
    untouched.
    """
    config = config or NIPQConfig()
    float_input_layers = check_patterns("float_input_layers", float_input_layers)
    check_input_choice(quantize_inputs, float_input_layers)
    check_products_choice(quantize_products, quantize_inputs)
    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)
    undo_split = split_attention_undoably(model, _attention_to_quantize(model, include, exclude, quantize_products))
    undo_products = _add_products_undoably(model, include, exclude) if quantize_products else (lambda: None)
    undo_lift = lift_learned_tensors_undoably(model, _tensors_to_quantize(model, config, include, exclude))
    try:
        result = _attach(model, config, include, exclude, float_input_layers, quantize_inputs)
        if quantize_products:
            for name, product in _products_to_quantize(model, include, exclude):
                quantize_product(product, config)
                result.products.append(name)
            if not result.products:
                warnings.warn(
                    f"quantize_products=True, but {type(model).__name__} has no activation product to quantize: no "
                    "nn.MultiheadAttention, no transformers attention module, no ActivationProduct (or include/exclude "
                    "left them out). Attention written with torch.matmul or scaled_dot_product_attention stays float; "
                    "call lightning_nipq.layers.ActivationProduct modules there instead",
                    stacklevel=2,
                )
    except BaseException:
        undo_lift()  # the model is left as it was
        undo_products()
        undo_split()
        raise
    disable_transformer_fast_path(model)
    return result


def _selector(include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> Callable[[str], bool]:
    def selected(name: str) -> bool:
        return (include is None or matches(name, include)) and not matches(name, exclude or [])

    return selected


def _attention_to_quantize(
    model: nn.Module, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]], products: bool = False
) -> list[str]:
    """The ``nn.MultiheadAttention`` modules to split: those with a projection (or, with ``products``, a product) that include/exclude select."""
    selected = _selector(include, exclude)
    parts = PROJECTIONS + (PRODUCTS if products else ())
    return [name for name in attention_modules(model) if name and any(selected(f"{name}.{p}") for p in parts)]


#: The module that computes transformers' attention through products (it imports transformers: loaded on first use).
_TRANSFORMERS_ATTENTION = "lightning_nipq.layers.transformers_attention"


def _dispatches_transformers_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers attention module that looks its attention function up by name (BERT, GPT-2, ViT...)."""
    cls = type(module)
    forward = getattr(cls, "forward", None)
    # transformers wraps some forwards in decorators (deprecated arguments): read the function they wrap.
    code = getattr(inspect.unwrap(forward), "__code__", None) if callable(forward) else None
    return (
        cls.__module__.startswith("transformers.")
        and hasattr(module, "config")
        and code is not None
        and "ALL_ATTENTION_FUNCTIONS" in code.co_names
    )


def product_holders(model: nn.Module) -> list[tuple[list[str], nn.Module]]:
    """``([name, *aliases], module)`` of every attention module that can compute its products through `ActivationProduct` children.

    A split ``nn.MultiheadAttention``, and a transformers attention module whose attention
    function is looked up by name (`lightning_nipq.layers.transformers_attention`).
    """
    return named_layers(model, lambda m: isinstance(m, SplitMultiheadAttention) or _dispatches_transformers_attention(m))


def _holds_products(module: nn.Module) -> bool:
    return all(name in module._modules for name in PRODUCTS)


def _add_products(module: nn.Module) -> None:
    if isinstance(module, SplitMultiheadAttention):
        module.add_products()
    else:
        # The model's class is imported already, and with it transformers: importing the module costs nothing more.
        importlib.import_module(_TRANSFORMERS_ATTENTION).use_products(module)


def _remove_products(module: nn.Module) -> None:
    if isinstance(module, SplitMultiheadAttention):
        module.remove_products()
    else:
        importlib.import_module(_TRANSFORMERS_ATTENTION).drop_products(module)


def _add_products_undoably(model: nn.Module, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> Callable[[], None]:
    """Give every attention module whose products include/exclude select its two products; returns the undo."""
    selected = _selector(include, exclude)
    added = []
    for names, attention in product_holders(model):
        if not _holds_products(attention) and any(selected(f"{names[0]}.{p}") for p in PRODUCTS):
            _add_products(attention)
            added.append(attention)

    def undo() -> None:
        for attention in added:
            _remove_products(attention)

    return undo


def _products_to_quantize(
    model: nn.Module, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]
) -> list[tuple[str, nn.Module]]:
    """The float activation products to quantize: those include/exclude select by name."""
    selected = _selector(include, exclude)
    return [(names[0], m) for names, m in named_layers(model, lambda m: type(m) is ActivationProduct) if selected(names[0])]


def check_products_choice(quantize_products: Any, quantize_inputs: bool) -> None:
    """Raise a `ValueError` unless ``quantize_products`` is a bool that ``quantize_inputs`` does not contradict."""
    if not isinstance(quantize_products, bool):
        raise ValueError(f"quantize_products must be True or False, got {quantize_products!r}")
    if quantize_products and not quantize_inputs:
        raise ValueError(
            "quantize_products=True quantizes the activations multiplied inside attention, but quantize_inputs=False "
            "leaves every activation float (weights only); pass one or the other"
        )


def _tensors_to_quantize(
    model: nn.Module, config: QuantizerFactory, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]
) -> list[tuple[str, str]]:
    """The learned tensors to lift into layers: those include/exclude select by their own name (``embeddings.cls_token``).

    Ranges per group of inputs need an ``(outputs, inputs)`` weight, which a learned tensor is
    not; under a group size they stay float parameters of their module.
    """
    if is_group_size(config.weight_granularity):
        return []

    def selected(name: str) -> bool:
        return (include is None or matches(name, include)) and not matches(name, exclude or [])

    return [(module, p) for module, p in liftable_tensors(model) if selected(lifted_name(module, p))]


def _attach(
    model: nn.Module,
    config: QuantizerFactory,
    include: Optional[Sequence[str]],
    exclude: Optional[Sequence[str]],
    float_input_layers: Optional[Sequence[str]],
    quantize_inputs: bool,
) -> AttachResult:
    targets, skipped = plan_layers(model, include, exclude)
    if not targets:
        supported = supported_names()
        detail = "; ".join(f"{n}: {r}" for n, r in skipped[:5])
        raise ValueError(
            f"{type(model).__name__} has no layer to quantize (supported: {supported})"
            + (f"; left out: {detail}" if detail else "")
            + ". Check include/exclude or add supported layers."
        )
    for name, layer in targets:
        kind = kind_of(layer)
        assert kind is not None  # plan_layers returns quantizable layers only
        try:
            kind.layer_range_shape(layer, config.weight_granularity)
        except ValueError as e:
            raise ValueError(f"layer {name!r} ({kind.name}): {e}") from None
    check_tied_ranges(targets, config.weight_granularity)
    if not quantize_inputs:
        float_inputs = {name for name, _ in targets}
    elif float_input_layers is None:
        float_inputs = set()  # decided by data flow at calibration
    else:
        float_inputs = set(float_input_layers)
        unknown = float_inputs - {n for n, _ in targets}
        if unknown:
            raise ValueError(f"float_input_layers {sorted(unknown)} are not among the quantized layers")
    result = AttachResult(skipped=skipped)
    shared: dict[int, BaseQuantizer] = {}  # a weight held by several layers (tied) gets one quantizer
    for name, layer in targets:
        kind = kind_of(layer)
        assert kind is not None  # plan_layers returns quantizable layers only
        kind.quantize(layer, config, float_input=name in float_inputs, shared=shared)
        if name in float_inputs:
            result.float_input.append(name)
        elif quantize_inputs and float_input_layers is None and layer.input_quantizer is not None:
            layer.input_quantizer.stays_float = None
        result.quantized.append(name)
    result.float_input_by_data_flow = quantize_inputs and float_input_layers is None
    return result


def check_input_choice(quantize_inputs: Any, float_input_layers: Optional[Sequence[str]]) -> None:
    """Raise a `ValueError` unless ``quantize_inputs`` is a bool that ``float_input_layers`` does not contradict."""
    if not isinstance(quantize_inputs, bool):
        raise ValueError(f"quantize_inputs must be True or False, got {quantize_inputs!r}")
    if not quantize_inputs and float_input_layers is not None:
        raise ValueError(
            "float_input_layers names layers whose input stays float, but quantize_inputs=False already leaves every "
            "input float; pass one or the other"
        )


def disable_transformer_fast_path(model: nn.Module) -> None:
    """Keep ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` from bypassing quantized, integer or split layers.

    In eval, the layer may run one fused kernel that reads the attention's packed weights and
    ``linear1``/``linear2`` weights directly and skips their forward, and so our quantizers;
    the encoder may turn a padded batch into a nested tensor for that kernel. The two flags set
    here are only read by those fast-path checks.
    """

    def holds_ours(module: nn.Module) -> bool:
        return any(is_quantized(m) or is_integer(m) or isinstance(m, SplitMultiheadAttention) for m in module.modules())

    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and holds_ours(module):
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder) and holds_ours(module):
            module.use_nested_tensor = False


def detach_quantizers(model: nn.Module) -> None:
    """Turn every fake-quantized and integer layer back into a plain float layer, in place.

    A fake-quantized layer keeps its float weight and loses its quantizers (undoing
    `attach_quantizers`). An integer layer gets a float32 weight holding its dequantized
    weight (codes times steps) and keeps its bias: the float model's weights are the
    quantized values, while its inputs are no longer quantized, so its outputs differ from
    the integer model's by the input rounding. A `lightning_nipq.layers.FoldedBatchNorm`
    stays (an identity: the BatchNorm is part of the dequantized weight and bias). Layers
    that shared one weight (tied) share one float Parameter again, and learned tensors lifted
    into layers (`lightning_nipq.layers.learned_tensors`) go back into their modules as plain
    parameters. The model can then be quantized afresh with `attach_quantizers`.
    """
    layers = named_layers(model, lambda m: is_quantized(m) or is_integer(m))
    # Tied integer layers share codes; give them one Parameter afterwards, as the float model had.
    ties = tied_groups([(names[0], layer) for names, layer in layers if is_integer(layer)])
    for _, layer in layers:
        kind = kind_of(layer)
        assert kind is not None
        kind.to_float(layer, dequantize=True)
    share_weight_parameters([[layer for _, layer in group] for group in ties])
    for _, product in named_layers(model, is_product):
        product_to_float(product)
    for _, attention in product_holders(model):
        if _holds_products(attention):
            _remove_products(attention)  # the attention's own products: torch's or transformers' kernels again
    lower_learned_tensors(model)  # learned tensors become their modules' parameters again


#: The key suffixes that tell a saved activation product's form: its left operand's quantizer, or its integer settings.
_SAVED_PRODUCT_FORMS = ((".left_quantizer._extra_state", "fake"), (".settings", "integer"))


def give_saved_products_undoably(model: nn.Module, state_dict: Mapping[str, Any]) -> Callable[[], None]:
    """Give ``model`` the activation products ``state_dict`` holds, each in its saved form; returns the undo.

    A split attention whose products the state dict holds (keys under
    ``<attention>.score_product.``) gets its two products first. Then every `ActivationProduct`
    of the model takes the saved form: fake-quantized with quantizers rebuilt from their saved
    settings, integer with placeholder state (the load fills it), or float where the state
    dict holds none. The saved quantizers are all rebuilt and checked before any product changes.

    Raises:
        ValueError: a saved product quantizer's state is invalid (the model is unchanged then).
    """
    keys = list(state_dict)
    added = []
    for names, attention in product_holders(model):
        prefixes = tuple(f"{n}.{p}." for n in names for p in PRODUCTS)
        if not _holds_products(attention) and any(k.startswith(prefixes) for k in keys):
            _add_products(attention)
            added.append(attention)
    try:
        plan: list[tuple[nn.Module, Optional[str], Any]] = []
        for names, product in named_layers(model, is_product):
            form = next(
                (form for suffix, form in _SAVED_PRODUCT_FORMS for n in names if f"{n}{suffix}" in state_dict),
                None,
            )
            built = None
            if form == "fake":
                prefix = next(f"{n}." for n in names if f"{n}.left_quantizer._extra_state" in state_dict)
                built = tuple(check_saved_quantizer(state_dict, f"{prefix}{side}_quantizer.", role="input") for side in SIDES)
                if any(q is None for q in built):
                    raise ValueError(f"{prefix}right_quantizer._extra_state is missing: the product's two operands are saved together")
            plan.append((product, form, built))
    except BaseException:
        for attention in added:
            _remove_products(attention)
        raise
    restores = [restore_point(product) for product, _, _ in plan]
    for product, form, built in plan:
        if type(product) is not ActivationProduct:
            product_to_float(product)
        if form == "fake":
            install_product_quantizers(product, *built)
        elif form == "integer":
            empty_integer_product(product)

    def undo() -> None:
        for restore in restores:
            restore()
        for attention in added:
            _remove_products(attention)

    return undo
