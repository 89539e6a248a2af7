"""lightning-nipq: NIPQ (noise proxy-based integrated pseudo-quantization) for PyTorch Lightning.

The public API is what this module exports.
"""

from lightning_nipq.artifact import ArtifactError, artifact_sizes, load_quantized, read_manifest, save_quantized
from lightning_nipq.attach import AttachResult, QuantizerConfig, attach_quantizers, detach_quantizers, quantizers
from lightning_nipq.bit_budget import BitBudget, fit_bits_to_budget, weight_and_act_average_bits
from lightning_nipq.calibration import calibrate_activations
from lightning_nipq.checkpoint import CheckpointMismatchError, NIPQCheckpointMixin, load_nipq_checkpoint
from lightning_nipq.callbacks import HardQuantize, LSQCallback, NIPQCallback
from lightning_nipq.callbacks.nipq import bit_loss
from lightning_nipq.fake_quant import hard_fake_quant, integer_codes, noise_fake_quant, num_levels, round_ste
from lightning_nipq.hard_quantize import (
    IntegerMismatchError,
    convert_to_integer,
    freeze_quantizers,
    hard_quantize,
    recalibrate_batchnorm,
)
from lightning_nipq.lsq import LSQConfig, LSQQuantizer
from lightning_nipq.onnx_export import compare_onnx, export_onnx
from lightning_nipq.ptq import choose_alpha, post_training_quantize, quantization_mse
from lightning_nipq.quantizer import NIPQQuantizer
from lightning_nipq.quantizer_base import BaseQuantizer
from lightning_nipq.report import LayerReport, QuantizationReport

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "AttachResult",
    "BaseQuantizer",
    "BitBudget",
    "CheckpointMismatchError",
    "HardQuantize",
    "IntegerMismatchError",
    "LSQCallback",
    "LSQConfig",
    "LSQQuantizer",
    "LayerReport",
    "NIPQCallback",
    "NIPQCheckpointMixin",
    "NIPQQuantizer",
    "QuantizationReport",
    "QuantizerConfig",
    "artifact_sizes",
    "attach_quantizers",
    "bit_loss",
    "calibrate_activations",
    "choose_alpha",
    "compare_onnx",
    "convert_to_integer",
    "detach_quantizers",
    "export_onnx",
    "fit_bits_to_budget",
    "freeze_quantizers",
    "hard_fake_quant",
    "hard_quantize",
    "integer_codes",
    "load_nipq_checkpoint",
    "load_quantized",
    "noise_fake_quant",
    "num_levels",
    "post_training_quantize",
    "quantization_mse",
    "quantizers",
    "read_manifest",
    "recalibrate_batchnorm",
    "round_ste",
    "save_quantized",
    "weight_and_act_average_bits",
]
