"""Attention's activation-by-activation products, quantized on both operands (``quantize_products=True``)."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq import (
    HardQuantize,
    LSQCallback,
    NIPQCallback,
    attach_quantizers,
    export_onnx,
    hard_quantize,
    load_nipq_checkpoint,
    load_quantized,
    save_quantized,
)
from lightning_nipq.layers import (
    ActivationProduct,
    IntegerActivationProduct,
    QuantizedActivationProduct,
    SplitMultiheadAttention,
    calibrate_activations,
    detach_quantizers,
    quantizers,
)
from lightning_nipq.layers.activation_products import check_product_state
from lightning_nipq.layers.forms import integer_arithmetic
from lightning_nipq.layers.model_walk import integer_products, quantized_products
from lightning_nipq.saving import compare_onnx
from lightning_nipq.saving.checkpoint import CheckpointMismatchError, prepare_for_state_dict
from lightning_nipq.training.bit_budget import model_pairs, pair_average_bits

PRODUCT_NAMES = [f"encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("score_product", "value_product")]


class Encoder(LightningModule):
    """nn.TransformerEncoder on a linear embedding, mean-pooled into three classes."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def _data(n: int = 128) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, 6, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, 0, 1] > 1).long()
    return x, y


def _quantized(bits: int, batch_first: bool = True) -> tuple[Encoder, Tensor]:
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    x, _ = _data(32)
    attach_quantizers(model, quantize_products=True)
    calibrate_activations(model, list(x.split(16)), forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(bits)
    return model, x


# ---------------------------------------------------------------------- float: the products change nothing
def _inputs(attention: nn.MultiheadAttention, batched: bool) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)

    def shaped(length: int, dim: int) -> Tensor:
        if not batched:
            return torch.randn(length, dim, generator=g)
        return torch.randn(3, length, dim, generator=g) if attention.batch_first else torch.randn(length, 3, dim, generator=g)

    return shaped(5, attention.embed_dim), shaped(7, attention.kdim), shaped(7, attention.vdim)


def _masks(kind: str, batched: bool) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    padding = padding if batched else padding[0]
    attn = torch.randn(3 * 2 if batched else 2, 5, 7, generator=g)
    return {"none": {}, "padding": {"key_padding_mask": padding}, "attn_3d": {"attn_mask": attn}}.get(
        kind, {"key_padding_mask": padding, "attn_mask": attn}
    )


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("construction", [{}, {"batch_first": True}, {"add_bias_kv": True, "add_zero_attn": True}, {"kdim": 6, "vdim": 5}])
def test_float_products_compute_what_torch_computes_for_every_argument(construction, batched):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, **construction).eval()
    split = SplitMultiheadAttention.from_attention(reference).eval()
    split.add_products()
    assert isinstance(split.score_product, ActivationProduct)
    q, k, v = _inputs(reference, batched)
    for mask_kind, need_weights in itertools.product(["none", "padding", "attn_3d", "both"], [True, False]):
        kwargs = {"need_weights": need_weights, **_masks(mask_kind, batched)}
        out, weights = reference(q, k, v, **kwargs)
        got, got_weights = split(q, k, v, **kwargs)
        assert torch.allclose(got, out, atol=1e-6), (mask_kind, need_weights)
        assert (weights is None) == (got_weights is None)
    x = torch.randn(3, 6, 8) if construction.get("batch_first") else torch.randn(6, 3, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    if "kdim" not in construction:  # the causal hint: the products need the mask, which torch's kernel would build itself
        out, _ = reference(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        got, _ = split(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        assert torch.allclose(got, out, atol=1e-6)


# ---------------------------------------------------------------------- attaching, the budget, conversion
def test_products_are_quantized_counted_in_the_input_budget_and_exact_in_the_integer_model():
    model, x = _quantized(bits=3)
    assert [name for name, _ in quantized_products(model)] == PRODUCT_NAMES
    product = model.encoder.layers[0].self_attn.score_product
    assert type(product) is QuantizedActivationProduct
    names = {name for name, _ in quantizers(model)}
    assert {f"{n}.{side}_quantizer" for n in PRODUCT_NAMES for side in ("left", "right")} <= names
    # The operands count in the average input bits, element-weighted like a layer's input.
    for _, q in quantizers(model):
        if q is product.left_quantizer:
            q.freeze_bits(8)
    avg_w, avg_a = pair_average_bits(model_pairs(model))
    inputs = [(a.size, a.rounded_bits()) for w, a in model_pairs(model) if a is not None and a.calibrated]
    expected = sum(s * b for s, b in inputs) / sum(s for s, _ in inputs)
    assert avg_a is not None and float(avg_a) == pytest.approx(expected) and float(avg_a) > 3
    assert product.left_quantizer.size == 16 * 4 * 5 * 4  # batch x heads x tokens x head_dim of one calibration batch
    fake = copy.deepcopy(model)
    report = hard_quantize(model, compare_batches=list(x.split(16)))
    assert [name for name, _ in integer_products(model)] == PRODUCT_NAMES
    assert report.agreement == 1.0 and report.max_abs_diff == 0.0  # the reference computes what the integer model does
    assert [p.name for p in report.products] == PRODUCT_NAMES
    assert (report.products[0].left_bits, report.products[0].right_bits) == (8, 3)
    assert "activation products multiplied as integers" in report.table()
    assert report.avg_act_bits == pytest.approx(expected)
    # Outside the integer-arithmetic reference, the fake-quantized model multiplies dequantized operands in
    # float: the two agree to float rounding.
    with torch.no_grad():
        assert torch.allclose(model(x), fake(x), atol=1e-4)
        with integer_arithmetic():
            assert torch.equal(model(x), fake.eval()(x))


def test_the_integer_product_sums_code_products_exactly():
    model, x = _quantized(bits=8)
    hard_quantize(model, compare_batches=[x])
    product = model.encoder.layers[1].self_attn.value_product
    assert type(product) is IntegerActivationProduct
    left, right = product.sides()
    weights = torch.softmax(torch.randn(4, 5, 5), dim=-1)
    values = torch.randn(4, 5, 4)
    codes_l, step_l = left.codes_and_step(weights)
    codes_r, step_r = right.codes_and_step(values)
    exact = torch.matmul(codes_l.long(), codes_r.long())  # int64: the true integer sums
    got = product(weights, values)
    assert torch.equal(got, (exact.float() * (step_l * step_r)).float())
    assert codes_l.min() >= 0 and not left.signed  # softmax weights: unsigned codes


def test_weight_only_and_products_contradict_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="quantize_products must be True or False"):
        attach_quantizers(Encoder(), quantize_products="yes")
    model = Encoder()
    with pytest.raises(ValueError, match="quantize_inputs=False"):
        attach_quantizers(model, quantize_inputs=False, quantize_products=True)
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention  # refused before any change
    with pytest.raises(ValueError, match="quantize_inputs=False"):
        NIPQCallback(target_bits=3, quantize_inputs=False, quantize_products=True)
    with pytest.raises(ValueError, match="budget='avg_bits'"):
        NIPQCallback(target_bits=3, budget="bops", quantize_products=True)


def test_a_model_without_reachable_products_is_told_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="no activation product to quantize"):
        result = attach_quantizers(model, quantize_products=True)
    assert result.products == [] and len(result.quantized) == 2


def test_exclude_leaves_a_product_float_and_detach_restores_torchs_attention():
    torch.manual_seed(0)
    model = Encoder().eval()
    reference = copy.deepcopy(model)
    x, _ = _data(16)
    result = attach_quantizers(model, quantize_products=True, exclude=["*.value_product"])
    assert result.products == [PRODUCT_NAMES[0], PRODUCT_NAMES[2]]
    assert type(model.encoder.layers[0].self_attn.value_product) is ActivationProduct
    detach_quantizers(model)
    attention = model.encoder.layers[0].self_attn
    assert attention.products() is None and "score_product" not in dict(attention.named_children())
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)


class OwnAttention(nn.Module):
    """A user's attention that multiplies through ActivationProduct modules of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 3)
        self.scores = ActivationProduct()
        self.mix = ActivationProduct()

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(self.scores(q, k.transpose(-2, -1)) / 8**0.5, dim=-1)
        return self.proj(self.mix(weights, v).mean(dim=1))


def test_a_users_own_products_are_quantized_converted_and_saved(tmp_path):
    torch.manual_seed(0)
    model = OwnAttention().eval()
    x = torch.randn(16, 5, 8)
    assert attach_quantizers(model, quantize_products=True).products == ["scores", "mix"]
    calibrate_activations(model, [x], forward=model)
    report = hard_quantize(model, compare_batches=[x])
    assert report.agreement == 1.0 and len(report.products) == 2
    path = save_quantized(model, tmp_path / "own.safetensors")
    fresh = load_quantized(path, OwnAttention())
    assert type(fresh.scores) is IntegerActivationProduct
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------------- saving: artifact, state dicts, ONNX
@pytest.mark.parametrize("batch_first", [True, False])
def test_artifact_and_state_dicts_reload_the_products_into_fresh_models(batch_first, tmp_path):
    model, x = _quantized(bits=4, batch_first=batch_first)
    fake_state = model.state_dict()
    fresh = Encoder(batch_first)
    prepare_for_state_dict(fresh, fake_state)
    fresh.load_state_dict(fake_state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))  # fake-quantized products, their quantizers rebuilt
    hard_quantize(model, compare_batches=[x])
    for source in ("state", "artifact"):
        fresh = Encoder(batch_first)
        if source == "state":
            state = model.state_dict()
            prepare_for_state_dict(fresh, state)
            fresh.load_state_dict(state)
        else:
            load_quantized(save_quantized(model, tmp_path / "encoder.safetensors"), fresh)
        assert [name for name, _ in integer_products(fresh)] == PRODUCT_NAMES
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), model(x)), source


def test_a_damaged_product_state_is_refused_with_the_key_and_changes_nothing():
    model, x = _quantized(bits=4)
    hard_quantize(model, compare_batches=[x])
    product = model.encoder.layers[0].self_attn.score_product
    before = {k: v.clone() for k, v in product.state_dict().items()}
    for key, value, message in (
        ("settings", torch.tensor([[40, 1, 0, 10], [4, 0, 0, 10]]), "bits"),
        ("settings", torch.tensor([[4, 0, 99, 10], [4, 0, 0, 10]]), "zero point"),
        ("settings", torch.zeros(3, dtype=torch.int64), "shape"),
        ("alphas", torch.tensor([1.0, float("nan")]), "alphas"),
    ):
        state = {**before, key: value}
        with pytest.raises(ValueError, match=message):
            check_product_state(state, "")
        with pytest.raises(ValueError, match=message):
            product.load_state_dict(state)
        assert all(torch.equal(product.state_dict()[k], v) for k, v in before.items())
    state = model.state_dict()
    state["encoder.layers.0.self_attn.score_product.left_quantizer._extra_state"] = {"method": "nipq", "bits": "many"}
    fresh = Encoder()
    with pytest.raises(CheckpointMismatchError):
        prepare_for_state_dict(fresh, state)
    assert type(fresh.encoder.layers[0].self_attn) is nn.MultiheadAttention  # left as it was


@pytest.mark.parametrize("form", ["qdq", "fused"])
def test_onnx_export_multiplies_the_products_in_onnxruntime(form, tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _quantized(bits=4)
    hard_quantize(model, compare_batches=[x])
    path = export_onnx(model, tmp_path / "encoder.onnx", x[:2], form=form)
    agreement, _, rel = compare_onnx(model, path, [x])
    assert agreement == 1.0 and rel < 1e-5


# ---------------------------------------------------------------------- training with the callbacks
def _fit(callback, tmp_path, steps: int = 30) -> tuple[Encoder, Trainer, HardQuantize]:
    torch.manual_seed(0)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = Encoder()
    hard = HardQuantize()
    trainer = Trainer(
        max_steps=steps,
        callbacks=[callback, hard],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, loader)
    return model, trainer, hard


@pytest.mark.slow
def test_nipq_learns_the_products_bits_within_the_input_budget_and_the_checkpoint_reloads(tmp_path):
    model, trainer, hard = _fit(NIPQCallback(target_bits=3, quantize_products=True), tmp_path)
    report = hard.report
    assert len(report.products) == 4 and report.agreement == 1.0 and report.max_abs_diff == 0.0
    assert report.avg_act_bits == pytest.approx(3.0, abs=0.25)  # layers' inputs and products' operands together
    operand_bits = {b for p in report.products for b in (p.left_bits, p.right_bits)}
    assert len(operand_bits | {r.input_bits for r in report.layers if r.input_bits is not None}) > 1
    trainer.save_checkpoint(tmp_path / "encoder.ckpt")
    reloaded = load_nipq_checkpoint(Encoder, tmp_path / "encoder.ckpt").eval()
    x, _ = _data(32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))


def test_lsq_quantizes_the_products_at_its_input_bits(tmp_path):
    _, _, hard = _fit(LSQCallback(weight_bits=4, act_bits=4, quantize_products=True), tmp_path, steps=8)
    assert {(p.left_bits, p.right_bits) for p in hard.report.products} == {(4, 4)}
    assert hard.report.agreement == 1.0
