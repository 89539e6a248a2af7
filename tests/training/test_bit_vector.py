"""BitVector: many quantizers' bits as one vector, equal to each quantizer's own, and the search for a common shift."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from lightning_nipq import NIPQQuantizer
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.training import BitBudget
from lightning_nipq.training import bit_vector as bit_vector_module
from lightning_nipq.training.bit_sensitivity import BitSensitivity
from lightning_nipq.training.bit_vector import LOGIT_SPAN, SEARCH_POINTS, SEARCH_ROUNDS, BitVector, LogitTap, bit_vector, smallest_shift


def _mixed_quantizers():
    """Learning and frozen, signed and unsigned, bits at and between whole values and a 1-bit signed one (promoted to 2)."""
    specs = [
        dict(signed=True, min_bits=2, max_bits=8, init_bits=3.5),  # a rounding tie
        dict(signed=False, min_bits=1, max_bits=8, init_bits=1.2),
        dict(signed=True, min_bits=2, max_bits=6, init_bits=5.97),
        dict(signed=False, min_bits=2, max_bits=8, init_bits=4.0, fixed_bits=4),
        dict(signed=True, min_bits=1, max_bits=4, init_bits=1.0, fixed_bits=1),
        dict(signed=False, min_bits=3, max_bits=3),  # one bit-width only: learns nothing, logit 0
    ]
    quantizers = []
    for size, spec in zip((300, 40, 1000, 64, 7, 90), specs):
        q = NIPQQuantizer(init_alpha=1.0, **spec)
        q.size = size
        quantizers.append(q)
    return quantizers


def test_bits_and_gradients_equal_each_quantizers_own():
    quantizers = _mixed_quantizers()
    weights = torch.linspace(0.3, 2.0, len(quantizers))
    for whole in (True, False):
        vector = BitVector(quantizers)
        own = torch.stack([q.bits() if whole else q.continuous_bits() for q in quantizers])
        together = vector.bits(whole=whole)
        assert torch.equal(together, own.detach())
        learning = [q for q in quantizers if q.learns_bits]
        expected = torch.autograd.grad((own * weights).sum(), [q.theta for q in learning])
        found = torch.autograd.grad((together * weights).sum(), [q.theta for q in learning])
        for e, f in zip(expected, found):
            assert torch.equal(e, f)


def test_the_average_is_the_size_weighted_mean_each_quantizer_gives():
    quantizers = _mixed_quantizers()
    total = sum(q.size for q in quantizers)
    expected = torch.stack([q.bits() * (q.size / total) for q in quantizers]).sum()
    assert torch.equal(BitVector(quantizers).average(), expected)


def test_the_cached_vector_is_rebuilt_when_bits_freeze_or_a_size_changes():
    quantizers = _mixed_quantizers()
    first = bit_vector(quantizers)
    assert bit_vector(list(quantizers)) is first
    quantizers[0].freeze_bits(4)
    frozen = bit_vector(quantizers)
    assert frozen is not first and len(frozen.learning) == len(first.learning) - 1
    assert float(frozen.bits()[0].detach()) == 4.0
    quantizers[1].size = 41
    assert bit_vector(quantizers) is not frozen


def test_a_shared_logit_is_shifted_once():
    q = NIPQQuantizer(init_bits=4.0)
    q.size = 10
    before = float(q.theta)
    BitVector([q, q]).shift(torch.tensor(0.5))
    assert float(q.theta) == pytest.approx(before - 0.5)


@pytest.mark.parametrize("root", [-39.99, -7.3, 0.0, 1e-3, 12.5, 39.9])
def test_the_search_finds_the_smallest_shift_that_meets_the_budget(root):
    found = smallest_shift(lambda d: root - d, torch.device("cpu"))  # non-increasing, zero at root
    resolution = 2 * LOGIT_SPAN / SEARCH_POINTS**SEARCH_ROUNDS
    assert float(root - found) <= 0  # meets the budget
    assert float(found) - root <= resolution + 1e-5  # and is the smallest to the search's resolution


def test_the_search_answers_the_edges_when_nothing_or_everything_meets():
    assert float(smallest_shift(lambda d: torch.ones_like(d), torch.device("cpu"))) == LOGIT_SPAN
    assert float(smallest_shift(lambda d: -torch.ones_like(d), torch.device("cpu"))) == pytest.approx(-LOGIT_SPAN, abs=1e-5)


def test_bops_projection_counts_an_input_shared_by_several_layers_once():
    # As a self-attention's query, key and value projections: three layers read one quantized input.
    shared = NIPQQuantizer(min_bits=2, max_bits=8, init_bits=6.5)
    shared.size = 512
    pairs = []
    for macs in (4000, 4000, 9000):
        w = NIPQQuantizer(min_bits=2, max_bits=8, init_bits=7.0)
        w.size, w.macs = 1000, macs
        pairs.append((w, shared))
    BitBudget(3.0, 3.0, budget="bops").project(pairs)
    macs = sum(w.macs for w, _ in pairs)
    bops = sum(w.macs * float(w.continuous_bits()) * float(a.continuous_bits()) for w, a in pairs) / macs
    assert bops == pytest.approx(9.0, rel=1e-4)


def test_sensitivity_observes_each_quantizer_as_its_own_formula_says():
    """The vectorised estimate against the formula written out for one quantizer at a time."""
    quantizers = [q for q in _mixed_quantizers() if q.learns_bits]
    quantizers[1].stochastic_bits = True
    for q in quantizers:
        q.theta.grad = torch.randn(()) * 0.01
    other = {"q0": torch.tensor(0.003)}
    sensitivity = BitSensitivity()
    sensitivity.observe({f"q{i}": q for i, q in enumerate(quantizers)}, other)
    totals = sensitivity.state_dict()
    for i, q in enumerate(quantizers):
        gradient = float(q.theta.grad) - (0.003 if i == 0 else 0.0)
        low, high = float(q.min_bits), float(q.max_bits)
        share = 1 / (1 + math.exp(-float(q.theta)))
        bits = low + (high - low) * share

        def at(whole):
            n = float(num_levels(torch.tensor(min(max(whole, q.lowest_bits), q.highest_bits), dtype=torch.float32), q.signed))
            return 2 * math.log(2.0) * (n + 1) / n**3

        if q.stochastic_bits:
            below = math.floor(bits)
            per_cost = (1 - (bits - below)) * at(below) + (bits - below) * at(below + 1)
        else:
            per_cost = at(round(bits))
        expected = -(gradient / max((high - low) * share * (1 - share), 1e-12)) / per_cost
        assert totals[f"q{i}"][0] == pytest.approx(expected, rel=1e-4)
        assert totals[f"q{i}"][1] == 1.0


def test_the_docstring_example_runs():
    assert doctest.testmod(bit_vector_module).failed == 0


@pytest.mark.parametrize("budget", ["avg_bits", "bops"])
def test_a_logit_tap_records_the_budget_share_of_the_gradient(budget):
    """Through a tap the budget's loss is unchanged, and its recorded share of the gradient is the loss's own.

    The sum backpropagated scales the budget's loss (1/1024, as accumulation or a loss scale
    would) and adds a task loss on the same logits; the tap divides the factor out and leaves
    the task's gradient out.
    """
    quantizers = _mixed_quantizers()
    for i, q in enumerate(quantizers):
        q.macs = 100 * (i + 1)
    pairs = [(quantizers[0], quantizers[1]), (quantizers[2], quantizers[3]), (quantizers[4], None), (quantizers[5], quantizers[1])]
    budget = BitBudget(3.0, 4.0, budget=budget)
    learning = [q.logistic_bits()[0] for q in quantizers if q.learns_bits]
    plain = budget.loss_of(pairs)
    expected = torch.stack([g if g is not None else torch.zeros(()) for g in torch.autograd.grad(plain, learning, allow_unused=True)])
    tap = LogitTap(learning)
    tapped = budget.loss_of(pairs, tap)
    assert torch.equal(tapped.detach(), plain.detach())
    tap.watch(tapped)
    assert tap.gradient() is None
    task = sum((logit - 1.0) ** 2 for logit in learning)
    (tapped / 1024 + task).backward()
    assert expected.abs().sum() > 0
    assert torch.allclose(tap.gradient(), expected, rtol=1e-5, atol=1e-9)


def test_a_logit_tap_refuses_a_logit_it_was_not_built_with():
    a, b = (NIPQQuantizer(init_bits=4.0).logistic_bits()[0] for _ in range(2))
    with pytest.raises(ValueError, match="not in this LogitTap"):
        LogitTap([a]).select([a, b])
