"""When NIPQ trains with noise, hands over to hard quantization, and freezes the bits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Phase = Literal["noise", "anneal", "hard"]


@dataclass(frozen=True)
class PhaseSchedule:
    """Epoch-based schedule: noise, then ``anneal_epochs`` of hand-over, then ``hard_epochs``.

    During the hand-over the share of layers using hard quantization rises linearly
    from 0 to 1 with training progress (layer by layer, in model order), so that the
    switch from noise to rounding does not hit every layer in the same step.
    """

    max_epochs: int
    hard_epochs: int = 1
    anneal_epochs: int = 0

    def __post_init__(self) -> None:
        if self.hard_epochs < 0 or self.anneal_epochs < 0:
            raise ValueError("hard_epochs and anneal_epochs must be >= 0")
        if self.hard_epochs + self.anneal_epochs > self.max_epochs:
            raise ValueError(
                f"hard_epochs ({self.hard_epochs}) + anneal_epochs ({self.anneal_epochs}) exceed "
                f"max_epochs ({self.max_epochs}); lower them or train for more epochs"
            )

    @property
    def hard_start(self) -> int:
        return self.max_epochs - self.hard_epochs

    @property
    def anneal_start(self) -> int:
        return self.hard_start - self.anneal_epochs

    def phase(self, epoch: int) -> Phase:
        if epoch >= self.hard_start:
            return "hard"
        if epoch >= self.anneal_start:
            return "anneal"
        return "noise"

    def hard_share(self, epoch: int, epoch_progress: float) -> float:
        """Share of layers in hard mode at ``epoch`` plus ``epoch_progress`` (0..1) of it."""
        phase = self.phase(epoch)
        if phase == "hard":
            return 1.0
        if phase == "noise":
            return 0.0
        return min(1.0, (epoch - self.anneal_start + epoch_progress) / self.anneal_epochs)

    @staticmethod
    def hard_layer_count(share: float, num_layers: int) -> int:
        return min(num_layers, math.floor(share * num_layers + 1e-9))
