"""Comparing the integer model with the fake-quantized one, and the tolerances it must meet."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_nipq.convert.layer_check import LAYER_REL_TOLERANCE
from lightning_nipq.convert.report import QuantizationReport


class IntegerMismatchError(RuntimeError):
    """The integer model disagrees with the fake-quantized model beyond the tolerance."""


def check_tolerances(min_agreement: float, max_rel_diff: float) -> None:
    """Raise a `ValueError` unless ``0 <= min_agreement <= 1`` and ``max_rel_diff > 0`` (NaN fails both)."""
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be a number in [0, 1], got {min_agreement!r}")
    if isinstance(max_rel_diff, bool) or not isinstance(max_rel_diff, (int, float)) or not max_rel_diff > 0:
        raise ValueError(f"max_rel_diff must be a number > 0, got {max_rel_diff!r}")


def _sample_diffs(ref: Tensor, out: Tensor) -> Tensor:
    """Each sample's max ``|diff|``, infinite where either side is not finite: NaN must fail every check."""
    diff = (ref - out).abs().reshape(ref.shape[0], -1) if ref.dim() else (ref - out).abs().reshape(1, 1)
    broken = ~(torch.isfinite(ref) & torch.isfinite(out)).reshape(diff.shape)
    return diff.masked_fill(broken, float("inf")).amax(dim=1)


def compare_outputs(reference: list[Tensor], candidate: list[Tensor]) -> tuple[Optional[float], float, float]:
    """``(argmax agreement or None for non-class outputs, max |diff|, max |diff| / max |reference|)``.

    A NaN or Inf on either side counts as a disagreement and an infinite difference.

    Raises:
        ValueError: there is nothing to compare.
    """
    if not reference or len(reference) != len(candidate):
        raise ValueError(f"nothing to compare: {len(reference)} reference and {len(candidate)} candidate outputs")
    agree = total = 0
    max_abs = 0.0
    scale = 0.0
    for ref, out in zip(reference, candidate):
        per_sample = _sample_diffs(ref, out)
        max_abs = max(max_abs, float(per_sample.max()))
        scale = max(scale, float(ref.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()))
        if ref.dim() >= 2 and ref.shape[-1] > 1:
            same = ref.argmax(-1) == out.argmax(-1)
            finite = (torch.isfinite(ref) & torch.isfinite(out)).all(dim=-1)
            agree += int((same & finite).sum())
            total += same.numel()
    agreement = agree / total if total else None
    return agreement, max_abs, max_abs / max(scale, 1e-12)


#: Share of compared samples whose difference must stay within ``max_rel_diff``.
TYPICAL_SAMPLE_QUANTILE = 0.99


def typical_rel_diff(reference: list[Tensor], candidate: list[Tensor], quantile: float = TYPICAL_SAMPLE_QUANTILE) -> float:
    """The ``quantile`` over samples of each sample's max ``|diff|``, relative to max ``|reference|``.

    The integer model is exact, while the fake-quantized one rounds in float: an activation
    that sits on a rounding boundary can land on the neighbouring code in one of them, a
    whole step at low bits, for a handful of samples. A layer that bypasses quantization
    shifts every sample. The worst sample measures the first; a high quantile the second.
    """
    per_sample = [_sample_diffs(ref, out) for ref, out in zip(reference, candidate)]
    if not per_sample:
        return 0.0
    scale = max(float(ref.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()) for ref in reference)
    return float(torch.quantile(torch.cat(per_sample).double(), quantile)) / max(scale, 1e-12)


def check_report(report: QuantizationReport, min_agreement: float = 0.999, max_rel_diff: float = 1e-2) -> None:
    """Raise `IntegerMismatchError` if the report's comparison figures break the tolerances.

    Each converted layer must match its fake-quantized self on the same input to float
    rounding (`LAYER_REL_TOLERANCE`); end to end, the argmax agreement must reach
    ``min_agreement`` and 99% of the samples must differ by at most ``max_rel_diff`` of the
    largest output. A report without comparison figures passes.
    """
    check_tolerances(min_agreement, max_rel_diff)
    problems = []
    # Written as "not within" so that a NaN figure fails as well.
    off = {name: diff for name, diff in report.layer_rel_diffs.items() if not diff <= LAYER_REL_TOLERANCE}
    if off:
        worst = max(off, key=off.__getitem__)
        problems.append(
            f"{len(off)} converted layer(s) differ from their fake-quantized selves on the same input, beyond float "
            f"rounding ({LAYER_REL_TOLERANCE:g}): {worst} by {off[worst]:.3g}"
        )
    if report.agreement is not None and not report.agreement >= min_agreement:
        problems.append(f"argmax agreement {report.agreement:.4%} is below min_agreement={min_agreement}")
    if report.typical_rel_diff is not None and not report.typical_rel_diff <= max_rel_diff:
        problems.append(
            f"for {TYPICAL_SAMPLE_QUANTILE:.0%} of samples the relative difference is up to {report.typical_rel_diff:.3g}, "
            f"above max_rel_diff={max_rel_diff}"
        )
    if problems:
        raise IntegerMismatchError(
            "the integer model does not reproduce the fake-quantized model: "
            + "; ".join(problems)
            + ". This points to a layer whose forward bypasses the quantized layer (a fused kernel or a custom "
            "forward reading .weight); see the report's 'left in float' list.\n"
            + report.table()
        )
