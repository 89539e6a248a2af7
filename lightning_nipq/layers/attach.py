"""Attaching quantizers to the layers of a model, and taking them off again. Plain torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

from lightning_nipq.layers.attention import PROJECTIONS, SplitMultiheadAttention, attention_modules, split_attention_undoably
from lightning_nipq.layers.forms import is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import kind_of, supported_names
from lightning_nipq.layers.model_walk import check_patterns, matches, named_layers, plan_layers
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


def attach_quantizers(
    model: nn.Module,
    config: Optional[QuantizerFactory] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    float_input_layers: Optional[Sequence[str]] = None,
    quantize_inputs: bool = True,
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

    Every layer's ranges are sized (``config.weight_granularity``) before any layer changes:
    a granularity that does not fit some layer raises a `ValueError` naming it, with the model
    untouched.
    """
    config = config or NIPQConfig()
    float_input_layers = check_patterns("float_input_layers", float_input_layers)
    check_input_choice(quantize_inputs, float_input_layers)
    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)
    undo_split = split_attention_undoably(model, _attention_to_quantize(model, include, exclude))
    undo_lift = lift_learned_tensors_undoably(model, _tensors_to_quantize(model, config, include, exclude))
    try:
        result = _attach(model, config, include, exclude, float_input_layers, quantize_inputs)
    except BaseException:
        undo_lift()  # the model is left as it was
        undo_split()
        raise
    disable_transformer_fast_path(model)
    return result


def _attention_to_quantize(model: nn.Module, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> list[str]:
    """The ``nn.MultiheadAttention`` modules to split: those with a projection that include/exclude select."""

    def selected(name: str) -> bool:
        return (include is None or matches(name, include)) and not matches(name, exclude or [])

    return [name for name in attention_modules(model) if name and any(selected(f"{name}.{p}") for p in PROJECTIONS)]


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
    lower_learned_tensors(model)  # learned tensors become their modules' parameters again
