"""The Lightning callbacks: the thin glue around the plain-torch quantization code."""

from lightning_nipq.callbacks.flatness import FlatnessNoise
from lightning_nipq.callbacks.hard_quantize import HardQuantize
from lightning_nipq.callbacks.lsq import LSQCallback
from lightning_nipq.callbacks.nipq import NIPQCallback
from lightning_nipq.callbacks.robust_quantization import RobustQuantization

__all__ = ["FlatnessNoise", "HardQuantize", "LSQCallback", "NIPQCallback", "RobustQuantization"]
