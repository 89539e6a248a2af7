"""Which inputs stay float: the layers fed the model's own input, found by data flow at calibration."""

from __future__ import annotations

import pytest
import torch
from models import fast_trainer, loader
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

from lightning_nipq import HardQuantize, NIPQCallback, attach_quantizers, hard_quantize, post_training_quantize
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations
from lightning_nipq.layers.model_walk import quantized_layers


class HeadFirst(nn.Module):
    """The head is registered before the body, so registration order would pick the wrong layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 4)
        self.body = nn.Linear(16, 32)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


class Preprocessed(nn.Module):
    """The input is scaled and viewed before the first layer; a second branch sees it through a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.first = nn.Linear(16, 8)
        self.after_norm = nn.Linear(16, 8)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        scaled = (x / 255.0).view(x.shape[0], -1)
        return self.head(torch.cat([self.first(F.dropout(scaled, 0.0)), self.after_norm(self.norm(scaled))], dim=1))


class Tokens(nn.Module):
    """Token ids through an embedding: no layer takes the model's input, every projection is quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(F.relu(self.proj(self.embed(ids))).mean(dim=1))


def stays_float(model):
    return sorted(name for name, layer in quantized_layers(model) if layer.input_quantizer is not None and layer.input_quantizer.stays_float)


@pytest.mark.parametrize(
    "make,data,expected",
    [
        (HeadFirst, lambda: torch.randn(64, 16), ["body"]),
        (Preprocessed, lambda: torch.rand(64, 4, 4) * 255, ["first"]),
        (Tokens, lambda: torch.randint(0, 50, (64, 6)), []),
    ],
    ids=["head-registered-first", "scaled-view-and-layernorm", "embedding"],
)
def test_the_layers_fed_the_models_own_input_keep_it_float(make, data, expected):
    torch.manual_seed(0)
    model = make()
    result = attach_quantizers(model, include=None, exclude=["embed"] if make is Tokens else None)
    assert result.float_input_by_data_flow and result.float_input == []
    x = data()
    calibrate_activations(model, list(x.split(16)), forward=lambda b: model(b))
    assert stays_float(model) == expected
    for name, layer in quantized_layers(model):
        assert layer.input_quantizer.calibrated == (name not in expected)
    report = hard_quantize(model, compare_batches=list(x.split(16)), input_fn=lambda b: b)
    float_rows = sorted(r.name for r in report.layers if r.input_bits is None)
    assert float_rows == expected
    assert report.agreement == 1.0


def test_the_callback_decides_on_the_first_batch_and_the_checkpoint_keeps_the_decision(tmp_path):
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = HeadFirst()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x * 2.0), y)  # computed from the input alone: still the model's input

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g))
    model = Module()
    trainer = fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=2), HardQuantize(verbose=False)])
    trainer.fit(model, loader(ds))
    assert "training_step" not in vars(model)  # the tracing ends with calibration
    assert isinstance(model.net.body, IntegerLayerMixin) and model.net.body.input_bits is None
    assert model.net.head.input_bits is not None
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    from lightning_nipq import load_nipq_checkpoint

    fresh = load_nipq_checkpoint(Module, tmp_path / "m.ckpt")
    assert fresh.net.body.input_bits is None


def test_explicit_float_input_layers_and_ptq_follow_the_same_rule():
    model = HeadFirst()
    attach_quantizers(model, float_input_layers=["head"])
    assert model.head.input_quantizer is None and model.body.input_quantizer.stays_float is False
    ptq = HeadFirst()
    post_training_quantize(ptq, [torch.randn(32, 16)], weight_bits=8)
    assert stays_float(ptq) == ["body"]


def test_a_saved_state_with_an_invalid_float_input_flag_is_refused():
    model = HeadFirst()
    attach_quantizers(model)
    state = model.state_dict()
    state["body.input_quantizer._extra_state"]["stays_float"] = "yes"
    with pytest.raises(ValueError, match="stays_float must be True, False or None"):
        HeadFirst_with_quantizers().load_state_dict(state)


def HeadFirst_with_quantizers():  # noqa: N802
    model = HeadFirst()
    attach_quantizers(model)
    return model


class _ConvolutionGradients(TorchDispatchMode):
    """Records, for each convolution backward torch runs, which gradients it computes (input, weight, bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[list[bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_float_input_stays_out_of_autograd_and_its_quantizer_still_gets_gradients(calibrated):
    """A float model never differentiates its input: neither does its quantized first convolution.

    Before and after calibration the input quantizer passes the images through; its
    parameters get zero gradients (DDP waits for them) through the weight instead.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 4))
    attach_quantizers(model)
    images = torch.rand(4, 1, 8, 8)
    if calibrated:
        calibrate_activations(model, [images], lambda batch: model(batch))
        assert model[0].input_quantizer.stays_float and not model[2].input_quantizer.stays_float
    recorded = _ConvolutionGradients()
    with recorded:
        model(images).sum().backward()
    assert [mask[0] for mask in recorded.masks] == [True, False]  # the second layer's backward runs first
    for name, parameter in model[0].input_quantizer.named_parameters():
        assert parameter.grad is not None and torch.count_nonzero(parameter.grad) == 0, name
    assert model[0].weight.grad.abs().sum() > 0
