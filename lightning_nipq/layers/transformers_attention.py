"""Attention's activation products in Hugging Face transformers models (BERT, GPT-2, ViT and their kin).

transformers' attention modules compute ``Q @ K^T`` and ``weights @ V`` inside an attention
function they look up by name, ``config._attn_implementation``, in ``ALL_ATTENTION_FUNCTIONS``
(``"sdpa"`` by default, ``"eager"``...). `use_products` gives such a module its two
`lightning_nipq.layers.ActivationProduct` children (``score_product``, ``value_product``)
and switches the model's configuration to an attention function registered here,
`IMPLEMENTATION`: it multiplies through the module's products where the module has them,
and runs transformers' own ``"sdpa"`` function for every other attention module. Masks are
built as for ``"eager"`` (additive float masks, which both paths take).

This module imports transformers, so nothing imports it up front: `lightning_nipq.layers.attach`
imports it the first time a model holds a transformers attention module and products are asked for.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from lightning_nipq.layers.activation_products import ActivationProduct

#: The name the attention function and its mask function are registered under in transformers.
IMPLEMENTATION = "lightning_nipq_products"
#: The attention function every module without products runs (transformers' own).
FALLBACK = "sdpa"
#: The attribute of a module's score product that keeps the implementation its configuration had before.
_PREVIOUS = "replaced_attention"


def products_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function signature: the products through ``module``'s `ActivationProduct` children, if it has them."""
    score_product = module._modules.get("score_product")
    value_product = module._modules.get("value_product")
    if score_product is None or value_product is None:
        return ALL_ATTENTION_FUNCTIONS[FALLBACK](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key and value head serves several query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = score_product(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True: attend
            scores = scores.masked_fill(~attention_mask[:, :, :, : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = value_product(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _register() -> None:
    if IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(IMPLEMENTATION, products_attention)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def use_products(module: nn.Module) -> None:
    """Give a transformers attention module its two products and switch its configuration to `IMPLEMENTATION`."""
    _register()
    config = module.config
    for name in ("score_product", "value_product"):
        if name not in module._modules:
            module.add_module(name, ActivationProduct())
    # The score product remembers what the configuration ran, for `drop_products` (the configuration may be shared).
    setattr(module.score_product, _PREVIOUS, config._attn_implementation)
    config._attn_implementation = IMPLEMENTATION


def drop_products(module: nn.Module) -> None:
    """Take a transformers attention module's products out, and its configuration back to the attention function it had."""
    previous = getattr(module._modules.get("score_product"), _PREVIOUS, None)
    for name in ("score_product", "value_product"):
        module._modules.pop(name, None)
    config = module.config
    if config._attn_implementation == IMPLEMENTATION:
        config._attn_implementation = previous if previous not in (None, IMPLEMENTATION) else FALLBACK
