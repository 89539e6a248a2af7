"""``NIPQQuantizer``: one learnable bit-width and one learnable truncation for one tensor; `NIPQConfig` builds them for a model.

A plain ``nn.Module`` that knows nothing of Lightning; use it on its own as
``q = NIPQQuantizer(signed=True); y = q(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.quant.base_quantizer import (
    BaseQuantizer,
    inverse_softplus,
    logistic_bit_width,
    shift_logits,
    shown_range,
    shown_value,
)
from lightning_nipq.quant.codes import MIN_SIGNED_BITS, check_bit_width, check_zero_point_rule
from lightning_nipq.quant.fake_quant import hard_fake_quant, noise_fake_quant
from lightning_nipq.quant.fused_fake_quant import fused_hard_fake_quant, fused_noise_fake_quant, use_fused
from lightning_nipq.quant.granularity import Granularity, RangeShape, check_granularity, granularity_name, range_shape_for
from lightning_nipq.quant.noise import NOISE_KINDS, register_generator, sample_noise, sample_noise_compilable
from lightning_nipq.quant.range_search import weight_ranges

Mode = Literal["noise", "hard"]


class NIPQQuantizer(BaseQuantizer):
    """Learnable-bit, learnable-range quantizer of NIPQ (Shin et al., CVPR 2023).

    Bits are ``min_bits + (max_bits - min_bits) * sigmoid(theta)``, rounded with a
    straight-through estimate so that the forward pass always uses whole bits; the
    truncation is ``alpha = softplus(alpha_raw)``. In training with ``mode="noise"``
    the output is the input clipped to the range plus one step of noise (the
    pseudo-quantization proxy); with ``mode="hard"``, and always in eval mode, it is
    straight-through fake quantization onto at most ``2**bits`` levels.

    Args:
        signed: codes in ``[-alpha, alpha]`` (weights, signed activations) rather than ``[0, alpha]``.
        min_bits: lowest bit-width the learned bits may take. Signed quantizers never go below 2.
        max_bits: highest bit-width.
        init_bits: starting (continuous) bit-width, by default half a bit under ``max_bits``.
        fixed_bits: if given, the bit-width is frozen at this integer and ``theta`` is not trained.
        init_alpha: starting truncation.
        noise: ``"uniform"`` or ``"histogram"`` noise in the noise phase.
        stochastic_bits: add ``U(-0.5, 0.5)`` to the continuous bits before rounding in the noise phase.
        calibrated: ``False`` makes the quantizer pass its input through (and record it with
            an attached observer) until `set_range` is called.
        granularity: ``"tensor"``, ``"channel"`` or a group size (see
            `lightning_nipq.quant.granularity`); the bits stay one per quantizer.
        range_shape: the shape of the range (``alpha``), broadcast against the input: ``()``
            per tensor, for example ``(C_out, 1, 1, 1)`` per channel of a Conv2d weight.
            ``init_alpha`` may be a tensor of this shape. Each range learns on its own, and in the
            noise phase each element's noise step is its own range's.
        zero_point: what calibration does about a zero point: ``"off"`` (signed or unsigned
            codes) or ``"auto"`` (see `lightning_nipq.quant.observers.wants_zero_point`).
        negative_share: the share ``f`` of the range below zero (unsigned codes only; 0: no zero
            point). The codes are ``[0, 2**b - 1]`` with the zero point ``round(f * (2**b - 1))``
            at whatever bits the quantizer has, and ``alpha`` stays the top of the range.

    Example:

        ```python
        >>> q = NIPQQuantizer(signed=True, fixed_bits=3, init_alpha=1.0).eval()
        >>> torch.unique(q(torch.linspace(-2, 2, 101))).numel() <= 2**3
        True
        ```
    """

    kind = "nipq"
    config_keys: ClassVar[tuple[str, ...]] = ("signed", "min_bits", "max_bits", "noise", "stochastic_bits")

    def __init__(
        self,
        signed: bool = True,
        min_bits: int = 2,
        max_bits: int = 8,
        init_bits: Optional[float] = None,
        fixed_bits: Optional[int] = None,
        init_alpha: Union[float, Tensor] = 1.0,
        noise: str = "uniform",
        stochastic_bits: bool = True,
        calibrated: bool = True,
        granularity: Union[str, int] = "tensor",
        range_shape: tuple[int, ...] = (),
        zero_point: str = "off",
        negative_share: float = 0.0,
    ) -> None:
        config = {
            "signed": signed,
            "min_bits": min_bits,
            "max_bits": max_bits,
            "noise": noise,
            "stochastic_bits": stochastic_bits,
            "granularity": granularity,
            "range_shape": range_shape,
            "zero_point": zero_point,
            "negative_share": negative_share,
        }
        super().__init__(config, calibrated=calibrated)
        if init_bits is None:
            init_bits = max_bits - 0.5 if max_bits > min_bits else float(max_bits)
        self.theta = nn.Parameter(torch.tensor(self._theta_for(init_bits)))
        self.alpha_raw = nn.Parameter(torch.zeros(self.range_shape))
        self._fill_range(init_alpha, "init_alpha")
        self.mode = "noise"
        if fixed_bits is not None:
            self.freeze_bits(fixed_bits)

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        config = super().check_config(config)
        if config["noise"] not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {config['noise']!r}")
        if not isinstance(config["stochastic_bits"], bool):
            raise ValueError(f"stochastic_bits must be True or False, got {config['stochastic_bits']!r}")
        return config

    @classmethod
    def _check_saved_range(cls, values: Mapping[str, Tensor], config: Mapping[str, Any]) -> Optional[str]:
        # softplus underflows to 0 below about -104 in float32: a zero range divides by zero.
        alpha_raw = values.get("alpha_raw")
        if alpha_raw is not None and not bool((F.softplus(alpha_raw.float()) > 0).all()):
            return f"alpha_raw={shown_value(alpha_raw)} gives the range softplus(alpha_raw) = 0"
        return None

    def _theta_for(self, bits: float) -> float:
        if self.max_bits == self.min_bits:
            return 0.0
        share = (bits - self.min_bits) / (self.max_bits - self.min_bits)
        share = min(max(share, 1e-4), 1 - 1e-4)
        return math.log(share / (1 - share))

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> Mode:
        """``"noise"`` (the NIPQ proxy) or ``"hard"`` (straight-through fake quantization) in training."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in ("noise", "hard"):
            raise ValueError(f"mode must be 'noise' or 'hard', got {mode!r}")
        device = self.alpha_raw.device
        flag = self.__dict__.get("_hard_flag")
        if flag is None or flag.device != device:
            flag = self._hard_flag = torch.zeros((), device=device)
        elif mode == self.__dict__.get("_mode"):
            return  # the callback sets the mode every batch; write the flag only when it changes
        self._mode = mode
        flag.fill_(1.0 if mode == "hard" else 0.0)

    # ------------------------------------------------------------------ randomness
    @property
    def generator(self) -> Optional[torch.Generator]:
        """Random source of noise and stochastic bits (None: torch's global one).

        The callback sets one whose state it checkpoints, so a resumed run draws the same noise.
        """
        return self._generator

    @generator.setter
    def generator(self, generator: Optional[torch.Generator]) -> None:
        self._generator = generator
        # Compiled code cannot hold the generator itself; it names it by this key (see noise.py).
        self._noise_key, self._noise_order = register_generator(generator)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deep copy or unpickled copy has its own generator: register that one.
        super().__setstate__(state)
        self.generator = self.__dict__.get("_generator")

    def _noise(self, kind: str, x: Tensor, alpha: Tensor, bits: Tensor, zero_point: Optional[Tensor] = None) -> Tensor:
        if torch.compiler.is_compiling():
            return sample_noise_compilable(kind, x, alpha, bits, self.signed, self._noise_key, self._noise_order, zero_point)
        return sample_noise(kind, x, alpha, bits, self.signed, self.generator, zero_point)

    # ------------------------------------------------------------------ bits and range
    @property
    def alpha(self) -> Tensor:
        return F.softplus(self.alpha_raw)

    def continuous_bits(self) -> Tensor:
        """The learned bit-width before rounding (the frozen value once frozen)."""
        if self.frozen_bits is not None:
            # ``0 * theta`` keeps theta in the graph: DDP expects a gradient for every
            # parameter it registered, frozen or not.
            return self.theta * 0.0 + float(self.frozen_bits)
        return logistic_bit_width(self.theta, self.min_bits, self.max_bits)

    def logistic_bits(self) -> tuple[Tensor, float, float]:
        return self.theta, float(self.min_bits), float(self.max_bits)

    def shift_bit_logit(self, delta: Tensor) -> None:
        if self.frozen_bits is None:
            shift_logits([self.theta], delta)

    def bits(self, stochastic: bool = False) -> Tensor:
        """Whole bits with a straight-through gradient to the continuous bits."""
        b = self.continuous_bits()
        if stochastic and self.frozen_bits is None:
            b = b + self._noise("uniform", b, b, b).to(b.dtype)
        return self._whole_bits(b)

    def freeze_bits(self, bits: Optional[int] = None) -> None:
        """Freeze the bit-width at ``bits`` (by default the current rounded bits)."""
        super().freeze_bits(bits)
        assert self.frozen_bits is not None
        self.theta.data.fill_(self._theta_for(self.frozen_bits))

    def _fill_range(self, alpha: Union[float, Tensor], name: str) -> None:
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=self.alpha_raw.device).detach()
        if not bool((alpha > 0).all()):
            raise ValueError(f"{name} must be positive, got {shown_value(alpha)}")
        self.alpha_raw.data.copy_(inverse_softplus(alpha.clamp_min(1e-8)).expand(self.range_shape))

    def set_range(self, alpha: Union[float, Tensor], signed: bool, negative_share: float = 0.0) -> None:
        """Set the truncation, signedness and zero point's share (what calibration does) and start quantizing."""
        config = self._grid_config(signed, negative_share)
        self._fill_range(torch.as_tensor(alpha, dtype=torch.float32).clamp_min(1e-8), "alpha")
        self._apply_config(config)
        self.calibrated = True

    # ------------------------------------------------------------------ forward
    def _parameters_in_use(self) -> Tensor:
        return self.alpha_raw.sum() + self.theta

    def _quantize(self, x: Tensor) -> Tensor:
        alpha = self.alpha
        if self.training and self.blend_modes and torch.compiler.is_compiling():
            return self._blended(x.float(), alpha)
        noisy = self.training and self.mode == "noise"
        bits = self.bits(stochastic=noisy and self.stochastic_bits)
        zero_point = self.zero_point_code(bits)
        if use_fused(x, alpha, bits):
            if noisy:
                return fused_noise_fake_quant(x, alpha, bits, self.signed, self.noise, self.generator, zero_point)
            return fused_hard_fake_quant(x, alpha, bits, self.signed, zero_point)
        x32 = x.float()
        if noisy:
            noise = self._noise(self.noise, x32, alpha.detach(), bits.detach(), zero_point)
            return noise_fake_quant(x32, alpha, bits, self.signed, noise, zero_point)
        return hard_fake_quant(x32, alpha, bits, self.signed, zero_point)

    def _blended(self, x32: Tensor, alpha: Tensor) -> Tensor:
        # Both paths, selected by the flag: gradients reach only the selected one. Noise is
        # drawn for hard layers too, so compiled anneal steps draw more than eager ones.
        noisy_bits = self.bits(stochastic=self.stochastic_bits)
        noisy_zero = self.zero_point_code(noisy_bits)
        noise = self._noise(self.noise, x32, alpha.detach(), noisy_bits.detach(), noisy_zero)
        noisy = noise_fake_quant(x32, alpha, noisy_bits, self.signed, noise, noisy_zero)
        bits = self.bits()
        hard = hard_fake_quant(x32, alpha, bits, self.signed, self.zero_point_code(bits))
        return torch.where(self._hard_flag > 0, hard, noisy)

    def extra_repr(self) -> str:
        bits = f"bits={self.frozen_bits} (frozen)" if self.frozen_bits is not None else (
            f"bits~{self.continuous_bits().item():.2f} in [{self.lowest_bits}, {self.max_bits}]"
        )
        return f"{self.codes_name()}, {bits}, alpha={shown_range(self.alpha)}, mode={self.mode}"


#: Ways to start a weight's range (see `NIPQConfig`).
WEIGHT_INITS: tuple[str, ...] = ("max", "mse")


@dataclass
class NIPQConfig:
    """How `lightning_nipq.attach_quantizers` builds NIPQ quantizers for a model's weights and inputs.

    Weights are signed; inputs start uncalibrated, and calibration sets their range and sign.
    Every setting is checked here, when the config is made, by the same check the quantizers
    use.

    Args:
        min_bits: lowest bit-width the learned bits may take (signed codes never go below 2).
        max_bits: highest bit-width.
        init_bits: starting learned bit-width (default ``max_bits - 0.5``).
        weight_bits: freeze every weight at this bit-width instead of learning it.
        act_bits: freeze every input at this bit-width.
        noise: ``"uniform"`` or ``"histogram"`` noise in the noise phase.
        stochastic_bits: add ``U(-0.5, 0.5)`` to the bits before rounding in the noise phase.
        weight_init: each weight's starting range: ``"max"`` (``max|W|``) or ``"mse"`` (the
            clipping minimising the rounding MSE at the starting bit-width: the fixed bits, else
            the rounded initial bits), each range searched on its own elements.
        weight_granularity: ``"tensor"``, ``"channel"`` or a group size: one learned range per
            weight, per output channel, or per group of that many inputs of each output
            channel (see `lightning_nipq.quant.granularity`). Bits stay one per layer.
        input_zero_point: ``"off"`` (symmetric signed or unsigned input codes) or ``"auto"``:
            calibration gives a zero point to each input whose negative side is small against
            its positive one (`lightning_nipq.quant.observers.wants_zero_point`).
    """

    #: The quantizer method this config builds.
    method: ClassVar[str] = NIPQQuantizer.kind

    min_bits: int = 2
    max_bits: int = 8
    init_bits: Optional[float] = None
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    noise: str = "uniform"
    stochastic_bits: bool = True
    weight_init: str = "max"
    weight_granularity: Granularity = "channel"
    input_zero_point: str = "off"

    def __post_init__(self) -> None:
        self.weight_granularity = check_granularity("weight_granularity", self.weight_granularity)
        check_zero_point_rule("input_zero_point", self.input_zero_point)
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")
        if self.weight_bits is not None:
            check_bit_width("weight_bits", self.weight_bits, signed=True)
        elif isinstance(self.max_bits, int) and self.max_bits < MIN_SIGNED_BITS:
            raise ValueError(
                f"max_bits must be at least {MIN_SIGNED_BITS}: weights are signed, and symmetric 1-bit codes hold only "
                f"zero; got max_bits={self.max_bits}"
            )
        if self.act_bits is not None:
            check_bit_width("act_bits", self.act_bits)
        for role in ("weight", "input"):
            NIPQQuantizer.check_config(self.quantizer_config(role, signed=role == "weight"))
        if self.init_bits is not None and not (
            isinstance(self.init_bits, (int, float)) and self.min_bits <= self.init_bits <= self.max_bits
        ):
            raise ValueError(f"init_bits={self.init_bits!r} is outside [min_bits={self.min_bits}, max_bits={self.max_bits}]")

    def fixed_bits(self, role: str) -> Optional[int]:
        """The frozen bit-width of ``role`` (``"weight"`` or ``"input"``), or None where bits are learned."""
        return self.weight_bits if role == "weight" else self.act_bits

    def quantizer_config(self, role: str, signed: bool) -> dict[str, Any]:
        """The settings (`NIPQQuantizer.config`) of a ``role`` quantizer built by this config."""
        fixed = self.fixed_bits(role)
        low, high = (fixed, fixed) if fixed is not None else (self.min_bits, self.max_bits)
        return {
            "signed": signed,
            "min_bits": low,
            "max_bits": high,
            "noise": self.noise,
            "stochastic_bits": self.stochastic_bits,
            "zero_point": self.input_zero_point if role == "input" else "off",
        }

    def _make(
        self, role: str, init_alpha: Union[float, Tensor], calibrated: bool, signed: bool, range_shape: RangeShape = ()
    ) -> NIPQQuantizer:
        fixed = self.fixed_bits(role)
        return NIPQQuantizer(
            **self.quantizer_config(role, signed),
            init_bits=self.init_bits if fixed is None else None,
            fixed_bits=fixed,
            init_alpha=init_alpha,
            calibrated=calibrated,
            granularity=self.weight_granularity if role == "weight" else "tensor",
            range_shape=range_shape,
        )

    def weight_quantizer(self, weight: Tensor, range_shape: Optional[RangeShape] = None) -> NIPQQuantizer:
        """A quantizer for ``weight`` with ranges of ``range_shape``, started by ``weight_init``.

        ``range_shape`` comes from the layer's kind (`lightning_nipq.layers.LayerKind.range_shape`);
        by default it is that of a weight whose output channels are its first axis.
        """
        if range_shape is None:
            range_shape = range_shape_for(tuple(weight.shape), self.weight_granularity)
        bits = self.weight_bits
        if bits is None:
            start = self.init_bits if self.init_bits is not None else self.max_bits - 0.5
            bits = max(round(start), self.min_bits)
        method = "mse" if self.weight_init == "mse" else "minmax"
        init_alpha = weight_ranges(weight, self.weight_granularity, range_shape, max(bits, 2), method)
        return self._make("weight", init_alpha=init_alpha, calibrated=True, signed=True, range_shape=range_shape)

    def input_quantizer(self) -> NIPQQuantizer:
        """An uncalibrated input quantizer; calibration sets its range and sign."""
        return self._make("input", init_alpha=1.0, calibrated=False, signed=True)

    def difference(self, quantizer: BaseQuantizer, role: str) -> Optional[str]:
        """How a quantizer already on the model differs from what this config builds in what it cannot change, or None.

        Another method, or another bit range (the learned bit parameter means something else
        under another range), cannot be changed.
        """
        if not isinstance(quantizer, NIPQQuantizer):
            return f"its {role} quantizer is a {quantizer.kind!r} quantizer, not a NIPQ one"
        if role == "weight" and quantizer.granularity != self.weight_granularity:
            return (
                f"its weight quantizer has {granularity_name(quantizer.granularity)} ranges, this configuration "
                f"{granularity_name(self.weight_granularity)} ranges"
            )
        expected = self.quantizer_config(role, quantizer.signed)
        have = (quantizer.min_bits, quantizer.max_bits)
        if have != (expected["min_bits"], expected["max_bits"]):
            return (
                f"its {role} quantizer learns bits in [{have[0]}, {have[1]}], this configuration in "
                f"[{expected['min_bits']}, {expected['max_bits']}]"
            )
        return None

    def adopt(self, quantizer: BaseQuantizer, role: str) -> None:
        """Give a quantizer already on the model (with no `difference`) this config's noise and zero-point settings.

        The zero-point rule matters only to an input not calibrated yet: a calibrated one keeps its codes.
        """
        zero_point = {"zero_point": self.input_zero_point} if role == "input" else {}
        quantizer.configure(noise=self.noise, stochastic_bits=self.stochastic_bits, **zero_point)
