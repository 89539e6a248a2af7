"""The sensitivities measured from the bit gradients, and the freeze that uses them."""

from __future__ import annotations

import pytest
import torch

from lightning_nipq import NIPQQuantizer
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.training import fit_bits_to_budget
from lightning_nipq.training.bit_sensitivity import MIN_OBSERVATIONS, BitSensitivity, loss_increase


def _quadratic_run(init_bits: float, stochastic: bool, curvature: float, steps: int = 400, seed: int = 0):
    """Measured extra loss of the noise and the estimate of c, for ``0.5 * sum(h * x**2)``."""
    torch.manual_seed(seed)
    q = NIPQQuantizer(signed=True, init_bits=init_bits, init_alpha=1.0, stochastic_bits=stochastic).train()
    q.generator = torch.Generator().manual_seed(seed)
    x = torch.empty(2048).uniform_(-0.9, 0.9)  # inside the range: no clipping
    h = torch.empty(2048).uniform_(0.5, 1.5) * curvature
    clean = float(0.5 * (h * x**2).sum())
    sensitivity = BitSensitivity()
    extra = 0.0
    for _ in range(steps):
        q.zero_grad()
        loss = 0.5 * (h * q(x) ** 2).sum()
        loss.backward()
        extra += (float(loss.detach()) - clean) / steps
        sensitivity.observe({"q": q})
    costs = sensitivity.costs({"q": q})
    assert costs is not None
    return q, extra, costs[id(q)]


@pytest.mark.parametrize("init_bits,stochastic", [(3.0, False), (2.0, False), (5.0, False), (3.4, True)])
def test_the_estimate_predicts_the_loss_the_noise_adds(init_bits, stochastic):
    q, measured, cost = _quadratic_run(init_bits, stochastic, curvature=1.0)
    if stochastic:  # the forward used 3 bits 60% of the time and 4 bits 40%
        predicted = 0.6 * loss_increase(cost, 3, True) + 0.4 * loss_increase(cost, 4, True)
    else:
        predicted = loss_increase(cost, round(init_bits), True)
    assert predicted == pytest.approx(measured, rel=0.1)


def test_sensitivity_scales_with_curvature_and_not_with_the_bits_it_was_measured_at():
    _, _, low = _quadratic_run(3.0, False, curvature=1.0)
    _, _, high = _quadratic_run(3.0, False, curvature=8.0)
    _, _, other_bits = _quadratic_run(5.0, False, curvature=1.0)
    assert high / low == pytest.approx(8.0, rel=0.15)
    assert other_bits / low == pytest.approx(1.0, rel=0.15)


def test_costs_need_every_learning_quantizer_observed_and_survive_a_state_round_trip():
    a = NIPQQuantizer(signed=True, init_bits=3.0, init_alpha=1.0).train()
    b = NIPQQuantizer(signed=True, init_bits=3.0, init_alpha=1.0).train()
    sensitivity = BitSensitivity()
    x = torch.linspace(-0.9, 0.9, 256)
    for step in range(MIN_OBSERVATIONS):
        a.zero_grad()
        b.zero_grad()
        (a(x) ** 2).sum().backward()
        sensitivity.observe({"a": a, "b": b})  # b has no gradient: not observed
    assert sensitivity.observed_steps("a") == MIN_OBSERVATIONS and sensitivity.observed_steps("b") == 0
    assert sensitivity.costs({"a": a, "b": b}) is None
    assert sensitivity.costs({"a": a}) is not None
    b.freeze_bits(3)  # a frozen quantizer needs no estimate
    costs = sensitivity.costs({"a": a, "b": b})
    assert costs is not None and set(costs) == {id(a)}
    restored = BitSensitivity()
    restored.load_state_dict(sensitivity.state_dict(), torch.device("cpu"))
    assert restored.costs({"a": a}) == pytest.approx(sensitivity.costs({"a": a}))


def _sized(size: int, bits: float) -> NIPQQuantizer:
    q = NIPQQuantizer(signed=True, init_bits=bits)
    q.size = size
    return q


def test_the_fit_gives_sensitive_layers_more_bits_at_a_whole_bit_target():
    # learned bits all within half a bit of 3: rounding alone gives each 3 bits
    qs = [_sized(1000, 3.2), _sized(1000, 2.9), _sized(1000, 2.9), _sized(1000, 3.0)]
    assert {fit_bits_to_budget(qs, 3.0)[id(q)] for q in qs} == {3}
    costs = {id(qs[0]): 100.0, id(qs[1]): 0.5, id(qs[2]): 0.5, id(qs[3]): 5.0}
    bits = fit_bits_to_budget(qs, 3.0, costs=costs)
    chosen = [bits[id(q)] for q in qs]
    assert sum(chosen) <= 12 and chosen[0] > 3 and min(chosen[1:3]) < 3
    # it is the assignment with the least predicted loss (brute force)
    import itertools

    best = min(
        (sum(loss_increase(costs[id(q)], b, True) for q, b in zip(qs, combo)), combo)
        for combo in itertools.product(range(2, 9), repeat=4)
        if sum(combo) <= 12
    )
    assert sum(loss_increase(costs[id(q)], b, True) for q, b in zip(qs, chosen)) == pytest.approx(best[0])
    # a missing estimate falls back to the distance to the learned bits for all
    assert {fit_bits_to_budget(qs, 3.0, costs={id(qs[0]): 1.0})[id(q)] for q in qs} == {3}


def test_loss_increase_follows_the_code_grid():
    assert loss_increase(9.0, 3, True) == pytest.approx(9.0 / num_levels(3, True) ** 2) == pytest.approx(1.0)
    assert loss_increase(1.0, 2, False) == pytest.approx(1.0 / 9)


def test_the_regulariser_share_of_the_gradient_is_taken_out():
    torch.manual_seed(0)
    x = torch.linspace(-0.9, 0.9, 512)
    plain, penalised = BitSensitivity(), BitSensitivity()
    q = NIPQQuantizer(signed=True, init_bits=3.0, init_alpha=1.0, stochastic_bits=False).train()
    logit = q.logistic_bits()[0]
    for seed in range(MIN_OBSERVATIONS):
        q.generator = torch.Generator().manual_seed(seed)
        q.zero_grad()
        (q(x) ** 2).sum().backward()
        plain.observe({"q": q})
        q.generator = torch.Generator().manual_seed(seed)  # the same noise again
        q.zero_grad()
        penalty = 5.0 * q.bits()
        ((q(x) ** 2).sum() + penalty).backward()
        (other,) = torch.autograd.grad(5.0 * q.bits(), [logit])
        penalised.observe({"q": q}, {"q": other})
    assert penalised.costs({"q": q})[id(q)] == pytest.approx(plain.costs({"q": q})[id(q)], rel=1e-5)


def test_the_bops_fit_uses_the_costs_of_weights_and_inputs_together():
    import itertools

    from lightning_nipq.training import fit_bops_to_budget

    def pair(size, macs, w_bits, a_bits):
        w, a = _sized(size, w_bits), NIPQQuantizer(signed=False, init_bits=a_bits)
        w.macs, a.size = macs, size
        a.calibrated = True
        return w, a

    pairs = [pair(100, 1000, 3.1, 3.0), pair(100, 1000, 2.9, 3.0)]
    (w0, a0), (w1, a1) = pairs
    assert {fit_bops_to_budget(pairs, 3.0, 3.0)[id(w)] for w, _ in pairs} == {3}
    costs = {id(w0): 50.0, id(a0): 1.0, id(w1): 0.1, id(a1): 1.0}
    bits = fit_bops_to_budget(pairs, 3.0, 3.0, costs=costs)
    assert bits[id(w0)] > bits[id(w1)]
    assert sum(bits[id(w)] * bits[id(a)] for w, a in pairs) <= 2 * 9  # the BOPs budget holds

    def predicted(choice):
        return sum(loss_increase(costs[id(q)], b, q.signed) for q, b in zip((w0, a0, w1, a1), choice))

    best = min(
        predicted(c)
        for c in itertools.product(range(2, 9), range(a0.lowest_bits, 9), range(2, 9), range(a1.lowest_bits, 9))
        if c[0] * c[1] + c[2] * c[3] <= 18
    )
    assert predicted((bits[id(w0)], bits[id(a0)], bits[id(w1)], bits[id(a1)])) == pytest.approx(best)
