"""The layer-by-layer conversion check: sharp at every bit-width, and names bypassed layers."""

from __future__ import annotations

import math

import pytest
import torch
from models import image_blobs
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq import IntegerMismatchError, hard_quantize, post_training_quantize
from lightning_nipq.convert import check_report
from lightning_nipq.convert.comparison import LAYER_REL_TOLERANCE
from lightning_nipq.convert.layer_check import layer_rel_diffs, record_layers


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 64, 4),
    )  # fmt: skip


def _batches() -> list[Tensor]:
    return list(image_blobs(256).tensors[0].split(64))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_converted_layer_matches_its_fake_quantized_self_to_float_rounding(bits):
    model = _cnn()
    batches = _batches()
    post_training_quantize(model, batches, weight_bits=bits, act_bits=bits, method="mse")
    report = hard_quantize(model, bn_batches=batches, compare_batches=batches, max_rel_diff=math.inf)
    assert set(report.layer_rel_diffs) == {"0", "3", "6", "10"}
    assert max(report.layer_rel_diffs.values()) < 1e-5  # float rounding, whatever the bits
    assert report.uncalled_layers == []
    assert "each integer layer against its fake-quantized self" in report.table()


def test_a_wrong_integer_code_is_caught_by_the_layer_check_and_named():
    model = _cnn()
    batches = _batches()
    post_training_quantize(model, batches, weight_bits=8, act_bits=8)
    model.eval()
    record = record_layers(model, lambda: model(batches[0]))
    assert set(record) == {"0", "3", "6", "10"} and record["3"][0].shape[0] == 32  # the first 32 samples
    report = hard_quantize(model)
    model[3].weight_codes[0, 0, 1, 1] += 20  # one wrong code in one layer
    report.layer_rel_diffs = layer_rel_diffs(model, record)
    assert report.layer_rel_diffs["3"] > LAYER_REL_TOLERANCE
    assert all(d < LAYER_REL_TOLERANCE for name, d in report.layer_rel_diffs.items() if name != "3")
    with pytest.raises(IntegerMismatchError, match=r"differ from their fake-quantized selves.*: 3 by"):
        check_report(report, 0.0, math.inf)


class ReadsWeightDirectly(nn.Module):
    """A forward that uses ``fc.weight`` itself: the quantized layer is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x)).mean(dim=(2, 3))
        return F.linear(h, self.fc.weight, self.fc.bias)


def test_a_bypassed_layer_is_named_in_the_report():
    torch.manual_seed(0)
    model = ReadsWeightDirectly()
    batches = _batches()
    post_training_quantize(model, batches, weight_bits=4, act_bits=4, float_input_layers=["conv", "fc"])
    report = hard_quantize(model, compare_batches=batches, min_agreement=0.0, max_rel_diff=math.inf)
    assert report.uncalled_layers == ["fc"]
    assert "not called by forward during the comparison" in report.table() and "fc" in report.table()
