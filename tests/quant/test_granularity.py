"""Ranges per output channel and per group of inputs: levels, gradients, range searches, and bad values."""

from __future__ import annotations

import pytest
import torch

from lightning_nipq import LSQConfig, LSQQuantizer, NIPQConfig, NIPQQuantizer
from lightning_nipq.quant.fake_quant import noise_fake_quant
from lightning_nipq.quant.granularity import check_granularity, grouped_view, range_rows, range_shape_for
from lightning_nipq.quant.range_search import mse_alpha, quantization_mse, weight_ranges


def scaled_weight(shape=(6, 24), seed=0):
    """A weight whose output channels differ in scale by 30x, as depthwise convolutions' do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w * torch.logspace(-1.5, 0, shape[0]).view(-1, *([1] * (len(shape) - 1)))


@pytest.mark.parametrize("make", ["nipq", "lsq"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hard_outputs_lie_on_at_most_2_to_the_b_levels_per_channel_inside_each_channels_range(make, bits):
    w = scaled_weight((6, 4, 3, 3))
    shape = range_shape_for(w.shape, "channel")
    config = NIPQConfig(weight_bits=bits, weight_granularity="channel") if make == "nipq" else LSQConfig(
        weight_bits=bits, weight_granularity="channel"
    )
    q = config.weight_quantizer(w, shape).eval()
    assert tuple(q.alpha.shape) == (6, 1, 1, 1)
    y = q(w)
    alphas = q.alpha.detach().flatten()
    assert len(torch.unique(alphas)) == 6  # each channel got its own range
    for c in range(6):
        levels = torch.unique(y[c])
        assert levels.numel() <= 2**bits
        assert float(levels.abs().max()) <= float(alphas[c]) * (1 + 1e-6)
        step = float(alphas[c]) / (2 ** (bits - 1) - 1)
        assert torch.allclose(levels / step, torch.round(levels / step), atol=1e-4)  # on that channel's own grid


def test_per_channel_ranges_quantize_a_small_channel_that_per_tensor_ranges_flatten_to_zero():
    w = scaled_weight((6, 24))
    per_tensor = NIPQConfig(weight_bits=3, weight_granularity="tensor").weight_quantizer(w).eval()
    per_channel = NIPQConfig(weight_bits=3, weight_granularity="channel").weight_quantizer(w, (6, 1)).eval()
    smallest = 0
    assert torch.unique(per_tensor(w)[smallest]).numel() <= 2  # per tensor the small channel is all but erased
    assert torch.unique(per_channel(w)[smallest]).numel() >= 5
    error = lambda q: float((q(w) - w).square().mean())  # noqa: E731
    assert error(per_channel) < error(per_tensor)


def test_group_ranges_follow_the_groups_of_inputs():
    w = scaled_weight((4, 32)).t().contiguous().t()  # scale varies along the inputs too
    w = w * torch.logspace(-1, 0, 32).view(1, -1)
    shape = range_shape_for(w.shape, 8)
    assert shape == (4, 4, 1)
    q = NIPQConfig(weight_bits=3, weight_granularity=8).weight_quantizer(w, shape).eval()
    y = grouped_view(q(w), 8)
    alphas = q.alpha.detach()
    for c in range(4):
        for g in range(4):
            assert torch.unique(y[c, g]).numel() <= 8
            assert float(y[c, g].abs().max()) <= float(alphas[c, g, 0]) * (1 + 1e-6)


def numeric_gradient(f, alpha, eps=1e-6):
    grad = torch.zeros_like(alpha)
    for index in range(alpha.numel()):
        up, down = alpha.clone(), alpha.clone()
        up.view(-1)[index] += eps
        down.view(-1)[index] -= eps
        grad.view(-1)[index] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("granularity", ["channel", 4])
def test_noise_proxy_gradients_to_each_range_match_a_numerical_derivative(granularity):
    g = torch.Generator().manual_seed(1)
    w = scaled_weight((3, 12)).double()
    view = grouped_view(w, granularity)
    shape = range_shape_for(w.shape, granularity)
    alpha = (range_rows(view, shape).abs().amax(dim=1) * 0.7).reshape(shape).double().requires_grad_(True)
    bits = torch.tensor(3.0, dtype=torch.float64)
    noise = (torch.rand(view.shape, generator=g, dtype=torch.float64) - 0.5)
    target = torch.randn(view.shape, generator=g, dtype=torch.float64)

    def loss(a):
        return (noise_fake_quant(view, a, bits, True, noise) * target).sum()

    loss(alpha).backward()
    expected = numeric_gradient(lambda a: float(loss(a)), alpha.detach())
    assert alpha.grad.shape == shape
    assert torch.allclose(alpha.grad, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["nipq", "lsq"])
def test_each_channels_gradient_is_that_of_a_per_tensor_quantizer_of_the_channel_alone(method):
    # The hard (straight-through) gradient has no numerical oracle; splitting is its defining property,
    # and for LSQ it checks that the gradient scale counts one channel's elements.
    w = scaled_weight((4, 10)).double()
    target = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if method == "nipq":
        whole = NIPQQuantizer(fixed_bits=3, granularity="channel", range_shape=(4, 1), init_alpha=w.abs().amax(1, keepdim=True) * 0.8)
        parts = [NIPQQuantizer(fixed_bits=3, init_alpha=float(w[c].abs().max()) * 0.8) for c in range(4)]
        grad = lambda q: q.alpha_raw.grad  # noqa: E731
    else:
        whole = LSQQuantizer(bits=3, granularity="channel", range_shape=(4, 1), init_alpha=w.abs().amax(1, keepdim=True) * 0.8)
        parts = [LSQQuantizer(bits=3, init_alpha=float(w[c].abs().max()) * 0.8) for c in range(4)]
        grad = lambda q: q.step.grad  # noqa: E731
    for q in (whole, *parts):
        q.double().train().mode = "hard"
    (whole(w) * target).sum().backward()
    for c, part in enumerate(parts):
        (part(w[c]) * target[c]).sum().backward()
        assert torch.allclose(grad(whole).flatten()[c], grad(part).flatten()[0], rtol=1e-5, atol=1e-9)  # the quantizers compute in float32


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_range_searches_run_per_channel_as_on_each_channel_alone(method):
    w = scaled_weight((5, 3, 3, 3))
    shape = range_shape_for(w.shape, "channel")
    ranges = weight_ranges(w, "channel", shape, bits=3, method=method, percentile=99.0)
    assert ranges.shape == shape
    for c in range(5):
        alone = weight_ranges(w[c : c + 1], "tensor", (), bits=3, method=method, percentile=99.0)
        assert float(ranges.flatten()[c]) == pytest.approx(float(alone), rel=1e-5)


def test_the_mse_search_is_at_least_as_good_as_a_dense_grid():
    w = scaled_weight((1, 500))
    alpha = mse_alpha(w, 3, True)
    dense = torch.linspace(0.01, 1, 400) * float(w.abs().max())
    assert float(quantization_mse(w, torch.tensor([alpha]), 3, True)) <= float(quantization_mse(w, dense, 3, True).min()) * 1.001


def test_an_all_zero_channel_gets_a_usable_range():
    w = scaled_weight((3, 8))
    w[1] = 0.0
    ranges = weight_ranges(w, "channel", (3, 1), bits=3, method="mse")
    assert float(ranges[1]) == pytest.approx(1 / 8**0.5)


@pytest.mark.parametrize(
    "value,match",
    [(0, "weight_granularity must be"), (-4, "weight_granularity must be"), ("row", "weight_granularity must be"), (True, "must be")],
)
def test_invalid_granularities_are_refused_by_name(value, match):
    with pytest.raises(ValueError, match=match):
        check_granularity("weight_granularity", value)
    with pytest.raises(ValueError, match="weight_granularity"):
        NIPQConfig(weight_granularity=value)
    with pytest.raises(ValueError, match="weight_granularity"):
        LSQConfig(weight_granularity=value)


def test_granularities_that_do_not_fit_a_weight_name_the_fix():
    with pytest.raises(ValueError, match="does not divide this layer's 24 inputs.*'channel'"):
        range_shape_for((4, 24), 5)
    with pytest.raises(ValueError, match="linear-like layer.*weight_granularity='channel'"):
        range_shape_for((4, 3, 3, 3), 3)


def test_a_quantizers_granularity_travels_with_its_state_and_cannot_be_reconfigured():
    q = NIPQQuantizer(fixed_bits=3, granularity=4, range_shape=(2, 3, 1), init_alpha=torch.rand(2, 3, 1) + 0.1)
    state = q.state_dict()
    assert state["_extra_state"]["config"]["granularity"] == 4
    assert state["_extra_state"]["config"]["range_shape"] == (2, 3, 1)
    with pytest.raises(ValueError, match="granularity is fixed"):
        q.configure(granularity="channel", range_shape=(2, 1))
    per_tensor = NIPQQuantizer(fixed_bits=3)
    with pytest.raises(ValueError, match="granularity is fixed"):
        per_tensor.load_state_dict(state)
    # A state saved before there was a choice (no layout keys) is per tensor.
    old = per_tensor.state_dict()
    for key in ("granularity", "range_shape"):
        del old["_extra_state"]["config"][key]
    NIPQQuantizer(fixed_bits=3).load_state_dict(old)
