"""lightning-nipq: NIPQ (noise proxy-based integrated pseudo-quantization) for PyTorch Lightning.

The public API is what this module exports.
"""

from lightning_nipq.artifact import ArtifactError, artifact_sizes, load_quantized, read_manifest, save_quantized
from lightning_nipq.attach import AttachResult, QuantizerConfig, attach_quantizers, detach_quantizers, quantizers
from lightning_nipq.bit_budget import BitBudget, fit_bits_to_budget, weight_and_act_average_bits
from lightning_nipq.calibration import calibrate_activations
from lightning_nipq.calibration_data import MixupPrompt, load_calibration_images, mixup_class_prompts
from lightning_nipq.checkpoint import CheckpointMismatchError, NIPQCheckpointMixin, load_nipq_checkpoint
from lightning_nipq.callbacks import FlatnessNoise, HardQuantize, LSQCallback, NIPQCallback, RobustQuantization
from lightning_nipq.callbacks.nipq import bit_loss
from lightning_nipq.callbacks.robust_quantization import symmetry_loss
from lightning_nipq.fake_quant import hard_fake_quant, integer_codes, noise_fake_quant, num_levels, round_ste
from lightning_nipq.flatness import FlatnessNoiseHandle, attach_flatness_noise, rounding_noise_std
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
from lightning_nipq.saturation import attach_saturation, fold_saturation
from lightning_nipq.symmetry import symmetry_penalty
from lightning_nipq.synthetic_data import bn_matching_loss, generate_calibration_data

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "AttachResult",
    "BaseQuantizer",
    "BitBudget",
    "CheckpointMismatchError",
    "FlatnessNoise",
    "FlatnessNoiseHandle",
    "HardQuantize",
    "IntegerMismatchError",
    "LSQCallback",
    "LSQConfig",
    "LSQQuantizer",
    "LayerReport",
    "MixupPrompt",
    "NIPQCallback",
    "NIPQCheckpointMixin",
    "NIPQQuantizer",
    "QuantizationReport",
    "QuantizerConfig",
    "RobustQuantization",
    "artifact_sizes",
    "attach_flatness_noise",
    "attach_quantizers",
    "attach_saturation",
    "bit_loss",
    "bn_matching_loss",
    "calibrate_activations",
    "choose_alpha",
    "compare_onnx",
    "convert_to_integer",
    "detach_quantizers",
    "export_onnx",
    "fit_bits_to_budget",
    "fold_saturation",
    "freeze_quantizers",
    "generate_calibration_data",
    "hard_fake_quant",
    "hard_quantize",
    "integer_codes",
    "load_calibration_images",
    "load_nipq_checkpoint",
    "load_quantized",
    "mixup_class_prompts",
    "noise_fake_quant",
    "num_levels",
    "post_training_quantize",
    "quantization_mse",
    "quantizers",
    "read_manifest",
    "recalibrate_batchnorm",
    "round_ste",
    "rounding_noise_std",
    "save_quantized",
    "symmetry_loss",
    "symmetry_penalty",
    "weight_and_act_average_bits",
]
