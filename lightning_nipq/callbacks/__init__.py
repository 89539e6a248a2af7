"""The Lightning callbacks: the thin glue around the plain-torch quantization code."""

from lightning_nipq.callbacks.hard_quantize import HardQuantize
from lightning_nipq.callbacks.lsq import LSQCallback
from lightning_nipq.callbacks.nipq import NIPQCallback

__all__ = ["HardQuantize", "LSQCallback", "NIPQCallback"]
