"""Fake-quantized versions of ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

A layer is quantized by changing its class in place to the matching subclass below and
giving it a ``weight_quantizer`` (and usually an ``input_quantizer``). Changing the class
rather than wrapping the layer keeps every parameter name (``conv.weight`` stays
``conv.weight``), keeps ``isinstance(layer, nn.Conv2d)`` true, and keeps a layer that is
reachable under two names the same object.
"""

from __future__ import annotations

import math
from typing import Optional, Union

from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.quantizer_base import BaseQuantizer

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FloatLayer = Union[nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d]


class QuantizedLayerMixin:
    """Quantizes the input and the weight, then runs the float layer's own maths."""

    weight: Tensor
    bias: Optional[Tensor]
    weight_quantizer: BaseQuantizer
    input_quantizer: Optional[BaseQuantizer]

    def forward(self, input: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            input = self.input_quantizer(input)
        weight = self.weight_quantizer(self.weight)
        output = self._forward_with_weight(input, weight)
        if self.weight_quantizer.macs == 0:
            self.weight_quantizer.macs = layer_macs(self, output)  # type: ignore[arg-type]
        return output

    def _forward_with_weight(self, input: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError


class QuantizedLinear(QuantizedLayerMixin, nn.Linear):
    def _forward_with_weight(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight, self.bias)


class QuantizedConv1d(QuantizedLayerMixin, nn.Conv1d):
    def _forward_with_weight(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(input, weight, self.bias)


class QuantizedConv2d(QuantizedLayerMixin, nn.Conv2d):
    def _forward_with_weight(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(input, weight, self.bias)


class QuantizedConv3d(QuantizedLayerMixin, nn.Conv3d):
    def _forward_with_weight(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(input, weight, self.bias)


QUANTIZED_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
}
FLOAT_CLASS: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in QUANTIZED_CLASS.items()}


def reduction_size(layer: nn.Module) -> int:
    """Products summed into one output element: ``in_features`` or ``C_in/groups * prod(kernel)``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)


def layer_macs(layer: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one forward that produced ``output``."""
    return int(output.numel()) * reduction_size(layer)


def layer_kind(layer: nn.Module) -> str:
    """``Linear``, ``Conv2d``, ``Conv2d(depthwise)``, ``Conv2d(groups=4)``..."""
    base = FLOAT_CLASS.get(type(layer), type(layer))
    for float_type in QUANTIZABLE_TYPES:
        if isinstance(layer, float_type):
            base = float_type
    kind = base.__name__
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        in_channels = getattr(layer, "in_channels", 0)
        kind += "(depthwise)" if groups == in_channels else f"(groups={groups})"
    return kind


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLayerMixin)
