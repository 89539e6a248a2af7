"""Learned tensors a module uses directly (a class token, a position table), lifted into layers of their own."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_nipq import NIPQConfig, attach_quantizers, export_onnx, hard_quantize, load_quantized, save_quantized
from lightning_nipq.layers import calibrate_activations, detach_quantizers, integer_layers, quantized_layers, quantizers
from lightning_nipq.layers.learned_tensors import LearnedTensor
from lightning_nipq.layers.model_walk import left_in_float
from lightning_nipq.layers.tensor_lifting import liftable_tensors
from lightning_nipq.saving import compare_onnx
from lightning_nipq.saving.checkpoint import prepare_for_state_dict
from lightning_nipq.training import BitBudget


class Embeddings(nn.Module):
    """As a ViT's: patches projected, a class token put in front, a position table added."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.position = nn.Parameter(torch.randn(1, 6, 8) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return h + self.position


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embeddings()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(self.embeddings(x))).mean(dim=1))


def batch(n: int = 16, seed: int = 0) -> Tensor:
    return torch.randn(n, 5, 4, generator=torch.Generator().manual_seed(seed))


def integer(model: nn.Module, x: Tensor, bits: int = 4):
    attach_quantizers(model)
    calibrate_activations(model, [x], forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(bits)
    report = hard_quantize(model, compare_batches=[x])
    return model.eval(), report


def test_lifting_keeps_the_module_working_and_the_parameter_itself():
    model = Model().eval()
    x = batch()
    expected = model(x)
    token = model.embeddings.cls_token
    keys = set(model.state_dict())
    assert liftable_tensors(model) == [("embeddings", "cls_token"), ("embeddings", "position")]
    result = attach_quantizers(model, NIPQConfig(weight_bits=8, act_bits=8))
    assert {"embeddings.cls_token", "embeddings.position"} <= set(result.quantized)
    layer = model.embeddings._modules["cls_token"]
    assert isinstance(layer, LearnedTensor) and layer.weight is token  # an optimizer made before still trains it
    assert isinstance(model.embeddings, Embeddings) and type(model.embeddings).__name__ == "Embeddings"
    assert {"embeddings.cls_token.weight", "embeddings.position.weight"} <= set(model.state_dict())
    detach_quantizers(model)
    assert type(model.embeddings) is Embeddings and model.embeddings.cls_token is token
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), expected)


def test_the_module_reads_the_quantized_tensor_and_the_budget_counts_it():
    model = Model().train()
    attach_quantizers(model)
    calibrate_activations(model, [batch()], forward=model)
    position = model.embeddings._modules["position"]
    position.weight_quantizer.freeze_bits(2)
    position.weight_quantizer.mode = "hard"
    # Signed 2-bit codes: at most three values per range (per channel: axis 0, one range here).
    assert model.embeddings.position.unique().numel() <= 3
    pairs = [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(model)]
    assert any(w is position.weight_quantizer and a is None for w, a in pairs)  # weights only
    assert BitBudget(target_bits=4).loss(model).requires_grad
    out = model(batch()).sum()
    out.backward()
    assert model.embeddings._modules["position"].weight.grad is not None


def test_integer_model_matches_and_reloads_from_artifact_and_state_dict(tmp_path):
    torch.manual_seed(0)
    x = batch()
    model, report = integer(Model(), x, bits=3)
    assert report.agreement == 1.0 and report.coverage == 1.0 and not report.skipped
    names = {name for name, _ in integer_layers(model)}
    assert {"embeddings.cls_token", "embeddings.position"} <= names
    with torch.no_grad():
        expected = model(x)
    codes = model.embeddings._modules["position"].weight_codes
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 3  # 3 signed bits: codes in [-3, 3]

    path = save_quantized(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = load_quantized(path, Model())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)

    state = model.state_dict()
    torch.manual_seed(2)
    other = Model()
    state = prepare_for_state_dict(other, state)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), expected)


@pytest.mark.parametrize("form", ["qdq", "fused"])
def test_onnx_stores_the_codes_and_onnxruntime_agrees(tmp_path, form):
    pytest.importorskip("onnxruntime")
    x = batch()
    model, _ = integer(Model(), x, bits=4)
    path = export_onnx(model, tmp_path / "model.onnx", x[:2], form=form)
    agreement, max_diff, _ = compare_onnx(model, path, [x])
    assert agreement == 1.0 and max_diff < 1e-4


def test_excluded_or_grouped_tensors_stay_float_with_a_reason_and_a_failed_attach_changes_nothing():
    model = Model()
    attach_quantizers(model, exclude=["embeddings.position"])
    reasons = dict(left_in_float(model))
    assert "position" in reasons["embeddings"] and "include/exclude" in reasons["embeddings"]
    assert isinstance(model.embeddings._modules["cls_token"], LearnedTensor)

    model = Model()
    attach_quantizers(model, NIPQConfig(weight_granularity=4))
    assert "embeddings.cls_token" not in {name for name, _ in quantized_layers(model)}
    assert "group size" in dict(left_in_float(model))["embeddings"]

    model = Model()
    token = model.embeddings.cls_token
    with pytest.raises(ValueError, match="not among the quantized layers"):
        attach_quantizers(model, float_input_layers=["embeddings.prj"])  # refused after the tensors were lifted
    assert type(model.embeddings) is Embeddings and model.embeddings.cls_token is token
    assert not any(isinstance(m, LearnedTensor) for m in model.modules())


class Shared(nn.Module):
    """One learned table read by two modules: lifted in both, one quantizer, counted once."""

    def __init__(self) -> None:
        super().__init__()
        table = nn.Parameter(torch.randn(1, 6, 8))
        self.a, self.b = Embeddings(), Embeddings()
        self.a.position = table
        self.b.position = table
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((self.a(x) + self.b(x)).mean(dim=1))


def test_a_learned_tensor_shared_by_two_modules_stays_one(tmp_path):
    x = batch()
    model = Shared()
    attach_quantizers(model)
    a, b = model.a._modules["position"], model.b._modules["position"]
    assert a.weight is b.weight and a.weight_quantizer is b.weight_quantizer
    calibrate_activations(model, [x], forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(4)
    report = hard_quantize(model, compare_batches=[x])
    assert report.agreement == 1.0
    assert model.a._modules["position"].weight_codes is model.b._modules["position"].weight_codes
    with torch.no_grad():
        expected = model(x)
    fresh = load_quantized(save_quantized(model, tmp_path / "shared.safetensors"), Shared())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
