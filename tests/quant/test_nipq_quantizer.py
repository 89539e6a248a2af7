import pytest
import torch

from lightning_nipq import NIPQQuantizer


def test_bits_are_whole_and_within_range_with_straight_through_gradient():
    q = NIPQQuantizer(min_bits=2, max_bits=8, init_bits=4.3)
    b = q.bits()
    assert b.item() == 4.0
    b.backward()
    assert q.theta.grad is not None and q.theta.grad.item() > 0


def test_stochastic_bits_round_to_neighbours_only():
    torch.manual_seed(0)
    q = NIPQQuantizer(min_bits=2, max_bits=8, init_bits=4.5)
    seen = {int(q.bits(stochastic=True).item()) for _ in range(200)}
    assert seen == {4, 5}


def test_fixed_bits_are_frozen_and_theta_untrained():
    q = NIPQQuantizer(fixed_bits=3, min_bits=3, max_bits=3)
    assert not q.learns_bits and q.rounded_bits() == 3
    q.train()
    q(torch.randn(10)).sum().backward()
    assert q.theta.grad is None or q.theta.grad.abs().sum() == 0


def test_signed_quantizers_never_go_below_two_bits():
    q = NIPQQuantizer(signed=True, min_bits=1, max_bits=4, init_bits=1.0)
    assert q.rounded_bits() == 2
    q = NIPQQuantizer(signed=False, min_bits=1, max_bits=4, init_bits=1.0)
    assert q.rounded_bits() == 1


def test_eval_is_hard_quantization_and_training_is_noise():
    torch.manual_seed(0)
    q = NIPQQuantizer(fixed_bits=2, min_bits=2, max_bits=2, init_alpha=1.0)
    x = torch.linspace(-1.5, 1.5, 1001)
    assert torch.unique(q.eval()(x)).numel() == 3  # 2-bit signed: -a, 0, a
    assert torch.unique(q.train()(x)).numel() > 100  # noise proxy: continuous values
    q.mode = "hard"
    assert torch.unique(q(x)).numel() == 3


def test_uncalibrated_quantizer_passes_input_through_until_set_range():
    q = NIPQQuantizer(calibrated=False, fixed_bits=4, min_bits=4, max_bits=4).eval()
    x = torch.randn(100)
    assert torch.equal(q(x), x)
    q.set_range(0.5, signed=False)
    out = q(x)
    assert out.min() >= 0 and out.max() <= 0.5 + 1e-6


def test_state_round_trips_through_state_dict_including_python_state():
    q = NIPQQuantizer(signed=False, min_bits=2, max_bits=6, init_bits=3.7, init_alpha=2.0)
    q.size, q.macs = 123, 456
    q.freeze_bits(3)
    fresh = NIPQQuantizer(calibrated=False)
    fresh.load_state_dict(q.state_dict())
    assert (fresh.signed, fresh.frozen_bits, fresh.calibrated, fresh.size, fresh.macs) == (False, 3, True, 123, 456)
    assert (fresh.min_bits, fresh.max_bits) == (2, 6)
    x = torch.randn(50) * 3
    assert torch.equal(fresh.eval()(x), q.eval()(x))


def test_bfloat16_input_is_quantized_in_float32_without_nan_at_two_bits():
    q = NIPQQuantizer(fixed_bits=2, min_bits=2, max_bits=2).train()
    x = torch.randn(1000, dtype=torch.bfloat16) * 1e-3
    out = q(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kwargs", [dict(min_bits=0), dict(min_bits=5, max_bits=4), dict(noise="gaussian"), dict(init_alpha=0.0)])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        NIPQQuantizer(**kwargs)


def test_one_bit_quantizer_on_signed_data_is_promoted_to_two_bits_not_nan():
    q = NIPQQuantizer(fixed_bits=1, min_bits=1, max_bits=1, calibrated=False).train()
    q.set_range(1.0, signed=True)
    out = q(torch.randn(1000))
    assert torch.isfinite(out).all() and q.rounded_bits() == 2
    assert torch.unique(q.eval()(torch.randn(1000))).numel() <= 3


def test_a_quantizer_without_a_generator_compiles_without_graph_breaks_in_the_noise_phase():
    q = NIPQQuantizer(signed=True, init_alpha=1.0).train()  # learned and stochastic bits: two draws
    x = torch.randn(64, 32, requires_grad=True)
    compiled = torch.compile(lambda t: q(t), backend="eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert x.grad is not None and q.alpha_raw.grad is not None
    inside = x.detach().abs() < 1.0
    # Inside the range, noise of at most half a step (a step is at most alpha, at 2 bits); outside, the clip.
    assert ((y - x).detach()[inside].abs() <= 0.5 + 1e-6).all()
    assert torch.equal(y.detach()[~inside], x.detach()[~inside].clamp(-1.0, 1.0))
