"""Symmetry regularisation (SymReg): pull each weight distribution toward symmetry around zero. Plain torch.

A symmetric quantizer (range ``[-alpha, alpha]``, zero exactly representable) applied to
a skewed weight distribution shifts its mean: the rounding errors on the long side do not
cancel those on the short side. Reconstructed from Park, Jang and Park, "Symmetry
Regularization and Saturating Nonlinearity for Robust Quantization" (ECCV 2022), whose full
text was not available: with the weights of a layer sorted, ``w(1) <= ... <= w(n)``, the
penalty is the mean over the lower half of ``(w(i) + w(n+1-i))^2``. It is zero exactly when
the sorted weights are mirror images of each other around zero.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def symmetry_penalty(weight: Tensor) -> Tensor:
    """``mean_i (w(i) + w(n+1-i))^2`` over ``i = 1..floor(n/2)`` of the sorted elements of ``weight``.

    Differentiable (the gradient flows through the sort to the elements it picks). Zero for a
    tensor with fewer than two elements, and for one whose sorted values mirror around zero.
    """
    flat = weight.reshape(-1)
    half = flat.numel() // 2
    if half == 0:
        return flat.new_zeros(())
    ordered = torch.sort(flat).values
    # Pair the i-th smallest with the i-th largest; a symmetric distribution sums to zero.
    pairs = ordered[:half] + ordered.flip(0)[:half]
    return pairs.square().mean()


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise convolution (one group per input channel, more than one channel).

    SymReg leaves these out: each of their filters has only ``k x k`` weights, too few
    for a per-layer distribution to mean much, and they are often quantized per channel.
    """
    return isinstance(module, _CONVS) and module.groups > 1 and module.groups == module.in_channels


def total_symmetry_penalty(layers: Iterable[nn.Module]) -> Tensor:
    """The sum of `symmetry_penalty` over the ``weight`` of every layer (an empty iterable gives 0)."""
    total: Tensor | None = None
    for layer in layers:
        penalty = symmetry_penalty(layer.weight)
        total = penalty if total is None else total + penalty
    return torch.zeros(()) if total is None else total
