"""When NIPQ trains with noise, hands over to hard quantization, and freezes the bits: in epochs or in steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Phase = Literal["noise", "anneal", "hard"]
Unit = Literal["epoch", "step"]
UNITS: tuple[str, ...] = ("epoch", "step")


@dataclass(frozen=True)
class PhaseSchedule:
    """Noise, then ``anneal`` units of hand-over, then ``hard`` units, over a run of ``length`` units.

    A unit is an epoch (the position is the epoch counter, and the hand-over advances with
    the share of the epoch done) or an optimizer step (the position is the global step).
    During the hand-over the share of layers using hard quantization rises linearly from 0
    to 1 (layer by layer, in model order), so that the switch from noise to rounding does
    not hit every layer in the same step.
    """

    length: int
    hard: int = 1
    anneal: int = 0
    unit: Unit = "epoch"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.hard < 0 or self.anneal < 0:
            raise ValueError("the hard and anneal phases cannot be negative")
        if self.hard + self.anneal > self.length:
            raise ValueError(
                f"the hard phase ({self.hard} {self.unit}s) and the hand-over ({self.anneal} {self.unit}s) exceed the "
                f"run ({self.length} {self.unit}s); shorten them or train for longer"
            )

    @property
    def hard_start(self) -> int:
        return self.length - self.hard

    @property
    def anneal_start(self) -> int:
        return self.hard_start - self.anneal

    def phase(self, position: int) -> Phase:
        if position >= self.hard_start:
            return "hard"
        if position >= self.anneal_start:
            return "anneal"
        return "noise"

    def hard_share(self, position: int, progress: float = 0.0) -> float:
        """Share of layers in hard mode at ``position`` plus ``progress`` (0..1) of the next unit."""
        phase = self.phase(position)
        if phase == "hard":
            return 1.0
        if phase == "noise":
            return 0.0
        return min(1.0, (position - self.anneal_start + progress) / self.anneal)

    @staticmethod
    def hard_layer_count(share: float, num_layers: int) -> int:
        return min(num_layers, math.floor(share * num_layers + 1e-9))
