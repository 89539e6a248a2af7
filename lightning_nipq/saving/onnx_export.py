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

Weight codes that fit 4 bits (those of every layer of at most 4 bits) are stored as INT4
initializers, two codes a byte, from opset 21 on, which is then the default; opset 18 stores
every code as int8. Weight codes are signed and symmetric, so UINT4 is never needed.

Two forms (``form``). ``"qdq"`` (the default) is the graph above: standard QDQ that any
runtime reads, and that onnxruntime computes exactly with `ORT_EXACT_CONFIG`, in float
kernels. ``"fused"`` is laid out for onnxruntime's CPU optimizer to turn into integer kernels:
the input's clamp is an integer Clip after QuantizeLinear (the same codes, see
`_input_code_bounds`), so a convolution whose output goes (through a ReLU) straight into the
next layer's quantizer becomes a ``QLinearConv``; linear layers are ``MatMul`` on transposed
codes, which becomes ``MatMulIntegerToFloat``; signed 8-bit input codes are uint8 with zero
point 128 (onnxruntime's x86 fusions take unsigned activations); packed codes reach their
DequantizeLinear through a Cast to int8, which onnxruntime folds at load, since its fusions
take 8-bit weights only; and the weights of layers that stay float are ``Cast(codes) * step``,
which onnxruntime folds into a float constant (see `_lay_out_for_fusion`). It runs with the
session's default optimizations (`onnx_session` reads the form from the file's metadata), and
agrees with the integer model up to the int32 bias and requantization rounding of those
kernels; with `ORT_EXACT_CONFIG` it computes exactly, as the QDQ form does.

Export uses torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch
2.9; the TorchScript exporter is deprecated) with small custom ops that the exporter
translates to QuantizeLinear/DequantizeLinear (and Clip) through onnxscript; the INT4 packing
and the fused layout are rewrites of the exported graph. onnx, onnxscript and onnxruntime are
optional: ``pip install lightning-nipq[onnx]``.
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

from lightning_nipq.convert.batchnorm_folding import find_foldable_batchnorms
from lightning_nipq.convert.comparison import compare_outputs
from lightning_nipq.layers.forms import IntegerLayerMixin
from lightning_nipq.layers.layer_kinds import kind_of
from lightning_nipq.layers.model_walk import integer_layers, require_integer_model
from lightning_nipq.layers.tensor_lifting import traceable_lifted_tensors
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.quant.granularity import is_group_size

#: The opset of models whose codes all take 5 to 8 bits: the lowest the torch.export-based
#: exporter writes (its own translation opset, so no version conversion), run by onnxruntime >= 1.14.
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: The first opset with 16-bit QuantizeLinear/DequantizeLinear, chosen by default when some
#: codes take 9 to 16 bits; onnxruntime >= 1.18 runs it.
WIDE_CODES_OPSET = 21
#: The first opset with INT4 tensors (weights of at most 4 bits, packed two a byte), chosen by
#: default when some layer has such weights; onnxruntime >= 1.20 runs it.
PACKED_CODES_OPSET = 21
#: The largest number of bits whose weight codes are stored as INT4 (signed, in [-7, 7]).
PACKED_CODE_BITS = 4
#: ``export_onnx(form=...)``: the portable, exact QDQ graph, or the layout onnxruntime fuses into integer kernels.
EXPORT_FORMS = ("qdq", "fused")
#: The model metadata key that records the form, read by `onnx_session`.
FORM_METADATA_KEY = "lightning_nipq.export_form"
EXTRA_HINT = "pip install lightning-nipq[onnx]"

ExampleInput = Union[Tensor, tuple[Tensor, ...]]
PathLike = Union[str, "os.PathLike[str]"]


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Range of the ONNX integer type that holds ``bits``-bit codes (int8/uint8 or int16/uint16)."""
    width = 8 if bits <= 8 else 16
    return (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2**width - 1)


_ops_registered = False


def _register_ops() -> None:
    """Define the custom ops the export twins call, once (torch.library.custom_op: torch >= 2.4)."""
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

    @torch.library.custom_op("lightning_nipq::quantize_clip_dequantize", mutates_args=())
    def quantize_clip_dequantize(
        x: Tensor, scale: Tensor, bits: int, signed: bool, zero_point: int, code_low: int, code_high: int
    ) -> Tensor:
        # QuantizeLinear, a Clip of the codes to [code_low, code_high], then DequantizeLinear.
        lo, hi = _code_range(bits, signed)
        codes = torch.clamp(torch.round(x / scale) + zero_point, lo, hi)
        return (torch.clamp(codes, code_low, code_high) - zero_point) * scale

    @quantize_clip_dequantize.register_fake
    def _(x: Tensor, scale: Tensor, bits: int, signed: bool, zero_point: int, code_low: int, code_high: int) -> Tensor:
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
    """onnxscript functions turning the custom ops into QuantizeLinear/DequantizeLinear (and Clip)."""
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

    def quantize_clip_dequantize_onnx(
        x: Any, scale: Any, bits: int, signed: bool, zero_point: int, code_low: int, code_high: int
    ) -> Any:
        zp = zero_point_constant(bits, signed, zero_point)
        codes = op.QuantizeLinear(x, scale, zp)
        if (code_low, code_high) != _code_range(bits, signed):
            # Clamping the codes is cheaper than the float Clip (a quarter of the bytes) and,
            # unlike it, leaves QuantizeLinear next to the layer that produces its input.
            codes = op.Clip(codes, zero_point_constant(bits, signed, code_low), zero_point_constant(bits, signed, code_high))
        return op.DequantizeLinear(codes, scale, zp)

    def dequantize_onnx(codes: Any, scale: Any, axis: int, block_size: int) -> Any:
        if block_size:
            return op.DequantizeLinear(codes, scale, axis=axis, block_size=block_size)
        return op.DequantizeLinear(codes, scale, axis=axis)

    return {
        torch.ops.lightning_nipq.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.lightning_nipq.quantize_clip_dequantize.default: quantize_clip_dequantize_onnx,
        torch.ops.lightning_nipq.dequantize.default: dequantize_onnx,
    }


class _OnnxLayerMixin:
    """The integer layer's maths written as QDQ ops, for export only: put before an integer form's class."""

    # (clip low, clip high, input scale, zero point) as Python numbers, set by ``_export_mode``: reading
    # a buffer with float() inside the traced forward would be a data-dependent ``.item()``.
    _onnx_input_range: Optional[tuple[float, float, float, int]]
    #: One of `EXPORT_FORMS`, set by ``_export_mode``.
    _onnx_form: str
    #: Whether the fused form writes the layer as a MatMul (its kind's `LayerKind.matmul`), set by ``_export_mode``.
    _onnx_matmul: bool
    #: The codes as ``(inputs, outputs)`` for that MatMul where the layer stores them ``(outputs, inputs)``, else None.
    _onnx_codes_t: Optional[Tensor]
    weight_codes: Tensor
    weight_scale: Tensor
    bias: Optional[Tensor]
    input_bits: Optional[int]
    input_signed: bool

    def forward(self, input: Optional[Tensor] = None, *args: Any, **kwargs: Any) -> Tensor:
        # Further arguments (a transposed convolution's ``output_size``) go to the layer's maths unchanged.
        if input is None:
            # A learned tensor (no input): its codes dequantized, stored as integers in the file.
            scale, axis, block = _weight_steps(self)  # type: ignore[arg-type]
            return torch.ops.lightning_nipq.dequantize(self.weight_codes, scale, axis, block)
        x = input
        fused = self._onnx_form == "fused"
        matmul = fused and self._onnx_matmul and not args and not kwargs
        # onnxruntime fuses a 2-d MatMul and its bias Add into a float Gemm before its QDQ
        # fusions run, which keeps the layer in float; on 3-d it leaves them to MatMulIntegerToFloat.
        flat = matmul and x.dim() == 2
        if flat:
            x = x.unsqueeze(0)
        if self._onnx_input_range is not None:
            low, high, scale, zero_point = self._onnx_input_range
            step = torch.tensor(scale, dtype=torch.float32)
            if fused:
                code_low, code_high = _input_code_bounds(self)  # type: ignore[arg-type]
                signed = self.input_signed
                if signed and self.input_bits <= 8:  # type: ignore[operator]
                    # The same codes as uint8 with zero point 128: onnxruntime's x86 fusions take
                    # unsigned activations only (int8 ones need session.qdqisint8allowed).
                    signed, zero_point, code_low, code_high = False, 128, code_low + 128, code_high + 128
                x = torch.ops.lightning_nipq.quantize_clip_dequantize(
                    x, step, self.input_bits, signed, zero_point, code_low, code_high
                )
            else:
                x = torch.clamp(x, low, high)
                x = torch.ops.lightning_nipq.quantize_dequantize(x, step, self.input_bits, self.input_signed, zero_point)
        if matmul:
            # A MatMul on codes stored (inputs, outputs), plus the bias: onnxruntime turns
            # DequantizeLinear -> MatMul into MatMulIntegerToFloat, but keeps Gemm (a float bias) in float.
            transposed = self._onnx_codes_t is not None
            scale, axis, block = _weight_steps(self, transposed=transposed)  # type: ignore[arg-type]
            codes = self._onnx_codes_t if transposed else self.weight_codes
            weight = torch.ops.lightning_nipq.dequantize(codes, scale, axis, block)
            output = torch.matmul(x, weight)
            output = output if self.bias is None else output + self.bias
            return output.squeeze(0) if flat else output
        scale, axis, block = _weight_steps(self)  # type: ignore[arg-type]
        weight = torch.ops.lightning_nipq.dequantize(self.weight_codes, scale, axis, block)
        # The layer kind's own float maths on the dequantized tensors (see lightning_nipq.layers.forms).
        return self.apply_weight(x, weight, self.bias, *args, **kwargs)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _export_class(integer_class: type[nn.Module]) -> type[nn.Module]:
    """The export twin of an integer form: the same class with the QDQ forward, so it works for every layer kind."""
    return type(f"Onnx{integer_class.__name__}", (_OnnxLayerMixin, integer_class), {})


def _weight_steps(layer: IntegerLayerMixin, transposed: bool = False) -> tuple[Tensor, int, int]:
    """``(scale, axis, block_size)`` of DequantizeLinear for the layer's weight codes (block_size 0: none).

    ``transposed``: for a linear layer's codes stored ``(inputs, outputs)`` (the fused form's MatMul).
    """
    scale = layer.weight_scale
    if scale.dim() == 0:
        return scale, 0, 0
    if is_group_size(layer.weight_granularity):
        blocks = scale.reshape(scale.shape[0], scale.shape[1])
        if transposed:
            return blocks.t().contiguous(), 0, int(layer.weight_granularity)
        return blocks, 1, int(layer.weight_granularity)
    axis = next(i for i, size in enumerate(scale.shape) if size > 1) if scale.numel() > 1 else 0
    return scale.reshape(-1), (1 - axis if transposed else axis), 0


def _input_code_bounds(layer: IntegerLayerMixin) -> tuple[int, int]:
    """The codes QuantizeLinear may give the layer's input: ``[-n, n]`` signed, ``[0, N]`` unsigned (``N = 2**b - 1``).

    Clipping the codes to these bounds gives the codes of clipping the input to the learned
    range first: QuantizeLinear's rounding is monotonic and rounds the range's ends (``alpha``,
    ``-z * step``) to the end codes, so every input beyond an end gets at least as far a code.
    """
    assert layer.input_bits is not None
    if layer.input_signed:
        top = num_levels(layer.input_bits, True)
        return -top, top
    return 0, num_levels(layer.input_bits, False)


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
def _export_mode(model: nn.Module, form: str = "qdq") -> Iterator[None]:
    """Swap every integer layer to its QDQ twin (same object, same buffers) and eval, then restore.

    In the fused form a layer written as a MatMul (`LayerKind.matmul`) whose codes are stored
    ``(outputs, inputs)`` also gets them transposed, for the export only.
    """
    swapped = [(layer, type(layer)) for _, layer in integer_layers(model)]
    was_training = model.training
    try:
        for layer, cls in swapped:
            kind = kind_of(layer)
            layer._onnx_input_range = _input_range(layer)
            layer._onnx_form = form
            layer._onnx_matmul = form == "fused" and kind is not None and kind.matmul
            # A buffer for the export only: the exporter writes it as an initializer rather than a
            # Transpose that onnxruntime would have to fold.
            stored_transposed = layer._onnx_matmul and kind is not None and kind.output_axis == 0
            layer.register_buffer("_onnx_codes_t", layer.weight_codes.t().contiguous() if stored_transposed else None, persistent=False)
            layer.__class__ = _export_class(cls)
        model.eval()
        yield
    finally:
        for layer, cls in swapped:
            layer.__class__ = cls
            for attribute in ("_onnx_input_range", "_onnx_form", "_onnx_matmul"):
                layer.__dict__.pop(attribute, None)
            layer._buffers.pop("_onnx_codes_t", None)
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
    packable = [name for name, layer in layers if layer.weight_bits <= PACKED_CODE_BITS]
    if opset is None:
        # Opset 21 packs 4-bit weights; an explicit opset 18 keeps them as int8 for older runtimes.
        return max(WIDE_CODES_OPSET, PACKED_CODES_OPSET) if wide or blocked or packable else DEFAULT_OPSET
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


def _check_form(form: Any) -> str:
    if form not in EXPORT_FORMS:
        raise ValueError(
            f"form must be one of {', '.join(map(repr, EXPORT_FORMS))}, got {form!r}: 'qdq' for any runtime "
            "(exact in onnxruntime with onnx_session), 'fused' for onnxruntime's integer CPU kernels"
        )
    return str(form)


def _check_folded(model: nn.Module, args: tuple[Tensor, ...]) -> None:
    """Raise if a BatchNorm directly follows an integer layer: it keeps the fused form's layer in float.

    onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into an integer convolution only
    when nothing stands between the convolution and the next quantizer; a BatchNorm does.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return  # nothing to fold, and no need to run the model to see it
    plan = find_foldable_batchnorms(model, args, input_fn=lambda batch: batch)
    if plan.pairs:
        shown = ", ".join(f"{bn} after {layer}" for bn, layer in plan.pairs[:5])
        raise ValueError(
            f"form='fused' needs BatchNorm folded into the integer layers, but {len(plan.pairs)} are not ({shown}): "
            "convert with hard_quantize(..., fold_batchnorm=True) or HardQuantize(fold_batchnorm=True), or call "
            "lightning_nipq.convert.fold_batchnorms(model, batch) first; or export with form='qdq'"
        )


def _pack_weight_codes(graph: Any) -> int:
    """Store every int8 weight initializer whose codes lie in ``[-7, 7]`` as INT4; returns how many.

    That includes every weight of at most 4 bits. Only initializers that feed DequantizeLinear
    alone are packed, and their values are unchanged, so the graph computes the same.
    """
    import ml_dtypes
    from onnxscript import ir

    top = num_levels(PACKED_CODE_BITS, True)
    packed = 0
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if value.dtype != ir.DataType.INT8 or tensor is None:
            continue
        uses = list(value.uses())
        if not uses or any(use.node.op_type != "DequantizeLinear" or use.idx != 0 for use in uses):
            continue
        codes = tensor.numpy()
        if codes.size == 0 or int(codes.min()) < -top or int(codes.max()) > top:
            continue
        value.const_value = ir.Tensor(codes.astype(ml_dtypes.int4), dtype=ir.DataType.INT4, name=value.name)
        value.dtype = ir.DataType.INT4
        packed += 1
    return packed


#: Ops onnxruntime moves a QuantizeLinear back across (its QDQ propagation), so that a
#: convolution followed by them and then a quantizer still fuses into QLinearConv.
_QUANTIZER_TRANSPARENT_OPS = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _sole_consumer(value: Any) -> Optional[Any]:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _is_type_minimum(value: Any) -> bool:
    # A zero point at its type's lowest code: QuantizeLinear itself then does what a ReLU before it does.
    tensor = None if value is None else value.const_value
    if tensor is None:
        producer = None if value is None else value.producer()
        attribute = None if producer is None or producer.op_type != "Constant" else producer.attributes.get("value")
        tensor = None if attribute is None else attribute.as_tensor()
    if tensor is None:
        return False
    array = tensor.numpy()
    return array.size == 1 and array.dtype.kind == "u" and int(array.reshape(-1)[0]) == 0


def _reaches_quantizer(value: Any) -> bool:
    """Whether ``value`` goes, through a ReLU onnxruntime can drop and ops it moves quantizers across, into one QuantizeLinear."""
    node = _sole_consumer(value)
    if node is not None and node.op_type == "Relu":
        after = _sole_consumer(node.outputs[0])
        # onnxruntime drops the ReLU only where QuantizeLinear's zero point is the lowest code.
        while after is not None and after.op_type in _QUANTIZER_TRANSPARENT_OPS:
            after = _sole_consumer(after.outputs[0])
        return after is not None and after.op_type == "QuantizeLinear" and len(after.inputs) > 2 and _is_type_minimum(after.inputs[2])
    while node is not None and node.op_type in _QUANTIZER_TRANSPARENT_OPS:
        node = _sole_consumer(node.outputs[0])
    return node is not None and node.op_type == "QuantizeLinear"


def _fuses_to_integer_kernel(dequantize: Any) -> bool:
    """Whether onnxruntime's CPU optimizer turns the layer that this weight DequantizeLinear feeds into an integer kernel.

    A MatMul whose other input is dequantized codes becomes MatMulIntegerToFloat; a Conv whose
    input is dequantized codes becomes QLinearConv when its output reaches the next quantizer
    (`_reaches_quantizer`). Nothing else does: onnxruntime has no integer convolution with a
    float output (its ConvInteger runs slower than the float Conv), and a Gemm with a float bias stays float.
    """
    layer = _sole_consumer(dequantize.outputs[0])
    if layer is None or layer.op_type not in ("MatMul", "Conv") or len(layer.inputs) < 2:
        return False
    if layer.inputs[1] is not dequantize.outputs[0]:
        return False
    source = layer.inputs[0].producer() if layer.inputs[0] is not None else None
    if source is None or source.op_type != "DequantizeLinear":
        return False
    return layer.op_type == "MatMul" or _reaches_quantizer(layer.outputs[0])


def _lay_out_for_fusion(graph: Any) -> tuple[int, int]:
    """Rewrite the weight DequantizeLinear nodes for onnxruntime's optimizer; returns ``(integer, float)`` layer counts.

    A weight whose layer fuses into an integer kernel (`_fuses_to_integer_kernel`) keeps its
    DequantizeLinear, through a Cast to int8 where its codes are packed: onnxruntime folds the
    Cast at load, and its fusions take 8-bit weights only. Any other weight becomes ``Cast(codes,
    float) * step``, which computes the same values but, unlike DequantizeLinear, onnxruntime
    folds into a float initializer at load: its float kernels then run on a constant weight
    (pre-packed, and in its blocked NCHWc layout) instead of dequantizing it at every run. A
    blockwise weight keeps its INT4 DequantizeLinear, which onnxruntime turns into MatMulNBits.
    """
    import numpy as np
    from onnxscript import ir

    integer = floating = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None or not node.inputs[0].is_initializer():
            continue
        codes, scale = node.inputs[0], node.inputs[1]
        block = node.attributes.get("block_size")
        if block is not None and block.as_int():
            continue
        if _fuses_to_integer_kernel(node):
            integer += 1
            if codes.dtype == ir.DataType.INT4:
                cast = ir.node("Cast", [codes], attributes={"to": ir.DataType.INT8}, name=f"{codes.name}_to_int8")
                graph.insert_before(node, cast)
                node.replace_input_with(0, cast.outputs[0])
            continue
        steps = None if scale is None or scale.const_value is None else scale.const_value.numpy()
        rank = len(codes.shape) if codes.shape is not None else None
        if steps is None or rank is None or len(node.inputs) > 2 and node.inputs[2] is not None:
            continue  # not a plain weight DequantizeLinear of this exporter's: left as it is
        if steps.ndim == 1 and steps.size > 1:
            attribute = node.attributes.get("axis")
            axis = (attribute.as_int() if attribute is not None else 1) % rank
            shape = [1] * rank
            shape[axis] = steps.size
            steps = steps.reshape(shape)
        step = ir.Value(name=f"{codes.name}_step", const_value=ir.Tensor(np.ascontiguousarray(steps, dtype=np.float32), name=f"{codes.name}_step"))
        graph.register_initializer(step)
        to_float = ir.node("Cast", [codes], attributes={"to": ir.DataType.FLOAT}, name=f"{codes.name}_to_float")
        times = ir.node("Mul", [to_float.outputs[0], step], name=f"{codes.name}_times_step")
        graph.insert_before(node, [to_float, times])
        node.outputs[0].replace_all_uses_with(times.outputs[0])
        graph.remove(node, safe=True)
        if scale.is_initializer() and not list(scale.uses()):
            graph.initializers.pop(scale.name)  # the 1-d steps the reshaped ones replace
        floating += 1
    return integer, floating


def _strip_debug_metadata(model: Any) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces with local paths, FX nodes): a deployed file needs none."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()):
        value.metadata_props.clear()


def export_onnx(
    model: nn.Module,
    path: PathLike,
    example_input: ExampleInput,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    form: str = "qdq",
) -> Path:
    """Write the integer ``model`` (after `lightning_nipq.hard_quantize`) as an ONNX QDQ graph.

    Args:
        model: an integer model; it is left unchanged (its layers are swapped to their
            export twins only while exporting).
        path: the ``.onnx`` file to write.
        example_input: a tensor, or a tuple of tensors passed as positional arguments.
        opset: ONNX opset, at least 18. By default 18 (`DEFAULT_OPSET`), or 21 when some
            weights take at most 4 bits (`PACKED_CODES_OPSET`: they are stored as INT4) or
            some codes take more than 8 bits (`WIDE_CODES_OPSET`), which 18 cannot hold.
            Opset 18 stores 4-bit weights as int8.
        dynamic_batch: make dimension 0 of every input symbolic, so any batch size runs.
        form: ``"qdq"`` (default), the standard QDQ graph any runtime reads, exact in
            onnxruntime with `onnx_session`; or ``"fused"``, laid out for onnxruntime's CPU
            optimizer to run integer kernels (QLinearConv, MatMulIntegerToFloat), which
            round otherwise than the integer model (see the module docstring). The fused
            form needs BatchNorm folded (``hard_quantize(..., fold_batchnorm=True)``).

    Returns:
        ``path``, after ``onnx.checker`` has checked the written model.

    Raises:
        ImportError: onnx or onnxscript is not installed (``pip install lightning-nipq[onnx]``).
        ValueError: the model is not an integer model, the opset cannot hold its codes, the
            form is unknown, or (form ``"fused"``) a BatchNorm directly follows an integer layer.
    """
    onnx = _require_onnx()
    form = _check_form(form)
    opset = _check_exportable(model, None if opset is None else int(opset))
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if form == "fused":
        _check_folded(model, args)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in args) if dynamic_batch else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(model, form), traceable_lifted_tensors(model):
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
    graph = program.model.graph
    if opset >= PACKED_CODES_OPSET:
        _pack_weight_codes(graph)
    if form == "fused":
        _lay_out_for_fusion(graph)
    _strip_debug_metadata(program.model)
    program.model.metadata_props[FORM_METADATA_KEY] = form
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


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"running ONNX models needs onnxruntime: {EXTRA_HINT}") from e
    return onnxruntime


def export_form(path: PathLike) -> str:
    """The form `export_onnx` wrote ``path`` in (its metadata); ``"qdq"`` for a file that records none."""
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    # Reading the metadata needs no optimized graph.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return str(session.get_modelmeta().custom_metadata_map.get(FORM_METADATA_KEY, "qdq"))


def onnx_session(
    path: PathLike,
    exact: Optional[bool] = None,
    threads: Optional[int] = None,
    optimized_model_path: Optional[PathLike] = None,
) -> Any:
    """An onnxruntime CPU session for an exported model.

    Args:
        path: the ``.onnx`` file.
        exact: compute what the graph says, in float kernels (`ORT_EXACT_CONFIG`; pass the
            same entries to your own ``SessionOptions``), or let onnxruntime fuse the QDQ
            layout into its integer kernels (its default optimizations). By default exact
            for the QDQ form and fused for the fused form (`export_form`).
        threads: onnxruntime's intra-op threads (default: its own choice, one per core).
        optimized_model_path: where onnxruntime saves the graph it runs, to see which kernels it chose.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a whole number >= 1 (or None for onnxruntime's choice), got {threads!r}")
    onnxruntime = _onnxruntime()
    if exact is None:
        exact = export_form(path) != "fused"
    options = onnxruntime.SessionOptions()
    if exact:
        for key, value in ORT_EXACT_CONFIG.items():
            options.add_session_config_entry(key, value)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, inputs: ExampleInput) -> Tensor:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    feeds = {spec.name: t.detach().cpu().numpy() for spec, t in zip(session.get_inputs(), args)}
    return torch.from_numpy(session.run(None, feeds)[0])


def onnx_outputs(path: PathLike, inputs: ExampleInput) -> Tensor:
    """Run an exported model with onnxruntime on CPU; returns its first output as a tensor."""
    return _run(onnx_session(path), inputs)


def compare_onnx(
    model: nn.Module, path: PathLike, batches: Iterable[ExampleInput], exact: Optional[bool] = None
) -> tuple[Optional[float], float, float]:
    """``(argmax agreement, max |diff|, max |diff| / max |output|)`` of onnxruntime against ``model``.

    The agreement is None when the outputs are not class scores (last dimension 1). A NaN or
    Inf on either side counts as a disagreement and an infinite difference. ``exact`` chooses
    the session as `onnx_session` does: by default the one the file's form runs with.

    Raises:
        ValueError: ``batches`` is empty.
    """
    session = onnx_session(path, exact=exact)
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
