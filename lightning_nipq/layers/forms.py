"""The forms a quantizable layer takes, and `LayerKind`, which moves a layer between them.

A layer is float (the user's ``nn.Linear``), fake-quantized (a quantizer on its weight and
usually one on its input, the float maths on their outputs) or integer (weight codes and
scales; inputs turned into codes; the layer's maths computed exactly on the codes before
one rescale). A layer changes form by changing its class in place to a subclass of its
float class. Changing the class rather than wrapping the layer keeps every parameter name
(``conv.weight`` stays ``conv.weight``), keeps ``isinstance(layer, nn.Conv2d)`` true, and
keeps a layer reachable under two names one object.

The forms here are generic. A layer kind supplies its own maths through two methods, which
both of its forms share (see `lightning_nipq.layers.torch_layers`):

* ``apply_weight(input, weight, bias)``: the layer's own computation with the given weight;
* ``reduction_size()``: how many products are summed into one output element;

and ``per_output_channel(t)``, which shapes a per-output-channel vector to broadcast against
the output. Integer exactness: every product of two codes and every partial sum is an
integer of magnitude at most ``K * n_x * n_w`` (``K = reduction_size()``). Float32 holds every
integer up to ``2**24`` exactly and float64 up to ``2**53``, so running the layer's own
kernel on codes in the narrowest of the two that holds the bound is integer arithmetic. On
CUDA, float32 kernels may use TF32, so float64 is used there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from lightning_nipq.quant.base_quantizer import DAMAGED_STATE_FIX, BaseQuantizer
from lightning_nipq.quant.codes import check_bit_width, code_dtype, num_levels
from lightning_nipq.quant.fake_quant import code_grid, integer_codes
from lightning_nipq.quant.fused_fake_quant import recomputed_outputs
from lightning_nipq.quant.granularity import (
    Granularity,
    RangeShape,
    check_granularity,
    grouped_view,
    is_group_size,
    range_shape_for,
)
from lightning_nipq.quant.methods import QuantizerFactory, quantizer_from_state

FLOAT32_EXACT_LIMIT = 2**24
FLOAT64_EXACT_LIMIT = 2**53
#: The state of an integer layer besides its float parameters (the bias).
INTEGER_STATE_KEYS = ("weight_codes", "weight_scale", "input_alpha", "_extra_state")
#: The attribute marking integer layers whose weight was one tensor (see `lightning_nipq.layers.tied_weights`).
WEIGHT_TIE_ATTRIBUTE = "_weight_tie"


class QuantizedLayerMixin:
    """Fake-quantized form: quantizes the input and the weight, then runs the layer's own maths.

    The kind's maths mixin provides ``apply_weight`` and ``reduction_size``.
    """

    weight: Tensor
    bias: Optional[Tensor]
    weight_quantizer: BaseQuantizer
    input_quantizer: Optional[BaseQuantizer]

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # Further arguments (a transposed convolution's ``output_size``) go to the layer's maths unchanged.
        if _INTEGER_ARITHMETIC.active and not self.training and uses_integer_arithmetic(type(self)):
            # What the integer form will compute, to the bit: see `integer_arithmetic`.
            with torch.no_grad():
                return integer_output(self, input, integer_values(self), args, kwargs)
        # The quantized input (and weight) the maths keep for backward are computed again there.
        with recomputed_outputs():
            unused: Optional[Tensor] = None
            quantizer = self.input_quantizer
            if quantizer is not None and quantizer.passes_through and not input.requires_grad:
                # Data (the model's input) that stays float or is being measured: kept out of
                # autograd, or backward would compute the gradient with respect to it, which a
                # float model never does (for a first convolution, more than its forward costs).
                # The quantizer's parameters take their zero part through the weight instead.
                input = quantizer.passed_through(input)
                unused = quantizer.zero_weighted_parameters() if torch.is_grad_enabled() else None
            elif quantizer is not None:
                input = quantizer(input)
            weight = self.weight_quantizer(self.weight)
            if unused is not None:
                weight = weight + unused.to(weight.dtype)
            output = self.apply_weight(input, weight, self.bias, *args, **kwargs)  # type: ignore[attr-defined]
        if self.weight_quantizer.macs == 0:
            self.weight_quantizer.macs = layer_macs(self, input, output)
        return output

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torch loads the layer's weight before its quantizers: check their saved states
        # first, so that a refused quantizer leaves the whole layer as it was.
        try:
            check_saved_quantizer(state_dict, prefix + "weight_quantizer.", role="weight")
            check_saved_quantizer(state_dict, prefix + "input_quantizer.", role="input")
        except ValueError as e:
            raise ValueError(f"{e}. {DAMAGED_STATE_FIX}") from e
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def layer_macs(layer: nn.Module, input: Tensor, output: Tensor) -> int:
    """The multiply-accumulates of one call of ``layer`` (for the BOPs budget).

    The kind's maths mixin may say it (``multiply_accumulates(input, output)``: 0 for a lookup
    table, one product per input element and kernel tap for a transposed convolution);
    otherwise every output element sums ``reduction_size()`` products.
    """
    count = getattr(layer, "multiply_accumulates", None)
    if count is not None:
        return int(count(input, output))
    return int(output.numel()) * layer.reduction_size()  # type: ignore[operator]


def check_saved_quantizer(state_dict: Mapping[str, Any], prefix: str, role: str) -> Optional[BaseQuantizer]:
    """The quantizer saved under ``prefix`` (``"<layer>.weight_quantizer."``), rebuilt and checked; None if none is saved.

    Its ``_extra_state`` (`BaseQuantizer.check_state`), a weight quantizer's signed codes of at
    least 2 bits (`BaseQuantizer.check_weight_config`) and its parameters
    (`BaseQuantizer.check_saved_parameters`) are checked; the parameters are not loaded.

    Raises:
        ValueError: naming the key and the problem.
    """
    key = prefix + "_extra_state"
    if key not in state_dict:
        return None
    try:
        quantizer = quantizer_from_state(state_dict[key])
        if role == "weight":
            quantizer.check_weight_config(quantizer.config())
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e
    quantizer.check_saved_parameters(state_dict, prefix, quantizer.config())
    return quantizer


class IntegerLayerMixin:
    """Integer form: state in buffers (``weight_codes``, ``weight_scale``, ``input_alpha``) and ``_extra_state``.

    The kind's maths mixin provides ``apply_weight``, ``reduction_size`` and ``per_output_channel``.
    """

    weight_codes: Tensor
    weight_scale: Tensor  # one step per range: shape () per tensor, the range shape otherwise
    input_alpha: Tensor
    bias: Optional[Tensor]
    weight_bits: int
    input_bits: Optional[int]
    input_signed: bool
    input_numel: int  # elements of the input in the calibration batch, its weight in average bits
    weight_granularity: Granularity
    #: The input codes' zero point (unsigned codes only; 0: none). The layer multiplies the
    #: centred codes ``q - z``, integers whose zero is the real 0.0, so zero padding stays exact.
    input_zero_point: int = 0

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (codes times scale), for code that reads ``layer.weight``."""
        return self.dequantized_weight(torch.float32)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """Codes times their range's step, in ``dtype``, shaped as the float weight."""
        codes = grouped_view(self.weight_codes.to(dtype), self.weight_granularity)
        return (codes * self.weight_scale.to(dtype)).reshape(self.weight_codes.shape)

    @property
    def float_input(self) -> bool:
        """True for a layer whose input is not quantized (by default the first layer)."""
        return self.input_bits is None

    def input_scale(self) -> Tensor:
        """The step of the input codes, ``input_alpha / n`` (``input_alpha / (N - z)`` with a zero point)."""
        assert self.input_bits is not None
        bits = torch.tensor(float(self.input_bits))
        # code_grid: the same float32 division as the fake quantizer's step.
        return self.input_alpha / code_grid(bits, self.input_signed, self._input_zero_tensor(bits.device))[1]

    def _input_zero_tensor(self, device: torch.device) -> Optional[Tensor]:
        # The zero point as the float tensor the quantizer's formula takes (None: no zero point).
        if not self.input_zero_point:
            return None
        return torch.tensor(float(self.input_zero_point), device=device)

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # Further arguments (a transposed convolution's ``output_size``) go to the layer's maths unchanged.
        return integer_output(
            self,
            input,
            IntegerValues(
                self.weight_codes,
                self.weight_scale,
                self.weight_bits,
                self.weight_granularity,
                self.input_alpha,
                self.input_bits,
                self.input_signed,
                self.input_zero_point,
            ),
            args,
            kwargs,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # torch converts buffers module by module (``model.to``): codes tied to another layer's
        # (`lightning_nipq.layers.tied_weights`) take that layer's converted tensors, staying one.
        tie = self.__dict__.get(WEIGHT_TIE_ATTRIBUTE)
        before = (self._buffers.get("weight_codes"), self._buffers.get("weight_scale"))  # type: ignore[attr-defined]
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        if tie is not None:
            tie.share(self, before)
        return result

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "input_bits": self.input_bits,
            "input_signed": self.input_signed,
            "input_numel": self.input_numel,
            "weight_granularity": self.weight_granularity,
            "input_zero_point": self.input_zero_point,
        }

    def set_extra_state(self, state: Any) -> None:
        settings = check_integer_state(state)
        zero_point = check_input_zero_point(state, settings)
        (
            self.weight_bits,
            self.input_bits,
            self.input_signed,
            self.input_numel,
            self.weight_granularity,
        ) = settings
        self.input_zero_point = zero_point

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torch copies the buffers before it sets the extra state: check both first, so an
        # invalid state never half-loads and no forward ever sees it.
        try:
            settings = check_saved_integer_layer(state_dict, prefix, self.get_extra_state(), getattr(type(self), "layer_kind", None))
        except ValueError as e:
            raise ValueError(f"{e}. {DAMAGED_STATE_FIX}") from e
        # torch copies into the buffer as it is: codes of another width would wrap (int16
        # into int8) or keep the old width. Give the buffer the saved width's type first.
        dtype = code_dtype(settings[0])
        if self.weight_codes.dtype != dtype:
            self.weight_codes = self.weight_codes.to(dtype)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


IntegerSettings = tuple[int, Optional[int], bool, int, Granularity]


def check_integer_state(state: Any, where: str = "") -> IntegerSettings:
    """``(weight_bits, input_bits, input_signed, input_numel, weight_granularity)`` of an integer layer's saved state, checked.

    A state without ``weight_granularity`` (written before there was a choice) is per tensor.

    The one check of these settings, wherever they are read from (``where`` prefixes the
    names in messages: ``"layers[3]."`` for the artifact).

    Raises:
        ValueError: a value is missing, of the wrong type or out of range.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"an integer layer's saved state must be a dict, got {type(state).__name__}")
    weight_bits = check_bit_width(f"{where}weight_bits", state.get("weight_bits"), signed=True)
    input_bits = state.get("input_bits")
    input_signed = state.get("input_signed")
    if not isinstance(input_signed, bool):
        raise ValueError(f"{where}input_signed must be True or False, got {input_signed!r}")
    if input_bits is not None:
        input_bits = check_bit_width(f"{where}input_bits", input_bits, signed=input_signed)
    input_numel = state.get("input_numel")
    # An element count, so within what torch counts in (int64).
    if isinstance(input_numel, bool) or not isinstance(input_numel, int) or not 0 <= input_numel < 2**63:
        raise ValueError(f"{where}input_numel must be a whole number in [0, 2**63), got {input_numel!r}")
    granularity = check_granularity(f"{where}weight_granularity", state.get("weight_granularity", "tensor"))
    return weight_bits, input_bits, input_signed, input_numel, granularity


def check_input_zero_point(state: Mapping[str, Any], settings: IntegerSettings, where: str = "") -> int:
    """The input zero point of an integer layer's saved state (``input_zero_point``), checked against its checked ``settings``.

    Absent (a state written before zero points existed) means 0. Otherwise a whole number
    ``0 <= z < 2**input_bits - 1``, and nonzero only for a quantized, unsigned input.

    Raises:
        ValueError: naming ``{where}input_zero_point`` and the problem.
    """
    _, input_bits, input_signed, _, _ = settings
    value = state.get("input_zero_point", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}input_zero_point must be a whole number >= 0, got {value!r}")
    if value == 0:
        return 0
    if input_bits is None or input_signed:
        what = "its input stays float" if input_bits is None else "its input codes are signed"
        raise ValueError(f"{where}input_zero_point is {value}, but {what}: only unsigned input codes have a zero point")
    top = num_levels(input_bits, False)
    if value >= top:
        raise ValueError(
            f"{where}input_zero_point is {value}, outside [0, {top - 1}]: {input_bits}-bit unsigned codes need one code above zero"
        )
    return int(value)


def check_codes(codes: Tensor, bits: int, name: str) -> None:
    """Raise a `ValueError` naming ``name`` unless ``codes`` are integers within the ``±n`` of ``bits``-bit signed codes."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{name} must be integers (torch.int8 or torch.int16), got {codes.dtype}")
    n = num_levels(bits, True)
    if codes.numel() and (int(codes.min()) < -n or int(codes.max()) > n):
        raise ValueError(f"{name} hold {int(codes.min())}..{int(codes.max())}, outside ±{n}, the range of {bits}-bit codes")


def check_saved_integer_layer(
    state_dict: Mapping[str, Any],
    prefix: str,
    current: Optional[Mapping[str, Any]] = None,
    kind: Optional["LayerKind"] = None,
) -> IntegerSettings:
    """`check_integer_state` of the integer layer saved under ``prefix`` (``"<layer>."``), and its buffers checked against it.

    The settings come from ``prefix + "_extra_state"``, or ``current`` (the layer's own) where
    the state dict has none. Saved buffers must hold what the integer maths needs: integer
    ``weight_codes`` within the ``±n`` of ``weight_bits``, a finite positive ``weight_scale``
    of the range shape the granularity gives the codes (when ``kind`` is known), and a finite
    scalar ``input_alpha``, positive where the input is quantized. Absent buffers are the
    strict load's to report.

    Raises:
        ValueError: naming the key and the problem.
    """
    key = prefix + "_extra_state"
    try:
        state = state_dict[key] if key in state_dict or current is None else current
        settings = check_integer_state(state)
        check_input_zero_point(state, settings)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e
    weight_bits, input_bits, _, _, granularity = settings
    tensors = {name: state_dict[prefix + name] for name in INTEGER_STATE_KEYS[:3] if prefix + name in state_dict}
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{prefix}{name} must be a tensor, got {type(value).__name__}")
    codes = tensors.get("weight_codes")
    if codes is not None:
        check_codes(codes, weight_bits, f"{prefix}weight_codes")
    scale = tensors.get("weight_scale")
    if scale is not None:
        expected: Optional[RangeShape] = None
        if codes is not None and kind is not None:
            try:
                expected = kind.range_shape(tuple(codes.shape), granularity)
            except ValueError as e:
                raise ValueError(f"{prefix}weight_granularity: {e}") from e
        elif granularity == "tensor":
            expected = ()
        check_steps(scale, f"{prefix}weight_scale", expected, positive=True)
    alpha = tensors.get("input_alpha")
    if alpha is not None:
        check_steps(alpha, f"{prefix}input_alpha", (), positive=input_bits is not None)
    return settings


def check_steps(value: Tensor, name: str, shape: Optional[RangeShape], positive: bool) -> None:
    """Raise a `ValueError` naming ``name`` unless ``value`` is a float tensor of ``shape`` (any, if None) with finite values > 0 (``>= 0`` unless ``positive``)."""
    if not value.is_floating_point() or (shape is not None and tuple(value.shape) != tuple(shape)):
        want = "a float scalar (shape ())" if shape == () else f"a float tensor of shape {shape}" if shape else "a float tensor"
        raise ValueError(f"{name} must be {want}, got a {value.dtype} tensor of shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty")
    low = float(value.min())
    high = float(value.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or (positive and low == 0):
        need = "finite and positive" if positive else "finite and >= 0"
        alike = value.numel() == 1 or low == high or (math.isnan(low) and math.isnan(high))
        shown = f"{low}" if alike else f"between {low} and {high}"
        raise ValueError(f"{name} is {shown}; it must be {need}")


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is in its fake-quantized form."""
    return isinstance(layer, QuantizedLayerMixin)


def is_integer(layer: nn.Module) -> bool:
    """Whether ``layer`` is in its integer form."""
    return isinstance(layer, IntegerLayerMixin)


class IntegerValues(NamedTuple):
    """What an integer layer computes with: weight codes and steps, and how its input becomes codes."""

    weight_codes: Tensor
    weight_scale: Tensor
    weight_bits: int
    weight_granularity: Granularity
    input_alpha: Tensor
    input_bits: Optional[int]  # None: the input stays float
    input_signed: bool
    input_zero_point: int


def integer_values(layer: nn.Module) -> IntegerValues:
    """The integer values of a fake-quantized layer, from its eval-mode quantizers (what `LayerKind.to_integer` stores).

    The codes come from the quantizers' own formula, so the integer layer's dequantized weights
    and inputs equal the fake-quantized ones exactly.
    """
    wq = layer.weight_quantizer
    with torch.no_grad():
        device = layer.weight.device
        w_bits = torch.tensor(float(wq.rounded_bits()), device=device)
        w_alpha = wq.alpha.detach().float()
        weight = layer.weight.detach().float()
        codes = integer_codes(grouped_view(weight, wq.granularity), w_alpha, w_bits, signed=True).reshape(weight.shape)
        scale = (w_alpha / num_levels(w_bits, True)).detach().clone()
        iq = layer.input_quantizer
        if iq is not None and iq.calibrated:
            input_bits, input_alpha, zero = input_code_settings(iq)
            return IntegerValues(codes, scale, int(w_bits.item()), wq.granularity, input_alpha, input_bits, iq.signed, zero)
    return IntegerValues(codes, scale, int(w_bits.item()), wq.granularity, torch.zeros((), device=device), None, True, 0)


def input_code_settings(quantizer: BaseQuantizer) -> tuple[int, Tensor, int]:
    """``(bits, alpha, zero point)`` with which an eval-mode, calibrated input quantizer turns values into codes (zero point 0: none)."""
    bits = quantizer.rounded_bits()
    alpha = quantizer.alpha.detach().float().reshape(()).clone()
    # The quantizer's own zero point at the bits it keeps: the same float32 formula.
    zero = quantizer.zero_point_code(torch.tensor(float(bits), device=alpha.device))
    return bits, alpha, 0 if zero is None else int(zero)


def input_codes(x: Tensor, alpha: Tensor, bits: int, signed: bool, zero_point: int) -> tuple[Tensor, Tensor]:
    """The centred codes of ``x`` (a float tensor of integers, ``q - z`` with a zero point) and their step, by the quantizer's formula."""
    bits_t = torch.tensor(float(bits), device=x.device)
    # Centred codes q - z with a zero point: integers in [-z, N - z], 0 for a real 0.0.
    zero = torch.tensor(float(zero_point), device=x.device) if zero_point else None
    codes = integer_codes(x.float(), alpha, bits_t, signed, zero)
    # code_grid: the same float32 division as the fake quantizer's step.
    return codes, alpha / code_grid(bits_t, signed, zero)[1]


def exact_sum_dtype(bound: int, device: torch.device) -> torch.dtype:
    """float32 where every partial sum of code products, at most ``bound`` in magnitude, is below ``2**24`` on CPU, else float64 (exact to ``2**53``)."""
    if bound >= FLOAT64_EXACT_LIMIT:
        raise ValueError(f"integer accumulation bound {bound} exceeds float64's exact range")
    if device.type == "cpu" and bound < FLOAT32_EXACT_LIMIT:
        return torch.float32
    return torch.float64


def accumulator_dtype(
    accumulation_size: int, input_bits: Optional[int], input_signed: bool, weight_bits: int, device: torch.device
) -> torch.dtype:
    """`exact_sum_dtype` for a layer's input codes times its weight codes (float32 for a float input)."""
    if input_bits is None:
        return torch.float32  # float input: not integer arithmetic
    # Python integers: no tensor, so no host sync and no graph break under torch.compile.
    return exact_sum_dtype(accumulation_size * num_levels(input_bits, input_signed) * num_levels(weight_bits, True), device)


def integer_output(maths: Any, input: Tensor, values: IntegerValues, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The integer layer's output: input codes times weight codes summed exactly, rescaled once per range, plus the bias.

    ``maths`` is the layer (its kind's ``apply_weight``, ``apply_weight_groups``,
    ``per_output_channel``, ``reduction_size`` and ``bias``). A float input (``input_bits``
    None) is multiplied by the dequantized weight instead.
    """
    out_dtype = input.dtype if input.is_floating_point() else torch.float32
    grouped = is_group_size(values.weight_granularity)
    size = int(values.weight_granularity) if grouped else maths.reduction_size()
    dtype = accumulator_dtype(size, values.input_bits, values.input_signed, values.weight_bits, input.device)
    steps = values.weight_scale.to(dtype)
    if values.input_bits is None:
        # Weight-only or float-input layer: float input times the dequantized weight.
        codes = grouped_view(values.weight_codes.to(dtype), values.weight_granularity)
        weight = (codes * steps).reshape(values.weight_codes.shape)
        output = maths.apply_weight(input.to(dtype), weight, None, *args, **kwargs)
    else:
        codes_in, input_scale = input_codes(input, values.input_alpha, values.input_bits, values.input_signed, values.input_zero_point)
        codes_in, input_scale = codes_in.to(dtype), input_scale.to(dtype)
        codes_w = values.weight_codes.to(dtype)
        if grouped:
            # One exact integer sum per group, each rescaled by its own step.
            output = maths.apply_weight_groups(codes_in, codes_w, steps) * input_scale
        else:
            accumulated = maths.apply_weight(codes_in, codes_w, None, *args, **kwargs)
            per_channel = steps if steps.dim() == 0 else maths.per_output_channel(steps.reshape(-1))
            output = accumulated * (input_scale * per_channel)
    if maths.bias is not None:
        output = output + maths.per_output_channel(maths.bias.to(dtype))
    return output.to(out_dtype)


class _IntegerArithmetic:
    active = False


_INTEGER_ARITHMETIC = _IntegerArithmetic()


@contextlib.contextmanager
def integer_arithmetic() -> Iterator[None]:
    """Within it, fake-quantized layers in eval mode compute exactly what their integer form will.

    The fake-quantized forward multiplies dequantized tensors in float; the integer layer sums
    code products exactly and rescales once. The two agree to float rounding, but an input
    code on a rounding boundary can then flip in the next layer, and at 2 to 3 bits such flips
    travel (through attention, for example). The integer comparison records the fake-quantized
    reference inside this, so a correct integer model matches it exactly and any difference
    means a bypassed layer or a wrong code. Training (grad-enabled, train mode) is unaffected.
    """
    previous = _INTEGER_ARITHMETIC.active
    _INTEGER_ARITHMETIC.active = True
    try:
        yield
    finally:
        _INTEGER_ARITHMETIC.active = previous


def uses_integer_arithmetic(fake_class: type) -> bool:
    """Whether the integer form of this fake-quantized class computes with `integer_output` (its forward is the generic one)."""
    kind = getattr(fake_class, "layer_kind", None)
    return kind is not None and kind.integer.forward is IntegerLayerMixin.forward


@dataclass(frozen=True)
class LayerKind:
    """One quantizable layer kind: its float class, its two quantized forms, and the moves between them.

    The forms subclass the float class (and `QuantizedLayerMixin` or `IntegerLayerMixin`
    with the kind's maths). The weight is the float layer's ``weight`` parameter and the
    input is the first argument of ``forward``; a kind that differs overrides the methods
    below. Everything else (attaching, checkpoints, the artifact, ONNX export, the report)
    reads the registry of kinds (`lightning_nipq.layers.layer_kinds.LAYER_KINDS`) and calls
    these methods, so a new kind needs one entry plus its forms: register it with
    `lightning_nipq.layers.register_layer_kind`, as the built-in kinds are.
    """

    float_type: type[nn.Module]
    fake_quantized: type[nn.Module]
    integer: type[nn.Module]
    #: The weight's output-channel axis (per-channel ranges vary along it).
    output_axis: int = 0
    #: Whether the weight is ``(outputs, inputs)``, so that ranges per group of inputs fit it.
    groupable: bool = False
    #: Whether only the weight is quantized: the input is not a tensor of values to quantize
    #: (the indices of an ``nn.Embedding``), so the layer never gets an input quantizer.
    weights_only: bool = False
    #: Whether a BatchNorm after the layer may fold into its per-channel steps: the layer's
    #: output channels (dimension 1 of the output) must be the weight's ``output_axis``.
    foldable: bool = True
    #: The name the artifact and the report record; by default the float class's name.
    type_name: Optional[str] = None
    #: Whether the layer multiplies its input's last dimension by the weight as a matrix
    #: (``input @ weight.T`` with ``output_axis`` 0, ``input @ weight`` with 1) plus the bias:
    #: the fused ONNX form writes it as a MatMul on the codes, which onnxruntime runs in integers.
    matmul: bool = False

    def __post_init__(self) -> None:
        # Each form knows its kind, so a layer can check its own saved state (the range shapes).
        for form in (self.fake_quantized, self.integer):
            form.layer_kind = self  # type: ignore[attr-defined]

    @property
    def name(self) -> str:
        """The kind's name, which the artifact and the report record: ``type_name``, else the float class's name."""
        return self.type_name or self.float_type.__name__

    def refusal(self, layer: nn.Module) -> Optional[str]:
        """Why this float layer of the kind cannot be quantized (a setting the forms cannot follow), or None.

        The reason is reported for the layer, which stays float. None by default; a kind
        overrides it (an ``nn.Embedding`` with ``max_norm`` renormalises its float rows in
        place on every lookup, which codes cannot follow).
        """
        return None

    def form_of(self, layer: nn.Module) -> Optional[str]:
        """``"float"``, ``"fake"`` or ``"integer"`` if ``layer`` is exactly one of this kind's classes, else None."""
        return {self.float_type: "float", self.fake_quantized: "fake", self.integer: "integer"}.get(type(layer))

    def weight_shape(self, layer: nn.Module) -> tuple[int, ...]:
        """The shape of the weight, in any form."""
        if is_integer(layer):
            return tuple(layer.weight_codes.shape)
        return tuple(layer.weight.shape)

    def range_shape(self, weight_shape: tuple[int, ...], granularity: Granularity) -> RangeShape:
        """The shape of the weight's ranges at ``granularity`` (see `lightning_nipq.quant.granularity`).

        Raises:
            ValueError: this kind cannot have that granularity, or a group size does not divide its inputs.
        """
        return range_shape_for(weight_shape, granularity, self.output_axis, self.groupable)

    def layer_range_shape(self, layer: nn.Module, granularity: Granularity) -> RangeShape:
        """`range_shape` for this very layer, whose settings (its groups) may rule out a granularity its weight shape allows.

        Raises:
            ValueError: as `range_shape`, or the layer's settings do not fit the granularity.
        """
        return self.range_shape(self.weight_shape(layer), granularity)

    # ------------------------------------------------------------------ float -> fake-quantized
    def quantize(
        self,
        layer: nn.Module,
        config: QuantizerFactory,
        float_input: bool = False,
        shared: Optional[dict[int, BaseQuantizer]] = None,
    ) -> None:
        """Give a float layer quantizers built by ``config`` (none on its input with ``float_input`` or `weights_only`).

        ``shared`` maps ``id(weight parameter)`` to the weight quantizer already built for it:
        a layer whose weight is another's (tied weights, as GPT-2's ``lm_head`` and ``wte``)
        gets that same quantizer, so the weight is quantized once, counted once in the budget
        and stays tied; a new quantizer is added to it.

        Raises:
            ValueError: the granularity does not fit the layer, or the shared quantizer's ranges do not fit it.
        """
        shape = self.layer_range_shape(layer, config.weight_granularity)
        weight = layer.weight
        weight_quantizer = None if shared is None else shared.get(id(weight))
        if weight_quantizer is None:
            weight_quantizer = config.weight_quantizer(weight, shape)
            weight_quantizer.size = weight.numel()
            if shared is not None:
                shared[id(weight)] = weight_quantizer
        elif tuple(weight_quantizer.range_shape) != tuple(shape):
            raise ValueError(
                f"this {self.name} shares its weight with another layer whose ranges are {tuple(weight_quantizer.range_shape)}, "
                f"where this layer's would be {tuple(shape)}; use weight_granularity='tensor', or leave one of them out with exclude"
            )
        input_quantizer = None if float_input or self.weights_only else config.input_quantizer()
        self.install_quantizers(layer, weight_quantizer, input_quantizer)

    def install_quantizers(
        self, layer: nn.Module, weight_quantizer: BaseQuantizer, input_quantizer: Optional[BaseQuantizer]
    ) -> None:
        """Turn a float layer into its fake-quantized form with the given quantizers."""
        if type(layer) is not self.float_type:
            raise TypeError(f"{type(layer).__name__} is not a plain {self.name}")
        device = layer.weight.device
        layer.__class__ = self.fake_quantized
        layer.weight_quantizer = weight_quantizer.to(device)
        layer.input_quantizer = None if input_quantizer is None else input_quantizer.to(device)

    # ------------------------------------------------------------------ fake-quantized -> integer
    def to_integer(self, layer: nn.Module) -> None:
        """Turn a fake-quantized layer into its integer form, using its eval-mode quantizers.

        The codes are computed with the same formula the fake quantizer uses, so the integer
        layer's dequantized weights and inputs equal the fake-quantized ones exactly.
        """
        if type(layer) is not self.fake_quantized:
            raise TypeError(f"{type(layer).__name__} is not a fake-quantized {self.name}")
        values = integer_values(layer)
        input_numel = layer.input_quantizer.size if values.input_bits is not None else 0
        weight_bits, granularity = values.weight_bits, values.weight_granularity
        del layer.weight_quantizer
        del layer.input_quantizer
        del layer.weight
        layer.__class__ = self.integer
        self._set_integer_state(
            layer,
            values.weight_codes.to(code_dtype(weight_bits)),
            values.weight_scale,
            values.input_alpha,
            weight_bits,
            values.input_bits,
            values.input_signed,
            input_numel,
            granularity,
            values.input_zero_point,
        )

    # ------------------------------------------------------------------ float -> integer
    def integer_from_codes(
        self,
        layer: nn.Module,
        weight_codes: Tensor,
        weight_scale: Tensor,
        input_alpha: Tensor,
        weight_bits: int,
        input_bits: Optional[int],
        input_signed: bool,
        input_numel: int,
        weight_granularity: Granularity = "tensor",
        input_zero_point: int = 0,
    ) -> None:
        """Turn a plain float layer into its integer form from stored codes and scales, in place.

        For loading a saved integer model: ``weight_codes`` (signed codes in ``[-n, n]``,
        ``n = 2**(weight_bits - 1) - 1``) replace the float weight, and ``weight_scale`` holds
        one step per range of ``weight_granularity`` (`range_shape`). ``input_zero_point`` is
        the zero point of unsigned input codes (0: none). Everything is checked before the
        layer is touched.
        """
        if type(layer) is not self.float_type:
            raise TypeError(f"{type(layer).__name__} is not a plain {self.name}")
        state = {
            "weight_bits": weight_bits,
            "input_bits": input_bits,
            "input_signed": input_signed,
            "input_numel": input_numel,
            "weight_granularity": weight_granularity,
            "input_zero_point": input_zero_point,
        }
        settings = check_integer_state(state)
        input_zero_point = check_input_zero_point(state, settings)
        weight_bits, input_bits, input_signed, input_numel, weight_granularity = settings
        weight = layer.weight
        if tuple(weight_codes.shape) != tuple(weight.shape):
            raise ValueError(f"weight codes of shape {tuple(weight_codes.shape)} do not fit a weight of shape {tuple(weight.shape)}")
        check_codes(weight_codes, weight_bits, "weight codes")
        shape = self.layer_range_shape(layer, weight_granularity)
        if weight_scale.numel() != math.prod(shape):
            raise ValueError(f"{weight_scale.numel()} weight scales do not fit ranges of shape {shape}")
        device = weight.device
        del layer.weight
        layer.__class__ = self.integer
        self._set_integer_state(
            layer,
            weight_codes.to(device=device, dtype=code_dtype(weight_bits)),
            weight_scale.detach().to(device=device, dtype=torch.float32).reshape(shape).clone(),
            input_alpha.detach().to(device=device, dtype=torch.float32).reshape(()),
            weight_bits,
            input_bits,
            input_signed,
            input_numel,
            weight_granularity,
            input_zero_point,
        )

    @staticmethod
    def _set_integer_state(
        layer: nn.Module,
        codes: Tensor,
        scale: Tensor,
        input_alpha: Tensor,
        weight_bits: int,
        input_bits: Optional[int],
        input_signed: bool,
        input_numel: int,
        weight_granularity: Granularity,
        input_zero_point: int = 0,
    ) -> None:
        layer.register_buffer("weight_codes", codes)
        layer.register_buffer("weight_scale", scale)
        layer.register_buffer("input_alpha", input_alpha)
        layer.weight_bits = weight_bits
        layer.input_bits = input_bits
        layer.input_signed = input_signed
        layer.input_numel = input_numel
        layer.weight_granularity = weight_granularity
        layer.input_zero_point = input_zero_point

    # ------------------------------------------------------------------ any form -> float
    def to_float(self, layer: nn.Module, dequantize: bool = False) -> None:
        """Turn a fake-quantized layer back into its float form (its weight kept), or an integer
        layer into a float one whose weight is zeros of the right shape (to be loaded), or with
        ``dequantize`` its codes times their steps (float32)."""
        form = self.form_of(layer)
        if form == "fake":
            del layer.weight_quantizer
            del layer.input_quantizer
        elif form == "integer":
            shape, device = layer.weight_codes.shape, layer.weight_codes.device
            weight = layer.dequantized_weight(torch.float32).detach() if dequantize else torch.zeros(shape, device=device)
            for name in INTEGER_STATE_KEYS[:3]:
                delattr(layer, name)
            layer.__dict__.pop(WEIGHT_TIE_ATTRIBUTE, None)  # a float layer is tied by sharing its Parameter
            layer.__class__ = self.float_type
            layer.weight = nn.Parameter(weight)
            return
        elif form is None:
            raise TypeError(f"{type(layer).__name__} is not a {self.name} in any form")
        layer.__class__ = self.float_type
