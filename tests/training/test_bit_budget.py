import itertools

import pytest
import torch
from models import MLP, blobs, fast_trainer, loader
from torch import nn

from lightning_nipq import NIPQCallback, NIPQQuantizer, attach_quantizers
from lightning_nipq.layers import quantized_layers, quantizers
from lightning_nipq.training import BitBudget, PhaseSchedule, fit_bits_to_budget, fit_bops_to_budget


def _q(size, bits, learns=True):
    q = NIPQQuantizer(min_bits=2, max_bits=8, init_bits=bits)
    q.size = size
    if not learns:
        q.freeze_bits(round(bits))
    return q


def _mean(qs, bits):
    return sum(bits[id(q)] * q.size for q in qs) / sum(q.size for q in qs)


def test_fit_keeps_rounding_when_it_meets_the_budget():
    qs = [_q(100, 2.8), _q(300, 3.2), _q(50, 4.4)]
    bits = fit_bits_to_budget(qs, 3.5)
    assert [bits[id(q)] for q in qs] == [3, 3, 4]


def test_fit_meets_the_budget_exactly_and_optimally_where_greedy_rounding_fails():
    # two large layers on 3 bits and two small ones above: only cutting the small ones meets 3.0
    qs = [_q(288, 4.77), _q(18432, 3.004), _q(36864, 2.984), _q(640, 3.52)]
    bits = fit_bits_to_budget(qs, 3.0)
    assert _mean(qs, bits) <= 3.0 + 1e-12
    # brute force over every assignment: the DP's cost is the optimum
    cont = [float(q.continuous_bits()) for q in qs]
    best = min(
        sum(q.size * (b - c) ** 2 for q, b, c in zip(qs, combo, cont))
        for combo in itertools.product(range(2, 9), repeat=4)
        if sum(q.size * b for q, b in zip(qs, combo)) <= 3.0 * sum(q.size for q in qs)
    )
    got = sum(q.size * (bits[id(q)] - c) ** 2 for q, c in zip(qs, cont))
    assert got == pytest.approx(best)


def test_fit_respects_frozen_quantizers_and_coprime_sizes():
    qs = [_q(997, 6.0, learns=False), _q(1009, 5.0), _q(1013, 5.0)]
    bits = fit_bits_to_budget(qs, 4.0)
    assert bits[id(qs[0])] == 6
    assert _mean(qs, bits) <= 4.0 + 1e-12 and _mean(qs, bits) >= 3.5


def test_avg_bits_loss_is_in_bits_and_two_sided():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    attach_quantizers(model)
    for _, q in quantizers(model):
        q.set_range(1.0, signed=False) if not q.calibrated else None
        q.size = q.size or 10
    budget = BitBudget(target_bits=5.0, target_act_bits=5.0)
    for _, q in quantizers(model):
        q.theta.data.fill_(q._theta_for(7.0))
    high = budget.loss(model)
    assert high.item() == pytest.approx(2 * (2.0 - 0.5))  # SmoothL1 of 2 bits, weights and inputs
    high.backward()
    assert all(q.theta.grad.item() > 0 for _, q in quantizers(model))  # gradient descent lowers bits
    for _, q in quantizers(model):
        q.theta.grad = None
        q.theta.data.fill_(q._theta_for(3.0))
    low = budget.loss(model)
    low.backward()
    assert all(q.theta.grad.item() < 0 for _, q in quantizers(model))  # and raises bits under target


def test_bops_budget_gives_activation_bits_a_gradient():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    attach_quantizers(model)
    model[2].input_quantizer.set_range(1.0, signed=False)
    model(torch.randn(3, 4))  # records MACs
    assert model[0].weight_quantizer.macs == 3 * 8 * 4 and model[2].weight_quantizer.macs == 3 * 2 * 8
    loss = BitBudget(target_bits=3, budget="bops").loss(model)
    loss.backward()
    assert model[2].input_quantizer.theta.grad.item() > 0
    assert model[0].weight_quantizer.theta.grad.item() > 0


def test_unknown_budget_is_a_value_error():
    with pytest.raises(ValueError, match="budget"):
        BitBudget(3, budget="flops")


def test_schedule_phases_and_hand_over():
    s = PhaseSchedule(length=10, hard=2, anneal=3)
    assert [s.phase(e) for e in range(10)] == ["noise"] * 5 + ["anneal"] * 3 + ["hard"] * 2
    assert s.hard_share(4, 0.9) == 0.0 and s.hard_share(5, 0.0) == 0.0
    assert s.hard_share(6, 0.5) == pytest.approx(0.5) and s.hard_share(8, 0.0) == 1.0
    assert s.hard_layer_count(0.5, 7) == 3
    with pytest.raises(ValueError, match="exceed the run"):
        PhaseSchedule(length=3, hard=2, anneal=2)


def _layer(weight_size, macs, w_bits, input_size=None, a_bits=None):
    weight = _q(weight_size, w_bits)
    weight.macs = macs
    if input_size is None:
        return weight, None
    return weight, _q(input_size, a_bits)


def test_bops_fit_meets_the_bops_target_and_is_the_nearest_assignment():
    # learned bits well above a 3x3 budget; the first layer's input stays float (32 bits)
    pairs = [_layer(288, 9_000, 5.2), _layer(4608, 40_000, 4.4, 512, 4.9), _layer(640, 2_000, 3.6, 64, 6.1)]
    bits = fit_bops_to_budget(pairs, 3.0, 3.0)
    macs = sum(w.macs for w, _ in pairs)
    target = sum(w.macs * 3.0 * (3.0 if a is not None else 32.0) for w, a in pairs) / macs
    bops = sum(w.macs * bits[id(w)] * (bits[id(a)] if a is not None else 32) for w, a in pairs) / macs
    assert bops <= target + 1e-9
    # brute force: no assignment within the target is nearer to the learned bits
    w_total = sum(w.size for w, _ in pairs)
    a_total = sum(a.size for _, a in pairs if a is not None)

    def distance(choice):
        total = 0.0
        for (w, a), (bw, ba) in zip(pairs, choice):
            total += w.size / w_total * (bw - float(w.continuous_bits())) ** 2
            if a is not None:
                total += a.size / a_total * (ba - float(a.continuous_bits())) ** 2
        return total

    options = [[(bw, ba) for bw in range(2, 9) for ba in (range(2, 9) if a is not None else [32])] for _, a in pairs]
    feasible = [
        c for c in itertools.product(*options) if sum(w.macs * bw * ba for (w, _), (bw, ba) in zip(pairs, c)) <= target * macs + 1e-9
    ]
    chosen = [(bits[id(w)], bits[id(a)] if a is not None else 32) for w, a in pairs]
    assert distance(chosen) == pytest.approx(min(distance(c) for c in feasible))


def test_bops_budget_freezes_within_its_target_in_a_fit():
    model = MLP()
    callback = NIPQCallback(target_bits=3, budget="bops", hard_epochs=1, calibration_batches=1)
    fast_trainer(2, [callback]).fit(model, loader(blobs(128)))
    pairs = [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)]
    assert all(q.frozen_bits is not None for pair in pairs for q in pair if q is not None and not q.stays_float)
    ((label, learned, target),) = callback.bit_budget.excess(pairs)
    assert label == "BOPs per MAC" and learned <= target + 1e-9
