"""lightning-nipq: NIPQ (noise proxy-based integrated pseudo-quantization) for PyTorch Lightning.

The public API is what this module exports: the callbacks, the quantizers and their
configurations, the functions that quantize, convert, save and export, the report and the
error types. Everything else is importable from the subpackage that defines it:

* `lightning_nipq.quant`: the quantization maths and the quantizer modules;
* `lightning_nipq.layers`: the layer kinds and their forms, attaching, calibration, PTQ;
* `lightning_nipq.training`: the bit budget, the phase schedule and the other training rules;
* `lightning_nipq.convert`: freezing, BatchNorm re-estimation, conversion, comparison, the report;
* `lightning_nipq.saving`: checkpoints, the integer artifact, ONNX;
* `lightning_nipq.robust` and `lightning_nipq.data`: robust float training and calibration data;
* `lightning_nipq.callbacks`: the Lightning glue.
"""

from lightning_nipq.callbacks import FlatnessNoise, HardQuantize, LSQCallback, NIPQCallback, RobustQuantization
from lightning_nipq.convert import IntegerMismatchError, QuantizationReport, hard_quantize
from lightning_nipq.layers import attach_quantizers, post_training_quantize
from lightning_nipq.quant import LSQConfig, LSQQuantizer, NIPQConfig, NIPQQuantizer
from lightning_nipq.saving import (
    ArtifactError,
    CheckpointMismatchError,
    NIPQCheckpointMixin,
    export_onnx,
    load_nipq_checkpoint,
    load_quantized,
    save_quantized,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "CheckpointMismatchError",
    "FlatnessNoise",
    "HardQuantize",
    "IntegerMismatchError",
    "LSQCallback",
    "LSQConfig",
    "LSQQuantizer",
    "NIPQCallback",
    "NIPQCheckpointMixin",
    "NIPQConfig",
    "NIPQQuantizer",
    "QuantizationReport",
    "RobustQuantization",
    "attach_quantizers",
    "export_onnx",
    "hard_quantize",
    "load_nipq_checkpoint",
    "load_quantized",
    "post_training_quantize",
    "save_quantized",
]
