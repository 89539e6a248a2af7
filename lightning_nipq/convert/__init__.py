"""From a fake-quantized model to a validated integer model: freezing, BatchNorm re-estimation,
conversion (folding BatchNorm if asked), comparison and the layer check, the report and its rendering. Plain torch."""

from lightning_nipq.convert.batchnorm_folding import fold_batchnorms
from lightning_nipq.convert.comparison import IntegerMismatchError, check_report, compare_outputs
from lightning_nipq.convert.report import LayerReport, QuantizationReport
from lightning_nipq.convert.report_rendering import print_report, save_bit_allocation_figure
from lightning_nipq.convert.steps import (
    convert_and_compare,
    convert_to_integer,
    freeze_quantizers,
    hard_quantize,
    recalibrate_batchnorm,
)

__all__ = [
    "IntegerMismatchError",
    "LayerReport",
    "QuantizationReport",
    "check_report",
    "compare_outputs",
    "convert_and_compare",
    "convert_to_integer",
    "fold_batchnorms",
    "freeze_quantizers",
    "hard_quantize",
    "print_report",
    "recalibrate_batchnorm",
    "save_bit_allocation_figure",
]
