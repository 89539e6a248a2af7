"""Convolutions whose stride is their kernel (a vision transformer's patch embedding), with the input's gradient as one matrix product.

A float model never needs the gradient with respect to its first layer's input, the data.
Once that input is quantized it does: the input quantizer's range and bits learn from it.
On a CPU, oneDNN computes it for a convolution whose windows do not overlap 7 to 16 times
slower than the matrix product it amounts to (each output position sees its own patch of the
input, so the gradient of a patch is the output gradient at that position times the weight):
11.9 ms against 0.33 ms for a batch of 128 1x28x28 images in 7x7 patches, 150 ms against
21 ms for 32 3x224x224 images in 16x16 patches, with the same result to the bit. The forward
and the weight's gradient stay torch's own.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def takes_patch_gradient(layer: nn.Module, input: Tensor) -> bool:
    """Whether ``layer`` (an ``nn.Conv1d/2d/3d``) is a patch convolution whose input's gradient `patch_convolution` should compute.

    Only on a CPU (where oneDNN is slow at it) and only when autograd needs that gradient.
    """
    return (
        input.requires_grad
        and input.device.type == "cpu"
        and torch.is_grad_enabled()
        and is_patch_convolution(layer)
    )


def is_patch_convolution(layer: nn.Module) -> bool:
    """Whether the windows of the convolution ``layer`` tile its input without overlap or gaps: stride equal to kernel, no padding, one group."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    padding = layer.padding
    return (
        tuple(layer.stride) == tuple(layer.kernel_size)
        and (padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding)))
        and all(d == 1 for d in layer.dilation)
        and layer.groups == 1
    )


def patch_convolution(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The convolution of ``input`` with ``weight`` at a stride of its kernel, as torch computes it, differentiable.

    Backward computes the input's gradient as a matrix product (see the module's doc) and
    the weight's and bias's as torch does.
    """
    return _PatchConvolution.apply(input, weight, bias)


class _PatchConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        kernel = tuple(weight.shape[2:])
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight)
        return _CONVOLUTIONS[len(kernel)](input, weight, bias, stride=kernel)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        # Under autocast the forward ran in grad's dtype: so does backward; autograd casts the
        # gradients back to each input's own dtype, as it does after torch's convolution.
        dtype = grad.dtype
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = _input_gradient(grad, weight.to(dtype), input.shape)
        if need_weight or (need_bias and ctx.has_bias):
            dims = weight.dim() - 2
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad,
                input.to(dtype),
                weight.to(dtype),
                [weight.shape[0]] if ctx.has_bias else None,
                list(weight.shape[2:]),
                [0] * dims,
                [1] * dims,
                False,
                [0] * dims,
                1,
                [False, bool(need_weight), bool(need_bias and ctx.has_bias)],
            )
        return grad_input, grad_weight, grad_bias


def _input_gradient(grad: Tensor, weight: Tensor, input_shape: Sequence[int]) -> Tensor:
    # grad (N, D, n_1..n_d) at each patch position times the weight (D, C, k_1..k_d) gives each
    # patch's gradient; laid back in place, patch i of axis j covering [i * k_j, (i + 1) * k_j).
    batch, channels_out = grad.shape[:2]
    counts = tuple(grad.shape[2:])
    kernel = tuple(weight.shape[2:])
    channels_in = weight.shape[1]
    dims = len(counts)
    rows = grad.movedim(1, -1).reshape(-1, channels_out) @ weight.reshape(channels_out, -1)
    patches = rows.reshape(batch, *counts, channels_in, *kernel)
    order = [0, dims + 1] + [axis for i in range(dims) for axis in (1 + i, dims + 2 + i)]
    covered = patches.permute(order).reshape(batch, channels_in, *(n * k for n, k in zip(counts, kernel)))
    # Elements past the last whole patch take no part in the convolution: zero gradient.
    missing = [size - n * k for size, n, k in zip(input_shape[2:], counts, kernel)]
    if any(missing):
        covered = F.pad(covered, [amount for m in reversed(missing) for amount in (0, m)])
    return covered
