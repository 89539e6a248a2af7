"""Finding the layers of a model to quantize and attaching quantizers to them. Plain torch."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

from torch import Tensor, nn

from lightning_nipq.integer_layers import is_integer
from lightning_nipq.layers import FLOAT_CLASS, QUANTIZABLE_TYPES, QUANTIZED_CLASS, is_quantized
from lightning_nipq.quantizer import NIPQQuantizer
from lightning_nipq.quantizer_base import BaseQuantizer


class QuantizerFactory(Protocol):
    """What `attach_quantizers` needs of a config (`QuantizerConfig`, `lightning_nipq.LSQConfig`)."""

    def weight_quantizer(self, weight: Tensor) -> BaseQuantizer:
        """A calibrated, signed quantizer whose initial range suits ``weight``."""
        ...

    def input_quantizer(self) -> BaseQuantizer:
        """An uncalibrated quantizer: calibration gives it its range and sign."""
        ...


@dataclass
class QuantizerConfig:
    """How NIPQ quantizers are built. ``weight_bits``/``act_bits`` freeze the bit-width.

    ``weight_init`` sets each weight's starting range: ``"max"`` (``max|W|``) or ``"mse"`` (the
    clipping minimising the rounding MSE at the starting bit-width: the fixed bits, else the
    rounded initial bits).
    """

    min_bits: int = 2
    max_bits: int = 8
    init_bits: Optional[float] = None
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    noise: str = "uniform"
    stochastic_bits: bool = True
    weight_init: str = "max"

    def make(self, fixed: Optional[int], init_alpha: float, calibrated: bool, signed: bool) -> NIPQQuantizer:
        lo, hi = (fixed, fixed) if fixed is not None else (self.min_bits, self.max_bits)
        return NIPQQuantizer(
            signed=signed,
            min_bits=lo,
            max_bits=hi,
            init_bits=self.init_bits if fixed is None else None,
            fixed_bits=fixed,
            init_alpha=init_alpha,
            noise=self.noise,
            stochastic_bits=self.stochastic_bits,
            calibrated=calibrated,
        )

    def weight_quantizer(self, weight: Tensor) -> NIPQQuantizer:
        """A quantizer for ``weight``, its range started by ``weight_init``."""
        init_alpha = float(weight.detach().abs().max().clamp_min(1e-8))
        if self.weight_init == "mse":
            from lightning_nipq.ptq import mse_alpha  # ptq builds on this module

            bits = self.weight_bits
            if bits is None:
                start = self.init_bits if self.init_bits is not None else self.max_bits - 0.5
                bits = max(round(start), self.min_bits)
            init_alpha = max(mse_alpha(weight, bits, signed=True), 1e-8)
        return self.make(self.weight_bits, init_alpha=init_alpha, calibrated=True, signed=True)

    def input_quantizer(self) -> NIPQQuantizer:
        """An uncalibrated input quantizer; calibration sets its range and sign."""
        return self.make(self.act_bits, init_alpha=1.0, calibrated=False, signed=True)


@dataclass
class AttachResult:
    """What `attach_quantizers` did: the quantized layers and everything it left alone, with why."""

    quantized: list[str] = field(default_factory=list)
    float_input: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _unquantizable_reason(name: str, module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """Why a module that holds a matrix-like weight is not quantized, or None if it is a target."""
    if isinstance(parent, nn.MultiheadAttention):
        return "called by nn.MultiheadAttention through F.multi_head_attention_forward, not through its forward"
    if isinstance(module, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention uses its packed in_proj_weight inside F.multi_head_attention_forward; "
            "write the projections as nn.Linear layers to quantize them"
        )
    if type(module) in QUANTIZABLE_TYPES:
        return None
    if isinstance(module, QUANTIZABLE_TYPES):
        return f"{type(module).__name__} subclasses a supported layer and may override its forward"
    has_matrix = any(p.dim() >= 2 for p in module.parameters(recurse=False))
    if has_matrix:
        return f"{type(module).__name__} is not a supported layer type (Linear, Conv1d, Conv2d, Conv3d)"
    return None


def plan_layers(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Layers to quantize, in registration order, and ``(name, reason)`` for what is left out.

    ``include``/``exclude`` are shell-style patterns on module names (``"encoder.*"``).
    A pattern that matches no module is an error, since it is almost always a typo.
    """
    include = list(include) if include is not None else None
    exclude = list(exclude or [])
    named = dict(model.named_modules())
    for pattern in (include or []) + exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in named if name):
            raise ValueError(
                f"pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {[n for n in list(named)[1:6]]}"
            )
    parents = {id(child): mod for mod in named.values() for child in mod.children()}
    targets: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[int] = set()
    for name, module in named.items():
        if not name or id(module) in seen:
            continue
        seen.add(id(module))
        if is_quantized(module) or is_integer(module):
            raise ValueError(f"{name} is already quantized; build the model afresh or call detach_quantizers first")
        reason = _unquantizable_reason(name, module, parents.get(id(module)))
        if reason is not None:
            skipped.append((name, reason))
            continue
        if type(module) not in QUANTIZABLE_TYPES:
            continue
        if include is not None and not _matches(name, include):
            skipped.append((name, "not matched by include"))
        elif _matches(name, exclude):
            skipped.append((name, "matched by exclude"))
        else:
            targets.append((name, module))
    return targets, skipped


def attach_quantizers(
    model: nn.Module,
    config: Optional[QuantizerFactory] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    float_input_layers: Optional[Sequence[str]] = None,
) -> AttachResult:
    """Quantize the weight and input of every supported layer of ``model``, in place.

    ``config`` builds the quantizers: `QuantizerConfig` (the default) NIPQ ones, whose
    weights start with ``alpha = max|W|``, and `lightning_nipq.LSQConfig` LSQ ones.
    Input quantizers start uncalibrated: they pass their input through until
    `lightning_nipq.calibration.calibrate_activations` (or their ``set_range``) gives
    them a range and a sign.

    ``float_input_layers`` names the layers whose input stays float; by default the first
    supported layer in registration order, which takes the raw model input in most models.
    """
    config = config or QuantizerConfig()
    targets, skipped = plan_layers(model, include, exclude)
    if not targets:
        supported = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
        detail = "; ".join(f"{n}: {r}" for n, r in skipped[:5])
        raise ValueError(
            f"{type(model).__name__} has no layer to quantize (supported: {supported})"
            + (f"; left out: {detail}" if detail else "")
            + ". Check include/exclude or add supported layers."
        )
    if float_input_layers is None:
        float_inputs = {targets[0][0]}
    else:
        float_inputs = set(float_input_layers)
        unknown = float_inputs - {n for n, _ in targets}
        if unknown:
            raise ValueError(f"float_input_layers {sorted(unknown)} are not among the quantized layers")
    result = AttachResult(skipped=skipped)
    for name, layer in targets:
        attach_layer(layer, config, float_input=name in float_inputs)
        if name in float_inputs:
            result.float_input.append(name)
        result.quantized.append(name)
    disable_transformer_fast_path(model)
    return result


def attach_layer(layer: nn.Module, config: QuantizerFactory, float_input: bool = False) -> None:
    """Quantize one plain ``nn.Linear``/``nn.Conv1d/2d/3d`` in place (see `attach_quantizers`)."""
    if type(layer) not in QUANTIZED_CLASS:
        raise TypeError(f"{type(layer).__name__} is not a plain Linear/Conv1d/Conv2d/Conv3d layer")
    weight_quantizer = config.weight_quantizer(layer.weight)
    weight_quantizer.size = layer.weight.numel()
    layer.__class__ = QUANTIZED_CLASS[type(layer)]
    layer.weight_quantizer = weight_quantizer.to(layer.weight.device)
    if float_input:
        layer.input_quantizer = None
    else:
        input_quantizer = config.input_quantizer()
        layer.input_quantizer = input_quantizer.to(layer.weight.device)


def disable_transformer_fast_path(model: nn.Module) -> None:
    """Keep ``nn.TransformerEncoderLayer`` from bypassing quantized or integer layers.

    In eval, the layer may run one fused kernel that reads ``linear1``/``linear2`` weights
    directly and skips their forward, and so our quantizers. The flag set here is only read
    by that fast-path check.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            is_quantized(m) or is_integer(m) for m in module.modules()
        ):
            module.activation_relu_or_gelu = 0


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every fake-quantized layer, each once, in registration order."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if is_quantized(module) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def quantizers(model: nn.Module) -> Iterator[tuple[str, BaseQuantizer]]:
    """``(name, quantizer)`` for every quantizer, weights before inputs within a layer."""
    for name, layer in quantized_layers(model):
        yield f"{name}.weight_quantizer", layer.weight_quantizer
        if layer.input_quantizer is not None:
            yield f"{name}.input_quantizer", layer.input_quantizer


def detach_layer(layer: nn.Module) -> None:
    """Undo `attach_layer`: the layer becomes a plain float layer again."""
    del layer.weight_quantizer
    del layer.input_quantizer
    layer.__class__ = FLOAT_CLASS[type(layer)]


def detach_quantizers(model: nn.Module) -> None:
    """Undo `attach_quantizers`: the layers become plain float layers again."""
    for _, layer in list(quantized_layers(model)):
        detach_layer(layer)
