"""The layer kinds of torch itself: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (grouped and depthwise included).

Each kind's maths is one mixin shared by its fake-quantized and its integer form, and each
kind is one `LayerKind` entry in `TORCH_LAYER_KINDS`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.layers.forms import IntegerLayerMixin, LayerKind, QuantizedLayerMixin


class _LinearMaths:
    in_features: int

    def apply_weight(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(input, weight, bias)

    def reduction_size(self) -> int:
        return self.in_features

    def per_output_channel(self, values: Tensor) -> Tensor:
        return values  # the output channel is the last dimension

    def apply_weight_groups(self, input: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
        """``input @ (codes * scale).T`` as one exact sum per group of inputs, each rescaled by its step.

        ``codes`` is ``(C_out, K)`` and ``scale`` ``(C_out, K / g, 1)``; the partial sums are
        products of integers, exact in the accumulator's type.
        """
        outputs, groups = scale.shape[0], scale.shape[1]
        grouped = input.reshape(*input.shape[:-1], groups, -1)
        partial = torch.einsum("...gk,cgk->...gc", grouped, codes.reshape(outputs, groups, -1))
        return (partial * scale.reshape(outputs, groups).transpose(0, 1)).sum(dim=-2)


class _ConvMaths:
    in_channels: int
    groups: int
    kernel_size: tuple[int, ...]

    def apply_weight(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return self._conv_forward(input, weight, bias)  # type: ignore[attr-defined]

    def reduction_size(self) -> int:
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def per_output_channel(self, values: Tensor) -> Tensor:
        return values.view(-1, *([1] * len(self.kernel_size)))  # (C, 1, ..., 1) against (N, C, *spatial)


class QuantizedLinear(QuantizedLayerMixin, _LinearMaths, nn.Linear):
    pass


class QuantizedConv1d(QuantizedLayerMixin, _ConvMaths, nn.Conv1d):
    pass


class QuantizedConv2d(QuantizedLayerMixin, _ConvMaths, nn.Conv2d):
    pass


class QuantizedConv3d(QuantizedLayerMixin, _ConvMaths, nn.Conv3d):
    pass


class IntegerLinear(IntegerLayerMixin, _LinearMaths, nn.Linear):
    pass


class IntegerConv1d(IntegerLayerMixin, _ConvMaths, nn.Conv1d):
    pass


class IntegerConv2d(IntegerLayerMixin, _ConvMaths, nn.Conv2d):
    pass


class IntegerConv3d(IntegerLayerMixin, _ConvMaths, nn.Conv3d):
    pass


TORCH_LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind(nn.Linear, QuantizedLinear, IntegerLinear, groupable=True),
    LayerKind(nn.Conv1d, QuantizedConv1d, IntegerConv1d),
    LayerKind(nn.Conv2d, QuantizedConv2d, IntegerConv2d),
    LayerKind(nn.Conv3d, QuantizedConv3d, IntegerConv3d),
)
