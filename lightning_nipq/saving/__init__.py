"""Saving and loading quantized models: Lightning checkpoints in any state, the bit-packed integer
artifact, and the ONNX export (which needs the ``onnx`` extra only when called)."""

from lightning_nipq.saving.artifact import ArtifactError, artifact_sizes, load_quantized, read_manifest, save_quantized
from lightning_nipq.saving.checkpoint import (
    CheckpointMismatchError,
    NIPQCheckpointMixin,
    load_nipq_checkpoint,
    prepare_for_state_dict,
    quantization_state_digest,
    read_checkpoint,
)
from lightning_nipq.saving.onnx_export import compare_onnx, export_form, export_onnx, onnx_session

__all__ = [
    "ArtifactError",
    "CheckpointMismatchError",
    "NIPQCheckpointMixin",
    "artifact_sizes",
    "compare_onnx",
    "export_form",
    "export_onnx",
    "load_nipq_checkpoint",
    "load_quantized",
    "onnx_session",
    "prepare_for_state_dict",
    "quantization_state_digest",
    "read_checkpoint",
    "read_manifest",
    "save_quantized",
]
