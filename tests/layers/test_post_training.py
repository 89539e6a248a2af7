"""Post-training quantization: range choices on synthetic data, and a PTQ'd CNN on digits against its float accuracy."""

import copy

import pytest
import torch
from models import train_on_tensors

from lightning_nipq import LSQQuantizer, hard_quantize, post_training_quantize
from lightning_nipq.demo.data import load_digits_split
from lightning_nipq.demo.models import SmallCNN
from lightning_nipq.layers import IntegerLayerMixin, quantizers
from lightning_nipq.quant import choose_alpha, hard_fake_quant, quantization_mse


def gaussian_with_outliers(n=20000, outliers=20, scale=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randperm(n, generator=g)[:outliers]] *= scale
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_quantization_mse_is_the_mse_of_the_fake_quantizer(signed):
    x = gaussian_with_outliers()
    x = x if signed else x.abs()
    alphas = torch.tensor([0.5, 2.0, 7.5])
    for bits in (2, 3, 8):
        direct = torch.stack([(hard_fake_quant(x, a, torch.tensor(float(bits)), signed) - x).square().mean() for a in alphas])
        assert torch.allclose(quantization_mse(x, alphas, bits, signed).float(), direct, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("signed", [True, False])
def test_mse_range_beats_min_max_and_is_the_grid_optimum(bits, signed):
    x = gaussian_with_outliers()
    x = x if signed else x.abs()
    minmax = choose_alpha(x, bits, signed, "minmax")
    mse = choose_alpha(x, bits, signed, "mse")
    assert minmax == pytest.approx(float(x.abs().max()))
    error = lambda alpha: float(quantization_mse(x, torch.tensor([alpha]), bits, signed))  # noqa: E731
    # outliers stretch the min-max grid over an empty range: clipping them pays for itself
    assert mse < minmax and error(mse) < 0.8 * error(minmax)
    dense = torch.linspace(0.001, 1.0, 1000) * minmax
    assert error(mse) <= float(quantization_mse(x, dense, bits, signed).min()) * 1.001


def test_percentile_range_is_the_percentile_below_the_max():
    x = gaussian_with_outliers()
    for p in (99.0, 99.9, 99.99):
        alpha = choose_alpha(x, 4, True, "percentile", percentile=p)
        assert alpha < float(x.abs().max())
        assert alpha == pytest.approx(float(torch.quantile(x.abs(), p / 100)), rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(method="kl"), dict(percentile=0.0), dict(weight_bits=1)])
def test_invalid_arguments_raise_before_touching_the_model(kwargs):
    model = SmallCNN(width=8)
    with pytest.raises(ValueError):
        post_training_quantize(model, [torch.randn(2, 1, 8, 8)], **kwargs)
    assert not any(True for _ in quantizers(model))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Kernels this small spend more time synchronising threads than computing, and far more
    # when another process keeps the other cores busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_cnn():
    """A width-8 SmallCNN trained in float on digits, with its test accuracy."""
    torch.manual_seed(0)
    tx, ty, vx, vy = load_digits_split()
    mean, std = tx.mean(), tx.std()
    tx, vx = (tx - mean) / std, (vx - mean) / std
    model = train_on_tensors(SmallCNN(width=8), tx, ty, epochs=15)
    return model, list(tx.split(64))[:8], vx, vy, accuracy(model, vx, vy)


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_ptq_cnn_converts_exactly_and_keeps_float_accuracy_at_w8a8(digits_cnn, method):
    float_model, calibration, vx, vy, float_acc = digits_cnn
    assert float_acc > 0.9
    model = copy.deepcopy(float_model)
    result = post_training_quantize(model, calibration, weight_bits=8, act_bits=8, method=method)
    assert result.quantized == ["features.0", "features.3", "features.7", "classifier"]
    qs = dict(quantizers(model))
    assert all(isinstance(q, LSQQuantizer) for q in qs.values())
    # The first convolution takes the model's input: it stays float; every other input is calibrated.
    assert qs["features.0.input_quantizer"].stays_float and not qs["features.0.input_quantizer"].calibrated
    assert all(q.calibrated for name, q in qs.items() if name != "features.0.input_quantizer")
    # inputs after ReLU are unsigned and use all 2**8 levels on [0, alpha]
    assert not qs["features.3.input_quantizer"].signed
    fake_acc = accuracy(model, vx, vy)
    # At 8 bits the fake-quantized model's float convolutions put the odd activation on the
    # other side of a rounding boundary (a one-code flip the exact integer model does not
    # make), which can exceed hard_quantize's default relative tolerance of 1e-3.
    report = hard_quantize(model, compare_batches=list(vx.split(150)), max_rel_diff=1e-2)
    assert report.agreement == 1.0
    assert {r.weight_bits for r in report.layers} == {8} and report.avg_act_bits == 8.0
    assert all(isinstance(m, IntegerLayerMixin) for m in (model.features[0], model.features[3], model.classifier))
    integer_acc = accuracy(model, vx, vy)
    assert integer_acc == fake_acc
    assert abs(integer_acc - float_acc) <= 0.02


def test_ptq_cnn_at_w2a2_is_clearly_worse(digits_cnn):
    float_model, calibration, vx, vy, float_acc = digits_cnn
    model = copy.deepcopy(float_model)
    post_training_quantize(model, calibration, weight_bits=2, act_bits=2, method="mse")
    report = hard_quantize(model, compare_batches=list(vx.split(150)))
    assert {r.weight_bits for r in report.layers} == {2}
    assert accuracy(model, vx, vy) < float_acc - 0.2
