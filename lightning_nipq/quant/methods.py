"""The quantizer methods by name, rebuilding a quantizer from its saved state, and what a method's config provides."""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Protocol

from torch import Tensor

from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.quant.granularity import Granularity, RangeShape
from lightning_nipq.quant.lsq_quantizer import LSQQuantizer
from lightning_nipq.quant.nipq_quantizer import NIPQQuantizer

QUANTIZER_METHODS: dict[str, type[BaseQuantizer]] = {cls.kind: cls for cls in (NIPQQuantizer, LSQQuantizer)}
"""Every quantizer method, by the name saved with its state (``BaseQuantizer.kind``)."""


class QuantizerFactory(Protocol):
    """What attaching quantizers needs of a method's config (`NIPQConfig`, `LSQConfig`)."""

    #: The method of the quantizers it builds (a key of `QUANTIZER_METHODS`).
    method: ClassVar[str]

    #: ``"tensor"``, ``"channel"`` or a group size: how many ranges each weight gets.
    weight_granularity: Granularity

    #: ``"off"`` or ``"auto"``: whether calibration may give inputs a zero point (`lightning_nipq.quant.codes.ZERO_POINT_RULES`).
    input_zero_point: str

    def weight_quantizer(self, weight: Tensor, range_shape: RangeShape = ()) -> BaseQuantizer:
        """A calibrated, signed quantizer with ranges of ``range_shape`` (from the layer's kind) that suit ``weight``."""
        ...

    def input_quantizer(self) -> BaseQuantizer:
        """An uncalibrated quantizer: calibration gives it its range and sign."""
        ...

    def difference(self, quantizer: BaseQuantizer, role: str) -> Optional[str]:
        """What a quantizer already on the model (``role``: ``"weight"`` or ``"input"``) has that
        this config would build otherwise and that cannot be changed, or None."""
        ...

    def adopt(self, quantizer: BaseQuantizer, role: str) -> None:
        """Give a quantizer already on the model (one with no `difference`) this config's changeable settings."""
        ...


def quantizer_from_state(state: Any) -> BaseQuantizer:
    """A quantizer of the method and settings of a saved ``_extra_state``, with that state loaded.

    Its parameters keep their initial values until the rest of the state dict is loaded.

    Raises:
        ValueError: the state names no known method, or its settings are invalid.
    """
    kind = state.get("kind") if isinstance(state, dict) else None
    cls = QUANTIZER_METHODS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"the saved quantizer state names the method {kind!r}; known: {sorted(QUANTIZER_METHODS)}")
    config, _ = cls.check_state(state)
    quantizer = cls(**config)
    quantizer.set_extra_state(state)
    return quantizer
