"""The layers of a quantized model: the registry of layer kinds and their fake-quantized and integer
forms, walking a model, attaching quantizers, calibration and post-training quantization. Plain torch
(transformers' ``Conv1D`` kind is registered, and transformers imported, only for a model that holds one)."""

from lightning_nipq.layers.activation_products import (
    ActivationProduct,
    IntegerActivationProduct,
    QuantizedActivationProduct,
)
from lightning_nipq.layers.attach import AttachResult, attach_quantizers, detach_quantizers
from lightning_nipq.layers.attention import SplitMultiheadAttention, split_attention
from lightning_nipq.layers.calibration import calibrate_activations
from lightning_nipq.layers.folded_batchnorm import FoldedBatchNorm
from lightning_nipq.layers.forms import (
    IntegerLayerMixin,
    LayerKind,
    QuantizedLayerMixin,
    integer_arithmetic,
    is_integer,
    is_quantized,
)
from lightning_nipq.layers.layer_kinds import (
    LAYER_KINDS,
    describe_layer,
    kind_of,
    register_layer_kind,
    unregister_layer_kind,
)
from lightning_nipq.layers.learned_tensors import LearnedTensor
from lightning_nipq.layers.model_calls import call_model, default_input_fn, first_tensor
from lightning_nipq.layers.model_walk import (
    integer_layers,
    integer_products,
    plan_layers,
    quantized_layers,
    quantized_products,
    quantizers,
)
from lightning_nipq.layers.post_training import post_training_quantize

__all__ = [
    "ActivationProduct",
    "AttachResult",
    "FoldedBatchNorm",
    "IntegerActivationProduct",
    "IntegerLayerMixin",
    "LAYER_KINDS",
    "LayerKind",
    "LearnedTensor",
    "QuantizedActivationProduct",
    "QuantizedLayerMixin",
    "SplitMultiheadAttention",
    "attach_quantizers",
    "calibrate_activations",
    "call_model",
    "default_input_fn",
    "describe_layer",
    "detach_quantizers",
    "first_tensor",
    "integer_arithmetic",
    "integer_layers",
    "integer_products",
    "is_integer",
    "is_quantized",
    "kind_of",
    "plan_layers",
    "post_training_quantize",
    "quantized_layers",
    "quantized_products",
    "quantizers",
    "register_layer_kind",
    "split_attention",
    "unregister_layer_kind",
]
