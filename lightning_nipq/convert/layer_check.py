"""Layer-by-layer check of the integer conversion: each integer layer against its fake-quantized self, same input.

End to end, the integer and the fake-quantized model can differ by more than float
rounding: an activation on a rounding boundary lands on the neighbouring code in one of
them, and the next layers carry that step on (at 8 bits the step is small but boundaries
are many). Fed the very same input, a converted layer may differ from its fake-quantized
self by float rounding only, so this check is sharp at every bit-width, and a layer that
the model's forward never calls (its quantization is bypassed, or it is unused) shows up
by name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_nipq.layers.model_walk import quantized_layers

#: Samples of the first compared batch whose layer inputs and outputs are kept.
LAYER_CHECK_SAMPLES = 32
#: Largest ``max|diff| / max|output|`` of one converted layer on its recorded input: float rounding only.
LAYER_REL_TOLERANCE = 1e-4



class LayerRecord(dict[str, tuple[Optional[Tensor], Tensor]]):
    """``name -> (input, output)`` of each recorded layer's first call, with ``calls``: its further arguments.

    A learned tensor (`lightning_nipq.layers.learned_tensors`) is called without input: None.

    ``calls[name]`` is ``(args after the input, keyword arguments)`` of that call (a transposed
    convolution's ``output_size``), so the converted layer is called as the model called it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}


@contextlib.contextmanager
def full_precision_kernels() -> Iterator[None]:
    """Keep cuDNN and cuBLAS off TF32, whose 10-bit mantissa would swamp the comparison."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def record_layers(model: nn.Module, run: Callable[[], Any], samples: int = LAYER_CHECK_SAMPLES) -> LayerRecord:
    """``name -> (input, output)`` of the first call of every fake-quantized layer during ``run()``.

    Only the first ``samples`` entries along the batch axis are kept: the layers act on each
    sample alone, so the slice of the output is the output of the sliced input.
    """
    record = LayerRecord()

    def hook(name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if name in record or not isinstance(output, Tensor):
                return
            if not args and not kwargs:  # a learned tensor: a layer without input
                record[name] = (None, output.detach().clone())  # type: ignore[assignment]
                record.calls[name] = ((), {})
                return
            if not args or not isinstance(args[0], Tensor):
                return
            x, y = args[0], output
            if x.dim() >= 2 and y.dim() >= 2:
                x, y = x[:samples], y[:samples]
            record[name] = (x.detach().clone(), y.detach().clone())
            record.calls[name] = (tuple(args[1:]), dict(kwargs))

        return keep

    handles = [layer.register_forward_hook(hook(name), with_kwargs=True) for name, layer in quantized_layers(model)]
    try:
        with torch.no_grad(), full_precision_kernels():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return record


def layer_rel_diffs(model: nn.Module, record: LayerRecord) -> dict[str, float]:
    """``name -> max|integer(x) - fake_quant(x)| / max|fake_quant(x)|`` for every recorded layer, after conversion."""
    modules = dict(model.named_modules())
    diffs: dict[str, float] = {}
    with torch.no_grad(), full_precision_kernels():
        for name, (x, y) in record.items():
            args, kwargs = getattr(record, "calls", {}).get(name, ((), {}))
            out = (modules[name]() if x is None else modules[name](x, *args, **kwargs)).to(y.dtype)
            diffs[name] = float((out - y).abs().max()) / max(float(y.abs().max()), 1e-12)
    return diffs
