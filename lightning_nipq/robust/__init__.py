"""Float training that leaves a model easier to quantize: SymReg, SatNL and flatness noise. Plain torch."""

from lightning_nipq.robust.flatness import FlatnessNoiseHandle, attach_flatness_noise, rounding_noise_std
from lightning_nipq.robust.saturation import attach_saturation, fold_saturation
from lightning_nipq.robust.symmetry import symmetry_penalty

__all__ = [
    "FlatnessNoiseHandle",
    "attach_flatness_noise",
    "attach_saturation",
    "fold_saturation",
    "rounding_noise_std",
    "symmetry_penalty",
]
