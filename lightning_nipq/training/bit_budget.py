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

When bits freeze, `BitBudget.fit` picks whole bits that meet the budget exactly as the loss
measures it (`fit_bits_to_budget` for average bits, `fit_bops_to_budget` for BOPs), nearest
to the learned bits, so the integer model never exceeds it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.layers.model_walk import product_quantizers, quantized_layers, quantized_products
from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.training.bit_sensitivity import loss_increase
from lightning_nipq.training.bit_vector import BitVector, LogitTap, bit_vector, smallest_shift

BUDGETS: tuple[str, ...] = ("avg_bits", "bops")
FLOAT_BITS = 32.0
#: A layer's ``(weight quantizer, input quantizer or None)``; an activation product's operand is ``(None, quantizer)``.
Pair = tuple[Optional[BaseQuantizer], Optional[BaseQuantizer]]


def model_pairs(model: nn.Module) -> list[Pair]:
    """The pairs of ``model``: ``(weight, input)`` of every quantized layer, then ``(None, operand)`` for each operand of its activation products.

    An operand of a product is an input like a layer's, so it counts in the average input
    bits; having no weight, it has no BOPs of a layer (``"bops"`` counts layers only).
    """
    return [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)] + product_pairs(model)


def product_pairs(model: nn.Module) -> list[Pair]:
    """``(None, operand quantizer)`` for each operand of the activation products of ``model``: inputs without a weight."""
    return [(None, q) for _, product in quantized_products(model) for q in product_quantizers(product)]


def _weights(pairs: Sequence[Pair]) -> list[BaseQuantizer]:
    return [w for w, _ in pairs if w is not None]


def unique(quantizers: Sequence[BaseQuantizer]) -> list[BaseQuantizer]:
    """Each quantizer once, in order: layers with one (tied) weight share its quantizer, whose elements count once."""
    seen: set[int] = set()
    out = []
    for q in quantizers:
        if id(q) not in seen:
            seen.add(id(q))
            out.append(q)
    return out


def merged_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs with each weight quantizer once, for the MAC-weighted budgets.

    Layers with one (tied) weight share its quantizer, and its ``macs`` are those of the
    first of them that multiplies (an ``nn.Embedding`` tied to an ``nn.Linear``, as GPT-2's,
    has none, so the Linear's count). The merged pair takes the first input quantizer among
    them; the BOPs of a second tied layer that quantizes its own input are not counted.
    """
    merged: dict[int, Pair] = {}
    for w, a in pairs:
        if w is None:
            continue  # an activation product's operand: no weight, no BOPs of a layer
        if id(w) not in merged or (merged[id(w)][1] is None and a is not None):
            merged[id(w)] = (w, a)
    return list(merged.values())


def average_bits(quantizers: Sequence[BaseQuantizer], tap: Optional[LogitTap] = None) -> Optional[Tensor]:
    """Element-weighted mean of the rounded bits (straight-through), None if nothing has a size yet.

    A quantizer listed twice (shared by tied layers) counts once. With ``tap`` the learned bits
    reach their logits through it (see `BitBudget.loss_of`).
    """
    sized = [q for q in unique(quantizers) if q.size > 0]
    if not sized:
        return None
    vector = bit_vector(sized)
    return vector.average(_learned_logits(vector, tap))


def weight_and_act_average_bits(model: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(avg weight bits, avg input bits)`` of a fake-quantized model; calibrated inputs only."""
    return pair_average_bits(model_pairs(model))


def pair_average_bits(
    pairs: Sequence[Pair],
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """As `weight_and_act_average_bits`, for ``(weight quantizer, input quantizer)`` pairs."""
    weights = _weights(pairs)
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
        return self.loss_of(model_pairs(model))

    def loss_of(self, pairs: Sequence[Pair], tap: Optional[LogitTap] = None) -> Tensor:
        """The penalty for ``(weight quantizer, input quantizer or None)`` pairs, one per layer.

        With ``tap`` (built from every learning quantizer's bit logit) the penalty reaches the
        logits through it, which records the penalty's share of their gradients.
        """
        first = next((q for pair in pairs for q in pair if q is not None), None)
        device = first.alpha.device if first is not None else torch.device("cpu")
        if self.budget == "bops":
            return self._bops_loss(pairs, device, tap)
        total = torch.zeros((), device=device)
        weights = _weights(pairs)
        inputs = [a for _, a in pairs if a is not None and a.calibrated]
        for group, target in ((weights, self.target_bits), (inputs, self.target_act_bits)):
            if not any(q.learns_bits for q in group):
                continue
            avg = average_bits(group, tap)
            if avg is not None:
                total = total + F.smooth_l1_loss(avg, torch.full_like(avg, float(target)))
        return total

    def fit(self, pairs: Sequence[Pair], fill: bool = False, costs: Optional[Mapping[int, float]] = None) -> dict[int, int]:
        """Whole bits for the ``(weight quantizer, input quantizer or None)`` pairs that meet this budget.

        ``"avg_bits"`` fits weights and inputs to their own targets (`fit_bits_to_budget`),
        ``"bops"`` both together (`fit_bops_to_budget`); ``fill`` uses the budget to within
        `FILL_TOLERANCE`; ``costs`` (``{id(quantizer): c}``, see
        `lightning_nipq.training.bit_sensitivity`) minimises the predicted loss instead of the
        distance to the learned bits. Returns ``{id(quantizer): bits}``.
        """
        if self.budget == "bops":
            return fit_bops_to_budget(pairs, self.target_bits, float(self.target_act_bits), fill, costs)  # type: ignore[arg-type]
        weights = _weights(pairs)
        inputs = [a for _, a in pairs if a is not None and a.calibrated]
        return {
            **fit_bits_to_budget(weights, self.target_bits, fill, costs),
            **fit_bits_to_budget(inputs, float(self.target_act_bits), fill, costs),  # type: ignore[arg-type]
        }

    def excess(self, pairs: Sequence[Pair]) -> list[tuple[str, float, float]]:
        """``(what, learned value, target)`` for each quantity the budget bounds, from the learned (rounded) bits."""
        if self.budget == "bops":
            measured = [(w, a) for w, a in merged_pairs(pairs) if w.macs > 0]
            if not measured:
                return []
            macs = float(sum(w.macs for w, _ in measured))
            learned = target = 0.0
            for w, a in measured:
                quantized_input = a is not None and a.calibrated
                act_bits = float(a.bits()) if quantized_input else FLOAT_BITS  # type: ignore[union-attr]
                act_target = float(self.target_act_bits) if quantized_input else FLOAT_BITS  # type: ignore[arg-type]
                learned += w.macs / macs * float(w.bits()) * act_bits
                target += w.macs / macs * self.target_bits * act_target
            return [("BOPs per MAC", learned, target)]
        rows = []
        weights = _weights(pairs)
        inputs = [a for _, a in pairs if a is not None and not a.stays_float]  # a float input has no bits
        for label, group, target_value in (
            ("average weight bits", weights, self.target_bits),
            ("average input bits", inputs, float(self.target_act_bits)),  # type: ignore[arg-type]
        ):
            if not any(q.learns_bits and q.calibrated for q in group):
                continue
            value = average_bits(group)
            if value is not None:
                rows.append((label, float(value), float(target_value)))
        return rows

    @torch.no_grad()
    def project(self, pairs: Sequence[Pair]) -> None:
        """Shift the learned bits so that they meet this budget, keeping their differences.

        The bit parameter of every quantizer that learns its bits (calibrated inputs only)
        moves by the same amount ``delta`` (its logit: ``bits = low + (high - low) *
        sigmoid(logit - delta)``, so no bit-width leaves its range and the differences that
        training made between the parameters stay as they are). ``delta`` is the smallest
        shift at which the budget holds for the element-weighted average
        of the continuous bits (``"avg_bits"``, weights and inputs each to their own target)
        or the MAC-weighted mean of ``b_w * b_a`` (``"bops"``); stochastic rounding trains at
        the continuous bits on average. The task loss still moves each layer up or down
        against the others: the allocation is learned, the average is not left to the
        regulariser's pace. The search (`lightning_nipq.training.bit_vector.smallest_shift`) tries
        128 shifts at once in each of four rounds, on the quantizers' device, and reads nothing
        back from it.
        """
        if self.budget == "bops":
            self._project_bops(pairs)
            return
        weights = _weights(pairs)
        inputs = [a for _, a in pairs if a is not None and a.calibrated]
        for group, target in ((weights, self.target_bits), (inputs, float(self.target_act_bits))):  # type: ignore[arg-type]
            sized = [q for q in unique(group) if q.size > 0]
            if not any(q.learns_bits for q in sized):
                continue
            vector = bit_vector(sized)
            logits, sizes = vector.logits(), vector.sizes[:, None]
            need = target * sum(q.size for q in sized)
            delta = smallest_shift(lambda d: (sizes * vector.continuous_at(d, logits)).sum(0) - need, vector.device)
            vector.shift(delta)

    def _project_bops(self, pairs: Sequence[Pair]) -> None:
        measured = [(w, a if a is not None and a.calibrated else None) for w, a in merged_pairs(pairs) if w.macs > 0]
        if not any(q is not None and q.learns_bits for pair in measured for q in pair):
            return
        macs = sum(w.macs for w, _ in measured)
        target = sum(
            w.macs / macs * self.target_bits * (float(self.target_act_bits) if a is not None else FLOAT_BITS)  # type: ignore[arg-type]
            for w, a in measured
        )
        weights = _ShiftedSide([w for w, _ in measured])
        inputs = _ShiftedSide([a for _, a in measured])
        # Every measured layer has a weight quantizer, so that side has a vector.
        device = weights.vector.device  # type: ignore[union-attr]
        shares = torch.tensor([w.macs / macs for w, _ in measured], device=device)[:, None]
        delta = smallest_shift(lambda d: (shares * weights.at(d) * inputs.at(d)).sum(0) - target, device)
        for side in (weights, inputs):
            if side.vector is not None:
                side.vector.shift(delta)

    def _bops_loss(self, pairs: Sequence[Pair], device: torch.device, tap: Optional[LogitTap]) -> Tensor:
        measured = [(w, a if a is not None and a.calibrated else None) for w, a in merged_pairs(pairs) if w.macs > 0]
        learnable = any(w.learns_bits or (a is not None and a.learns_bits) for w, a in measured)
        if not measured or not learnable:
            return torch.zeros((), device=device)
        macs = float(sum(w.macs for w, _ in measured))
        shares = [w.macs / macs for w, _ in measured]
        target = sum(
            share * float(self.target_bits) * (float(self.target_act_bits) if a is not None else FLOAT_BITS)  # type: ignore[arg-type]
            for share, (_, a) in zip(shares, measured)
        )
        weight_bits = _bits(bit_vector([w for w, _ in measured]), tap)
        act_bits = torch.full((len(measured),), FLOAT_BITS, device=weight_bits.device)
        present = [i for i, (_, a) in enumerate(measured) if a is not None]
        if present:
            act_bits = act_bits.index_put(
                (torch.tensor(present, device=weight_bits.device),),
                _bits(bit_vector([measured[i][1] for i in present]), tap),  # type: ignore[misc]
            )
        mean = (weight_bits * act_bits * weight_bits.new_tensor(shares)).sum()
        return F.smooth_l1_loss(mean, torch.full_like(mean, target))


def _learned_logits(vector: BitVector, tap: Optional[LogitTap]) -> Optional[Tensor]:
    return vector.logits(tap) if tap is not None and vector.learns else None


def _bits(vector: BitVector, tap: Optional[LogitTap]) -> Tensor:
    return vector.bits(_learned_logits(vector, tap))


class _ShiftedSide:
    """One side (weights or inputs) of every measured layer as a function of a common shift of the learned logits.

    ``at(d)`` gives a row per layer and a column per shift: learned bits move, frozen bits and
    float inputs (None, 32 bits) do not.
    """

    def __init__(self, quantizers: Sequence[Optional[BaseQuantizer]]) -> None:
        self.count = len(quantizers)
        present = [i for i, q in enumerate(quantizers) if q is not None]
        self.vector = bit_vector([quantizers[i] for i in present]) if present else None  # type: ignore[misc]
        if self.vector is not None:
            self.rows = torch.tensor(present, dtype=torch.long, device=self.vector.device)
            self.logits = self.vector.logits()

    def at(self, shifts: Tensor) -> Tensor:
        out = torch.full((self.count, len(shifts)), FLOAT_BITS, device=shifts.device)
        if self.vector is not None:
            out[self.rows] = self.vector.continuous_at(shifts, self.logits)
        return out


#: Budget resolution of the fits: the dynamic programme tracks at most this many states.
MAX_BUDGET_STATES = 1 << 18


#: With ``fill``, the freeze uses the budget to within this many bits of the average (or, for
#: BOPs, of the weight bits times the input target).
FILL_TOLERANCE = 0.05


def _cheapest_within(
    items: Sequence[Sequence[tuple[int, float]]], budget: float, slack: Optional[float] = None
) -> Optional[list[int]]:
    """One option per item, ``(cost, distance)`` each, minimising the total distance with total cost <= ``budget``.

    With ``slack``, only choices whose total cost is within ``slack`` of the highest
    achievable total (at most ``budget``) are considered.

    A knapsack solved exactly by dynamic programming over the budget, discretised
    conservatively: exact when the budget in units of the costs' gcd fits in the table (it
    nearly always does: layer sizes share large powers of two); otherwise each cost is
    rounded up, so the true total never exceeds the budget. None if no choice fits.
    """
    gcd = functools.reduce(math.gcd, (cost for options in items for cost, _ in options))
    if gcd == 0:
        return [0 for _ in items]
    exact_states = math.floor(budget / gcd + 1e-9)
    if exact_states < 0:
        return None
    if exact_states <= MAX_BUDGET_STATES:
        states, unit = exact_states, float(gcd)
    else:
        states, unit = MAX_BUDGET_STATES, budget / MAX_BUDGET_STATES
    infinity = float("inf")
    total = torch.full((states + 1,), infinity, dtype=torch.float64)
    total[0] = 0.0
    picks: list[Tensor] = []
    for options in items:
        best = torch.full_like(total, infinity)
        pick = torch.full((states + 1,), -1, dtype=torch.int64)
        for index, (cost, distance) in enumerate(options):
            used = math.ceil(cost / unit - 1e-9)
            if used > states:
                continue
            shifted = torch.full_like(total, infinity)
            shifted[used:] = total[: states + 1 - used] + distance
            better = shifted < best
            best = torch.where(better, shifted, best)
            pick = torch.where(better, torch.full_like(pick, index), pick)
        total = best
        picks.append(pick)
    reachable = torch.isfinite(total)
    if not reachable.any():
        return None
    if slack is not None:
        fullest = int(reachable.nonzero().max())
        total = torch.where(torch.arange(states + 1) >= fullest - math.floor(slack / unit), total, torch.full_like(total, infinity))
    state = int(torch.argmin(total))
    chosen: list[int] = []
    for options, pick in zip(reversed(items), reversed(picks)):
        index = int(pick[state])
        chosen.append(index)
        state -= math.ceil(options[index][0] / unit - 1e-9)
    return chosen[::-1]


def _bit_options(q: BaseQuantizer) -> list[int]:
    return list(range(q.lowest_bits, q.highest_bits + 1)) if q.learns_bits else [q.rounded_bits()]


def _penalty(q: BaseQuantizer, bits: int, costs: Optional[Mapping[int, float]], weight: float) -> float:
    """What choosing ``bits`` for ``q`` costs: its predicted loss with ``costs``, else ``weight`` times the squared distance to its learned bits."""
    if not q.learns_bits:
        return 0.0
    if costs is not None:
        return loss_increase(costs[id(q)], bits, q.signed)
    return weight * (bits - float(q.continuous_bits().detach())) ** 2


def _complete(costs: Optional[Mapping[int, float]], quantizers: Sequence[Optional[BaseQuantizer]]) -> Optional[Mapping[int, float]]:
    # One objective for all: costs only count when every learning quantizer has one.
    if costs is None or any(q is not None and q.learns_bits and id(q) not in costs for q in quantizers):
        return None
    return costs


def fit_bits_to_budget(
    quantizers: Sequence[BaseQuantizer], target: float, fill: bool = False, costs: Optional[Mapping[int, float]] = None
) -> dict[int, int]:
    """Whole bits, one per quantizer, whose element-weighted mean is at most ``target``.

    With ``costs`` (``{id(quantizer): c}`` for every quantizer that learns its bits, see
    `lightning_nipq.training.bit_sensitivity`), it returns the assignment with the least
    predicted loss ``sum(c / n(b)**2)``. Otherwise, among all such assignments it returns the one
    closest to the learned continuous bits,
    measured as the element-weighted squared distance (see `_cheapest_within`). When the
    learned bits already meet the budget this is just their rounding. Frozen quantizers keep
    their bits. Rounding each layer on its own cannot do this: with a few large layers, the
    one budget-meeting rounding may need a small layer cut by two bits rather than a large
    one by one. With ``fill``, only assignments that use the budget to within
    `FILL_TOLERANCE` of the fullest possible are considered: rounding a few large layers down
    can otherwise leave much of it unused (learned bits averaging 3 rounded to 2.67 on the
    demo's CNN). Returns ``{id(quantizer): bits}``.
    """
    sized = [q for q in unique(quantizers) if q.size > 0]
    if not sized:
        return {}
    costs = _complete(costs, sized)
    total = float(sum(q.size for q in sized))
    options = [_bit_options(q) for q in sized]
    items = [[(q.size * b, _penalty(q, b, costs, q.size)) for b in opts] for q, opts in zip(sized, options)]
    chosen = _cheapest_within(items, target * total, FILL_TOLERANCE * total if fill else None)
    if chosen is None:
        # Even the lowest bits break the budget: give every layer its lowest bits.
        return {id(q): opts[0] for q, opts in zip(sized, options)}
    return {id(q): opts[index] for q, opts, index in zip(sized, options, chosen)}


def fit_bops_to_budget(
    pairs: Sequence[Pair],
    target_bits: float,
    target_act_bits: float,
    fill: bool = False,
    costs: Optional[Mapping[int, float]] = None,
) -> dict[int, int]:
    """Whole weight and input bits whose MAC-weighted mean of ``b_w * b_a`` is at most the BOPs target.

    The target is the loss's: ``target_bits * target_act_bits`` per MAC, with ``b_a = 32`` for
    a layer whose input stays float (or is not calibrated), in the target as well. Among the
    assignments that meet it, the one nearest to the learned bits is returned (squared
    distance, each quantizer weighted by its share of the weight or input elements). Layers
    that have not run yet (no MACs) keep their rounded bits. ``fill`` as for
    `fit_bits_to_budget`, the tolerance in bits of the weight times `target_act_bits`;
    ``costs`` as there (the predicted losses of a layer's weight and input add up).
    Returns ``{id(quantizer): bits}``.
    """
    measured = [(w, a if a is not None and a.calibrated else None) for w, a in merged_pairs(pairs) if w.macs > 0]
    if not measured:
        return {}
    costs = _complete(costs, [q for pair in measured for q in pair])
    weight_total = float(sum(w.size for w, _ in measured)) or 1.0
    input_total = float(sum(a.size for _, a in measured if a is not None)) or 1.0
    budget = 0.0
    items = []
    choices = []
    for w, a in measured:
        w_opts = _bit_options(w)
        a_opts = [int(FLOAT_BITS)] if a is None else _bit_options(a)
        options = [(bw, ba) for bw in w_opts for ba in a_opts]
        choices.append(options)
        items.append(
            [
                (
                    w.macs * bw * ba,
                    _penalty(w, bw, costs, w.size / weight_total)
                    + (0.0 if a is None else _penalty(a, ba, costs, a.size / input_total)),
                )
                for bw, ba in options
            ]
        )
        budget += w.macs * float(target_bits) * (float(target_act_bits) if a is not None else FLOAT_BITS)
    macs = float(sum(w.macs for w, _ in measured))
    slack = FILL_TOLERANCE * float(target_act_bits) * macs if fill else None
    chosen = _cheapest_within(items, budget, slack)
    bits: dict[int, int] = {}
    for (w, a), options, index in zip(measured, choices, chosen or [0] * len(measured)):
        bw, ba = options[index]  # the first option is the lowest bits, used when nothing fits
        bits[id(w)] = bw
        if a is not None:
            bits[id(a)] = ba
    return bits
