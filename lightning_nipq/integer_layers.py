"""Integer layers: weights held as integer codes, inputs quantized to integer codes, and the
matmul or convolution computed exactly on the codes before one rescale.

Exactness: every product of two codes and every partial sum is an integer whose magnitude
is at most ``K * n_x * n_w`` (``K`` products per output). Float32 represents every integer
up to ``2**24`` exactly and float64 up to ``2**53``, so running the layer's own kernel on
codes in the narrowest of the two that holds the bound is integer arithmetic, with no
rounding at any step. On CUDA, float32 kernels may use TF32, so float64 is used there.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.fake_quant import integer_codes, num_levels
from lightning_nipq.layers import FLOAT_CLASS, QuantizedLayerMixin, reduction_size

FLOAT32_EXACT_LIMIT = 2**24
FLOAT64_EXACT_LIMIT = 2**53


def code_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer type that holds codes of ``bits`` bits."""
    if bits <= 8:
        return torch.int8
    if bits <= 16:
        return torch.int16
    return torch.int32


class IntegerLayerMixin:
    """Shared forward of the integer layers; state lives in buffers and ``_extra_state``."""

    weight_codes: Tensor
    weight_scale: Tensor
    input_alpha: Tensor
    bias: Optional[Tensor]
    weight_bits: int
    input_bits: Optional[int]
    input_signed: bool
    input_numel: int  # elements of the input in the calibration batch, its weight in average bits

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (codes times scale), for code that reads ``layer.weight``."""
        return self.weight_codes.float() * self.weight_scale

    def accumulator_dtype(self, device: torch.device) -> torch.dtype:
        if self.input_bits is None:
            return torch.float32  # float input: not integer arithmetic, see ``float_input``
        # Python integers: no tensor, so no host sync and no graph break under torch.compile.
        input_levels = 2 ** (self.input_bits - 1) - 1 if self.input_signed else 2**self.input_bits - 1
        bound = reduction_size(self) * input_levels * (2 ** (self.weight_bits - 1) - 1)
        if bound >= FLOAT64_EXACT_LIMIT:
            raise ValueError(f"integer accumulation bound {bound} exceeds float64's exact range")
        if device.type == "cpu" and bound < FLOAT32_EXACT_LIMIT:
            return torch.float32
        return torch.float64

    @property
    def float_input(self) -> bool:
        """True for a layer whose input is not quantized (by default the first layer)."""
        return self.input_bits is None

    def input_scale(self) -> Tensor:
        return self.input_alpha / num_levels(torch.tensor(float(self.input_bits)), self.input_signed)

    def forward(self, input: Tensor) -> Tensor:
        out_dtype = input.dtype if input.is_floating_point() else torch.float32
        dtype = self.accumulator_dtype(input.device)
        if self.input_bits is None:
            codes_in = input.to(dtype)
            scale = self.weight_scale
        else:
            bits = torch.tensor(float(self.input_bits), device=input.device)
            codes_in = integer_codes(input.float(), self.input_alpha, bits, self.input_signed).to(dtype)
            scale = self.input_scale() * self.weight_scale
        accumulated = self._integer_op(codes_in, self.weight_codes.to(dtype))
        output = accumulated * scale.to(dtype)
        if self.bias is not None:
            output = output + self._bias_shape(self.bias.to(dtype))
        return output.to(out_dtype)

    def _integer_op(self, codes_in: Tensor, weight_codes: Tensor) -> Tensor:
        raise NotImplementedError

    def _bias_shape(self, bias: Tensor) -> Tensor:
        return bias

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "input_bits": self.input_bits,
            "input_signed": self.input_signed,
            "input_numel": self.input_numel,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.weight_bits = int(state["weight_bits"])
        self.input_bits = None if state["input_bits"] is None else int(state["input_bits"])
        self.input_signed = bool(state["input_signed"])
        self.input_numel = int(state["input_numel"])


class _IntegerConvMixin(IntegerLayerMixin):
    def _integer_op(self, codes_in: Tensor, weight_codes: Tensor) -> Tensor:
        return self._conv_forward(codes_in, weight_codes, None)  # type: ignore[attr-defined]

    def _bias_shape(self, bias: Tensor) -> Tensor:
        spatial = len(self.kernel_size)  # type: ignore[attr-defined]
        return bias.view(-1, *([1] * spatial))


class IntegerLinear(IntegerLayerMixin, nn.Linear):
    def _integer_op(self, codes_in: Tensor, weight_codes: Tensor) -> Tensor:
        return F.linear(codes_in, weight_codes)


class IntegerConv1d(_IntegerConvMixin, nn.Conv1d):
    pass


class IntegerConv2d(_IntegerConvMixin, nn.Conv2d):
    pass


class IntegerConv3d(_IntegerConvMixin, nn.Conv3d):
    pass


INTEGER_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: IntegerLinear,
    nn.Conv1d: IntegerConv1d,
    nn.Conv2d: IntegerConv2d,
    nn.Conv3d: IntegerConv3d,
}


def convert_layer_to_integer(layer: nn.Module) -> None:
    """Turn a fake-quantized layer into its integer twin, in place, using its eval-mode quantizers.

    The codes are computed with the same formula the fake quantizer uses, so the integer
    layer's dequantized weights and inputs equal the fake-quantized ones exactly.
    """
    if not isinstance(layer, QuantizedLayerMixin):
        raise TypeError(f"{type(layer).__name__} is not a quantized layer")
    wq = layer.weight_quantizer
    with torch.no_grad():
        w_bits = torch.tensor(float(wq.rounded_bits()), device=layer.weight.device)
        w_alpha = wq.alpha.detach().float()
        codes = integer_codes(layer.weight.detach().float(), w_alpha, w_bits, signed=True)
        scale = (w_alpha / num_levels(w_bits, True)).detach()
        iq = layer.input_quantizer
        if iq is not None and iq.calibrated:
            input_bits: Optional[int] = iq.rounded_bits()
            input_alpha = iq.alpha.detach().float().clone()
            input_signed = iq.signed
            input_numel = iq.size
        else:
            input_bits, input_alpha, input_signed, input_numel = None, torch.zeros((), device=codes.device), True, 0
    float_type = FLOAT_CLASS[type(layer)]
    del layer.weight_quantizer
    del layer.input_quantizer
    del layer.weight
    layer.__class__ = INTEGER_CLASS[float_type]
    layer.register_buffer("weight_codes", codes.to(code_dtype(int(w_bits.item()))))
    layer.register_buffer("weight_scale", scale)
    layer.register_buffer("input_alpha", input_alpha)
    layer.weight_bits = int(w_bits.item())
    layer.input_bits = input_bits
    layer.input_signed = input_signed
    layer.input_numel = input_numel


def is_integer(layer: nn.Module) -> bool:
    return isinstance(layer, IntegerLayerMixin)


def require_integer_model(model: nn.Module, action: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``model`` holds integer layers and no fake quantizer (before ``action``)."""
    from lightning_nipq.layers import is_quantized

    fake = [name for name, m in model.named_modules() if is_quantized(m)]
    if fake:
        raise error(f"{fake[:5]} still hold fake quantizers; call hard_quantize(model) before {action}")
    if not any(is_integer(m) for m in model.modules()):
        raise error(f"{type(model).__name__} has no integer layer; call hard_quantize(model) before {action}")


def integer_layer_from_codes(
    layer: nn.Module,
    weight_codes: Tensor,
    weight_scale: Tensor,
    input_alpha: Tensor,
    weight_bits: int,
    input_bits: Optional[int],
    input_signed: bool,
    input_numel: int,
) -> nn.Module:
    """Turn a plain float layer into its integer twin from stored codes and scales, in place.

    The counterpart of `convert_layer_to_integer` for loading a saved integer model:
    ``layer`` is a fresh ``nn.Linear``/``nn.Conv1d/2d/3d`` whose float weight is replaced
    by ``weight_codes`` (signed codes in ``[-n, n]``, ``n = 2**(weight_bits - 1) - 1``).
    Everything is checked before the layer is touched.
    """
    float_type = type(layer)
    if float_type not in INTEGER_CLASS:
        raise TypeError(f"{float_type.__name__} is not a plain Linear/Conv1d/Conv2d/Conv3d layer")
    weight = layer.weight
    if tuple(weight_codes.shape) != tuple(weight.shape):
        raise ValueError(f"weight codes of shape {tuple(weight_codes.shape)} do not fit a weight of shape {tuple(weight.shape)}")
    if not 2 <= weight_bits <= 32:
        raise ValueError(f"weight_bits must be in [2, 32], got {weight_bits}")
    n = 2 ** (weight_bits - 1) - 1
    if weight_codes.numel() and (int(weight_codes.min()) < -n or int(weight_codes.max()) > n):
        raise ValueError(f"weight codes exceed +-{n}, the range of {weight_bits}-bit codes")
    device = weight.device
    del layer.weight
    layer.__class__ = INTEGER_CLASS[float_type]
    layer.register_buffer("weight_codes", weight_codes.to(device=device, dtype=code_dtype(weight_bits)))
    layer.register_buffer("weight_scale", weight_scale.detach().to(device=device, dtype=torch.float32).reshape(()))
    layer.register_buffer("input_alpha", input_alpha.detach().to(device=device, dtype=torch.float32).reshape(()))
    layer.weight_bits = int(weight_bits)
    layer.input_bits = None if input_bits is None else int(input_bits)
    layer.input_signed = bool(input_signed)
    layer.input_numel = int(input_numel)
    return layer
