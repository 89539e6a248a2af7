"""The layer kinds of torch itself: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (grouped and depthwise
included), ``nn.ConvTranspose1d/2d/3d`` and ``nn.Embedding``.

Each kind's maths is one mixin shared by its fake-quantized and its integer form, and each
kind is one `LayerKind` entry in `TORCH_LAYER_KINDS`, registered by
`lightning_nipq.layers.layer_kinds` with `register_layer_kind` as a user's kind would be.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.layers.forms import IntegerLayerMixin, LayerKind, QuantizedLayerMixin
from lightning_nipq.layers.patch_convolution import patch_convolution, takes_patch_gradient
from lightning_nipq.quant.granularity import Granularity, RangeShape, is_group_size


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
        if takes_patch_gradient(self, input):  # type: ignore[arg-type]
            return patch_convolution(input, weight, bias)
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


# ---------------------------------------------------------------------- transposed convolutions
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvTransposeMaths:
    """``nn.ConvTranspose1d/2d/3d``: weight ``(C_in, C_out / groups, *kernel)``, output channels on axis 1."""

    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def apply_weight(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], output_size: Optional[list[int]] = None) -> Tensor:
        # As torch's forward: ``output_size`` picks the output padding among the sizes the stride allows.
        dims = len(self.kernel_size)
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            input, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation
        )
        return _CONV_TRANSPOSE[dims](input, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation)

    def reduction_size(self) -> int:
        # At most every input channel of the group times every kernel tap lands on one output
        # element (fewer with a stride): the bound of the exact integer accumulation.
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def multiply_accumulates(self, input: Tensor, output: Tensor) -> int:
        # Each input element meets every kernel tap of each output channel of its group once.
        return int(input.numel()) * (self.out_channels // self.groups) * math.prod(self.kernel_size)

    def per_output_channel(self, values: Tensor) -> Tensor:
        return values.view(-1, *([1] * len(self.kernel_size)))  # (C, 1, ..., 1) against (N, C, *spatial)


class ConvTransposeKind(LayerKind):
    """The transposed convolutions: per-channel ranges along axis 1, for ungrouped layers only.

    With ``groups > 1`` axis 1 of the weight holds ``C_out / groups`` channels, each standing
    for one output channel of every group, so ranges along it would be shared by several
    output channels; such a layer takes per-tensor ranges.
    """

    def layer_range_shape(self, layer: nn.Module, granularity: Granularity) -> RangeShape:
        shape = super().layer_range_shape(layer, granularity)
        if granularity == "channel" and layer.groups > 1:
            raise ValueError(
                f"weight_granularity='channel' needs an ungrouped {self.name}: with groups={layer.groups} its weight "
                f"{self.weight_shape(layer)} holds C_out / groups = {self.weight_shape(layer)[1]} channels on axis 1, each "
                "shared by one output channel of every group. Use weight_granularity='tensor', or leave the layer out with exclude"
            )
        return shape


class QuantizedConvTranspose1d(QuantizedLayerMixin, _ConvTransposeMaths, nn.ConvTranspose1d):
    pass


class QuantizedConvTranspose2d(QuantizedLayerMixin, _ConvTransposeMaths, nn.ConvTranspose2d):
    pass


class QuantizedConvTranspose3d(QuantizedLayerMixin, _ConvTransposeMaths, nn.ConvTranspose3d):
    pass


class IntegerConvTranspose1d(IntegerLayerMixin, _ConvTransposeMaths, nn.ConvTranspose1d):
    pass


class IntegerConvTranspose2d(IntegerLayerMixin, _ConvTransposeMaths, nn.ConvTranspose2d):
    pass


class IntegerConvTranspose3d(IntegerLayerMixin, _ConvTransposeMaths, nn.ConvTranspose3d):
    pass


# ---------------------------------------------------------------------- embeddings
class _EmbeddingMaths:
    """``nn.Embedding``: a lookup of rows, so weights only; per channel means one range per row (axis 0)."""

    padding_idx: Optional[int]
    max_norm: Optional[float]
    norm_type: float
    scale_grad_by_freq: bool
    sparse: bool
    #: An embedding has no bias; the generic forms read one.
    bias: Optional[Tensor] = None

    def apply_weight(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # torch's own lookup, so that padding_idx and scale_grad_by_freq shape the gradient as for nn.Embedding.
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def reduction_size(self) -> int:
        return 1  # every output element is one weight element: nothing is summed

    def multiply_accumulates(self, input: Tensor, output: Tensor) -> int:
        return 0  # a lookup: no multiply-accumulate, so it adds nothing to the BOPs


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: weights only; an embedding that renormalises or has sparse gradients stays float."""

    def refusal(self, layer: nn.Module) -> Optional[str]:
        if layer.max_norm is not None:
            return (
                f"nn.Embedding with max_norm={layer.max_norm} rescales its float rows in place on every lookup, which "
                "quantized codes cannot follow; build it with max_norm=None to quantize it"
            )
        if layer.sparse:
            return "nn.Embedding with sparse=True gives sparse gradients, which cannot flow through the weight quantizer; build it with sparse=False to quantize it"
        return None


class QuantizedEmbedding(QuantizedLayerMixin, _EmbeddingMaths, nn.Embedding):
    pass


class IntegerEmbedding(IntegerLayerMixin, _EmbeddingMaths, nn.Embedding):
    def forward(self, input: Tensor) -> Tensor:
        # The rows of codes and the steps of those rows are looked up, then multiplied: the same
        # float32 products as the dequantized table, without dequantizing the whole table.
        codes = F.embedding(input, self.weight_codes).to(torch.float32)
        scale = self.weight_scale.to(torch.float32)
        if scale.dim() == 0:
            return codes * scale
        rows = F.embedding(input, scale.reshape(scale.shape[0], -1))  # (..., ranges per row)
        if is_group_size(self.weight_granularity):
            grouped = codes.reshape(*codes.shape[:-1], rows.shape[-1], -1) * rows.unsqueeze(-1)
            return grouped.reshape(codes.shape)
        return codes * rows


TORCH_LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind(nn.Linear, QuantizedLinear, IntegerLinear, groupable=True, matmul=True),
    LayerKind(nn.Conv1d, QuantizedConv1d, IntegerConv1d),
    LayerKind(nn.Conv2d, QuantizedConv2d, IntegerConv2d),
    LayerKind(nn.Conv3d, QuantizedConv3d, IntegerConv3d),
    ConvTransposeKind(nn.ConvTranspose1d, QuantizedConvTranspose1d, IntegerConvTranspose1d, output_axis=1),
    ConvTransposeKind(nn.ConvTranspose2d, QuantizedConvTranspose2d, IntegerConvTranspose2d, output_axis=1),
    ConvTransposeKind(nn.ConvTranspose3d, QuantizedConvTranspose3d, IntegerConvTranspose3d, output_axis=1),
    # Per group: groups of consecutive elements of each row, as the (rows, dim) weight allows.
    EmbeddingKind(nn.Embedding, QuantizedEmbedding, IntegerEmbedding, groupable=True, weights_only=True, foldable=False),
)
