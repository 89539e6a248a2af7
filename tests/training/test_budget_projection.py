"""BitBudget.project: the learned bits meet the budget exactly, and keep their differences."""

import pytest
import torch

from lightning_nipq import NIPQQuantizer
from lightning_nipq.training import BitBudget


def _quantizer(size, bits, macs=0, learns=True):
    q = NIPQQuantizer(min_bits=2, max_bits=8, init_bits=bits)
    q.size, q.macs = size, macs
    if not learns:
        q.freeze_bits(round(bits))
    return q


def _average(quantizers, bits=None):
    total = sum(q.size for q in quantizers)
    return sum(q.size * (float(q.continuous_bits()) if bits is None else bits[i]) for i, q in enumerate(quantizers)) / total


def test_average_bits_are_moved_to_the_target_by_one_shift():
    weights = [_quantizer(300, 6.2), _quantizer(400, 7.4), _quantizer(500, 5.1), _quantizer(100, 4.0, learns=False)]
    inputs = [_quantizer(512, 7.0), _quantizer(64, 3.5)]
    thetas = [float(q.theta) for q in weights]
    BitBudget(5.0, 4.0).project(list(zip(weights, inputs + [None, None])))
    assert _average(weights) == pytest.approx(5.0, abs=1e-3)
    assert _average(inputs) == pytest.approx(4.0, abs=1e-3)
    assert float(weights[3].continuous_bits()) == 4.0  # frozen bits stay
    # one shift of every learned logit: the differences training made between them stay
    shifts = {round(before - float(q.theta), 4) for before, q in zip(thetas[:3], weights[:3])}
    assert len(shifts) == 1 and shifts != {0.0}
    after = [float(q.continuous_bits()) for q in weights]
    assert after[1] > after[0] > after[2]  # the learned order is kept


def test_a_budget_below_every_layers_lowest_bits_puts_them_at_their_lowest():
    weights = [_quantizer(100, 6.0), _quantizer(300, 5.0)]
    BitBudget(2.0, budget="avg_bits").project([(w, None) for w in weights])
    assert [round(float(q.continuous_bits()), 2) for q in weights] == [2.0, 2.0]


def test_bops_meet_their_target_with_weight_and_input_bits_shifted_together():
    pairs = [
        (_quantizer(288, 6.0, macs=9000), None),  # a float input counts 32 bits and never moves
        (_quantizer(4608, 7.0, macs=40000), _quantizer(512, 6.5)),
        (_quantizer(640, 5.0, macs=2000), _quantizer(64, 7.5)),
    ]
    budget = BitBudget(3.0, 3.0, budget="bops")
    budget.project(pairs)
    macs = sum(w.macs for w, _ in pairs)
    bops = sum(w.macs * float(w.continuous_bits()) * (float(a.continuous_bits()) if a else 32.0) for w, a in pairs) / macs
    target = sum(w.macs * 3.0 * (3.0 if a else 32.0) for w, a in pairs) / macs
    assert bops == pytest.approx(target, rel=1e-3)


def test_a_projection_that_moves_nothing_leaves_theta_bit_for_bit():
    weights = [_quantizer(100, 3.0), _quantizer(100, 3.0)]
    theta = [q.theta.detach().clone() for q in weights]
    BitBudget(3.0).project([(w, None) for w in weights])
    assert all(torch.equal(q.theta, t) for q, t in zip(weights, theta))


def test_the_fill_uses_the_budget_where_rounding_would_leave_it_unused():
    from lightning_nipq.training import fit_bits_to_budget

    # the demo's case: learned bits averaging 3 whose rounding uses 2.67
    weights = [_quantizer(288, 4.915), _quantizer(18432, 2.001), _quantizer(36864, 3.499), _quantizer(640, 2.124)]
    mean = lambda bits: sum(q.size * bits[id(q)] for q in weights) / sum(q.size for q in weights)  # noqa: E731
    nearest = fit_bits_to_budget(weights, 3.0)
    assert [nearest[id(q)] for q in weights] == [5, 2, 3, 2] and mean(nearest) < 2.7
    filled = fit_bits_to_budget(weights, 3.0, fill=True)
    assert 2.95 <= mean(filled) <= 3.0
    assert filled[id(weights[0])] == 5  # the small, sensitive layer keeps its learned bits


def test_projection_works_on_half_precision_parameters():
    for dtype in (torch.bfloat16, torch.float16):
        weights = [_quantizer(100, 7.5).to(dtype), _quantizer(300, 6.0).to(dtype)]
        BitBudget(3.0).project([(w, None) for w in weights])
        assert all(torch.isfinite(q.theta).all() for q in weights)
        assert _average(weights) == pytest.approx(3.0, abs=0.05)
