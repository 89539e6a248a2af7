"""Products of two activations, quantized on both sides: attention's ``Q @ K^T`` and ``weights @ V``.

A layer multiplies an activation by a weight; inside attention two activations multiply
each other, so no layer kind covers them. `ActivationProduct` is the module for such a
product (``torch.matmul(left, right)``), in three forms like a layer's:

* float: `ActivationProduct`, plain ``torch.matmul``;
* fake-quantized: `QuantizedActivationProduct`, an input quantizer on each operand
  (``left_quantizer``, ``right_quantizer``), counted in the input budget like any layer's
  input quantizer;
* integer: `IntegerActivationProduct`, which turns both operands into codes with the
  quantizers' own formula, sums their products exactly (float32 where every partial sum is
  below ``2**24``, else float64) and rescales once by the two steps.

The forms are classes of one family, and a module changes form by changing its class in
place, as layers do. The integer form keeps its settings in two small tensors, ``alphas``
(the two ranges) and ``settings`` (bits, signedness, zero point and element count of each
operand), so a state dict, a checkpoint and the artifact carry it as they carry any buffer.

`lightning_nipq.layers.attention.SplitMultiheadAttention` computes its scores and its
weighted values through two of these (``score_product``, ``value_product``) when
``attach_quantizers(..., quantize_products=True)`` adds them; a model of the user's own can
call an `ActivationProduct` where it multiplies two activations and get the same treatment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_nipq.layers.forms import _INTEGER_ARITHMETIC, check_steps, exact_sum_dtype, input_code_settings, input_codes
from lightning_nipq.quant.base_quantizer import DAMAGED_STATE_FIX, BaseQuantizer
from lightning_nipq.quant.codes import check_bit_width, num_levels
from lightning_nipq.quant.fused_fake_quant import recomputed_outputs
from lightning_nipq.quant.methods import QuantizerFactory

#: The two operands, in the order of ``forward``'s arguments and of the integer form's rows.
SIDES = ("left", "right")
#: Columns of the integer form's ``settings``: one row per operand.
SETTING_COLUMNS = ("bits", "signed", "zero_point", "numel")


class ActivationProduct(nn.Module):
    """``torch.matmul(left, right)`` of two activations, which `attach_quantizers(..., quantize_products=True)` quantizes.

    Put one where a model multiplies two activations (attention's scores and weighted values)
    to have both operands quantized, counted in the input budget, and multiplied as integers
    in the integer model.

    Example:

        ```python
        >>> product = ActivationProduct()
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
        >>> product(q, k.transpose(-2, -1)).shape
        torch.Size([2, 4, 5, 5])
        ```
    """

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return torch.matmul(left, right)


class ProductSide(NamedTuple):
    """How one operand of an integer product becomes codes: its range, bits, sign and zero point."""

    alpha: Tensor
    bits: int
    signed: bool
    zero_point: int
    numel: int

    def codes_and_step(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The centred codes of ``x`` (float tensor of integers) and their step, by the quantizer's own formula."""
        return input_codes(x, self.alpha.to(x.device), self.bits, self.signed, self.zero_point)

    def largest_code(self) -> int:
        """The largest magnitude of a centred code: ``n`` signed, ``N`` unsigned (with or without a zero point)."""
        return num_levels(self.bits, self.signed)


def product_dtype(reduction: int, left: ProductSide, right: ProductSide, device: torch.device) -> torch.dtype:
    """float32 where every partial sum of code products is below ``2**24`` on CPU, else float64 (exact to ``2**53``)."""
    return exact_sum_dtype(reduction * left.largest_code() * right.largest_code(), device)


def integer_product(left: Tensor, right: Tensor, sides: tuple[ProductSide, ProductSide]) -> Tensor:
    """``left @ right`` on codes: each operand to centred codes, the products summed exactly, one rescale."""
    out_dtype = left.dtype if left.is_floating_point() else torch.float32
    codes_l, step_l = sides[0].codes_and_step(left)
    codes_r, step_r = sides[1].codes_and_step(right)
    dtype = product_dtype(left.shape[-1], sides[0], sides[1], left.device)
    return (torch.matmul(codes_l.to(dtype), codes_r.to(dtype)) * (step_l.to(dtype) * step_r.to(dtype))).to(out_dtype)


def _side_of(quantizer: BaseQuantizer) -> ProductSide:
    """The integer side an eval-mode, calibrated input quantizer gives (what `product_to_integer` stores)."""
    bits, alpha, zero = input_code_settings(quantizer)
    return ProductSide(alpha, bits, bool(quantizer.signed), zero, int(quantizer.size))


class QuantizedActivationProduct(ActivationProduct):
    """Fake-quantized form: an input quantizer on each operand, then the float product."""

    left_quantizer: BaseQuantizer
    right_quantizer: BaseQuantizer

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        if _INTEGER_ARITHMETIC.active and not self.training and self.left_quantizer.calibrated and self.right_quantizer.calibrated:
            # What the integer form will compute, to the bit (see `lightning_nipq.layers.forms.integer_arithmetic`).
            with torch.no_grad():
                return integer_product(left, right, (_side_of(self.left_quantizer), _side_of(self.right_quantizer)))
        with recomputed_outputs():
            return torch.matmul(self.left_quantizer(left), self.right_quantizer(right))


class IntegerActivationProduct(ActivationProduct):
    """Integer form: both operands to codes, an exact integer product, one rescale.

    ``alphas`` holds the two ranges (float32) and ``settings`` one row per operand of
    `SETTING_COLUMNS` (int64), both buffers, checked whenever they are loaded.
    """

    alphas: Tensor
    settings: Tensor
    #: ``settings`` as Python integers, kept in step with the buffer: the forward reads these,
    #: so that tracing (torch.export, the ONNX export) sees constants rather than tensor data.
    setting_rows: list[list[int]]

    def sides(self) -> tuple[ProductSide, ProductSide]:
        """The two operands' `ProductSide`."""
        return tuple(  # type: ignore[return-value]
            ProductSide(self.alphas[i], bits, bool(signed), zero, numel)
            for i, (bits, signed, zero, numel) in enumerate(self.setting_rows)
        )

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return integer_product(left, right, self.sides())

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
        # Checked before torch copies anything, so a damaged state never half-loads.
        try:
            check_product_state(state_dict, prefix)
        except ValueError as e:
            raise ValueError(f"{e}. {DAMAGED_STATE_FIX}") from e
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.setting_rows = [[int(v) for v in row] for row in self.settings.tolist()]


def check_product_state(state_dict: Mapping[str, Any], prefix: str) -> None:
    """Raise a `ValueError` naming the key unless the integer product saved under ``prefix`` holds valid ``alphas`` and ``settings``.

    Absent keys are the strict load's to report.
    """
    alphas = state_dict.get(prefix + "alphas")
    if alphas is not None:
        if not isinstance(alphas, Tensor):
            raise ValueError(f"{prefix}alphas must be a tensor, got {type(alphas).__name__}")
        check_steps(alphas, f"{prefix}alphas", (len(SIDES),), positive=True)
    settings = state_dict.get(prefix + "settings")
    if settings is None:
        return
    if not isinstance(settings, Tensor) or settings.dtype != torch.int64 or tuple(settings.shape) != (len(SIDES), len(SETTING_COLUMNS)):
        shown = f"a {settings.dtype} tensor of shape {tuple(settings.shape)}" if isinstance(settings, Tensor) else type(settings).__name__
        raise ValueError(f"{prefix}settings must be an int64 tensor of shape (2, 4), got {shown}")
    for side, (bits, signed, zero, numel) in zip(SIDES, settings.tolist()):
        where = f"{prefix}settings[{side}]"
        if signed not in (0, 1):
            raise ValueError(f"{where}: signed must be 0 or 1, got {signed}")
        check_bit_width(f"{where} bits", bits, signed=bool(signed))
        if zero and (signed or not 0 < zero < num_levels(bits, False)):
            raise ValueError(f"{where}: zero point {zero} does not fit {bits}-bit {'signed' if signed else 'unsigned'} codes")
        if zero < 0 or numel < 0:
            raise ValueError(f"{where}: the zero point and the element count must be >= 0, got {zero} and {numel}")


# ---------------------------------------------------------------------- moving between forms
def is_product(module: nn.Module) -> bool:
    """Whether ``module`` is an `ActivationProduct` in any of its forms."""
    return isinstance(module, ActivationProduct)


def is_quantized_product(module: nn.Module) -> bool:
    """Whether ``module`` is an `ActivationProduct` in its fake-quantized form."""
    return type(module) is QuantizedActivationProduct


def is_integer_product(module: nn.Module) -> bool:
    """Whether ``module`` is an `ActivationProduct` in its integer form."""
    return type(module) is IntegerActivationProduct


def quantize_product(product: nn.Module, config: QuantizerFactory) -> None:
    """Give a float `ActivationProduct` an input quantizer on each operand, built by ``config``."""
    if type(product) is not ActivationProduct:
        raise TypeError(f"{type(product).__name__} is not a float ActivationProduct")
    install_product_quantizers(product, config.input_quantizer(), config.input_quantizer())


def install_product_quantizers(product: nn.Module, left: BaseQuantizer, right: BaseQuantizer) -> None:
    """Turn a float `ActivationProduct` into its fake-quantized form with the given quantizers."""
    if type(product) is not ActivationProduct:
        raise TypeError(f"{type(product).__name__} is not a float ActivationProduct")
    product.__class__ = QuantizedActivationProduct
    product.left_quantizer = left
    product.right_quantizer = right


def product_to_integer(product: nn.Module) -> None:
    """Turn a fake-quantized product into its integer form, from its eval-mode quantizers.

    Raises:
        ValueError: an operand's quantizer has never been calibrated (it has no range).
    """
    if type(product) is not QuantizedActivationProduct:
        raise TypeError(f"{type(product).__name__} is not a fake-quantized ActivationProduct")
    for side in SIDES:
        if not getattr(product, f"{side}_quantizer").calibrated:
            raise ValueError(f"the {side} operand's quantizer was never calibrated: run the model on data before converting")
    with torch.no_grad():
        sides = [_side_of(getattr(product, f"{side}_quantizer")) for side in SIDES]
    device = sides[0].alpha.device
    del product.left_quantizer
    del product.right_quantizer
    product.__class__ = IntegerActivationProduct
    set_integer_product_state(product, sides, device)


def set_integer_product_state(product: nn.Module, sides: list[ProductSide], device: torch.device) -> None:
    """Give an integer product its two buffers from the operands' `ProductSide`."""
    product.register_buffer("alphas", torch.stack([s.alpha.to(device=device, dtype=torch.float32) for s in sides]))
    rows = [[s.bits, int(s.signed), s.zero_point, s.numel] for s in sides]
    product.register_buffer("settings", torch.tensor(rows, dtype=torch.int64, device=device))
    product.setting_rows = rows


def empty_integer_product(product: nn.Module) -> None:
    """Turn a float `ActivationProduct` into an integer one with placeholder state, for loading a saved one into."""
    if type(product) is not ActivationProduct:
        raise TypeError(f"{type(product).__name__} is not a float ActivationProduct")
    product.__class__ = IntegerActivationProduct
    placeholder = ProductSide(torch.ones(()), 8, True, 0, 0)
    set_integer_product_state(product, [placeholder, placeholder], torch.device("cpu"))


def product_to_float(product: nn.Module) -> None:
    """Turn a product in any form back into the float `ActivationProduct` (quantizers or integer state dropped)."""
    if type(product) is QuantizedActivationProduct:
        del product.left_quantizer
        del product.right_quantizer
    elif type(product) is IntegerActivationProduct:
        del product.alphas
        del product.settings
        del product.setting_rows
    elif type(product) is not ActivationProduct:
        raise TypeError(f"{type(product).__name__} is not an ActivationProduct")
    product.__class__ = ActivationProduct
