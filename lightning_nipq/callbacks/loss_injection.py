"""Adding a callback's term to the loss a LightningModule's ``training_step`` returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def add_to_loss(output: Any, extra: Tensor, who: str) -> Any:
    """``output`` with ``extra`` added to its loss: a tensor, or a mapping's ``"loss"`` (copied, not mutated).

    ``None`` (a skipped step) passes through unchanged.
    """
    if output is None:
        return output
    if isinstance(output, Tensor):
        return output + extra
    if isinstance(output, Mapping) and "loss" in output:
        output = dict(output)
        output["loss"] = output["loss"] + extra
        return output
    raise TypeError(
        f"{who} adds its loss to what training_step returns, which must be a tensor or a dict with a 'loss' key, "
        f"got {type(output).__name__}"
    )
