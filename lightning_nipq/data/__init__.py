"""Calibration data without the training data: batches synthesised from BatchNorm statistics, and
externally generated images loaded safely. Plain torch."""

from lightning_nipq.data.calibration_images import MixupPrompt, as_batches, load_calibration_images, mixup_class_prompts
from lightning_nipq.data.synthetic import bn_matching_loss, generate_calibration_data

__all__ = [
    "MixupPrompt",
    "as_batches",
    "bn_matching_loss",
    "generate_calibration_data",
    "load_calibration_images",
    "mixup_class_prompts",
]
