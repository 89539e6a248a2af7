"""LSQ (Esser et al., ICLR 2020): fixed bits, a learned step size, straight-through rounding.

The baseline NIPQ is compared with. `LSQQuantizer` quantizes onto the same codes as
`lightning_nipq.NIPQQuantizer` (symmetric signed ``[-n, n]`` or unsigned
``[0, 2**b - 1]``, with ``alpha = s * n``), so attaching, `hard_quantize`, the integer
layers, the report and checkpoints treat both alike. `LSQConfig` builds LSQ quantizers
for `lightning_nipq.attach_quantizers`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nipq.quant.base_quantizer import BaseQuantizer, shown_range, shown_value
from lightning_nipq.quant.codes import MIN_SIGNED_BITS, check_bit_width, check_zero_point_rule, num_levels
from lightning_nipq.quant.fake_quant import hard_fake_quant, zero_point_of
from lightning_nipq.quant.fused_fake_quant import fused_hard_fake_quant, use_fused
from lightning_nipq.quant.granularity import (
    Granularity,
    RangeShape,
    check_granularity,
    granularity_name,
    grouped_view,
    range_rows,
    range_shape_for,
)
from lightning_nipq.quant.range_search import usable_weight_ranges


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; the gradient is multiplied by ``scale`` in the backward pass.

    Written so that the forward value is bitwise ``x`` (``y - y.detach()`` is exactly zero):
    the integer conversion recomputes the range from the parameter and must find the same float.
    """
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def lsq_init_alpha(x: Tensor, bits: int, signed: bool) -> float:
    """The LSQ paper's initial step ``s = 2 mean|x| / sqrt(Qp)`` as a range ``alpha = s * Qp``.

    Capped at ``max|x|``: a range past the largest value only wastes levels (at 8 bits the
    paper's rule gives several times ``max|x|``).
    """
    return float(lsq_init_ranges(x.detach().reshape(1, -1), bits, signed)[0])


def lsq_init_ranges(rows: Tensor, bits: int, signed: bool) -> Tensor:
    """`lsq_init_alpha` of each row of ``rows`` (one row per range)."""
    magnitude = rows.detach().abs().float()
    alpha = 2.0 * magnitude.mean(dim=1) * math.sqrt(num_levels(bits, signed))
    return torch.minimum(alpha, magnitude.amax(dim=1)).clamp_min(1e-8)


class LSQQuantizer(BaseQuantizer):
    """Learned step size quantization: ``v = clamp(x / s, -Qn, Qp)``, ``out = round_ste(v) * s``.

    The bit-width is fixed. The step ``s`` is a parameter whose gradient is LSQ's,
    ``round(v) - v`` inside the range and ``-Qn`` or ``Qp`` where clipped, times the
    gradient scale ``g = 1 / sqrt(numel * Qp)``. ``numel`` is the number of elements of
    the tensor for a weight and of one sample (the tensor without its first dimension)
    for an activation (``per_sample=True``). Signed codes are symmetric (``Qn = Qp = 2**(b-1) - 1``)
    and unsigned ones ``[0, 2**b - 1]``, as NIPQ's, so ``alpha = s * Qp``. With a zero point
    ``z`` (an unsigned input with a ``negative_share``), ``Qn = z`` and ``Qp = 2**b - 1 - z``,
    still ``alpha = s * Qp``. There is no noise mode: training and eval both round.

    Args:
        bits: the fixed bit-width (signed quantizers need at least 2).
        signed: codes in ``[-alpha, alpha]`` rather than ``[0, alpha]``.
        init_alpha: starting range ``alpha = s * Qp``.
        per_sample: the gradient scale counts the elements of one sample (activations)
            rather than of the whole tensor (weights).
        calibrated: ``False`` makes the quantizer pass its input through (and record it with
            an attached observer) until `set_range` is called.
        granularity: ``"tensor"``, ``"channel"`` or a group size (see
            `lightning_nipq.quant.granularity`).
        range_shape: the shape of the step (one per channel or group), broadcast against the
            input; ``init_alpha`` may be a tensor of this shape. The gradient scale then counts
            the elements of one range: ``g = 1 / sqrt(numel / ranges * Qp)``.
        zero_point: what calibration does about a zero point: ``"off"`` or ``"auto"`` (see
            `lightning_nipq.quant.observers.wants_zero_point`).
        negative_share: the share ``f`` of the range below zero (unsigned codes only; 0: no
            zero point); the zero point is ``round(f * (2**bits - 1))``.

    Example:

        ```python
        >>> q = LSQQuantizer(bits=3, signed=True, init_alpha=1.5)
        >>> q.step.item()  # alpha / Qp
        0.5
        >>> torch.unique(q(torch.linspace(-2, 2, 101))).numel()
        7
        ```
    """

    kind = "lsq"
    config_keys: ClassVar[tuple[str, ...]] = ("bits", "signed", "per_sample")

    def __init__(
        self,
        bits: int = 4,
        signed: bool = True,
        init_alpha: Union[float, Tensor] = 1.0,
        per_sample: bool = False,
        calibrated: bool = True,
        granularity: Granularity = "tensor",
        range_shape: RangeShape = (),
        zero_point: str = "off",
        negative_share: float = 0.0,
    ) -> None:
        config = {
            "bits": bits,
            "signed": signed,
            "per_sample": per_sample,
            "granularity": granularity,
            "range_shape": range_shape,
            "zero_point": zero_point,
            "negative_share": negative_share,
        }
        super().__init__(config, calibrated=calibrated)
        alpha = torch.as_tensor(init_alpha, dtype=torch.float32).detach()
        if not bool((alpha > 0).all()):
            raise ValueError(f"init_alpha must be positive, got {shown_value(alpha)}")
        self.step = nn.Parameter((alpha / self.qp).expand(self.range_shape).clone())

    # ------------------------------------------------------------------ configuration
    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        config = super().check_config(config)
        check_bit_width("bits", config["bits"], signed=config["signed"])
        if not isinstance(config["per_sample"], bool):
            raise ValueError(f"per_sample must be True or False, got {config['per_sample']!r}")
        return config

    @classmethod
    def bit_range(cls, config: Mapping[str, Any]) -> tuple[int, int]:
        return config["bits"], config["bits"]

    def config(self) -> dict[str, Any]:
        return {
            "bits": self.max_bits,
            "signed": self.signed,
            "per_sample": self.per_sample,
            "granularity": self.granularity,
            "range_shape": self.range_shape,
            "zero_point": self.zero_point,
            "negative_share": self.negative_share,
        }

    def _apply_config(self, config: Mapping[str, Any]) -> None:
        # The bit-width is fixed: it is the frozen bits and both ends of the range.
        self.min_bits = self.max_bits = self.frozen_bits = config["bits"]
        self.signed = config["signed"]
        self.per_sample = config["per_sample"]
        self.granularity = config["granularity"]
        self.range_shape = config["range_shape"]
        self.zero_point = config["zero_point"]
        self.negative_share = config["negative_share"]
        # The bits are fixed, so is the zero point: a Python integer, no tensor work per forward.
        self._zero_code = zero_point_of(config["bits"], config["negative_share"])

    @classmethod
    def _check_saved_range(cls, values: Mapping[str, Tensor], config: Mapping[str, Any]) -> Optional[str]:
        # alpha = |step| * Qp: a zero step divides by zero, a huge one overflows to inf.
        step = values.get("step")
        if step is None:
            return None
        qp = num_levels(config["bits"], config["signed"]) - zero_point_of(config["bits"], config["negative_share"])
        alpha = step.abs().double() * qp
        if not bool(((alpha > 0) & (alpha < torch.finfo(torch.float32).max)).all()):
            return f"step={shown_value(step)} gives the range |step| * {qp}, which must be positive and finite"
        return None

    @property
    def qp(self) -> int:
        """The largest code (``Qn`` is the same for signed codes, 0 for unsigned ones, the zero point with one)."""
        return num_levels(self.max_bits, self.signed) - self._zero_code

    @property
    def alpha(self) -> Tensor:
        # abs: a step driven through zero by a large learning rate keeps a valid range (the
        # forward pass is the same function of |s|) instead of turning the codes around.
        return self.step.abs() * float(self.qp)

    def continuous_bits(self) -> Tensor:
        return self.step.detach().new_full((), float(self.max_bits))

    def set_range(self, alpha: Union[float, Tensor], signed: bool, negative_share: float = 0.0) -> None:
        """Set the range (``s = alpha / Qp``), signedness and zero point's share, and start quantizing."""
        if signed and self.max_bits < MIN_SIGNED_BITS:
            raise ValueError(
                f"a signed input needs at least {MIN_SIGNED_BITS} bits (symmetric 1-bit codes hold only zero); "
                f"this quantizer has {self.max_bits}"
            )
        config = self._grid_config(signed, negative_share)
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=self.step.device).clamp_min(1e-8)
        self._apply_config(config)
        self.step.data.copy_((alpha / self.qp).expand(self.range_shape))
        self.calibrated = True

    def gradient_scale(self, x: Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(numel * Qp)`` for the input ``x``, ``numel`` counting the elements of one range."""
        numel = x.numel() // x.shape[0] if self.per_sample and x.dim() > 1 else x.numel() // max(self.ranges, 1)
        return 1.0 / math.sqrt(max(numel, 1) * self.qp)

    # ------------------------------------------------------------------ forward
    def _parameters_in_use(self) -> Tensor:
        return self.step.sum()

    def _quantize(self, x: Tensor) -> Tensor:
        # hard_fake_quant computes round_ste(clamp(x / alpha, -1, 1) * Qp) * alpha / Qp, which
        # for alpha = s * Qp is LSQ's round_ste(clamp(x / s, -Qn, Qp)) * s with LSQ's step
        # gradient, and is the very formula the integer conversion uses for the codes.
        # With a zero point z, N - z of the formula is Qp and z is Qn.
        step = scale_grad(self.step.abs(), self.gradient_scale(x))
        alpha = step * float(self.qp)
        bits = torch.full((), float(self.max_bits), device=x.device)
        zero = torch.full((), float(self._zero_code), device=x.device) if self.has_zero_point else None
        if use_fused(x, alpha):
            return fused_hard_fake_quant(x, alpha, bits, self.signed, zero)
        return hard_fake_quant(x.float(), alpha, bits, self.signed, zero)

    def extra_repr(self) -> str:
        return f"{self.codes_name()}, bits={self.max_bits}, step={shown_range(self.step.abs())}, per_sample={self.per_sample}"


@dataclass
class LSQConfig:
    """How `lightning_nipq.attach_quantizers` builds LSQ quantizers: fixed bits, LSQ's initial step.

    Weights start from the LSQ paper's ``s = 2 mean|W| / sqrt(Qp)`` (capped at ``max|W|``).
    Inputs start uncalibrated, and calibration (`lightning_nipq.calibrate_activations`,
    the callbacks, or `lightning_nipq.post_training_quantize`) sets their range and sign.

    Args:
        weight_bits: bits of every weight (at least 2: weights are signed).
        act_bits: bits of every quantized input; defaults to ``weight_bits``.
        weight_granularity: ``"tensor"``, ``"channel"`` or a group size: one step per weight,
            per output channel, or per group of that many inputs (see
            `lightning_nipq.quant.granularity`).
        input_zero_point: ``"off"`` (symmetric signed or unsigned input codes) or ``"auto"``:
            calibration gives a zero point to each input whose negative side is small against
            its positive one (`lightning_nipq.quant.observers.wants_zero_point`).
    """

    #: The quantizer method this config builds.
    method: ClassVar[str] = LSQQuantizer.kind

    weight_bits: int = 4
    act_bits: Optional[int] = None
    weight_granularity: Granularity = "channel"
    input_zero_point: str = "off"

    def __post_init__(self) -> None:
        if self.act_bits is None:
            self.act_bits = self.weight_bits
        check_bit_width("weight_bits", self.weight_bits, signed=True)
        check_bit_width("act_bits", self.act_bits)
        self.weight_granularity = check_granularity("weight_granularity", self.weight_granularity)
        check_zero_point_rule("input_zero_point", self.input_zero_point)

    def weight_quantizer(self, weight: Tensor, range_shape: Optional[RangeShape] = None) -> LSQQuantizer:
        """A quantizer for ``weight`` with ranges of ``range_shape``, each with LSQ's initial step.

        ``range_shape`` comes from the layer's kind (`lightning_nipq.layers.LayerKind.range_shape`);
        by default it is that of a weight whose output channels are its first axis.
        """
        if range_shape is None:
            range_shape = range_shape_for(tuple(weight.shape), self.weight_granularity)
        rows = range_rows(grouped_view(weight.detach(), self.weight_granularity), range_shape)
        alphas = usable_weight_ranges(lsq_init_ranges(rows, self.weight_bits, signed=True).reshape(range_shape), weight)
        return LSQQuantizer(
            bits=self.weight_bits,
            signed=True,
            init_alpha=alphas,
            granularity=self.weight_granularity,
            range_shape=range_shape,
        )

    def input_quantizer(self) -> LSQQuantizer:
        """An uncalibrated input quantizer; calibration sets its range and sign."""
        assert self.act_bits is not None
        # Symmetric signed codes need 2 bits, so a 1-bit input starts unsigned (as ReLU
        # outputs are); calibration refuses it if the input turns out signed.
        return LSQQuantizer(
            bits=self.act_bits,
            signed=self.act_bits >= MIN_SIGNED_BITS,
            per_sample=True,
            calibrated=False,
            zero_point=self.input_zero_point,
        )

    def difference(self, quantizer: BaseQuantizer, role: str) -> Optional[str]:
        """How a quantizer already on the model differs from what this config builds, or None."""
        if not isinstance(quantizer, LSQQuantizer):
            return f"its {role} quantizer is a {quantizer.kind!r} quantizer, not an LSQ one"
        if role == "weight" and quantizer.granularity != self.weight_granularity:
            return (
                f"its weight quantizer has {granularity_name(quantizer.granularity)} ranges, this configuration "
                f"{granularity_name(self.weight_granularity)} ranges"
            )
        bits = self.weight_bits if role == "weight" else self.act_bits
        if quantizer.max_bits != bits:
            return f"its {role} quantizer has {quantizer.max_bits} bits, this configuration {bits}"
        return None

    def adopt(self, quantizer: BaseQuantizer, role: str) -> None:
        """Give an input quantizer already on the model this config's zero-point rule (bits are what `difference` compares).

        The rule matters only to an input not calibrated yet: a calibrated one keeps its codes.
        """
        if role == "input":
            quantizer.configure(zero_point=self.input_zero_point)
