"""The bits of many quantizers as one vector: per-step budget work in a few tensor operations.

The budget's loss, its projection, the sensitivities' observation and the logged averages run
every training step over every quantizer. Written quantizer by quantizer they took tens of
small tensor operations each, about 1,400 per step for the benchmark's 19-quantizer ResNet:
several milliseconds on a CPU, where they were a sixth of a compiled step, and a kernel launch
each on a GPU. `BitVector` stacks the quantizers' bit logits once and does the rest as
arithmetic on vectors, with the quantizers' own definitions of their bits
(`lightning_nipq.quant.base_quantizer.logistic_bit_width` and ``whole_bits``).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from lightning_nipq.quant.base_quantizer import BaseQuantizer, logistic_bit_width, shift_logits, whole_bits


class BitVector:
    """The bits of ``quantizers`` (in order; one may appear twice) as vectors on their device.

    Quantizers that learn their bits contribute through their bit logit
    (`BaseQuantizer.logistic_bits`), so gradients reach it; frozen ones contribute constants.
    Built from the quantizers' state at construction: `bit_vector` builds another when that
    changes (bits freeze, a size is measured, the model moves). It keeps the logits, not the
    quantizers.

    Example:

        >>> from lightning_nipq import NIPQQuantizer
        >>> quantizers = [NIPQQuantizer(init_bits=b) for b in (3.0, 5.0)]
        >>> for q, size in zip(quantizers, (100, 300)):
        ...     q.size = size
        >>> round(float(BitVector(quantizers).average(whole=False).detach()), 3)
        4.5
    """

    def __init__(self, quantizers: Sequence[BaseQuantizer]) -> None:
        if not quantizers:
            raise ValueError("BitVector needs at least one quantizer")
        quantizers = list(quantizers)
        self.count = len(quantizers)
        self.learning = [i for i, q in enumerate(quantizers) if q.learns_bits]
        forms = [quantizers[i].logistic_bits() for i in self.learning]
        device = _device_of(quantizers[0])
        self.device = device
        self._logits = [logit for logit, _, _ in forms]
        vector = lambda values: torch.tensor(values, dtype=torch.float32, device=device)  # noqa: E731
        self.low = vector([low for _, low, _ in forms])
        self.high = vector([high for _, _, high in forms])
        learning_q = [quantizers[i] for i in self.learning]
        self.lowest = vector([float(q.lowest_bits) for q in learning_q])
        self.highest = vector([float(q.highest_bits) for q in learning_q])
        #: Per learning quantizer: signed codes, and bits rounded stochastically in the noise phase.
        self.signed = torch.tensor([bool(q.signed) for q in learning_q], dtype=torch.bool, device=device)
        self.stochastic = torch.tensor([_stochastic(q) for q in learning_q], dtype=torch.bool, device=device)
        self.sizes = vector([float(q.size) for q in quantizers])
        total = float(sum(q.size for q in quantizers))
        self.shares = vector([q.size / total if total > 0 else 0.0 for q in quantizers])
        # Frozen bits, continuous (the frozen value) and whole (as `bits` clamps it), without tensor work.
        fixed = [i for i in range(self.count) if i not in set(self.learning)]
        self._fixed_index = torch.tensor(fixed, dtype=torch.long, device=device)
        self.learning_index = torch.tensor(self.learning, dtype=torch.long, device=device)
        frozen = [quantizers[i] for i in fixed]
        self._fixed_continuous = vector([float(q.frozen_bits) for q in frozen])  # type: ignore[arg-type]
        self._fixed_whole = vector([float(q.frozen_whole_bits()) for q in frozen])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.count

    @property
    def learns(self) -> bool:
        """Whether any of the quantizers learns its bits."""
        return bool(self.learning)

    def logits(self, tap: Optional[LogitTap] = None) -> Tensor:
        """The learning quantizers' bit logits, stacked (float32, in the autograd graph); taken from ``tap`` if given."""
        if tap is not None:
            return tap.select(self._logits)
        return stack_scalars(self._logits)

    def learned_bits(self, logits: Optional[Tensor] = None, whole: bool = True) -> Tensor:
        """Bits of the learning quantizers only: whole (straight-through) or continuous, at ``logits`` (default: theirs)."""
        bits = logistic_bit_width(self.logits() if logits is None else logits, self.low, self.high)
        return whole_bits(bits, self.lowest, self.highest) if whole else bits

    def bits(self, logits: Optional[Tensor] = None, whole: bool = True) -> Tensor:
        """Every quantizer's bits, in order: as `BaseQuantizer.bits` (``whole``) or `BaseQuantizer.continuous_bits` give them."""
        fixed = self._fixed_whole if whole else self._fixed_continuous
        if not self.learning:
            return fixed
        learned = self.learned_bits(logits, whole)
        if not len(fixed):
            return learned
        out = torch.empty(self.count, dtype=learned.dtype, device=self.device)
        out = out.index_put((self._fixed_index,), fixed)
        return out.index_put((self.learning_index,), learned)

    def continuous_at(self, shifts: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        """Continuous bits with every learning logit lowered by each of ``shifts``: a row per quantizer, a column per shift.

        Frozen quantizers' rows stay at their bits. ``logits`` (default: theirs) saves
        stacking them again when one search evaluates many shifts.
        """
        logits = self.logits() if logits is None else logits
        out = self._fixed_continuous.new_empty((self.count, len(shifts)))
        if len(self._fixed_continuous):
            out[self._fixed_index] = self._fixed_continuous[:, None]
        if self.learning:
            out[self.learning_index] = logistic_bit_width(logits[:, None] - shifts, self.low[:, None], self.high[:, None])
        return out

    def average(self, logits: Optional[Tensor] = None, whole: bool = True) -> Tensor:
        """The size-weighted mean of `bits` (listed twice, a quantizer counts twice: pass each once)."""
        return (self.bits(logits, whole) * self.shares).sum()

    def shift(self, delta: Tensor) -> None:
        """Lower every learning quantizer's bit logit by ``delta`` (`BaseQuantizer.shift_bit_logit`, for all at once)."""
        unique: dict[int, Tensor] = {}
        for logit in self._logits:
            unique.setdefault(id(logit), logit)
        shift_logits(list(unique.values()), delta)


def stack_scalars(values: Sequence[Tensor]) -> Tensor:
    """One-element tensors (bit logits, their gradients) as one float32 vector, in the autograd graph.

    Bit logits are 0-d float32 parameters unless a model was cast: then one ``stack`` does it,
    where a reshape and a cast of each first cost eight times as much (40 logits: 0.19 ms).
    """
    if all(v.dim() == 0 and v.dtype == torch.float32 for v in values):
        return torch.stack(list(values))
    return torch.stack([v.reshape(()).float() for v in values])


class LogitTap:
    """Bit logits stacked once for one loss, recording in backward that loss's share of their gradients.

    A loss built from `select`-ed values (`BitVector.logits` with ``tap=``) reaches the logits
    through this one stack, and nothing else does: the gradient autograd passes through it is
    the loss's own part of each logit's gradient, separate from the task loss's, at no cost
    beyond the backward that runs anyway. `watch` the loss as it is added to the task loss:
    whatever scales the sum before backward (gradient accumulation's division, a mixed-precision
    loss scale) scales both gradients alike, and `gradient` divides it out.

    Example:

        >>> from lightning_nipq import NIPQQuantizer
        >>> q = NIPQQuantizer(init_bits=4.0)
        >>> logit = q.logistic_bits()[0]
        >>> tap = LogitTap([logit])
        >>> loss = 3.0 * tap.select([logit]).sum()
        >>> tap.watch(loss)
        >>> (0.5 * loss + (logit ** 2).sum()).backward()  # a task loss, and a factor on the sum
        >>> float(tap.gradient()[0])
        3.0
    """

    def __init__(self, logits: Sequence[Tensor]) -> None:
        self.parameters = list(logits)
        self.values = stack_scalars(self.parameters) if self.parameters else None
        self._layout = tuple(id(p) for p in self.parameters)
        self._from_values: Optional[Tensor] = None
        self._from_loss: Optional[Tensor] = None
        if self.values is not None and self.values.requires_grad:
            self.values.register_hook(self._record_values)

    def select(self, logits: Sequence[Tensor]) -> Tensor:
        """The stacked values at ``logits`` (each one of this tap's), in their order."""
        if self.values is None:
            raise ValueError("this LogitTap holds no logits")
        return self.values[_positions(self._layout, tuple(id(p) for p in logits), self.values.device)]

    def watch(self, loss: Tensor) -> None:
        """Record the gradient that reaches ``loss`` (a scalar built from `select`-ed values) in backward."""
        if loss.requires_grad:
            loss.register_hook(self._record_loss)

    def gradient(self) -> Optional[Tensor]:
        """d(watched loss)/d(logit), in the order the tap was built with; None until a backward reached both."""
        if self._from_values is None or self._from_loss is None:
            return None
        return self._from_values / self._from_loss

    def _record_values(self, grad: Tensor) -> None:
        self._from_values = grad.detach()

    def _record_loss(self, grad: Tensor) -> None:
        self._from_loss = grad.detach().reshape(()).float()


@functools.lru_cache(maxsize=32)
def _positions(layout: tuple[int, ...], selection: tuple[int, ...], device: torch.device) -> Tensor:
    # A tap is built each step from the same logits: keep the index on the device between steps.
    where = {ident: i for i, ident in enumerate(layout)}
    missing = [ident for ident in selection if ident not in where]
    if missing:
        raise ValueError(f"{len(missing)} of the logits selected are not in this LogitTap; build it from every logit the loss uses")
    return torch.tensor([where[ident] for ident in selection], dtype=torch.long, device=device)


def _device_of(quantizer: BaseQuantizer) -> torch.device:
    parameter = next(quantizer.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _stochastic(q: BaseQuantizer) -> bool:
    return bool(getattr(q, "stochastic_bits", False))


def _signature(q: BaseQuantizer) -> Hashable:
    # Everything a BitVector takes from a quantizer. A learning quantizer's logit is kept alive by
    # the cached vector, so its id is not reused while the entry lives; a frozen quantizer gives
    # constants only, which any quantizer of the same signature gives alike.
    if q.learns_bits:
        logit, low, high = q.logistic_bits()
        return (id(logit), logit.device, logit.dtype, low, high, q.lowest_bits, q.highest_bits, q.size, q.signed, _stochastic(q))
    return (q.frozen_bits, q.frozen_whole_bits(), q.size, _device_of(q))


_CACHE_SIZE = 32
_cache: "OrderedDict[tuple[Hashable, ...], BitVector]" = OrderedDict()


def bit_vector(quantizers: Sequence[BaseQuantizer]) -> BitVector:
    """The `BitVector` of ``quantizers``, built once and reused while none of them changes what it gives.

    The per-step callers (loss, projection, logging) pass the same lists every step; the
    vector's constants then stay on the device instead of being built and copied there again.
    """
    key = tuple(_signature(q) for q in quantizers)
    found = _cache.get(key)
    if found is not None:
        _cache.move_to_end(key)
        return found
    vector = _cache[key] = BitVector(quantizers)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return vector


#: The logit shifts `smallest_shift` searches, ``[-LOGIT_SPAN, LOGIT_SPAN]``: wide enough to take
#: any learned bit-width from one end of its range to the other.
LOGIT_SPAN = 40.0
#: Shifts tried at once in each round of `smallest_shift`, and the rounds: the interval left is
#: ``2 * LOGIT_SPAN / SEARCH_POINTS**SEARCH_ROUNDS`` (3e-7), below `SHIFT_RESOLUTION`.
SEARCH_POINTS = 128
SEARCH_ROUNDS = 4


def smallest_shift(
    excess: Callable[[Tensor], Tensor],
    device: torch.device,
    span: float = LOGIT_SPAN,
    points: int = SEARCH_POINTS,
    rounds: int = SEARCH_ROUNDS,
) -> Tensor:
    """The smallest shift ``delta`` in ``[-span, span]`` with ``excess(delta) <= 0``, for a non-increasing ``excess``.

    ``excess`` takes a vector of shifts and answers one value for each. Each round evaluates it
    at ``points`` shifts across the interval left and keeps the one sub-interval whose right end
    is the first to meet the budget: a few vector operations per round, and no value read back
    to the host (on a GPU, no synchronisation). The answer meets the budget (``excess <= 0``)
    unless none in ``[-span, span]`` does, when it is ``span``; it lies within
    ``2 * span / points**rounds`` above the exact root.
    """
    offsets = torch.arange(1, points + 1, dtype=torch.float32, device=device)
    low = torch.full((), -span, dtype=torch.float32, device=device)
    width = 2.0 * span
    right = low + width
    for _ in range(rounds):
        step = width / points
        ends = low + offsets * step  # right ends of the sub-intervals
        # excess is non-increasing: the shifts that fail the budget come first; count them.
        failing = (excess(ends) > 0).sum().clamp_max(points - 1)
        right = ends[failing]
        low = right - step
        width = step
    return right
