"""Exporting integer models to ONNX QDQ graphs, run with onnxruntime; and the digits artifact figures."""

import sys

import onnx
import pytest
import torch
from models import MLP, GroupedConvNet, TinyTransformer, blobs, image_blobs
from onnx import numpy_helper
from torch import nn

from lightning_nipq import NIPQConfig, attach_quantizers, export_onnx, hard_quantize, load_quantized, save_quantized
from lightning_nipq.demo.data import load_digits_split
from lightning_nipq.demo.models import SmallCNN
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations, quantizers
from lightning_nipq.saving import artifact_sizes, compare_onnx
from lightning_nipq.saving.onnx_export import onnx_outputs

# Codes are computed from integer arithmetic on both sides, so only float accumulation order
# differs: outputs agree to float32 rounding, far below one quantization step.
MAX_REL_DIFF = 1e-5


def integer_model(make, x, bits=None, low=2, high=8, seed=0, config=None):
    """``make()`` attached, calibrated on ``x``, bits frozen (``bits`` or random in [low, high]), converted."""
    torch.manual_seed(seed)
    model = make()
    attach_quantizers(model, config)
    calibrate_activations(model, list(x.split(16))[:4], forward=lambda b: model(b))
    g = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits(bits or int(torch.randint(max(low, q.lowest_bits), high + 1, (1,), generator=g)))
    hard_quantize(model)
    return model.eval()


def graph_facts(path):
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return graph, producers, inits


def assert_qdq_graph(path, model):
    """Weights are integer initializers; every QuantizeLinear takes a Clip to the learned range."""
    graph, producers, inits = graph_facts(path)
    ops = [n.op_type for n in graph.node]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IntegerLayerMixin)]
    quantized = [(n, m) for n, m in layers if m.input_bits is not None]
    # A self-attention's query, key and value projections quantize one tensor: the export
    # merges their QuantizeLinear nodes where their ranges and bits are equal.
    distinct = {}
    for name, m in quantized:
        parent, _, child = name.rpartition(".")
        same_input = child in ("q_proj", "k_proj", "v_proj")
        key = (parent, float(m.input_alpha), m.input_bits, m.input_signed) if same_input else name
        distinct.setdefault(key, m)
    quantized_inputs = list(distinct.values())
    assert ops.count("QuantizeLinear") == len(quantized_inputs)
    assert ops.count("DequantizeLinear") == len(layers) + len(quantized_inputs)
    packed = opset_of(path) >= 21
    for name, layer in layers:
        codes = inits[f"{name}.weight_codes"]
        # Codes that fit 4 bits (every layer of at most 4 bits) are INT4 from opset 21 on.
        fits = int(layer.weight_codes.abs().max()) <= 7
        assert codes.dtype.name == ("int4" if packed and fits else "int8"), (name, layer.weight_bits)
        assert (codes.astype("int8") == layer.weight_codes.numpy()).all()
    alphas = sorted(float(m.input_alpha) for m in quantized_inputs)
    clip_highs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        clip = producers[node.input[0]]
        assert clip.op_type == "Clip"
        low, high = float(inits[clip.input[1]]), float(inits[clip.input[2]])
        scale, zero = float(inits[node.input[1]]), inits[node.input[2]]
        assert zero == 0 and (low == -high or low == 0.0)
        n = round(high / scale)  # the learned number of levels: codes stay in [-n, n] or [0, n]
        assert n in (2 ** (b - 1) - 1 for b in range(2, 9)) or n in (2**b - 1 for b in range(2, 9))
        assert zero.dtype.name == ("int8" if low < 0 else "uint8")
        clip_highs.append(high)
    assert sorted(clip_highs) == alphas


def opset_of(path):
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize(
    "make,data,opset",
    [
        (MLP, lambda: blobs(256).tensors[0], 21),
        (GroupedConvNet, lambda: image_blobs(128).tensors[0], None),  # BatchNorm, grouped, depthwise, 1-d, 3-d
        (TinyTransformer, lambda: blobs(256).tensors[0], None),
    ],
    ids=["MLP", "GroupedConvNet", "TinyTransformer"],
)
def test_onnxruntime_agrees_with_the_integer_model(tmp_path, make, data, opset):
    x = data()
    model = integer_model(make, x)
    classes = {type(m) for m in model.modules()}
    path = export_onnx(model, tmp_path / "model.onnx", x[:2], opset=opset)
    four_bit = any(m.weight_bits <= 4 for m in model.modules() if isinstance(m, IntegerLayerMixin))
    assert opset_of(path) == (opset or (21 if four_bit else 18))  # 21 packs 4-bit weights
    assert {type(m) for m in model.modules()} == classes  # the export twins are swapped back
    assert_qdq_graph(path, model)
    agreement, max_abs, max_rel = compare_onnx(model, path, list(x.split(64)))  # other batch sizes than exported
    assert agreement == 1.0
    assert max_rel < MAX_REL_DIFF, (max_abs, max_rel)
    if make is MLP:
        with pytest.raises(ValueError, match="got no batches"):  # no comparison is no perfect score
            compare_onnx(model, path, [])
        poisoned = x[:64].clone()
        poisoned[5] = float("nan")  # the same NaN on both sides still fails
        agreement, max_abs, _ = compare_onnx(model, path, [poisoned])
        assert agreement < 1.0 and max_abs == float("inf")


def test_codes_wider_than_8_bits_need_opset_21(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    config = NIPQConfig(weight_bits=12, act_bits=10)
    model = integer_model(lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), x, config=config)
    with pytest.raises(ValueError, match="opset >= 21"):
        export_onnx(model, tmp_path / "old.onnx", x[:2], opset=18)
    path = export_onnx(model, tmp_path / "wide.onnx", x[:2])
    assert opset_of(path) == 21
    _, _, inits = graph_facts(path)
    assert inits["2.weight_codes"].dtype.name == "int16"
    assert "uint16" in {inits[n.input[2]].dtype.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}
    with torch.no_grad():
        reference = model(x)
    assert (onnx_outputs(path, x) - reference).abs().max() <= MAX_REL_DIFF * reference.abs().max()


def test_refuses_float_models_and_names_the_extra(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="hard_quantize"):
        export_onnx(MLP(), tmp_path / "float.onnx", torch.randn(2, 16))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    with pytest.raises(ImportError, match=r"lightning-nipq\[onnx\]"):
        export_onnx(MLP(), tmp_path / "float.onnx", torch.randn(2, 16))


def test_digits_cnn_artifact_size_and_onnx_agreement(tmp_path):
    """The demo's CNN at 3 bits on real data: artifact size, reload and onnxruntime on the whole test split.

    Width 32 is the demo's: at width 8 the payload is about 2 KiB and the safetensors header
    with the manifest (about 3 KiB) alone exceeds 1.15x of it.
    """
    train_x, _, test_x, _ = load_digits_split()
    mean, std = train_x.mean(), train_x.std()
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    make = lambda: SmallCNN(width=32)  # noqa: E731
    model = integer_model(make, train_x[:256], bits=3)
    assert {m.weight_bits for m in model.modules() if isinstance(m, IntegerLayerMixin)} == {3}

    path = save_quantized(model, tmp_path / "digits.safetensors")
    sizes = artifact_sizes(path)
    print(f"\ndigits SmallCNN(width=32), 3 bits: {sizes.summary()}")
    assert sizes.ratio_to_ideal <= 1.15
    assert sizes.float32_ratio > 8.0
    loaded = load_quantized(path, make())
    with torch.no_grad():
        assert torch.equal(loaded(test_x), model(test_x))

    onnx_path = export_onnx(model, tmp_path / "digits.onnx", test_x[:1])
    agreement, max_abs, max_rel = compare_onnx(model, onnx_path, [test_x])
    print(f"onnxruntime vs integer model on {len(test_x)} test images: agreement {agreement:.4%}, max |diff| {max_abs:.3g} (relative {max_rel:.3g})")
    assert agreement >= 0.999
    assert max_rel < MAX_REL_DIFF
