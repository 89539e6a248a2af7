"""How much each learned bit-width costs the loss, measured from the gradients NIPQ gives the bits.

NIPQ's noise on a tensor quantized to ``b`` bits is ``U(-0.5, 0.5)`` times the step
``alpha / n(b)``, where ``n(b)`` is the largest code (`lightning_nipq.quant.codes.num_levels`).
To second order the loss it adds is proportional to the noise's variance:
``extra_loss(b) ~= c / n(b)**2``, where ``c`` sums the loss's curvature over the tensor's
elements times ``alpha**2 / 12``. The gradient the noise gives the bits is, in expectation,
``dL/db = -2 * ln(2) * (n + 1) / n * extra_loss(b)`` (``dn/db = ln(2) * (n + 1)``): each step's
bit gradient is a one-sample (Hutchinson-like) estimate of ``c``, averaged here over the noise
phase. For a quadratic loss the relation is exact in expectation (the tests check it).

Why it is needed: under an enforced budget the learned bits keep their average at the target,
and the optimizer (Adam normalises each step) moves every bit logit at about the same pace,
so a run of a few hundred steps leaves them within half a bit of each other. Rounding them to
whole bits then gives every layer the target's bits at a whole-bit target, whatever the layers'
sensitivities. `BitBudget.fit` with these costs chooses the whole bits that minimise the
predicted ``sum(c / n(b)**2)`` under the budget instead: sensitive layers above the target,
robust ones below.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from lightning_nipq.quant.base_quantizer import BaseQuantizer, logistic_bit_width
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.training.bit_vector import bit_vector, stack_scalars

#: A quantizer's cost is only trusted after this many noise-phase steps.
MIN_OBSERVATIONS = 8


def loss_increase(cost: float, bits: int, signed: bool) -> float:
    """The loss that noise at ``bits`` adds for a quantizer of sensitivity ``cost``: ``c / n(bits)**2``."""
    return cost / float(num_levels(bits, signed)) ** 2


def _gradient_per_cost(bits: Tensor, lowest: Tensor, highest: Tensor, signed: Tensor, stochastic: Tensor) -> Tensor:
    """``-E[dL/db] / c`` at the whole bits the forward used, for a vector of quantizers.

    Those are ``round(bits)``, or with stochastic bits (``stochastic``) ``round(bits + U(-0.5,
    0.5))``: ``floor(bits) + 1`` with probability equal to the fraction. Each is clamped to
    its quantizer's range ``[lowest, highest]``.
    """

    def at(whole: Tensor) -> Tensor:
        n = num_levels(whole.clamp(lowest, highest), signed)
        return 2 * math.log(2.0) * (n + 1) / n**3

    below = torch.floor(bits)
    fraction = bits - below
    return torch.where(stochastic, (1 - fraction) * at(below) + fraction * at(below + 1), at(torch.round(bits)))


class BitSensitivity:
    """Running estimates of ``c`` for named quantizers, kept on their device (no read-back per step).

    Example:

        >>> import torch
        >>> from lightning_nipq.quant.nipq_quantizer import NIPQQuantizer
        >>> q = NIPQQuantizer(signed=True, init_alpha=1.0)
        >>> sensitivity = BitSensitivity()
        >>> q(torch.randn(64)).pow(2).sum().backward()
        >>> sensitivity.observe({"layer.weight_quantizer": q})
        >>> sensitivity.observed_steps("layer.weight_quantizer")
        1
    """

    def __init__(self) -> None:
        # One running total per name, in one vector: a step adds its estimates with one operation.
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._totals: Optional[Tensor] = None
        self._counts: dict[str, int] = {}
        self._rows: Optional[tuple[tuple[str, ...], Tensor]] = None  # the last observed names' rows in the totals

    def reset(self) -> None:
        self._names, self._index, self._totals, self._rows = [], {}, None, None
        self._counts.clear()

    @torch.no_grad()
    def observe(self, named_quantizers: dict[str, BaseQuantizer], other_gradients: Optional[dict[str, Tensor]] = None) -> None:
        """Add one step's estimate for each quantizer that learns its bits, is in noise mode and has a gradient.

        ``other_gradients`` holds, by name, the part of a bit logit's gradient that is not the
        task loss's (the budget regulariser's), which is taken out first.
        """
        names, quantizers, logits = [], [], []
        for name, q in named_quantizers.items():
            if not q.learns_bits or getattr(q, "mode", "hard") != "noise" or q.stays_float or not q.calibrated:
                continue
            logit = q.logistic_bits()[0]
            if logit.grad is None:
                continue
            names.append(name)
            quantizers.append(q)
            logits.append(logit)
        if not names:
            return
        device = logits[0].device
        gradient = stack_scalars([logit.grad for logit in logits]).detach()  # type: ignore[misc]
        if other_gradients:
            zero = gradient.new_zeros(())
            gradient = gradient - stack_scalars([other_gradients[n] if n in other_gradients else zero for n in names]).detach()
        # The quantizers' constants, kept on the device between steps (no host-to-device copy per step).
        vector = bit_vector(quantizers)
        logit_values = vector.logits().detach()
        share = torch.sigmoid(logit_values)
        # bits = low + span * sigmoid(logit): dL/db = dL/dlogit / (span * s * (1 - s)).
        slope = ((vector.high - vector.low) * share * (1 - share)).clamp_min(1e-12)
        bits = logistic_bit_width(logit_values, vector.low, vector.high)
        per_cost = _gradient_per_cost(bits, vector.lowest, vector.highest, vector.signed, vector.stochastic)
        estimate = torch.nan_to_num(-(gradient / slope) / per_cost, nan=0.0, posinf=0.0, neginf=0.0)
        new = [n for n in names if n not in self._index]
        if new or self._totals is None:
            for n in new:
                self._index[n] = len(self._names)
                self._names.append(n)
            grown = torch.zeros(len(self._names), dtype=torch.float32, device=device)
            if self._totals is not None:
                grown[: len(self._totals)] = self._totals.to(device)
            self._totals = grown
        key = tuple(names)
        if self._rows is None or self._rows[0] != key or self._rows[1].device != device:
            self._rows = (key, torch.tensor([self._index[n] for n in names], dtype=torch.long, device=device))
        self._totals = self._totals.to(device).index_add_(0, self._rows[1], estimate)
        for n in names:
            self._counts[n] = self._counts.get(n, 0) + 1

    def observed_steps(self, name: str) -> int:
        return self._counts.get(name, 0)

    def costs(self, named_quantizers: dict[str, BaseQuantizer]) -> Optional[dict[int, float]]:
        """``{id(quantizer): c}`` for the quantizers that learn their bits, or None if one lacks an estimate.

        A negative mean (noise that did not measurably hurt) counts as zero: the layer is then
        as cheap to cut as any.
        """
        learning = {name: q for name, q in named_quantizers.items() if q.learns_bits and q.calibrated and not q.stays_float}
        if not learning or any(self._counts.get(name, 0) < MIN_OBSERVATIONS for name in learning):
            return None
        totals = self._host_totals()
        return {id(q): max(totals[name] / self._counts[name], 0.0) for name, q in learning.items()}

    def _host_totals(self) -> dict[str, float]:
        values = self._totals.tolist() if self._totals is not None else []
        return dict(zip(self._names, values))

    def state_dict(self) -> dict[str, list[float]]:
        return {name: [total, float(self._counts[name])] for name, total in self._host_totals().items()}

    def load_state_dict(self, state: dict[str, Iterable[float]], device: torch.device) -> None:
        self.reset()
        totals = []
        for name, pair in state.items():
            total, count = (float(v) for v in pair)
            self._index[name] = len(self._names)
            self._names.append(name)
            totals.append(total)
            self._counts[name] = int(count)
        if totals:
            self._totals = torch.tensor(totals, dtype=torch.float32, device=device)
