"""The bit-budget regulariser and the final fit of whole bits to the budget. Plain torch.

Two budgets (DESIGN.md section 2, with the released code's bugs fixed):

``"avg_bits"``
    ``SmoothL1(avg_w, target_w) + SmoothL1(avg_a, target_a)`` where ``avg_w`` is the
    element-weighted mean of the weight quantizers' (straight-through rounded) bits and
    ``avg_a`` that of the input quantizers only. Normalising by the element count makes
    the penalty a number of bits, independent of model size.
``"bops"``
    ``SmoothL1(BOPs / MACs, target_w * target_a)``: the MAC-weighted mean of
    ``b_w * b_a`` over layers, so activation bits get their gradient too. A layer whose
    input stays float counts with ``b_a = 32``, in the target as well.

Both are two-sided: bits below the target are pushed up as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.quantizer import NIPQQuantizer

BUDGETS: tuple[str, ...] = ("avg_bits", "bops")
FLOAT_BITS = 32.0


def _layer_quantizers(model: nn.Module) -> list[tuple[NIPQQuantizer, Optional[NIPQQuantizer]]]:
    from lightning_nipq.attach import quantized_layers

    return [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)]


def average_bits(quantizers: Sequence[NIPQQuantizer]) -> Optional[Tensor]:
    """Element-weighted mean of the rounded bits (straight-through), None if nothing has a size yet."""
    sized = [q for q in quantizers if q.size > 0]
    if not sized:
        return None
    total = float(sum(q.size for q in sized))
    return torch.stack([q.bits() * (q.size / total) for q in sized]).sum()


def weight_and_act_average_bits(model: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(avg weight bits, avg input bits)`` of a fake-quantized model; calibrated inputs only."""
    pairs = _layer_quantizers(model)
    weights = [w for w, _ in pairs]
    inputs = [a for _, a in pairs if a is not None and a.calibrated]
    return average_bits(weights), average_bits(inputs)


@dataclass
class BitBudget:
    """The regulariser for one target. ``target_act_bits`` defaults to ``target_bits``."""

    target_bits: float
    target_act_bits: Optional[float] = None
    budget: str = "avg_bits"

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.target_act_bits is None:
            self.target_act_bits = self.target_bits

    def loss(self, model: nn.Module) -> Tensor:
        """The penalty for the model's current bits; zero (with no graph) if no bit is learnable."""
        pairs = _layer_quantizers(model)
        device = pairs[0][0].theta.device if pairs else torch.device("cpu")
        if self.budget == "bops":
            return self._bops_loss(pairs, device)
        total = torch.zeros((), device=device)
        weights = [w for w, _ in pairs]
        inputs = [a for _, a in pairs if a is not None and a.calibrated]
        for group, target in ((weights, self.target_bits), (inputs, self.target_act_bits)):
            if not any(q.learns_bits for q in group):
                continue
            avg = average_bits(group)
            if avg is not None:
                total = total + F.smooth_l1_loss(avg, torch.full_like(avg, float(target)))
        return total

    def _bops_loss(
        self, pairs: list[tuple[NIPQQuantizer, Optional[NIPQQuantizer]]], device: torch.device
    ) -> Tensor:
        measured = [(w, a) for w, a in pairs if w.macs > 0]
        learnable = any(w.learns_bits or (a is not None and a.learns_bits) for w, a in measured)
        if not measured or not learnable:
            return torch.zeros((), device=device)
        macs = float(sum(w.macs for w, _ in measured))
        bops = []
        target = 0.0
        for w, a in measured:
            quantized_input = a is not None and a.calibrated
            act_bits = a.bits() if quantized_input else torch.tensor(FLOAT_BITS, device=device)
            share = w.macs / macs
            bops.append(w.bits() * act_bits * share)
            target += share * float(self.target_bits) * (float(self.target_act_bits) if quantized_input else FLOAT_BITS)
        mean = torch.stack(bops).sum()
        return F.smooth_l1_loss(mean, torch.full_like(mean, target))


def fit_bits_to_budget(quantizers: Sequence[NIPQQuantizer], target: float) -> dict[int, int]:
    """Whole bits for each quantizer whose element-weighted mean is at most ``target`` and close to it.

    Starts from the rounded learned bits. While the mean is over budget, lowers by one bit
    the learnable layer that rounding pushed up the most; then, while some layer can gain
    a bit without breaking the budget, raises the one that rounding pushed down the most.
    Lowering a large layer can overshoot far below the target; the second pass spends that
    slack. Returns ``{id(quantizer): bits}``.
    """
    sized = [q for q in quantizers if q.size > 0]
    bits = {id(q): q.rounded_bits() for q in sized}
    total = float(sum(q.size for q in sized))
    if total == 0:
        return bits
    continuous = {id(q): float(q.continuous_bits().detach()) for q in sized}
    budget = target * total + 1e-6

    def used() -> float:
        return sum(bits[id(q)] * q.size for q in sized)

    while used() > budget:
        lowerable = [q for q in sized if q.learns_bits and bits[id(q)] > q.lowest_bits]
        if not lowerable:
            break
        choice = max(lowerable, key=lambda q: (bits[id(q)] - continuous[id(q)], -q.size))
        bits[id(choice)] -= 1
    while True:
        slack = budget - used()
        raisable = [q for q in sized if q.learns_bits and bits[id(q)] < q.max_bits and q.size <= slack]
        if not raisable:
            break
        choice = max(raisable, key=lambda q: (continuous[id(q)] - bits[id(q)], q.size))
        bits[id(choice)] += 1
    return bits
