"""Patch convolutions (stride equal to kernel): torch's forward, and every gradient equal to torch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nipq.layers import torch_layers
from lightning_nipq.layers.attach import attach_quantizers
from lightning_nipq.layers.calibration import calibrate_activations
from lightning_nipq.layers.patch_convolution import is_patch_convolution, patch_convolution, takes_patch_gradient
from lightning_nipq.quant import NIPQConfig, NIPQQuantizer

_CONVOLUTIONS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _gradients(layer: nn.Module, x: torch.Tensor, through_patches: bool, dtype=None):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = patch_convolution(x, layer.weight, layer.bias) if through_patches else layer(x)
    out.float().pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return out, grads


@pytest.mark.parametrize(
    "dims,kernel,size,bias",
    [(1, 4, 18, True), (2, 7, 28, True), (2, (4, 3), (17, 13), False), (3, 2, (4, 6, 5), True)],
)
def test_forward_and_gradients_are_torchs(dims, kernel, size, bias):
    """Sizes that are not a multiple of the kernel leave a border the convolution never reads: its gradient is zero."""
    torch.manual_seed(0)
    layer = _CONVOLUTIONS[dims](3, 8, kernel, stride=kernel, bias=bias).double()
    size = (size,) * dims if isinstance(size, int) else size
    x = torch.randn(4, 3, *size, dtype=torch.float64)
    reference, expected = _gradients(layer, x, through_patches=False)
    out, got = _gradients(layer, x, through_patches=True)
    assert torch.equal(out, reference)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_under_autocast_the_gradients_are_torchs_in_bfloat16():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 16, 4, stride=4)
    x = torch.randn(8, 3, 16, 16)
    reference, expected = _gradients(layer, x, through_patches=False, dtype=torch.bfloat16)
    out, got = _gradients(layer, x, through_patches=True, dtype=torch.bfloat16)
    assert out.dtype == reference.dtype == torch.bfloat16 and torch.equal(out, reference)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=1e-2)


def test_which_convolutions_are_patch_convolutions():
    assert is_patch_convolution(nn.Conv2d(3, 8, 4, stride=4))
    assert is_patch_convolution(nn.Conv1d(3, 8, 4, stride=4, padding="valid"))
    assert is_patch_convolution(nn.Conv2d(3, 8, (2, 3), stride=(2, 3)))
    assert not is_patch_convolution(nn.Conv2d(3, 8, 4, stride=2))  # overlapping windows
    assert not is_patch_convolution(nn.Conv2d(3, 8, 4, stride=4, padding=1))
    assert not is_patch_convolution(nn.Conv2d(4, 8, 4, stride=4, groups=2))
    assert not is_patch_convolution(nn.Conv2d(3, 8, 2, stride=2, dilation=2))
    assert not is_patch_convolution(nn.Linear(3, 8))
    layer = nn.Conv2d(3, 8, 4, stride=4)
    x = torch.randn(2, 3, 8, 8)
    assert not takes_patch_gradient(layer, x)  # the data: no gradient wanted
    assert takes_patch_gradient(layer, x.requires_grad_())
    with torch.no_grad():
        assert not takes_patch_gradient(layer, x)


def _patch_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 7, stride=7), nn.Flatten(), nn.Linear(16 * 16, 10))
    attach_quantizers(model, NIPQConfig(init_bits=4.0), float_input_layers=[])  # the images too are quantized
    calibrate_activations(model, [torch.rand(8, 1, 28, 28)], lambda batch: model(batch))
    return model


def test_a_quantized_patch_embedding_trains_as_with_torchs_convolution(monkeypatch):
    """The input quantizer's range and bits, the weight's and the bias: the same gradients either way."""
    model = _patch_model()
    assert not model[0].input_quantizer.stays_float
    x = torch.rand(8, 1, 28, 28)

    def gradients():
        model.zero_grad()
        model.train()
        for m in model.modules():
            if isinstance(m, NIPQQuantizer):
                m.generator = torch.Generator().manual_seed(1)
        model(x).logsumexp(dim=1).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    through_patches = gradients()
    monkeypatch.setattr(torch_layers, "takes_patch_gradient", lambda layer, input: False)
    through_torch = gradients()
    assert through_patches.keys() == through_torch.keys()
    assert {"0.input_quantizer.alpha_raw", "0.input_quantizer.theta", "0.weight", "0.bias"} <= through_patches.keys()
    for name in through_torch:
        torch.testing.assert_close(through_patches[name], through_torch[name], rtol=1e-5, atol=1e-7, msg=name)


def test_it_compiles_without_a_graph_break_to_the_same_gradients():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 4, stride=4)
    x = torch.randn(2, 3, 16, 16)

    def step(x):
        return patch_convolution(x, layer.weight, layer.bias).pow(2).sum()

    grads = []
    for run in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        inputs = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(run(inputs), [inputs, layer.weight, layer.bias]))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)
