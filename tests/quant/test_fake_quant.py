import pytest
import torch

from lightning_nipq import NIPQQuantizer
from lightning_nipq.quant import hard_fake_quant, integer_codes, noise_fake_quant, num_levels, round_ste
from lightning_nipq.quant.noise import histogram_noise, uniform_noise


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_hard_outputs_lie_on_at_most_2_pow_b_levels_inside_the_range(bits, signed):
    torch.manual_seed(0)
    x = torch.randn(10_000) * 3
    alpha = torch.tensor(1.7)
    out = hard_fake_quant(x, alpha, torch.tensor(float(bits)), signed)
    levels = torch.unique(out)
    assert levels.numel() <= 2**bits
    low = -1.7 if signed else 0.0
    assert levels.min() >= low - 1e-6 and levels.max() <= 1.7 + 1e-6
    # the levels are the integer multiples of one step
    step = alpha / num_levels(torch.tensor(float(bits)), signed)
    assert torch.allclose(levels / step, torch.round(levels / step), atol=1e-4)
    assert levels.max() == pytest.approx(1.7, abs=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_noise_outputs_stay_within_half_a_step_inside_the_range_and_clip_outside(signed):
    torch.manual_seed(0)
    x = torch.randn(50_000) * 2
    alpha, bits = torch.tensor(1.5), torch.tensor(3.0)
    step = float(alpha / num_levels(bits, signed))
    out = noise_fake_quant(x, alpha, bits, signed, uniform_noise(x))
    low = -1.5 if signed else 0.0
    inside = (x > low) & (x < 1.5)
    assert (out[inside] - x[inside]).abs().max() <= step / 2 + 1e-6
    assert (out[inside] - x[inside]).abs().max() > step / 2 * 0.99  # the noise really spans the step
    assert torch.all(out[x >= 1.5] == 1.5)
    assert torch.all(out[x <= low] == low)


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.2, 1.6, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("signed", [True, False])
def test_noise_gradients_match_numerical_derivatives(signed):
    """Gradients to x, alpha and (continuous) bits against finite differences, with the noise fixed."""
    torch.manual_seed(1)
    x = (torch.randn(64, dtype=torch.float64) * 1.2).requires_grad_()
    alpha = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    bits = torch.tensor(3.3, dtype=torch.float64, requires_grad=True)
    noise = (torch.rand(64, dtype=torch.float64) - 0.5)
    # keep x away from the clipping edges, where the derivative is not defined
    with torch.no_grad():
        low = -1.0 if signed else 0.0
        for edge in (low, 1.0):
            near = (x - edge).abs() < 1e-3
            x[near] += 1e-2
    fn = lambda x, a, b: noise_fake_quant(x, a, b, signed, noise)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, alpha, bits), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_noise_gradients_have_the_design_form(signed):
    x = torch.tensor([-2.0, -0.3, 0.4, 0.7, 2.0], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    bits = torch.tensor(3.0, requires_grad=True)
    noise = torch.tensor([0.1, -0.2, 0.3, 0.4, -0.5])
    out = noise_fake_quant(x, alpha, bits, signed, noise)
    out.sum().backward()
    n = float(num_levels(bits.detach(), signed))
    inside = torch.tensor([False, signed, True, True, False])
    assert torch.equal(x.grad, inside.float())
    # d/d alpha: +1 above, -1 below (signed only), noise/n inside
    expected_alpha = 1.0 + (-1.0 if signed else 0.0) + float((noise / n)[inside].sum())
    assert alpha.grad.item() == pytest.approx(expected_alpha, rel=1e-5)
    # d/d bits through step = alpha/n(b): d step/db = -alpha * dn/db / n^2, dn/db = ln2 * (n + 1)
    dstep = -1.0 * torch.log(torch.tensor(2.0)) * (n + 1) / n**2
    assert bits.grad.item() == pytest.approx(float(noise[inside].sum() * dstep), rel=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_hard_gradients_are_straight_through(signed):
    x = torch.tensor([-2.0, -0.33, 0.41, 0.77, 2.0], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    bits = torch.tensor(3.0)
    hard_fake_quant(x, alpha, bits, signed).sum().backward()
    inside = torch.tensor([False, signed, True, True, False])
    assert torch.equal(x.grad, inside.float())
    n = float(num_levels(bits, signed))
    v = x.detach() * n
    expected = float(((torch.round(v) - v) / n)[inside].sum()) + 1.0 + (-1.0 if signed else 0.0)
    assert alpha.grad.item() == pytest.approx(expected, rel=1e-5)


def test_histogram_noise_follows_the_rounding_error_and_survives_full_clipping():
    torch.manual_seed(0)
    alpha, bits = torch.tensor(1.0), torch.tensor(4.0)
    # every element clipped: the released code crashed in torch.multinomial here
    clipped = torch.full((1000,), 5.0)
    u = histogram_noise(clipped, alpha, bits, True)
    assert u.shape == clipped.shape and u.abs().max() <= 0.5
    # inputs sitting exactly on the grid have zero rounding error: the noise concentrates near 0
    n = float(num_levels(bits, True))
    on_grid = torch.randint(-int(n) + 1, int(n), (5000,)).float() / n
    u = histogram_noise(on_grid, alpha, bits, True)
    assert u.abs().max() <= 1.0 / 256 + 1e-6
    # and a quantizer configured for it runs
    q = NIPQQuantizer(noise="histogram").train()
    assert torch.isfinite(q(torch.randn(100))).all()


def test_integer_codes_are_the_hard_levels():
    x = torch.randn(1000)
    alpha, bits = torch.tensor(0.8), torch.tensor(4.0)
    codes = integer_codes(x, alpha, bits, True)
    assert codes.abs().max() <= 7
    assert torch.equal(codes * (alpha / 7), hard_fake_quant(x, alpha, bits, True))
