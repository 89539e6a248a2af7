"""Exporting an integer model to a standard ONNX graph with QuantizeLinear/DequantizeLinear.

Each integer layer becomes, in the graph:

```text
input -> Clip(lo, alpha) -> QuantizeLinear(alpha / n, 0) -> DequantizeLinear -+
weight codes (int8 initializer) -> DequantizeLinear(weight scale, 0) -------+-> Conv / Gemm / MatMul (+ bias)
```

A weight with one range per output channel dequantizes per axis (a 1-D scale and ``axis``);
one with ranges per group of inputs dequantizes per block (a ``(C_out, K / g)`` scale,
``axis=1``, ``block_size=g``), which needs opset 21 and is chosen then by default.

The Clip bounds the input to the learned range ``[-alpha, alpha]`` (signed) or ``[0, alpha]``
(unsigned), so the codes QuantizeLinear produces stay within ``[-n, n]`` or ``[0, n]``, the
learned bit width, even though the ONNX type (int8/uint8, int16/uint16 above 8 bits) is wider.
An input with a zero point ``z`` quantizes with a uint8 (uint16) zero point ``z`` and the step
``alpha / (2**b - 1 - z)``, after a Clip to ``[-z * step, alpha]``: its codes stay in ``[0, 2**b - 1]``.
A layer whose input stays float (usually the first) keeps only the weight DequantizeLinear.

Export uses torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch
2.9; the TorchScript exporter is deprecated) with two small custom ops that the exporter
translates to QuantizeLinear/DequantizeLinear through onnxscript. onnx, onnxscript and
onnxruntime are optional: ``pip install lightning-nipq[onnx]``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nipq.convert.comparison import compare_outputs
from lightning_nipq.layers.forms import IntegerLayerMixin
from lightning_nipq.layers.model_walk import integer_layers, require_integer_model
from lightning_nipq.quant.granularity import is_group_size

#: The opset of models whose codes all fit 8 bits: the lowest the torch.export-based exporter
#: writes (its own translation opset, so no version conversion), run by onnxruntime >= 1.14.
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: The first opset with 16-bit QuantizeLinear/DequantizeLinear, chosen by default when some
#: codes take 9 to 16 bits; onnxruntime >= 1.18 runs it.
WIDE_CODES_OPSET = 21
EXTRA_HINT = "pip install lightning-nipq[onnx]"

ExampleInput = Union[Tensor, tuple[Tensor, ...]]
PathLike = Union[str, "os.PathLike[str]"]


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Range of the ONNX integer type that holds ``bits``-bit codes (int8/uint8 or int16/uint16)."""
    width = 8 if bits <= 8 else 16
    return (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2**width - 1)


_ops_registered = False


def _register_ops() -> None:
    """Define the two custom ops the export twins call, once (torch.library.custom_op: torch >= 2.4)."""
    global _ops_registered
    if _ops_registered:
        return

    @torch.library.custom_op("lightning_nipq::quantize_dequantize", mutates_args=())
    def quantize_dequantize(x: Tensor, scale: Tensor, bits: int, signed: bool, zero_point: int) -> Tensor:
        # QuantizeLinear then DequantizeLinear with this zero point, with ONNX's semantics.
        lo, hi = _code_range(bits, signed)
        return (torch.clamp(torch.round(x / scale) + zero_point, lo, hi) - zero_point) * scale

    @quantize_dequantize.register_fake
    def _(x: Tensor, scale: Tensor, bits: int, signed: bool, zero_point: int) -> Tensor:
        return torch.empty_like(x)

    @torch.library.custom_op("lightning_nipq::dequantize", mutates_args=())
    def dequantize(codes: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
        # DequantizeLinear with zero point 0: per tensor (a scalar scale), per axis (a 1-D
        # scale along ``axis``) or per block (``block_size`` elements of ``axis`` per scale).
        values = codes.to(torch.float32)
        if scale.dim() == 0:
            return values * scale
        if block_size:
            return values * scale.repeat_interleave(block_size, dim=axis)
        shape = [1] * codes.dim()
        shape[axis] = -1
        return values * scale.reshape(shape)

    @dequantize.register_fake
    def _(codes: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
        return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)

    _ops_registered = True


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages: {EXTRA_HINT}") from e
    exporter = inspect.signature(torch.onnx.export).parameters
    if "custom_translation_table" not in exporter or not hasattr(torch.export.Dim, "DYNAMIC"):
        raise RuntimeError(f"ONNX export needs torch's torch.export-based exporter (torch >= 2.6); this is torch {torch.__version__}")
    _register_ops()
    return onnx


def _translation_table(opset: int) -> dict[Callable[..., Any], Callable[..., Any]]:
    """onnxscript functions turning the two custom ops into QuantizeLinear/DequantizeLinear."""
    from onnxscript import ir
    from onnxscript.values import Opset

    op = Opset("", opset)

    def zero_point_constant(bits: int, signed: bool, value: int) -> Any:
        # The zero point's type is the codes' type: uint8 (uint16) for unsigned codes, whose zero point may be nonzero.
        narrow = bits <= 8
        dtype = {
            (True, True): ir.DataType.INT8,
            (True, False): ir.DataType.UINT8,
            (False, True): ir.DataType.INT16,
            (False, False): ir.DataType.UINT16,
        }[(narrow, signed)]
        return op.Constant(value=ir.tensor(value, dtype=dtype))

    def quantize_dequantize_onnx(x: Any, scale: Any, bits: int, signed: bool, zero_point: int) -> Any:
        zp = zero_point_constant(bits, signed, zero_point)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    def dequantize_onnx(codes: Any, scale: Any, axis: int, block_size: int) -> Any:
        if block_size:
            return op.DequantizeLinear(codes, scale, axis=axis, block_size=block_size)
        return op.DequantizeLinear(codes, scale, axis=axis)

    return {
        torch.ops.lightning_nipq.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.lightning_nipq.dequantize.default: dequantize_onnx,
    }


class _OnnxLayerMixin:
    """The integer layer's maths written as QDQ ops, for export only: put before an integer form's class."""

    # (clip low, clip high, input scale, zero point) as Python numbers, set by ``_export_mode``: reading
    # a buffer with float() inside the traced forward would be a data-dependent ``.item()``.
    _onnx_input_range: Optional[tuple[float, float, float, int]]
    weight_codes: Tensor
    weight_scale: Tensor
    bias: Optional[Tensor]
    input_bits: Optional[int]
    input_signed: bool

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if self._onnx_input_range is not None:
            low, high, scale, zero_point = self._onnx_input_range
            x = torch.clamp(x, low, high)
            x = torch.ops.lightning_nipq.quantize_dequantize(
                x, torch.tensor(scale, dtype=torch.float32), self.input_bits, self.input_signed, zero_point
            )
        scale, axis, block = _weight_steps(self)  # type: ignore[arg-type]
        weight = torch.ops.lightning_nipq.dequantize(self.weight_codes, scale, axis, block)
        # The layer kind's own float maths on the dequantized tensors (see lightning_nipq.layers.forms).
        return self.apply_weight(x, weight, self.bias)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _export_class(integer_class: type[nn.Module]) -> type[nn.Module]:
    """The export twin of an integer form: the same class with the QDQ forward, so it works for every layer kind."""
    return type(f"Onnx{integer_class.__name__}", (_OnnxLayerMixin, integer_class), {})


def _weight_steps(layer: IntegerLayerMixin) -> tuple[Tensor, int, int]:
    """``(scale, axis, block_size)`` of DequantizeLinear for the layer's weight codes (block_size 0: none)."""
    scale = layer.weight_scale
    if scale.dim() == 0:
        return scale, 0, 0
    if is_group_size(layer.weight_granularity):
        return scale.reshape(scale.shape[0], scale.shape[1]), 1, int(layer.weight_granularity)
    axis = next(i for i, size in enumerate(scale.shape) if size > 1) if scale.numel() > 1 else 0
    return scale.reshape(-1), axis, 0


def _input_range(layer: IntegerLayerMixin) -> Optional[tuple[float, float, float, int]]:
    if layer.input_bits is None:
        return None
    alpha = float(layer.input_alpha)
    # The same float32 division as IntegerLayerMixin.input_scale, so the scale matches bit for bit.
    scale = float(layer.input_scale())
    zero_point = layer.input_zero_point
    if zero_point:
        # The bottom of the range is code 0, that is -z steps (in float32, as the layer's clamp computes it).
        low = float(torch.tensor(-float(zero_point), dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32))
        return (low, alpha, scale, zero_point)
    return (-alpha if layer.input_signed else 0.0, alpha, scale, 0)


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Swap every integer layer to its QDQ twin (same object, same buffers) and eval, then restore."""
    swapped = [(layer, type(layer)) for _, layer in integer_layers(model)]
    was_training = model.training
    try:
        for layer, cls in swapped:
            layer._onnx_input_range = _input_range(layer)
            layer.__class__ = _export_class(cls)
        model.eval()
        yield
    finally:
        for layer, cls in swapped:
            layer.__class__ = cls
            layer.__dict__.pop("_onnx_input_range", None)
        model.train(was_training)


def _check_exportable(model: nn.Module, opset: Optional[int]) -> int:
    """The opset to use, after checking that ``model`` is an integer model that it can hold."""
    require_integer_model(model, "exporting")
    layers = list(integer_layers(model))
    too_wide = [name for name, layer in layers if (layer.input_bits or 0) > 16]
    if too_wide:
        raise ValueError(f"inputs of {too_wide[:5]} take more than 16 bits, beyond ONNX's QuantizeLinear types")
    wide = [name for name, layer in layers if (layer.input_bits or 0) > 8 or 8 < layer.weight_bits <= 16]
    blocked = [name for name, layer in layers if is_group_size(layer.weight_granularity)]
    if opset is None:
        return WIDE_CODES_OPSET if wide or blocked else DEFAULT_OPSET
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be at least {MIN_OPSET} (torch's exporter), got {opset}")
    if wide and opset < WIDE_CODES_OPSET:
        raise ValueError(f"{wide[:5]} use codes wider than 8 bits, which need opset >= {WIDE_CODES_OPSET}; got opset={opset}")
    if blocked and opset < WIDE_CODES_OPSET:
        raise ValueError(
            f"{blocked[:5]} have weight ranges per group, whose blockwise DequantizeLinear needs opset >= "
            f"{WIDE_CODES_OPSET}; got opset={opset}. Leave opset unset to get {WIDE_CODES_OPSET}"
        )
    return opset


def export_onnx(
    model: nn.Module,
    path: PathLike,
    example_input: ExampleInput,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write the integer ``model`` (after `lightning_nipq.hard_quantize`) as an ONNX QDQ graph.

    Args:
        model: an integer model; it is left unchanged (its layers are swapped to their
            export twins only while exporting).
        path: the ``.onnx`` file to write.
        example_input: a tensor, or a tuple of tensors passed as positional arguments.
        opset: ONNX opset, at least 18. By default 18 (`DEFAULT_OPSET`), or 21
            (`WIDE_CODES_OPSET`) when some codes take more than 8 bits, which 18 cannot hold.
        dynamic_batch: make dimension 0 of every input symbolic, so any batch size runs.

    Returns:
        ``path``, after ``onnx.checker`` has checked the written model.

    Raises:
        ImportError: onnx or onnxscript is not installed (``pip install lightning-nipq[onnx]``).
        ValueError: the model is not an integer model, or the opset cannot hold its codes.
    """
    onnx = _require_onnx()
    opset = _check_exportable(model, None if opset is None else int(opset))
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in args) if dynamic_batch else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(model):
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=["output"],
            dynamic_shapes=dynamic,
            custom_translation_table=_translation_table(opset),
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


#: onnxruntime rewrites a DequantizeLinear -> MatMul pair whose other input is float (a layer
#: whose input stays float, on 3-d or larger input) into MatMulNBits, which by default
#: (accuracy level 4) quantizes that float input to int8 and so changes the results; level 1
#: computes it in float32, as the graph says. It also fuses DequantizeLinear -> Conv/Gemm ->
#: QuantizeLinear (a layer whose output goes straight into the next layer's quantizer, as
#: after a folded BatchNorm) into QLinearConv/QGemm, whose integer requantization and int32
#: bias round otherwise than the graph, so that codes on a rounding boundary flip;
#: ``session.disable_quant_qdq`` keeps the graph's own float ops.
ORT_EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1", "session.disable_quant_qdq": "1"}


def onnx_session(path: PathLike) -> Any:
    """An onnxruntime CPU session for an exported model, set to compute what the graph says.

    See `ORT_EXACT_CONFIG`; pass the same entries to your own ``SessionOptions``.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"running ONNX models needs onnxruntime: {EXTRA_HINT}") from e
    options = onnxruntime.SessionOptions()
    for key, value in ORT_EXACT_CONFIG.items():
        options.add_session_config_entry(key, value)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, inputs: ExampleInput) -> Tensor:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    feeds = {spec.name: t.detach().cpu().numpy() for spec, t in zip(session.get_inputs(), args)}
    return torch.from_numpy(session.run(None, feeds)[0])


def onnx_outputs(path: PathLike, inputs: ExampleInput) -> Tensor:
    """Run an exported model with onnxruntime on CPU; returns its first output as a tensor."""
    return _run(onnx_session(path), inputs)


def compare_onnx(model: nn.Module, path: PathLike, batches: Iterable[ExampleInput]) -> tuple[Optional[float], float, float]:
    """``(argmax agreement, max |diff|, max |diff| / max |output|)`` of onnxruntime against ``model``.

    The agreement is None when the outputs are not class scores (last dimension 1). A NaN or
    Inf on either side counts as a disagreement and an infinite difference.

    Raises:
        ValueError: ``batches`` is empty.
    """
    session = onnx_session(path)
    reference, candidate = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                args = batch if isinstance(batch, tuple) else (batch,)
                reference.append(model(*args).float())
                candidate.append(_run(session, batch).float())
    finally:
        model.train(was_training)
    if not reference:
        raise ValueError("compare_onnx got no batches: give at least one input batch to compare on")
    return compare_outputs(reference, candidate)
