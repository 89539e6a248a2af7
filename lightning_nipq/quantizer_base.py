"""`BaseQuantizer`: what every quantizer shares with the code around it.

Attaching, calibration, the bit budget, `hard_quantize`, the integer conversion, the
report and checkpoints only read the interface defined here: whole bits
(`rounded_bits`, `bits`, `continuous_bits`, `frozen_bits`), the range (`alpha`,
`signed`, `set_range`), the calibration state, the sizes, and ``_extra_state``. A
quantizer method (NIPQ, LSQ) fills in how its parameters give bits and range and how
it quantizes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from lightning_nipq.fake_quant import num_levels, round_ste

#: Signed codes are symmetric (``[-n, n]``); below 2 bits that would leave only zero.
MIN_SIGNED_BITS = 2
#: Widest codes: the integer layers accumulate exactly in float64 up to 2**53.
MAX_SUPPORTED_BITS = 16


@torch.compiler.disable
def _observe(observer: Any, quantizer: "BaseQuantizer", x: Tensor) -> None:
    # Calibration keeps Python statistics; traced, every value would be a guard and a
    # recompile. Under torch.compile it runs eagerly, at the cost of a graph break.
    observer.observe(quantizer, x)


class BaseQuantizer(nn.Module):
    """A quantizer of one tensor onto symmetric signed or unsigned integer codes.

    Codes are ``[-n, n]`` with ``n = 2**(b-1) - 1`` (signed) or ``[0, 2**b - 1]``
    (unsigned), and the range is ``[-alpha, alpha]`` or ``[0, alpha]``. Subclasses
    provide `alpha`, `continuous_bits`, `set_range`, ``_quantize`` (the calibrated
    forward, in float32) and ``_parameters_in_use`` (a tensor touching every parameter).

    Args:
        signed: codes in ``[-alpha, alpha]`` rather than ``[0, alpha]``.
        min_bits: lowest bit-width.
        max_bits: highest bit-width.
        calibrated: ``False`` makes the quantizer pass its input through (and record it with
            an attached observer) until `set_range` is called.
    """

    #: Names the method in checkpoints and manifests.
    kind: ClassVar[str] = ""

    def __init__(self, signed: bool, min_bits: int, max_bits: int, calibrated: bool) -> None:
        super().__init__()
        if min_bits < 1 or max_bits < min_bits:
            raise ValueError(f"need 1 <= min_bits <= max_bits, got min_bits={min_bits}, max_bits={max_bits}")
        self.min_bits = int(min_bits)
        self.max_bits = int(max_bits)
        self.signed = bool(signed)
        self.frozen_bits: Optional[int] = None
        self.calibrated = calibrated
        #: Set by the NIPQ callback during the anneal; quantizers without modes ignore it.
        self.blend_modes = False
        #: Elements quantized per forward (weights: the tensor; activations: one batch's input),
        #: the weight of this quantizer in the average bit-width.
        self.size = 0
        #: Multiply-accumulates of the layer whose weight this quantizes, for the BOPs budget.
        self.macs = 0
        self.observer: Optional[Any] = None
        #: A list (set by the callback while it calibrates) makes compiled code keep the
        #: inputs here instead of calling the observer, which would break the graph; the
        #: callback hands them over after each step with `flush_observations`.
        self.deferred_observations: Optional[list[Tensor]] = None
        #: Random source of quantizers that draw noise (None: torch's global one). The
        #: callbacks set it on every quantizer.
        self.generator: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ for subclasses
    @property
    def alpha(self) -> Tensor:
        """The truncation: the largest magnitude the codes represent."""
        raise NotImplementedError

    def continuous_bits(self) -> Tensor:
        """The bit-width before rounding (the frozen value once frozen)."""
        raise NotImplementedError

    def set_range(self, alpha: float, signed: bool) -> None:
        """Set the truncation and signedness (what calibration does) and start quantizing."""
        raise NotImplementedError

    def _quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _parameters_in_use(self) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        """Always ``"hard"``: straight-through fake quantization. NIPQ adds a ``"noise"`` mode."""
        return "hard"

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode != "hard":
            raise ValueError(f"{type(self).__name__} has only the 'hard' mode, got {mode!r}")

    # ------------------------------------------------------------------ bits
    @property
    def lowest_bits(self) -> int:
        return max(self.min_bits, MIN_SIGNED_BITS) if self.signed else self.min_bits

    @property
    def learns_bits(self) -> bool:
        return self.frozen_bits is None

    @property
    def highest_bits(self) -> int:
        # A 1-bit quantizer whose input turned out signed is promoted to 2 bits, the least
        # symmetric codes need (clamping to 1 would leave n = 0 levels and divide by zero).
        return max(self.max_bits, self.lowest_bits)

    def _whole_bits(self, bits: Tensor) -> Tensor:
        return torch.clamp(round_ste(bits), self.lowest_bits, self.highest_bits)

    def bits(self, stochastic: bool = False) -> Tensor:
        """Whole bits with a straight-through gradient to the continuous bits."""
        return self._whole_bits(self.continuous_bits())

    def rounded_bits(self) -> int:
        """The bit-width eval mode uses now, as a Python integer."""
        return int(self.bits().detach().item())

    def freeze_bits(self, bits: Optional[int] = None) -> None:
        """Freeze the bit-width at ``bits`` (by default the current rounded bits)."""
        value = self.rounded_bits() if bits is None else int(bits)
        if not self.min_bits <= value <= self.max_bits:
            raise ValueError(f"cannot freeze at {value} bits: this quantizer's range is [{self.min_bits}, {self.max_bits}]")
        self.frozen_bits = value

    def step_size(self) -> Tensor:
        """``alpha / n`` at the current rounded bits."""
        return self.alpha / num_levels(self.bits(), self.signed)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not self.calibrated:
            if self.training and self.observer is not None:
                if self.deferred_observations is not None and torch.compiler.is_compiling():
                    # A graph break here would outlive calibration: Dynamo keeps the split
                    # graph for as long as the guards before the break hold.
                    self.deferred_observations.append(x.detach())
                else:
                    _observe(self.observer, self, x)
            # Zero-weighted use of the parameters keeps DDP's reducer satisfied while the
            # range is still being measured.
            return x + self._parameters_in_use().to(x.dtype) * 0.0
        # Rounding needs float32: in bf16 a 4-bit grid is already coarser than the data.
        return self._quantize(x.float()).to(x.dtype)

    def flush_observations(self) -> None:
        """Give the observer the inputs that compiled code deferred (see ``deferred_observations``)."""
        if not self.deferred_observations:
            return
        pending = list(self.deferred_observations)
        self.deferred_observations.clear()  # in place: the compiled code holds this list
        if self.observer is not None:
            for x in pending:
                self.observer.observe(self, x)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "signed": self.signed,
            "frozen_bits": self.frozen_bits,
            "calibrated": self.calibrated,
            "min_bits": self.min_bits,
            "max_bits": self.max_bits,
            "size": self.size,
            "macs": self.macs,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.signed = bool(state["signed"])
        self.frozen_bits = None if state["frozen_bits"] is None else int(state["frozen_bits"])
        self.calibrated = bool(state["calibrated"])
        self.min_bits = int(state["min_bits"])
        self.max_bits = int(state["max_bits"])
        self.size = int(state["size"])
        self.macs = int(state["macs"])

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A float checkpoint has none of our keys: keep the quantizer as attached and
        # calibrated instead of failing a strict load, so a float checkpoint still loads.
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
