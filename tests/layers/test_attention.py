"""nn.MultiheadAttention split into quantizable projections: torch's behaviour in float, the whole chain quantized."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_nipq import attach_quantizers, export_onnx, hard_quantize, load_quantized, save_quantized
from lightning_nipq.layers import (
    SplitMultiheadAttention,
    calibrate_activations,
    detach_quantizers,
    integer_layers,
    quantized_layers,
    quantizers,
    split_attention,
)
from lightning_nipq.layers.model_walk import left_in_float
from lightning_nipq.saving import compare_onnx
from lightning_nipq.saving.checkpoint import CheckpointMismatchError, prepare_for_state_dict

# ---------------------------------------------------------------------- float: every argument as in torch
CONSTRUCTIONS = {
    "plain": {},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 6, "vdim": 5},
    "dropout": {"dropout": 0.3},
}


def _inputs(attention: nn.MultiheadAttention, batched: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tgt, src, n = 5, 7, 3

    def shaped(length: int, dim: int) -> Tensor:
        if not batched:
            return torch.randn(length, dim, generator=g)
        return torch.randn(n, length, dim, generator=g) if attention.batch_first else torch.randn(length, n, dim, generator=g)

    return shaped(tgt, attention.embed_dim), shaped(src, attention.kdim), shaped(src, attention.vdim)


def _masks(kind: str, n: int, heads: int, tgt: int, src: int, batched: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(n, src, dtype=torch.bool)
    padding[0, -2:] = True
    if kind == "none":
        return {}
    if kind == "padding_bool":
        return {"key_padding_mask": padding if batched else padding[0]}
    if kind == "padding_float":
        mask = torch.zeros(n, src).masked_fill(padding, -1e4)
        return {"key_padding_mask": mask if batched else mask[0]}
    if kind == "attn_2d_bool":
        return {"attn_mask": torch.rand(tgt, src, generator=g) > 0.7}
    if kind == "attn_3d_float":
        return {"attn_mask": torch.randn(n * heads if batched else heads, tgt, src, generator=g)}
    if kind == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(tgt)[:, :src] if tgt == src else None}
    if kind == "both":
        return {"key_padding_mask": padding if batched else padding[0], "attn_mask": torch.rand(tgt, src, generator=g) > 0.7}
    raise AssertionError(kind)


@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_split_attention_equals_torchs_for_every_argument(construction, batched):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, **CONSTRUCTIONS[construction]).eval()
    split = SplitMultiheadAttention.from_attention(reference).eval()
    q, k, v = _inputs(reference, batched)
    for mask_kind, need_weights, average in itertools.product(
        ["none", "padding_bool", "padding_float", "attn_2d_bool", "attn_3d_float", "both"], [True, False], [True, False]
    ):
        masks = _masks(mask_kind, 3, 2, 5, 7, batched)
        kwargs = {"need_weights": need_weights, "average_attn_weights": average, **masks}
        out, weights = reference(q, k, v, **kwargs)
        got, got_weights = split(q, k, v, **kwargs)
        where = f"{construction} {mask_kind} need_weights={need_weights} average={average}"
        assert torch.allclose(got, out, atol=1e-6, equal_nan=True), where
        assert (weights is None) == (got_weights is None), where
        if weights is not None:
            assert got_weights.shape == weights.shape and torch.allclose(got_weights, weights, atol=1e-6), where


@pytest.mark.parametrize("need_weights", [True, False])
def test_causal_self_attention_and_its_hint(need_weights):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    split = SplitMultiheadAttention.from_attention(reference)
    x = torch.randn(3, 6, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for kwargs in ({"attn_mask": causal}, {"attn_mask": causal, "is_causal": True}):
        out, _ = reference(x, x, x, need_weights=need_weights, **kwargs)
        got, _ = split(x, x, x, need_weights=need_weights, **kwargs)
        assert torch.allclose(got, out, atol=1e-6)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        split(x, x, x, is_causal=True)


def test_torchs_inference_fast_path_gives_what_the_split_attention_gives():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    split = SplitMultiheadAttention.from_attention(reference).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():  # torch takes its fused kernel here
        assert torch.allclose(split(x, x, x)[0], reference(x, x, x)[0], atol=1e-5)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    split = SplitMultiheadAttention.from_attention(nn.MultiheadAttention(8, 2, dropout=0.5))
    q, k, v = _inputs(split, True)
    split.train()
    torch.manual_seed(1)
    first = split(q, k, v, need_weights=False)[0]
    assert not torch.allclose(first, split(q, k, v, need_weights=False)[0])
    split.eval()
    assert torch.equal(split(q, k, v)[0], split(q, k, v)[0])


def test_state_dict_keys_and_separate_projection_weights_round_trip():
    torch.manual_seed(0)
    for kwargs in ({}, {"kdim": 6, "vdim": 5}, {"bias": False, "add_bias_kv": True}):
        reference = nn.MultiheadAttention(8, 2, **kwargs)
        split = SplitMultiheadAttention.from_attention(reference)
        saved = reference.state_dict()
        assert sorted(split.state_dict()) == sorted(saved)
        assert all(torch.equal(split.state_dict()[key], value) for key, value in saved.items())
        other = SplitMultiheadAttention.from_attention(nn.MultiheadAttention(8, 2, **kwargs))
        other.load_state_dict(saved)
        q, k, v = _inputs(reference, True)
        assert torch.equal(other(q, k, v)[0], split(q, k, v)[0])
    with pytest.raises(RuntimeError, match="in_proj_weight is not a"):
        split = SplitMultiheadAttention.from_attention(nn.MultiheadAttention(8, 2))
        split.load_state_dict({**split.state_dict(), "in_proj_weight": torch.zeros(7, 8)})


def test_only_exact_attention_modules_are_split_and_a_shared_one_stays_shared():
    class OwnAttention(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict({"a": nn.MultiheadAttention(8, 2), "own": OwnAttention(8, 2)})
    model["alias"] = model["a"]
    assert split_attention(model) == ["a"]
    assert isinstance(model["a"], SplitMultiheadAttention) and model["alias"] is model["a"]
    assert type(model["own"]) is OwnAttention
    with pytest.raises(ValueError, match="wrap it in a module"):
        split_attention(nn.MultiheadAttention(8, 2))


# ---------------------------------------------------------------------- quantized: attach, integer, artifact, checkpoint, ONNX
class AttentionBlock(nn.Module):
    """Self-attention with a padding mask, then cross-attention onto a memory of other widths."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        self.memory_embed = nn.Linear(6, 12)
        self.self_attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.cross_attn = nn.MultiheadAttention(16, 2, kdim=12, vdim=12, batch_first=batch_first, add_bias_kv=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        h = torch.relu(self.embed(x))
        m = torch.relu(self.memory_embed(x))
        if not self.batch_first:
            h, m = h.transpose(0, 1), m.transpose(0, 1)
        h = h + self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        h = h + self.cross_attn(h, m, m)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


def _quantized_block(batch_first: bool = True, bits: int = 6) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = AttentionBlock(batch_first).eval()
    x = torch.randn(32, 5, 6, generator=torch.Generator().manual_seed(0))
    attach_quantizers(model)
    calibrate_activations(model, list(x.split(16)), forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(bits)
    return model, x


@pytest.mark.parametrize("batch_first", [True, False])
def test_every_projection_is_quantized_converted_exactly_and_saved(batch_first, tmp_path):
    model, x = _quantized_block(batch_first)
    names = {name for name, _ in quantized_layers(model)}
    assert {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= names
    assert [name for name, _ in left_in_float(model)] == ["cross_attn"]  # bias_k and bias_v
    fake = copy.deepcopy(model)
    report = hard_quantize(model, compare_batches=list(x.split(16)))
    assert report.uncalled_layers == [] and report.agreement == 1.0
    assert max(report.layer_rel_diffs.values()) < 1e-5
    assert report.float_weight_numel == 2 * 16  # bias_k and bias_v, added to keys and values in float
    with torch.no_grad():
        assert torch.allclose(model(x), fake(x), atol=1e-4)  # integer equals fake-quantized
    path = save_quantized(model, tmp_path / "attention.safetensors")
    torch.manual_seed(5)
    fresh = load_quantized(path, AttentionBlock(batch_first))
    assert isinstance(fresh.self_attn, SplitMultiheadAttention)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_checkpoint_of_a_quantized_attention_reloads_into_a_fresh_model():
    model, x = _quantized_block()
    for form in ("fake", "integer"):
        if form == "integer":
            hard_quantize(model, compare_batches=[x])
        state = model.state_dict()
        fresh = AttentionBlock()
        prepare_for_state_dict(fresh, state)
        fresh.load_state_dict(state)
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x)), form


def test_a_checkpoint_that_does_not_fit_leaves_the_fresh_attention_unsplit():
    model, _ = _quantized_block()
    state = model.state_dict()
    fresh = AttentionBlock()
    fresh.head = nn.Linear(16, 4)  # another head: its per-channel ranges do not fit the checkpoint's
    attention = fresh.self_attn
    with pytest.raises(CheckpointMismatchError, match="head"):
        prepare_for_state_dict(fresh, state)
    assert fresh.self_attn is attention and type(attention) is nn.MultiheadAttention
    assert not any(True for _ in quantized_layers(fresh))


def test_onnx_export_of_quantized_attention_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _quantized_block(bits=8)
    hard_quantize(model, compare_batches=[x])
    path = export_onnx(model, tmp_path / "attention.onnx", x[:2])
    agreement, _, _ = compare_onnx(model, path, [x])
    assert agreement >= 0.999


def test_detach_quantizers_leaves_split_float_attention_with_torchs_keys():
    model, x = _quantized_block()
    detach_quantizers(model)
    assert not any(True for _ in quantized_layers(model)) and not any(True for _ in integer_layers(model))
    keys = set(model.state_dict())
    assert {"self_attn.in_proj_weight", "cross_attn.q_proj_weight", "cross_attn.k_proj_weight"} <= keys


# ---------------------------------------------------------------------- torch's transformer modules: no fast path bypasses a quantizer
class EncoderClassifier(LightningModule):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_in_eval_calls_every_quantized_layer(batch_first):
    torch.manual_seed(0)
    model = EncoderClassifier(batch_first).eval()
    x = torch.randn(16, 5, 6)
    padding = torch.zeros(16, 5, dtype=torch.bool)
    padding[:, -1] = True
    attach_quantizers(model)
    calibrate_activations(model, [x], forward=lambda b: model(b, padding))
    for _, q in quantizers(model):
        q.freeze_bits(4)
    called: set[str] = set()
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: called.add(n)) for name, layer in quantized_layers(model)]
    with torch.no_grad():  # torch's fused encoder path and nested tensors would run here
        model(x, padding)
    for hook in hooks:
        hook.remove()
    assert called == {name for name, _ in quantized_layers(model)}
    assert len(called) == 2 * 6 + 2
    report = hard_quantize(model, compare_batches=[x])
    assert report.uncalled_layers == [] and report.coverage > 0.99


def test_nn_transformer_encoder_decoder_is_fully_quantized_and_reloads(tmp_path):
    torch.manual_seed(0)
    transformer = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0, batch_first=True)

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.src = nn.Linear(6, 16)
            self.tgt = nn.Linear(6, 16)
            self.transformer = copy.deepcopy(transformer)
            self.head = nn.Linear(16, 6)

        def forward(self, x: Tensor) -> Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.head(self.transformer(self.src(x), self.tgt(x), tgt_mask=mask, tgt_is_causal=True))

    model = Seq2Seq().eval()
    x = torch.randn(8, 5, 6)
    attach_quantizers(model)
    assert sum(isinstance(m, SplitMultiheadAttention) for m in model.modules()) == 3
    calibrate_activations(model, [x], forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(8)
    report = hard_quantize(model, compare_batches=[x])
    assert report.uncalled_layers == [] and report.coverage > 0.99 and not report.skipped
    path = save_quantized(model, tmp_path / "seq2seq.safetensors")
    fresh = load_quantized(path, Seq2Seq())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
