"""The Lightning callbacks: the thin glue around the plain-torch quantization code."""

from lightning_nipq.callbacks.flatness_noise import FlatnessNoise
from lightning_nipq.callbacks.hard_quantize import HardQuantize
from lightning_nipq.callbacks.lsq import LSQCallback
from lightning_nipq.callbacks.nipq import NIPQCallback, bit_loss
from lightning_nipq.callbacks.quantization_aware import QuantizationAwareTraining
from lightning_nipq.callbacks.robust_quantization import RobustQuantization, symmetry_loss

__all__ = [
    "FlatnessNoise",
    "HardQuantize",
    "LSQCallback",
    "NIPQCallback",
    "QuantizationAwareTraining",
    "RobustQuantization",
    "bit_loss",
    "symmetry_loss",
]
