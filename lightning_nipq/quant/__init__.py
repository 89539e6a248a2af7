"""The quantization maths and the quantizer modules: plain torch, no layers and no Lightning."""

from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.quant.codes import MAX_BITS, MIN_BITS, MIN_SIGNED_BITS, num_levels
from lightning_nipq.quant.fake_quant import hard_fake_quant, integer_codes, noise_fake_quant, round_ste
from lightning_nipq.quant.fused_fake_quant import kept_fake_quant_outputs
from lightning_nipq.quant.granularity import check_granularity, grouped_view, range_shape_for
from lightning_nipq.quant.lsq_quantizer import LSQConfig, LSQQuantizer
from lightning_nipq.quant.methods import QUANTIZER_METHODS, QuantizerFactory, quantizer_from_state
from lightning_nipq.quant.nipq_quantizer import NIPQConfig, NIPQQuantizer
from lightning_nipq.quant.noise import counter_noise, counter_uniform_noise
from lightning_nipq.quant.observers import RangeObserver
from lightning_nipq.quant.range_search import choose_alpha, quantization_mse, weight_ranges

__all__ = [
    "BaseQuantizer",
    "LSQConfig",
    "LSQQuantizer",
    "MAX_BITS",
    "MIN_BITS",
    "MIN_SIGNED_BITS",
    "NIPQConfig",
    "NIPQQuantizer",
    "QUANTIZER_METHODS",
    "QuantizerFactory",
    "RangeObserver",
    "check_granularity",
    "choose_alpha",
    "counter_noise",
    "counter_uniform_noise",
    "grouped_view",
    "hard_fake_quant",
    "integer_codes",
    "kept_fake_quant_outputs",
    "noise_fake_quant",
    "num_levels",
    "quantization_mse",
    "quantizer_from_state",
    "range_shape_for",
    "round_ste",
    "weight_ranges",
]
