"""The NIPQ training rules without Lightning: the bit budget and the fit of whole bits, the phase
schedule, quantizer optimizer groups, distillation, per-layer metrics, and the compiled step's
partitioner."""

from lightning_nipq.training.bit_budget import BitBudget, fit_bits_to_budget, fit_bops_to_budget, weight_and_act_average_bits
from lightning_nipq.training.bit_sensitivity import BitSensitivity
from lightning_nipq.training.distillation import Distiller, distillation_loss
from lightning_nipq.training.layer_metrics import per_layer_metrics
from lightning_nipq.training.mask_recomputation import MaskRecomputingPartitioner
from lightning_nipq.training.param_groups import split_quantizer_params
from lightning_nipq.training.phase_schedule import PhaseSchedule

__all__ = [
    "BitBudget",
    "BitSensitivity",
    "Distiller",
    "MaskRecomputingPartitioner",
    "PhaseSchedule",
    "distillation_loss",
    "fit_bits_to_budget",
    "fit_bops_to_budget",
    "per_layer_metrics",
    "split_quantizer_params",
    "weight_and_act_average_bits",
]
