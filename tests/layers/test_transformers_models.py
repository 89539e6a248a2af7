"""Models users bring, built from Hugging Face transformers configs (random weights, nothing downloaded).

Each goes the whole way a user takes it: NIPQ in a Lightning fit with HardQuantize, at least
99% of its weight-bearing parameters quantized, the Lightning checkpoint reloaded into a
fresh module, the artifact loaded into a fresh model, and the ONNX export run in onnxruntime.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from models import fast_trainer, loader
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_nipq import (
    HardQuantize,
    NIPQCallback,
    attach_quantizers,
    export_onnx,
    hard_quantize,
    load_nipq_checkpoint,
    load_quantized,
    save_quantized,
)
from lightning_nipq.layers import calibrate_activations, detach_quantizers, integer_layers, quantizers
from lightning_nipq.layers.attach import product_holders
from lightning_nipq.saving import compare_onnx
from lightning_nipq.saving.checkpoint import prepare_for_state_dict

transformers = pytest.importorskip("transformers")
from lightning_nipq.layers.transformers_attention import drop_products, use_products  # noqa: E402  (imports transformers)

CLASSES = 3
VOCAB = 60


def _eager(config: Any) -> Any:
    config._attn_implementation = "eager"  # the attention that exports to ONNX on every version
    return config


def build(name: str) -> nn.Module:
    """The tiny model ``name``, from its config."""
    t = transformers
    if name == "bert":
        config = t.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=CLASSES,
        )
        return t.BertForSequenceClassification(_eager(config))
    if name == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
        config.bos_token_id = config.eos_token_id = 0
        return t.GPT2LMHeadModel(_eager(config))
    if name == "llama":
        config = t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, num_labels=CLASSES, pad_token_id=0, use_cache=False,
        )
        return t.LlamaForSequenceClassification(_eager(config))
    if name == "vit":
        config = t.ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=CLASSES,
        )
        return t.ViTForImageClassification(_eager(config))
    if name == "mobilenet_v2":
        config = t.MobileNetV2Config(num_channels=1, image_size=16, depth_multiplier=0.35, num_labels=CLASSES)
        return t.MobileNetV2ForImageClassification(config)
    raise ValueError(name)


TEXT = ("bert", "gpt2", "llama")
MODELS = ("bert", "gpt2", "llama", "vit", "mobilenet_v2")


def data(name: str, n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    if name in TEXT:
        ids = torch.randint(1, VOCAB, (n, 8), generator=g)
        return TensorDataset(ids, ids[:, 0] % CLASSES)
    size = 16 if name == "mobilenet_v2" else 8
    images = torch.randn(n, 1, size, size, generator=g)
    return TensorDataset(images, (images.mean(dim=(1, 2, 3)) > 0).long())


class Wrapped(LightningModule):
    """A transformers model trained on tensor batches: a classifier, or GPT-2 predicting the next token."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.name = name
        self.net = build(name)

    def forward(self, x: Tensor) -> Tensor:
        if self.name in TEXT:
            return self.net(input_ids=x).logits
        return self.net(pixel_values=x).logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.name == "gpt2":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_a_model_from_transformers_trains_converts_reloads_and_exports(name, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Wrapped(name)
    ds = data(name)
    hard = HardQuantize(run_validation=False, verbose=False, save_figure=False)
    trainer = fast_trainer(2, [NIPQCallback(target_bits=4, calibration_batches=2, log_per_layer=False), hard])
    trainer.fit(model, loader(ds, batch_size=16))
    report = hard.report
    assert report is not None
    assert report.coverage >= 0.99 and not report.skipped, report.skipped
    if name == "vit":
        # Its class token and position table, which the embeddings add to the patches, are layers of their own.
        stored = {row.name: row for row in report.layers}
        assert {"net.vit.embeddings.cls_token", "net.vit.embeddings.position_embeddings"} <= set(stored)
        assert report.coverage == 1.0
    assert report.agreement == 1.0 and not report.uncalled_layers
    assert abs(report.avg_weight_bits - 4.0) <= 0.5
    x = ds.tensors[0][:16]
    model.eval()
    with torch.no_grad():
        expected = model(x)

    # The Lightning checkpoint, into a fresh module (other random weights).
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(1)
    reloaded = load_nipq_checkpoint(Wrapped, ckpt).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)

    # The artifact, into a fresh float model.
    path = save_quantized(model, tmp_path / "model.safetensors")
    torch.manual_seed(2)
    fresh = load_quantized(path, Wrapped(name))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert sum(1 for _ in integer_layers(fresh)) == len(report.layers)

    # ONNX, run by onnxruntime.
    onnx_path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    agreement, _, _ = compare_onnx(model, onnx_path, [x])
    assert agreement >= 0.999


# ---------------------------------------------------------------------- attention's activation products (quantize_products=True)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ("bert", "gpt2", "llama", "vit"))
def test_float_products_compute_what_transformers_attention_computes(name, implementation):
    torch.manual_seed(0)
    model = Wrapped(name).eval()
    model.net.config._attn_implementation = implementation
    reference = copy.deepcopy(model)
    x = data(name).tensors[0][:8]
    holders = product_holders(model)
    assert len(holders) == 2  # one attention module per block
    for _, module in holders:
        use_products(module)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    for _, module in holders:
        drop_products(module)
    assert model.net.config._attn_implementation == implementation


@pytest.mark.slow
@pytest.mark.parametrize("name", ("bert", "gpt2", "llama", "vit"))
def test_transformers_attention_products_are_exact_saved_reloaded_and_exported(name, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Wrapped(name).eval()
    x = data(name).tensors[0][:32]
    result = attach_quantizers(model, quantize_products=True)
    assert len(result.products) == 4 and model.net.config._attn_implementation == "lightning_nipq_products"
    calibrate_activations(model, list(x.split(16)), forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(4)
    report = hard_quantize(model, compare_batches=list(x.split(16)))
    assert len(report.products) == 4 and report.agreement == 1.0 and report.max_abs_diff == 0.0
    with torch.no_grad():
        expected = model(x)
    fresh = load_quantized(save_quantized(model, tmp_path / "model.safetensors"), Wrapped(name))
    state = model.state_dict()
    other = Wrapped(name)
    prepare_for_state_dict(other, state)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected) and torch.equal(other.eval()(x), expected)
    path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    agreement, _, relative = compare_onnx(model, path, [x])
    assert agreement == 1.0 and relative < 1e-5
    detach_quantizers(model)
    assert model.net.config._attn_implementation == "eager" and not product_holders(model)[0][1]._modules.get("score_product")
