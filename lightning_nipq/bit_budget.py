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

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.quantizer_base import BaseQuantizer

BUDGETS: tuple[str, ...] = ("avg_bits", "bops")
FLOAT_BITS = 32.0


def _layer_quantizers(model: nn.Module) -> list[tuple[BaseQuantizer, Optional[BaseQuantizer]]]:
    from lightning_nipq.attach import quantized_layers

    return [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)]


def average_bits(quantizers: Sequence[BaseQuantizer]) -> Optional[Tensor]:
    """Element-weighted mean of the rounded bits (straight-through), None if nothing has a size yet."""
    sized = [q for q in quantizers if q.size > 0]
    if not sized:
        return None
    total = float(sum(q.size for q in sized))
    return torch.stack([q.bits() * (q.size / total) for q in sized]).sum()


def weight_and_act_average_bits(model: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(avg weight bits, avg input bits)`` of a fake-quantized model; calibrated inputs only."""
    return pair_average_bits(_layer_quantizers(model))


def pair_average_bits(
    pairs: Sequence[tuple[BaseQuantizer, Optional[BaseQuantizer]]],
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """As `weight_and_act_average_bits`, for ``(weight quantizer, input quantizer)`` pairs."""
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
        return self.loss_of(_layer_quantizers(model))

    def loss_of(self, pairs: Sequence[tuple[BaseQuantizer, Optional[BaseQuantizer]]]) -> Tensor:
        """The penalty for ``(weight quantizer, input quantizer or None)`` pairs, one per layer."""
        device = pairs[0][0].alpha.device if pairs else torch.device("cpu")
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
        self, pairs: Sequence[tuple[BaseQuantizer, Optional[BaseQuantizer]]], device: torch.device
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


#: Budget resolution of `fit_bits_to_budget`: the DP tracks at most this many states.
MAX_BUDGET_STATES = 1 << 18


def fit_bits_to_budget(quantizers: Sequence[BaseQuantizer], target: float) -> dict[int, int]:
    """Whole bits, one per quantizer, whose element-weighted mean is at most ``target``.

    Among all such assignments it returns the one closest to the learned continuous bits,
    measured as the element-weighted squared distance (a knapsack solved exactly by dynamic
    programming over the budget, discretised conservatively: each layer's cost is rounded
    up where it is not exact, so the true mean never exceeds the target). When the learned bits already meet the
    budget this is just their rounding. Frozen quantizers keep their bits. Rounding each
    layer on its own cannot do this: with a few large layers, the one budget-meeting
    rounding may need a small layer cut by two bits rather than a large one by one.
    Returns ``{id(quantizer): bits}``.
    """
    sized = [q for q in quantizers if q.size > 0]
    if not sized:
        return {}
    total = float(sum(q.size for q in sized))
    continuous = [float(q.continuous_bits().detach()) for q in sized]
    options = [
        list(range(q.lowest_bits, q.max_bits + 1)) if q.learns_bits else [q.rounded_bits()] for q in sized
    ]
    # Exact when the budget in units of the sizes' gcd fits in the table (it nearly always
    # does: layer sizes share large powers of two); otherwise costs are rounded up.
    gcd = functools.reduce(math.gcd, (q.size for q in sized))
    exact_states = math.floor(target * total / gcd + 1e-9)
    if exact_states <= MAX_BUDGET_STATES:
        states, unit = exact_states, float(gcd)
    else:
        states = MAX_BUDGET_STATES
        unit = target * total / states
    infinity = float("inf")
    cost = torch.full((states + 1,), infinity, dtype=torch.float64)
    cost[0] = 0.0
    choices: list[Tensor] = []
    for q, c, opts in zip(sized, continuous, options):
        best = torch.full_like(cost, infinity)
        pick = torch.full((states + 1,), -1, dtype=torch.int64)
        for index, b in enumerate(opts):
            used = math.ceil(q.size * b / unit - 1e-9)
            if used > states:
                continue
            shifted = torch.full_like(cost, infinity)
            shifted[used:] = cost[: states + 1 - used] + q.size * (b - c) ** 2
            better = shifted < best
            best = torch.where(better, shifted, best)
            pick = torch.where(better, torch.full_like(pick, index), pick)
        cost = best
        choices.append(pick)
    if not torch.isfinite(cost).any():
        # Even the lowest bits break the budget: give every layer its lowest bits.
        return {id(q): opts[0] for q, opts in zip(sized, options)}
    state = int(torch.argmin(cost))
    bits: dict[int, int] = {}
    for q, opts, pick in zip(reversed(sized), reversed(options), reversed(choices)):
        index = int(pick[state])
        b = opts[index]
        bits[id(q)] = b
        state -= math.ceil(q.size * b / unit - 1e-9)
    return bits
