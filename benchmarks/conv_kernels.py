"""Why a convolution whose output stays float cannot run faster in integers in onnxruntime: its CPU kernels, timed alone.

    python -m benchmarks.conv_kernels                 # the benchmark ResNet's 3x3 convolutions, batch 64, one thread

An integer convolution can run in onnxruntime's fast integer kernel, ``QLinearConv``, only
when its output is requantized to 8 bits: when the next layer's input quantizer follows it.
In a ResNet, the second convolution of each block and the shortcut feed the residual add,
whose inputs the integer model keeps in float (exactly ``step * sum(codes) + bias``). Each
such convolution, run exactly on codes, has these choices, each a one-convolution ONNX
graph timed here on codes of the shapes the benchmark ResNet (Fashion-MNIST, widths 16, 32
and 64) gives its convolutions:

* ``Conv`` on the dequantized codes: onnxruntime's float kernel (what the fused export runs);
* ``ConvInteger`` with a ``Cast`` and the rescale: integer accumulation, float output, exact;
* ``im2col`` by slices with ``MatMulIntegerToFloat``: the same, through its integer matmul;
* ``QLinearConv``: the fast kernel, for comparison only: its 8-bit output rounds the sum,
  so it cannot compute a float output exactly.

Times: median of ``--rounds`` runs of each graph, the graphs in turn each round, with the
ratio to the float ``Conv`` of the same round. The two integer variants that keep a float output
are checked equal to the exact result (the integer sums, each rescaled once in float32); the
float ``Conv`` comes within float32 rounding of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.reporting import DOC_PATH, command_line, environment, markdown_table, write_section

SECTION = "conv-kernels"
#: (channels, image side) of the benchmark ResNet's 3x3 convolutions: one per stage.
SHAPES = ((16, 28), (32, 14), (64, 7))
VARIANTS = ("Conv (float)", "ConvInteger + Cast", "im2col + MatMulIntegerToFloat", "QLinearConv (8-bit output)")


def _model(nodes: list[Any], inputs: list[Any], initializers: list[Any]) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def graphs(channels: int, side: int, batch: int, weight_codes: np.ndarray, scale: np.ndarray) -> dict[str, tuple[Any, str]]:
    """Each variant's graph of one 3x3 convolution (padding 1) and the input it takes: ``float`` or ``codes``."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value), name)

    shape = (batch, channels, side, side)
    float_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    code_input = helper.make_tensor_value_info("x", TensorProto.UINT8, shape)
    pads = [1, 1, 1, 1]
    out = {}
    out[VARIANTS[0]] = (
        _model(
            [helper.make_node("Conv", ["x", "w"], ["conv"], pads=pads), helper.make_node("Mul", ["conv", "scale"], ["y"])],
            [float_input],
            [const("w", weight_codes.astype(np.float32)), const("scale", scale.reshape(1, -1, 1, 1))],
        ),
        "float",
    )
    out[VARIANTS[1]] = (
        _model(
            [
                helper.make_node("ConvInteger", ["x", "w"], ["sums"], pads=pads),
                helper.make_node("Cast", ["sums"], ["conv"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["conv", "scale"], ["y"]),
            ],
            [code_input],
            [const("w", weight_codes), const("scale", scale.reshape(1, -1, 1, 1))],
        ),
        "codes",
    )
    # im2col in NHWC: the nine shifted windows side by side, then one integer matmul whose
    # rescale (a_scale * b_scale) is the per-channel step, and back to NCHW.
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]), helper.make_node("Pad", ["nhwc", "pads"], ["padded"])]
    inits = [const("pads", np.array([0, 1, 1, 0, 0, 1, 1, 0], dtype=np.int64)), const("axes", np.array([1, 2], dtype=np.int64))]
    windows = []
    for dy in range(3):
        for dx in range(3):
            name = f"window{dy}{dx}"
            inits += [const(f"{name}_start", np.array([dy, dx], dtype=np.int64)), const(f"{name}_end", np.array([dy + side, dx + side], dtype=np.int64))]
            nodes.append(helper.make_node("Slice", ["padded", f"{name}_start", f"{name}_end", "axes"], [name]))
            windows.append(name)
    nodes += [
        helper.make_node("Concat", windows, ["columns"], axis=-1),
        helper.make_node("MatMulIntegerToFloat", ["columns", "b", "a_scale", "b_scale"], ["rows"], domain="com.microsoft"),
        helper.make_node("Transpose", ["rows"], ["y"], perm=[0, 3, 1, 2]),
    ]
    inits += [
        const("b", weight_codes.transpose(2, 3, 1, 0).reshape(9 * channels, -1)),
        const("a_scale", np.float32(1.0)),
        const("b_scale", scale.astype(np.float32)),
    ]
    out[VARIANTS[2]] = (_model(nodes, [code_input], inits), "codes")
    out[VARIANTS[3]] = (
        _model(
            [
                helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"], ["q"], pads=pads),
                helper.make_node("DequantizeLinear", ["q", "y_scale", "y_zero"], ["y"]),
            ],
            [code_input],
            [
                const("w", weight_codes),
                const("x_scale", np.float32(1.0)),
                const("x_zero", np.uint8(0)),
                const("w_scale", scale.astype(np.float32)),
                const("w_zero", np.zeros(len(scale), dtype=np.int8)),
                const("y_scale", np.float32(float(scale.max()) * 9 * channels * 255 * 8 / 127)),
                const("y_zero", np.uint8(0)),
            ],
        ),
        "codes",
    )
    return out


def measure(channels: int, side: int, args: argparse.Namespace) -> dict[str, list[float]]:
    import onnxruntime

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (args.batch_size, channels, side, side), dtype=np.uint8)
    weight_codes = rng.integers(-8, 8, (channels, channels, 3, 3), dtype=np.int8)  # 4-bit weights
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32) / 2**10
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions, feeds = {}, {}
    for name, (model, takes) in graphs(channels, side, args.batch_size, weight_codes, scale).items():
        sessions[name] = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds[name] = {"x": codes.astype(np.float32) if takes == "float" else codes}
    # The exact result: integer sums (float64 holds them exactly), each rescaled once in float32.
    sums = F.conv2d(torch.from_numpy(codes).double(), torch.from_numpy(weight_codes).double(), padding=1)
    exact = sums.float().numpy() * scale.reshape(1, -1, 1, 1)
    for name in VARIANTS[1:3]:
        if not np.array_equal(sessions[name].run(None, feeds[name])[0], exact):
            raise AssertionError(f"{name} differs from the exact integer convolution")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return times


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--shapes", nargs="+", default=[f"{c}x{s}" for c, s in SHAPES], help="CxS: C channels in and out, SxS images")
    parser.add_argument("--doc", type=Path, default=DOC_PATH)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--section", default=SECTION)
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes CxS pairs such as 16x28, got {args.shapes}")
    if args.rounds < 1 or args.threads < 1 or args.batch_size < 1 or any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        parser.error("--rounds, --threads, --batch-size and every --shapes value must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    import onnxruntime

    args = parse_args(argv)
    rows = []
    for channels, side in args.shapes:
        times = measure(channels, side, args)
        base = times[VARIANTS[0]]
        for name in VARIANTS:
            ratio = statistics.median(t / f for t, f in zip(times[name], base))
            rows.append([f"{channels} ch, {side}x{side}", name, f"{1e3 * statistics.median(times[name]):.2f}", f"{ratio:.2f}x"])
            print(f"{channels:3d} ch {side:3d}x{side:<3d} {name:32s} {1e3 * statistics.median(times[name]):7.2f} ms  {ratio:5.2f}x", flush=True)
    text = markdown_table(["convolution (3x3, batch %d)" % args.batch_size, "onnxruntime kernels", "ms", "time / Conv"], rows)
    print()
    print(text)
    if args.no_doc:
        return 0
    body = (
        f"Measured on {environment()}; onnxruntime {onnxruntime.__version__}, CPUExecutionProvider with {args.threads} "
        f"intra-op thread(s), median of {args.rounds} rounds, with:\n\n```\n{command_line('benchmarks.conv_kernels', argv)}\n```\n\n{text}"
    )
    write_section(args.section, body, args.doc)
    print(f"\nwrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
