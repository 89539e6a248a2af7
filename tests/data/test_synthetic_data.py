"""Calibration data synthesised from the float model: BatchNorm-statistics matching with mixup-class labels."""

import copy

import pytest
import torch
from models import train_on_tensors
from torch import nn
from torch.nn import functional as F

from lightning_nipq import hard_quantize, post_training_quantize
from lightning_nipq.data import bn_matching_loss, generate_calibration_data
from lightning_nipq.data.synthetic import BatchNormStatistics, calibration_targets, sample_targets
from lightning_nipq.demo.data import load_digits_split

SHAPE = (1, 8, 8)


def digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN with BatchNorm trained for about a second on scikit-learn's digits."""
    torch.manual_seed(0)
    x, y, x_test, y_test = digits
    model = train_on_tensors(digits_cnn(), x, y, epochs=6)
    assert accuracy(model, x_test, y_test) > 0.75
    for p in model.parameters():
        p.grad = None
    return model


def test_generated_batches_match_the_batchnorm_statistics(trained, digits):
    noise = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(0))
    real = digits[0][:32]
    for labels in ("mixup", "single", None):
        (batch,) = generate_calibration_data(trained, SHAPE, num_batches=1, batch_size=32, labels=labels, steps=150)
        assert batch.shape == (32, *SHAPE)
        generated, start = bn_matching_loss(trained, batch), bn_matching_loss(trained, noise)
        # From hundreds for noise to the level of real digits.
        assert generated < start / 1000, (labels, generated, start)
        assert generated < 2 * bn_matching_loss(trained, real), labels
    # Layer by layer, too: the first BatchNorm's input moved to its running mean and spread.
    first_bn = trained[1]

    def gaps(x):
        with torch.no_grad():
            var, mean = torch.var_mean(trained[0](x), dim=(0, 2, 3), unbiased=False)
        return (mean - first_bn.running_mean).abs().max(), (var.sqrt() - first_bn.running_var.sqrt()).abs().max()

    (mean_gap, std_gap), (noise_mean_gap, noise_std_gap) = gaps(batch), gaps(noise)
    assert mean_gap < 0.1 and std_gap < 0.1
    assert mean_gap < noise_mean_gap / 5 and std_gap < noise_std_gap / 5


def test_the_loss_is_the_sum_over_layers_of_the_squared_mean_and_std_gaps(trained):
    x = torch.randn(16, *SHAPE)
    expected = 0.0
    with torch.no_grad():
        for bn, bn_input in ((trained[1], trained[0](x)), (trained[4], trained[:4](x))):
            var, mean = torch.var_mean(bn_input, dim=(0, 2, 3), unbiased=False)
            std, running_std = (var + bn.eps).sqrt(), (bn.running_var + bn.eps).sqrt()
            expected += float((mean - bn.running_mean).square().sum() + (std - running_std).square().sum())
    assert bn_matching_loss(trained, x) == pytest.approx(expected, rel=1e-5)


def test_mixup_labels_are_two_different_classes_with_lambda_inside_0_1_and_follow_the_seed():
    before = torch.random.get_rng_state()
    first = calibration_targets(3, 64, 10, "mixup", mixup_alpha=1.0, seed=3)
    again = calibration_targets(3, 64, 10, "mixup", mixup_alpha=1.0, seed=3)
    other = calibration_targets(3, 64, 10, "mixup", mixup_alpha=1.0, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before), "the global generator is left alone"
    for t, u in zip(first, again):
        assert torch.equal(t.y1, u.y1) and torch.equal(t.y2, u.y2) and torch.equal(t.lam, u.lam)
    assert not torch.equal(first[0].lam, other[0].lam)
    y1 = torch.cat([t.y1 for t in first])
    y2 = torch.cat([t.y2 for t in first])
    lam = torch.cat([t.lam for t in first])
    assert bool((y1 != y2).all())
    assert bool(((lam > 0) & (lam < 1)).all())
    assert set(y1.tolist()) == set(range(10)) and set(y2.tolist()) == set(range(10))
    soft = first[0].soft(10)
    assert torch.allclose(soft.sum(1), torch.ones(64))
    assert torch.allclose(soft[torch.arange(64), first[0].y1], first[0].lam)
    # Beta(alpha, alpha): a large alpha mixes near half and half, a small one near a single class.
    torch.manual_seed(0)
    near_half = sample_targets("mixup", 4000, 10, mixup_alpha=50.0).lam
    extreme = sample_targets("mixup", 4000, 10, mixup_alpha=0.2).lam
    assert abs(float(near_half.mean()) - 0.5) < 0.01 and float((near_half - 0.5).abs().mean()) < 0.05
    assert float((extreme - 0.5).abs().mean()) > 0.3
    single = calibration_targets(1, 64, 10, "single", seed=3)[0]
    assert torch.equal(single.y1, single.y2) and bool((single.lam == 1).all())
    assert calibration_targets(2, 8, 10, None) == [None, None]


def test_the_same_seed_gives_the_same_data(trained):
    kwargs = dict(num_batches=2, batch_size=8, steps=5)
    a = generate_calibration_data(trained, SHAPE, seed=1, **kwargs)
    b = generate_calibration_data(trained, SHAPE, seed=1, **kwargs)
    c = generate_calibration_data(trained, SHAPE, seed=2, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])


def _probabilities(model, batch):
    with torch.no_grad():
        return F.softmax(model(batch), dim=1)


def test_mixup_batches_spread_predictions_over_two_classes_single_ones_over_one(trained):
    n = 64
    (mixup,) = generate_calibration_data(trained, SHAPE, 1, n, labels="mixup", mixup_alpha=20.0, seed=5, steps=150)
    (single,) = generate_calibration_data(trained, SHAPE, 1, n, labels="single", seed=5, steps=150)
    t_mix = calibration_targets(1, n, 10, "mixup", mixup_alpha=20.0, seed=5)[0]
    t_one = calibration_targets(1, n, 10, "single", seed=5)[0]
    rows = torch.arange(n)

    p = _probabilities(trained, mixup)
    p1, p2 = p[rows, t_mix.y1], p[rows, t_mix.y2]
    assert float((p1 + p2).mean()) > 0.6, "most of the mass on the two named classes"
    assert float(torch.minimum(p1, p2).mean()) > 0.2, "and a good share on each of them"
    # The class with the larger lambda tends to get the larger probability.
    assert float(((p1 > p2) == (t_mix.lam > 0.5)).float().mean()) > 0.6

    q = _probabilities(trained, single)
    top2 = q.topk(2, dim=1).values
    assert float(q[rows, t_one.y1].mean()) > 0.7, "single-class batches concentrate on their class"
    assert float(top2[:, 1].mean()) < 0.1
    assert float(top2[:, 1].mean()) * 2 < float(p.topk(2, dim=1).values[:, 1].mean())


def test_the_model_is_left_exactly_as_it_was(trained):
    model = copy.deepcopy(trained)
    model.train()
    model[4].eval()  # a mix of modes, restored module by module
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    model[8].bias.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()

    generate_calibration_data(model, SHAPE, num_batches=2, batch_size=8, steps=10, tv_weight=0.1, clamp=(-1.0, 3.0))

    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters and BatchNorm buffers untouched"
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert [p.requires_grad for p in model.parameters()] == [True] * 7 + [False]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()), "hooks removed"
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_clamp_keeps_inputs_in_range_and_tv_smooths_them(trained):
    (clamped,) = generate_calibration_data(trained, SHAPE, 1, 16, steps=30, clamp=(0.0, 1.0))
    assert float(clamped.min()) >= 0.0 and float(clamped.max()) <= 1.0
    (rough,) = generate_calibration_data(trained, SHAPE, 1, 16, steps=60, labels=None)
    (smooth,) = generate_calibration_data(trained, SHAPE, 1, 16, steps=60, labels=None, tv_weight=5.0)
    tv = lambda x: float(x.diff(dim=2).abs().mean() + x.diff(dim=3).abs().mean())
    assert tv(smooth) < 0.7 * tv(rough)


def test_without_batchnorm_labels_alone_drive_the_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="no BatchNorm"):
        generate_calibration_data(model, (16,), labels=None)
    (batch,) = generate_calibration_data(model, (16,), 1, 32, labels="single", steps=100, lr=0.2)
    target = calibration_targets(1, 32, 4, "single")[0]
    assert float((model(batch).argmax(1) == target.y1).float().mean()) == 1.0


def test_num_classes_is_inferred_and_arguments_are_checked(trained):
    targets = calibration_targets(1, 4, 10, "mixup")[0]
    (batch,) = generate_calibration_data(trained, SHAPE, 1, 4, steps=1)  # num_classes from the output: 10
    assert batch.shape == (4, *SHAPE) and int(targets.y1.max()) < 10
    with pytest.raises(ValueError, match="labels must be one of"):
        generate_calibration_data(trained, SHAPE, labels="both")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        generate_calibration_data(trained, SHAPE, num_classes=1, labels="mixup")
    with pytest.raises(ValueError, match="mixup_alpha"):
        generate_calibration_data(trained, SHAPE, mixup_alpha=0.0)
    with pytest.raises(ValueError, match="input_shape"):
        generate_calibration_data(trained, (0, 8))
    with pytest.raises(ValueError, match="clamp"):
        generate_calibration_data(trained, SHAPE, clamp=(1.0, 0.0))
    features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))  # no (batch, classes) output
    with pytest.raises(ValueError, match="pass num_classes"):
        generate_calibration_data(features, SHAPE, labels="mixup")
    assert len(generate_calibration_data(features, SHAPE, 2, 4, labels=None, steps=2)) == 2


def test_hooks_record_nothing_outside_their_context(trained):
    with BatchNormStatistics(trained) as stats:
        trained(torch.randn(4, *SHAPE))
        assert len(stats.losses) == 2
    trained(torch.randn(4, *SHAPE))
    assert len(stats.losses) == 2


def test_documented_pipeline_generate_then_ptq_then_integer_model(trained, digits):
    """The data-free recipe of docs/data-free-calibration.md, without any real image for calibration."""
    _, _, x_test, y_test = digits
    float_acc = accuracy(trained, x_test, y_test)
    model = copy.deepcopy(trained)
    batches = generate_calibration_data(model, SHAPE, num_batches=4, batch_size=32, labels="mixup", steps=100)
    post_training_quantize(model, batches, weight_bits=8, act_bits=8, method="percentile")
    report = hard_quantize(model, bn_batches=batches, compare_batches=[x_test[:128]])
    assert report.agreement is not None and report.agreement > 0.99
    assert accuracy(model, x_test, y_test) > float_acc - 0.05
