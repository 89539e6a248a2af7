"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` layers, so that the registry quantizes them.

``nn.MultiheadAttention`` multiplies its packed ``in_proj_weight`` (or ``q/k/v_proj_weight``
when ``kdim``/``vdim`` differ) and ``out_proj.weight`` inside
``F.multi_head_attention_forward``; no layer's forward runs, so nothing can quantize them
where they are. `split_attention` rewrites each ``nn.MultiheadAttention`` of a model, in
place, into a `SplitMultiheadAttention`: the same module (a subclass, with the same
attributes, call signature and outputs) whose query, key and value projections are the
``nn.Linear`` layers ``q_proj``, ``k_proj`` and ``v_proj`` and whose ``out_proj`` is a
plain ``nn.Linear``. Those four are ordinary layers to `attach_quantizers`, the integer
conversion, checkpoints, the artifact and the ONNX export; each has its own input quantizer
(query, key and value may be different tensors) and per-channel ranges of its own.

Its state dict keeps ``nn.MultiheadAttention``'s keys for the float weights
(``in_proj_weight``, ``in_proj_bias``, or ``q_proj_weight``...), so float checkpoints of the
user's model load into it and its float weights save as before; the quantizers' and the
integer layers' entries live under ``q_proj.`` and the like.

Torch's fused fast paths (``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` in
eval) read the packed weights and skip every layer's forward: `disable_transformer_fast_path`
in `lightning_nipq.layers.attach` turns them off for transformer layers holding a split
attention or any quantized layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.layers.activation_products import ActivationProduct

#: The projections of a `SplitMultiheadAttention`, in the order of the packed weight's rows.
INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
PROJECTIONS = (*INPUT_PROJECTIONS, "out_proj")
#: The activation products a `SplitMultiheadAttention` may compute through (`SplitMultiheadAttention.add_products`).
PRODUCTS = ("score_product", "value_product")


def _additive_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask (True: do not attend) as ``-inf``/``0`` of ``dtype``; a float mask as it is (added to the scores)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


def separate_projection_keys(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Rewrite, in place, ``nn.MultiheadAttention``'s keys under ``prefix`` (``in_proj_weight``, ``in_proj_bias``,
    ``q_proj_weight``...) into those of the split projections (``q_proj.weight``...); returns what could not be split.
    """
    problems = []
    packed = state.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        if not isinstance(packed, Tensor) or packed.dim() != 2 or packed.shape[0] % 3:
            problems.append(f"{prefix}in_proj_weight is not a (3 * embed_dim, embed_dim) tensor")
        else:
            state.update({prefix + f"{name}.weight": rows for name, rows in zip(INPUT_PROJECTIONS, packed.chunk(3))})
    for name in INPUT_PROJECTIONS:
        if prefix + f"{name}_weight" in state:
            state[prefix + f"{name}.weight"] = state.pop(prefix + f"{name}_weight")
    bias = state.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] % 3:
            problems.append(f"{prefix}in_proj_bias is not a (3 * embed_dim,) tensor")
        else:
            state.update({prefix + f"{name}.bias": part for name, part in zip(INPUT_PROJECTIONS, bias.chunk(3))})
    return problems


def separate_all_projection_keys(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a state dict of ``model``) with every split attention's torch keys rewritten as its projections' keys."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, SplitMultiheadAttention):
            separate_projection_keys(state, f"{name}." if name else "")
    return state


def _linear_copy(weight: Tensor, bias: Optional[Tensor], training: bool) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias`` (their device, dtype and ``requires_grad``)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)
    return layer.train(training)


class SplitMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computing its projections with the ``nn.Linear`` layers ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

    Made from an ``nn.MultiheadAttention`` by `from_attention` (or `split_attention` on a
    whole model), sharing nothing with it afterwards. Every argument of ``forward`` behaves as
    in torch (``batch_first``, unbatched inputs, ``key_padding_mask``, ``attn_mask``,
    ``is_causal``, ``need_weights``, ``average_attn_weights``, ``add_bias_kv``,
    ``add_zero_attn``, ``dropout``); in float it equals the module it was made from, apart
    from the padded positions of torch's nested-tensor fast path, which is not taken.

    Example:

        ```python
        >>> attention = nn.MultiheadAttention(16, 4, batch_first=True)
        >>> split = SplitMultiheadAttention.from_attention(attention)
        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(split(x, x, x)[0], attention(x, x, x)[0], atol=1e-6)
        True
        >>> sorted(split.state_dict()) == sorted(attention.state_dict())
        True
        ```
    """

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """A split copy of ``attention`` (its own Parameters, copies of the original values)."""
        split = cls.__new__(cls)
        nn.Module.__init__(split)
        for name in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim", "_qkv_same_embed_dim"):
            setattr(split, name, getattr(attention, name))
        split.training = attention.training
        weight = attention.in_proj_weight
        bias = attention.in_proj_bias
        sources = (
            weight.chunk(3)
            if attention._qkv_same_embed_dim
            else (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        )
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        for name, w, b in zip(INPUT_PROJECTIONS, sources, biases):
            setattr(split, name, _linear_copy(w, b, attention.training))
        out = attention.out_proj
        split.out_proj = _linear_copy(out.weight, out.bias, out.training)
        split.bias_k = None if attention.bias_k is None else nn.Parameter(attention.bias_k.detach().clone())
        split.bias_v = None if attention.bias_v is None else nn.Parameter(attention.bias_v.detach().clone())
        split.add_zero_attn = attention.add_zero_attn
        return split

    # ------------------------------------------------------------------ nn.MultiheadAttention's float attributes
    def _float_weights(self) -> Optional[list[Tensor]]:
        weights = [getattr(getattr(self, name), "weight", None) for name in INPUT_PROJECTIONS]
        return weights if all(isinstance(w, Tensor) for w in weights) else None

    @property
    def in_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        """The packed ``(3 * embed_dim, embed_dim)`` weight, as ``nn.MultiheadAttention`` has it (None with separate projection weights)."""
        weights = self._float_weights()
        if not self._qkv_same_embed_dim:
            return None
        if weights is None:
            raise AttributeError("the projections are integer layers, which hold codes rather than a float weight")
        return torch.cat(weights)

    @property
    def in_proj_bias(self) -> Optional[Tensor]:  # type: ignore[override]
        biases = [getattr(self, name).bias for name in INPUT_PROJECTIONS]
        return None if any(b is None for b in biases) else torch.cat(biases)

    @property
    def q_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    # ------------------------------------------------------------------ state dict: nn.MultiheadAttention's keys
    def _plain_projections(self) -> bool:
        # Only float projections save under torch's keys: quantized and integer ones have entries of their own.
        return all(type(getattr(self, name)) is nn.Linear for name in INPUT_PROJECTIONS)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:  # type: ignore[override]
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            return super().state_dict(*args)
        out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._plain_projections():
            weights = [out.pop(prefix + f"{name}.weight") for name in INPUT_PROJECTIONS]
            if self._qkv_same_embed_dim:
                out[prefix + "in_proj_weight"] = torch.cat([w.detach() for w in weights])
            else:
                out.update({prefix + f"{name}_weight": w for name, w in zip(INPUT_PROJECTIONS, weights)})
            biases = [prefix + f"{name}.bias" for name in INPUT_PROJECTIONS]
            if all(key in out for key in biases):
                out[prefix + "in_proj_bias"] = torch.cat([out.pop(key).detach() for key in biases])
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Runs before the projections load theirs: hand them their rows of torch's keys.
        error_msgs.extend(separate_projection_keys(state_dict, prefix))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ activation products
    def add_products(self) -> None:
        """Compute the scores and the weighted values through two `ActivationProduct` modules, ``score_product`` and ``value_product``.

        Their operands are the scaled queries and the keys, then the attention weights (after
        dropout) and the values; `attach_quantizers(..., quantize_products=True)` quantizes
        them. The explicit softmax path is taken then (torch's fused attention kernel would
        multiply float operands).
        """
        for name in PRODUCTS:
            if name not in self._modules:
                setattr(self, name, ActivationProduct())

    def remove_products(self) -> None:
        """Take the two products out again (float maths through torch's kernels)."""
        for name in PRODUCTS:
            self._modules.pop(name, None)

    def products(self) -> Optional[tuple[nn.Module, nn.Module]]:
        """``(score_product, value_product)``, or None if the attention has none."""
        found = [self._modules.get(name) for name in PRODUCTS]
        return None if found[0] is None or found[1] is None else (found[0], found[1])

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if batched and self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, batch, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"query has {embed_dim} features, the attention expects embed_dim={self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key's sequence and batch sizes {tuple(key.shape[:2])} differ from value's {tuple(value.shape[:2])}")
        dtype = query.dtype
        key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        products = self.products()
        causal_kernel = is_causal and key_padding_mask is None and not need_weights
        if causal_kernel:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
        else:
            attn_mask = _additive_mask(attn_mask, "attn_mask", dtype)
            if key_padding_mask is not None:
                is_causal = False

        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)

        heads, head_dim = self.num_heads, self.head_dim
        if attn_mask is not None:
            src_len = key.shape[0]
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (batch * heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(batch * heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, batch, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

        q = q.reshape(tgt_len, batch * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], batch * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], batch * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((batch * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros.to(v.dtype)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, src_len):
                raise RuntimeError(f"expected key_padding_mask of shape {(batch, src_len)}, got {tuple(key_padding_mask.shape)}")
            padding = key_padding_mask.view(batch, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(batch * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        if need_weights or products is not None:
            score_product, value_product = products if products is not None else (torch.bmm, torch.bmm)
            if causal_kernel:
                # The mask torch's kernel builds for the hint (aligned top left, after bias_k and the zero key).
                attn_mask = _additive_mask(torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).tril().logical_not(), "", dtype)
            scores = score_product(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = value_product(weights, v).transpose(0, 1).reshape(tgt_len * batch, embed_dim)
            attn_weights: Optional[Tensor] = weights.view(batch, heads, tgt_len, src_len) if need_weights else None
            if attn_weights is not None and average_attn_weights:
                attn_weights = attn_weights.mean(dim=1)  # type: ignore[union-attr]
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(batch, heads, -1, src_len)
            out = F.scaled_dot_product_attention(
                q.view(batch, heads, tgt_len, head_dim),
                k.view(batch, heads, src_len, head_dim),
                v.view(batch, heads, src_len, head_dim),
                attn_mask,
                dropout_p,
                is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(tgt_len * batch, embed_dim)
            attn_weights = None
        out = self.out_proj(out).view(tgt_len, batch, -1)
        if not batched:
            out = out.squeeze(1)
            if attn_weights is not None:
                attn_weights = attn_weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, attn_weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def attention_modules(model: nn.Module) -> list[str]:
    """The names of the ``nn.MultiheadAttention`` modules of ``model`` (exactly that class: a subclass may override ``forward``), each once."""
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if type(module) is nn.MultiheadAttention and id(module) not in seen:
            seen.add(id(module))
            found.append(name)
    return found


def attention_in_state(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """The ``nn.MultiheadAttention`` modules of ``model`` that a state dict (or artifact) with ``keys`` holds split.

    A split attention saves its float weights under torch's keys, so only quantizer or
    integer entries under a projection, or any entry under ``q_proj``, ``k_proj`` or ``v_proj``,
    tell it apart, as do the entries of its activation products.
    """
    keys = list(keys)
    found = []
    for name in attention_modules(model):
        if not name:
            continue
        inputs = tuple(f"{name}.{p}." for p in INPUT_PROJECTIONS)
        plain_out = (f"{name}.out_proj.weight", f"{name}.out_proj.bias")
        products = tuple(f"{name}.{p}." for p in PRODUCTS)
        if any(k.startswith(inputs + products) or (k.startswith(f"{name}.out_proj.") and k not in plain_out) for k in keys):
            found.append(name)
    return found


def split_attention_undoably(model: nn.Module, names: Optional[Sequence[str]] = None) -> Callable[[], None]:
    """`split_attention`, returning a function that puts the original modules back."""
    names = attention_modules(model) if names is None else list(names)
    if "" in names:
        raise ValueError(
            "the model is an nn.MultiheadAttention itself; wrap it in a module (nn.Sequential or your own) so that "
            "its projections can be quantized"
        )
    originals = {id(model.get_submodule(name)) for name in names}
    splits: dict[int, SplitMultiheadAttention] = {}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # every name: named_children drops aliases
            if id(child) in originals:
                assert isinstance(child, nn.MultiheadAttention)
                if id(child) not in splits:
                    splits[id(child)] = SplitMultiheadAttention.from_attention(child)
                setattr(parent, child_name, splits[id(child)])
                replaced.append((parent, child_name, child))

    def undo() -> None:
        for parent, child_name, child in reversed(replaced):
            setattr(parent, child_name, child)

    return undo


def split_attention(model: nn.Module, names: Optional[Sequence[str]] = None) -> list[str]:
    """Replace each ``nn.MultiheadAttention`` of ``model`` (or those in ``names``) by its `SplitMultiheadAttention`, in place; returns their names.

    `attach_quantizers` does this itself (for the attention modules whose projections it
    quantizes), as do checkpoint and artifact loading; call it yourself only to work on the
    split modules before. A subclass of ``nn.MultiheadAttention`` is left alone (it may
    override ``forward``); a module reachable under several names is replaced under each.
    Split before making an optimizer from the model's parameters: the projections get
    Parameters of their own.

    Raises:
        ValueError: ``model`` itself is an ``nn.MultiheadAttention`` (nothing to put the split one into).
    """
    names = attention_modules(model) if names is None else list(names)
    split_attention_undoably(model, names)
    return names
