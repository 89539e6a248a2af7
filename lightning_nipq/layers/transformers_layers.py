"""transformers' ``Conv1D`` (GPT-2, GPT, and their kin) as a quantizable layer kind.

This module imports transformers, so nothing imports it up front: the registry imports it
the first time it meets a ``Conv1D`` (see `lightning_nipq.layers.layer_kinds.LAZY_KINDS`)
and registers the kinds of `PROVIDED_KINDS` with `register_layer_kind`.

``Conv1D`` is a linear layer whose weight is stored transposed, ``(inputs, outputs)``:
``forward(x) = x @ weight + bias`` on the last dimension. Its output channels are axis 1 of
the weight, so per-channel ranges have shape ``(1, outputs)``. Ranges per group of inputs
would group along axis 0, which the grouped layout (`lightning_nipq.quant.granularity`:
groups split off the last axis of ``(outputs, inputs)``) does not describe, so a group size
is refused for it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from lightning_nipq.layers.forms import IntegerLayerMixin, LayerKind, QuantizedLayerMixin
from lightning_nipq.quant.granularity import Granularity, RangeShape, is_group_size, range_shape_for


class _Conv1DMaths:
    nx: int
    nf: int

    def apply_weight(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # transformers' own computation (addmm on the flattened input), so a float-mode layer matches it.
        flat = input.reshape(-1, input.shape[-1])
        output = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return output.view(*input.shape[:-1], weight.shape[-1])

    def reduction_size(self) -> int:
        return self.nx

    def per_output_channel(self, values: Tensor) -> Tensor:
        return values.reshape(-1)  # the output channel is the last dimension


class Conv1DKind(LayerKind):
    """``Conv1D``: a transposed weight ``(inputs, outputs)``; per tensor or per output channel."""

    def range_shape(self, weight_shape: tuple[int, ...], granularity: Granularity) -> RangeShape:
        if is_group_size(granularity):
            raise ValueError(
                f"weight_granularity={granularity} (ranges per group of inputs) does not fit transformers' Conv1D, whose "
                f"weight {tuple(weight_shape)} is (inputs, outputs), groups would run along axis 0. Use "
                "weight_granularity='channel' (one range per output channel), or leave its layers out with exclude"
            )
        return range_shape_for(weight_shape, granularity, self.output_axis, groupable=False)


class QuantizedConv1D(QuantizedLayerMixin, _Conv1DMaths, Conv1D):
    pass


class IntegerConv1D(IntegerLayerMixin, _Conv1DMaths, Conv1D):
    pass


CONV1D_KIND = Conv1DKind(Conv1D, QuantizedConv1D, IntegerConv1D, output_axis=1, matmul=True)
#: The kinds this module defines, which the registry registers when it imports the module.
PROVIDED_KINDS: tuple[LayerKind, ...] = (CONV1D_KIND,)

