"""The integer check never rejects a correct integer model and always catches a bypassed layer or a wrong code.

The reference is the fake-quantized model computing what its integer form will
(`lightning_nipq.layers.integer_arithmetic`), so a correct conversion matches it to the bit,
at any bit-width, even where code flips used to travel through attention.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_nipq import IntegerMismatchError, NIPQConfig, attach_quantizers, hard_quantize
from lightning_nipq.layers import LayerKind, calibrate_activations, quantizers


class ConvAttention(nn.Module):
    """A depthwise conv, a Conv1d branch and a transformer encoder layer (batch first)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.branch = nn.Conv1d(16, 16, 3, padding=1)
        self.encoder = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 5)
        self.bypass_head = False

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.depthwise(h))
        tokens = h.flatten(2)  # (B, 16, 64)
        tokens = tokens + self.branch(tokens)
        tokens = self.encoder(tokens.transpose(1, 2))
        pooled = tokens.mean(dim=1)
        if self.bypass_head:
            # A fused path that reads the weight and skips the layer's forward (and its quantizers).
            return F.linear(pooled, self.head.weight, self.head.bias)
        return self.head(pooled)


def prepared(bits: int, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = ConvAttention()
    attach_quantizers(model, NIPQConfig(weight_bits=bits, act_bits=bits))
    x = torch.randn(96, 3, 8, 8)
    batches = list(x.split(16))
    calibrate_activations(model, batches[:2], forward=lambda b: model(b))
    return model.eval(), batches


@pytest.mark.parametrize("bits", [2, 3])
def test_a_correct_integer_model_matches_its_reference_exactly_at_2_and_3_bits(bits):
    model, batches = prepared(bits)
    report = hard_quantize(model, compare_batches=batches, input_fn=lambda b: b)  # default tolerances
    assert report.agreement == 1.0
    assert report.max_abs_diff == 0.0 and report.typical_rel_diff == 0.0
    assert max(report.layer_rel_diffs.values()) == 0.0


@pytest.mark.parametrize("bits", [2, 3])
def test_a_bypassed_layer_is_caught(bits):
    model, batches = prepared(bits)
    model.bypass_head = True  # the head's weight is read directly: its quantizers never run
    with pytest.raises(IntegerMismatchError):
        hard_quantize(model, compare_batches=batches, input_fn=lambda b: b)


@pytest.mark.parametrize("bits", [2, 3])
def test_a_wrong_code_is_caught(bits, monkeypatch):
    model, batches = prepared(bits)
    real = LayerKind.to_integer

    def corrupting(self, layer):
        real(self, layer)
        if layer is model.branch:
            with torch.no_grad():
                n = 2 ** (layer.weight_bits - 1) - 1
                codes = layer.weight_codes
                flat = codes.view(-1)
                flat[0] = n if int(flat[0]) != n else -n  # one code of the 768 moved
    monkeypatch.setattr(LayerKind, "to_integer", corrupting)
    with pytest.raises(IntegerMismatchError, match="branch"):
        hard_quantize(model, compare_batches=batches, input_fn=lambda b: b)


def test_training_still_uses_the_differentiable_path():
    model, batches = prepared(3)
    model.train()
    for _, q in quantizers(model):
        q.mode = "hard"
    out = model(batches[0])
    out.sum().backward()
    assert model.stem.weight.grad is not None and model.stem.weight_quantizer.alpha_raw.grad is not None
