"""Deployment forms of the ONNX export: INT4 weights, and the fused form onnxruntime runs with integer kernels.

Latency is measured by benchmarks/deployment.py only; these tests check what the files hold,
what onnxruntime makes of them, and that they agree with the integer model.
"""

import collections

import onnx
import pytest
import torch
from models import MLP, TinyTransformer, blobs, train_on_tensors
from onnx import numpy_helper
from torch import nn

from lightning_nipq import export_onnx, hard_quantize, post_training_quantize
from lightning_nipq.demo.data import load_digits_split
from lightning_nipq.demo.models import SmallCNN
from lightning_nipq.layers import IntegerLayerMixin
from lightning_nipq.saving import compare_onnx, onnx_session
from lightning_nipq.saving.onnx_export import FORM_METADATA_KEY, export_form

#: Operators of onnxruntime's CPU provider that compute on integer codes.
INTEGER_KERNELS = {"QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulNBits", "ConvInteger"}


def quantized(model, batches, weight_bits=4, act_bits=8, fold=True, **kwargs):
    """``model`` after PTQ on ``batches`` and conversion to integer layers (BatchNorm folded with ``fold``)."""
    post_training_quantize(model.eval(), batches, weight_bits=weight_bits, act_bits=act_bits, method="mse", **kwargs)
    hard_quantize(model, compare_batches=batches[:2], fold_batchnorm=fold, min_agreement=0.0, max_rel_diff=float("inf"))
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    train_x, train_y, test_x, test_y = load_digits_split()
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


@pytest.fixture(scope="module")
def digits_cnn(digits):
    """The demo's CNN trained briefly on digits, at W4A8 with BatchNorm folded."""
    train_x, train_y, _, _ = digits
    torch.manual_seed(0)
    model = train_on_tensors(SmallCNN(width=16), train_x, train_y, epochs=3, lr=3e-3)
    return quantized(model, list(train_x[:256].split(64)))


def initializers(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def optimized_ops(path, tmp_path, exact=None):
    """The operator counts of the graph onnxruntime runs (its saved optimized model)."""
    saved = tmp_path / f"{path.stem}.optimized.onnx"
    onnx_session(path, exact=exact, threads=1, optimized_model_path=saved)
    return collections.Counter(n.op_type for n in onnx.load(str(saved)).graph.node), onnx.load(str(saved)).graph


def test_four_bit_weights_are_int4_initializers_and_the_file_is_small(tmp_path):
    """A weight-dominated MLP at W4A8: INT4 codes, the checker passes, at most 0.15x the float file, exact in onnxruntime."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))  # noqa: E731
    x = torch.randn(256, 256)
    float_model = make().eval()
    float_path = tmp_path / "float.onnx"
    program = torch.onnx.export(float_model, (x[:1],), dynamo=True, input_names=["input"], output_names=["output"], verbose=False)
    program.save(str(float_path), external_data=False)

    model = make()
    model.load_state_dict(float_model.state_dict())
    model = quantized(model, list(x.split(64)))
    path = export_onnx(model, tmp_path / "w4.onnx", x[:2])
    onnx.checker.check_model(str(path), full_check=True)
    inits = initializers(path)
    for name, layer in model.named_modules():
        if isinstance(layer, IntegerLayerMixin):
            codes = inits[f"{name}.weight_codes"]
            assert codes.data_type == onnx.TensorProto.INT4
            assert (numpy_helper.to_array(codes).astype("int8") == layer.weight_codes.numpy()).all()
    ratio = path.stat().st_size / float_path.stat().st_size
    print(f"\nW4A8 MLP (394k weights): ONNX {path.stat().st_size / 1024:.1f} KiB, {ratio:.3f}x the float file")
    assert ratio <= 0.15
    # onnxruntime sums dequantized float products, torch integer codes: a code on a rounding boundary
    # of the next quantizer may flip (here about 3e-3 of the largest output), no class does.
    agreement, _, _ = compare_onnx(model, path, list(x.split(64)))
    assert agreement == 1.0
    # Opset 18 has no INT4: the same codes as int8, for older runtimes.
    old = export_onnx(model, tmp_path / "w4-opset18.onnx", x[:2], opset=18)
    assert initializers(old)["0.weight_codes"].data_type == onnx.TensorProto.INT8
    assert old.stat().st_size > 1.8 * path.stat().st_size


def test_blockwise_four_bit_weights_stay_int4_in_both_forms(tmp_path):
    x = blobs(256, dim=64).tensors[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    model = quantized(model, list(x.split(64)), weight_granularity=32)
    for form in ("qdq", "fused"):
        path = export_onnx(model, tmp_path / f"{form}.onnx", x[:2], form=form)
        graph = onnx.load(str(path)).graph
        blocked = [n for n in graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i for a in n.attribute)]
        assert len(blocked) == 2
        assert all(initializers(path)[n.input[0]].data_type == onnx.TensorProto.INT4 for n in blocked)
        agreement, _, _ = compare_onnx(model, path, list(x.split(64)))
        assert agreement >= 0.999


def test_fused_cnn_runs_integer_convolutions_and_agrees(tmp_path, digits, digits_cnn):
    """The demo CNN: QLinearConv where a conv feeds the next quantizer, MatMulIntegerToFloat for the classifier."""
    _, _, test_x, _ = digits
    model = digits_cnn
    path = export_onnx(model, tmp_path / "cnn.onnx", test_x[:1], form="fused")
    assert export_form(path) == "fused"
    assert onnx.load(str(path)).metadata_props[0].key == FORM_METADATA_KEY
    ops, graph = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] >= 1 and ops["MatMulIntegerToFloat"] == 1, ops
    # Every weight that does not fuse is a float constant at run time: no DequantizeLinear of an initializer is left.
    constants = {i.name for i in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    agreement, max_abs, max_rel = compare_onnx(model, path, [test_x])
    print(f"\nfused digits CNN: {dict(ops)}; agreement {agreement:.4%}, max rel diff {max_rel:.2g}")
    assert agreement >= 0.999
    # Run exactly, the fused layout computes what the integer model does (its integer Clip is the float Clip).
    agreement, _, max_rel = compare_onnx(model, path, [test_x], exact=True)
    qdq = export_onnx(model, tmp_path / "cnn-qdq.onnx", test_x[:1])
    _, _, qdq_rel = compare_onnx(model, qdq, [test_x])
    assert agreement == 1.0 and max_rel <= max(qdq_rel, 1e-5)


class Residual(nn.Module):
    """conv-BN-ReLU, then conv-BN added to the input: the second conv feeds a float add, not a quantizer."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))) + h)
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("residual", [False, True], ids=["cnn", "residual"])
def test_fused_form_keeps_the_predicted_layers_integer(tmp_path, digits, digits_cnn, residual):
    """Each weight the export keeps behind a DequantizeLinear becomes one integer kernel in onnxruntime, and no other layer does."""
    train_x, train_y, test_x, _ = digits
    model = digits_cnn
    if residual:
        torch.manual_seed(0)
        # Trained enough to have margins: the fused form rounds the bias and the requantization otherwise (see the docs).
        model = quantized(train_on_tensors(Residual(16), train_x, train_y, epochs=6, lr=3e-3), list(train_x[:256].split(64)))
    path = export_onnx(model, tmp_path / "cnn.onnx", test_x[:1], form="fused")
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer}

    def weight_source(name):
        node = producers.get(name)
        return name in constants or (node is not None and node.op_type == "Cast" and node.input[0] in constants)

    kept = [n for n in graph.node if n.op_type == "DequantizeLinear" and weight_source(n.input[0])]
    ops, _ = optimized_ops(path, tmp_path)
    assert sum(ops[k] for k in INTEGER_KERNELS) == len(kept) >= 2
    if residual:  # conv1 feeds conv2's quantizer; conv2 feeds the add and stays float, as does the float-input stem
        assert ops["QLinearConv"] == 1 and ops["MatMulIntegerToFloat"] == 1, ops
        agreement, _, _ = compare_onnx(model, path, [test_x])
        assert agreement >= 0.999


@pytest.mark.parametrize("zero_point", ["off", "auto"])
def test_fused_transformer_turns_every_linear_into_an_integer_matmul(tmp_path, zero_point):
    """3-d linears with signed (stored as uint8 with zero point 128) or zero-pointed inputs, and a 2-d head."""
    ds = blobs(512)
    x, y = ds.tensors
    torch.manual_seed(0)
    model = train_on_tensors(TinyTransformer(), x, y, epochs=3, lr=3e-3)
    model = quantized(model, list(x.split(64)), input_zero_point=zero_point, float_input_layers=[])
    path = export_onnx(model, tmp_path / "tt.onnx", x[:2], form="fused")
    ops, _ = optimized_ops(path, tmp_path)
    linears = sum(isinstance(m, nn.Linear) and isinstance(m, IntegerLayerMixin) for m in model.modules())
    assert ops["MatMulIntegerToFloat"] == linears, ops  # the one Gemm left is attention's float out_proj
    agreement, _, _ = compare_onnx(model, path, list(x.split(128)))
    assert agreement >= 0.999
    _, _, max_rel = compare_onnx(model, path, list(x.split(128)), exact=True)
    assert max_rel < 1e-5


def test_fused_form_needs_folded_batchnorm_and_a_known_form(tmp_path, digits):
    train_x, _, test_x, _ = digits
    torch.manual_seed(0)
    model = quantized(SmallCNN(width=8), list(train_x[:128].split(64)), fold=False)
    with pytest.raises(ValueError, match=r"needs BatchNorm folded.*features\.1 after features\.0.*fold_batchnorm=True"):
        export_onnx(model, tmp_path / "cnn.onnx", test_x[:1], form="fused")
    with pytest.raises(ValueError, match="form must be one of 'qdq', 'fused'"):
        export_onnx(model, tmp_path / "cnn.onnx", test_x[:1], form="qlinear")
    path = export_onnx(model, tmp_path / "cnn.onnx", test_x[:1])  # the QDQ form takes BatchNorm as a float op
    assert export_form(path) == "qdq"
    with pytest.raises(ValueError, match="threads must be a whole number"):
        onnx_session(path, threads=0)


def test_plain_mlp_head_is_an_integer_matmul_not_a_float_gemm(tmp_path):
    """onnxruntime would fuse a 2-d MatMul and its bias into a float Gemm: the fused form computes it on a 3-d view."""
    ds = blobs(256)
    x, y = ds.tensors
    torch.manual_seed(0)
    model = quantized(train_on_tensors(MLP(), x, y, epochs=3), list(x.split(64)))
    path = export_onnx(model, tmp_path / "mlp.onnx", x[:2], form="fused")
    ops, _ = optimized_ops(path, tmp_path)
    assert not ops["Gemm"] and ops["MatMulIntegerToFloat"] >= 1, ops
    agreement, _, _ = compare_onnx(model, path, list(x.split(64)))
    assert agreement >= 0.999


def test_fused_gpt2_runs_its_conv1d_layers_as_integer_matmuls(tmp_path):
    """transformers' Conv1D (weight stored (inputs, outputs)) is a MatMul on codes too, not a float Gemm."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = transformers.GPT2LMHeadModel(config)

        def forward(self, ids):
            return self.lm(input_ids=ids).logits

    ids = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(0))
    model = quantized(Logits(), list(ids.split(8)), weight_bits=4, act_bits=8, fold=False)
    path = export_onnx(model, tmp_path / "gpt2.onnx", ids[:2], form="fused")
    ops, _ = optimized_ops(path, tmp_path)
    matrices = sum(type(m).__name__ in ("IntegerConv1D", "IntegerLinear") for m in model.modules())
    assert matrices == 2 * 4 + 1  # per block: c_attn, attention c_proj, c_fc, MLP c_proj; and lm_head
    assert ops["MatMulIntegerToFloat"] == matrices and not ops["Gemm"], ops
    agreement, _, _ = compare_onnx(model, path, [ids])
    assert agreement >= 0.999
