"""Learned tensors that a module uses directly: a ViT's class token and position embeddings, a user layer's matrix.

Such a parameter is not the weight of a layer whose forward we could swap: the module reads
``self.position_embeddings`` in its own forward. To quantize it, it is lifted into a
`LearnedTensor`, a layer of its own whose forward takes no input and returns its weight, and
which the registry knows as a weights-only kind (like ``nn.Embedding``), so that attaching,
the budget, conversion, checkpoints, the artifact, the ONNX export and the report handle it
as any layer. The module's class is swapped in place for a subclass whose attribute of that
name calls the layer: its forward then reads the fake-quantized tensor in training and the
dequantized codes in the integer model, unchanged.

The lifted parameter keeps its identity (the same ``nn.Parameter`` object moves into the
layer), so an optimizer built before still trains it. Its state-dict key gains ``.weight``
(``embeddings.cls_token`` becomes ``embeddings.cls_token.weight``), as the quantizer's keys
sit beside it; checkpoint and artifact loading lift a fresh model's tensors the same way
when the saved state holds them lifted, and `lower_learned_tensors` puts them back. The
lifting itself is `lightning_nipq.layers.tensor_lifting`.

Only modules below the model are lifted (the model's own class is the user's LightningModule,
which is not swapped), and only parameters of two or more dimensions that the module holds
itself, outside recurrent layers and ``nn.MultiheadAttention`` (whose kernels read their
parameters without the attribute).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_nipq.layers.forms import _INTEGER_ARITHMETIC, IntegerLayerMixin, LayerKind, QuantizedLayerMixin, integer_values


class LearnedTensor(nn.Module):
    """A learned tensor as a layer: its forward returns ``weight``. The float form of the kind."""

    #: A learned tensor has no bias; the generic forms read one.
    bias: Optional[Tensor] = None

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self) -> Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class _LearnedTensorMaths:
    def apply_weight(self, input: Optional[Tensor], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return weight  # nothing is computed: the tensor is the output

    def reduction_size(self) -> int:
        return 1

    def multiply_accumulates(self, input: Optional[Tensor], output: Tensor) -> int:
        return 0  # read, not multiplied here: adds nothing to the BOPs


class QuantizedLearnedTensor(QuantizedLayerMixin, _LearnedTensorMaths, LearnedTensor):
    def forward(self) -> Tensor:  # type: ignore[override]
        if _INTEGER_ARITHMETIC.active and not self.training:
            # What the integer form will give, to the bit, as every layer does inside `integer_arithmetic`.
            with torch.no_grad():
                values = integer_values(self)
                return _dequantized(values.weight_codes, values.weight_scale, self.weight.dtype)
        return self.weight_quantizer(self.weight)


class IntegerLearnedTensor(IntegerLayerMixin, _LearnedTensorMaths, LearnedTensor):
    def forward(self) -> Tensor:  # type: ignore[override]
        return _dequantized(self.weight_codes, self.weight_scale, torch.float32)


def _dequantized(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.to(torch.float32) * scale.to(torch.float32)).to(dtype)


#: Learned tensors: weights only, one range per slice of axis 0 when per channel.
LEARNED_TENSOR_KIND = LayerKind(
    LearnedTensor, QuantizedLearnedTensor, IntegerLearnedTensor, weights_only=True, foldable=False
)
