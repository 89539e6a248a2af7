"""The per-layer report of an integer model: bits, ranges, sizes and what stayed float."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from lightning_nipq.layers.folded_batchnorm import folded_batchnorms
from lightning_nipq.layers.layer_kinds import describe_layer
from lightning_nipq.layers.model_walk import float_weight_numel, integer_layers, integer_products, left_in_float
from lightning_nipq.layers.tied_weights import integer_ties
from lightning_nipq.quant.codes import num_levels
from lightning_nipq.quant.granularity import granularity_name


def _figure(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


@dataclass
class LayerReport:
    name: str
    kind: str
    weight_bits: int
    input_bits: Optional[int]  # None: the input stays float
    weight_alpha: float  # the largest range where there are several (per channel or group)
    input_alpha: Optional[float]
    params: int
    weight_numel: int
    input_numel: int
    #: ``tensor``, ``channel`` or ``group of g``: how many ranges the weight has.
    granularity: str = "tensor"
    #: The weight's stored steps (1 per tensor, the channels or groups otherwise).
    weight_ranges: int = 1
    #: The input codes' zero point (0: none; see `lightning_nipq.quant.fake_quant`).
    input_zero_point: int = 0
    #: The earlier layer whose weight this one shares (tied weights: stored and counted once, there); None if its own.
    tied_to: Optional[str] = None


@dataclass
class ProductReport:
    """An integer activation product: the bits, range and elements of each operand."""

    name: str
    left_bits: int
    right_bits: int
    left_alpha: float
    right_alpha: float
    left_numel: int
    right_numel: int


@dataclass
class QuantizationReport:
    """What `lightning_nipq.hard_quantize` produced, with its validation figures."""

    layers: list[LayerReport]
    skipped: list[tuple[str, str]]
    total_params: int
    agreement: Optional[float] = None
    max_abs_diff: Optional[float] = None
    max_rel_diff: Optional[float] = None
    #: Relative difference that 99% of the compared samples stay within.
    typical_rel_diff: Optional[float] = None
    compared_batches: int = 0
    #: Each converted layer against its fake-quantized self on the same recorded input (relative max difference).
    layer_rel_diffs: dict[str, float] = field(default_factory=dict)
    #: Quantized layers the model's forward did not call during the comparison (bypassed or unused).
    uncalled_layers: list[str] = field(default_factory=list)
    integer_metrics: dict[str, float] = field(default_factory=dict)
    #: ``BatchNorm name -> integer layer name`` for each BatchNorm folded into the layer it follows.
    folded_batchnorms: dict[str, str] = field(default_factory=dict)
    #: ``(BatchNorm name, why)`` for the BatchNorms kept as they are when folding was asked for.
    batchnorms_kept: list[tuple[str, str]] = field(default_factory=list)
    #: Elements of the matrix-like parameters of the layers left in float (those of `skipped`), each once.
    float_weight_numel: int = 0
    #: The integer activation products (attention's ``Q @ K^T`` and ``weights @ V``, with ``quantize_products=True``).
    products: list[ProductReport] = field(default_factory=list)

    @property
    def _stored(self) -> list[LayerReport]:
        # A weight shared by tied layers is stored and counted once: under the first of them.
        return [r for r in self.layers if r.tied_to is None]

    @property
    def avg_weight_bits(self) -> float:
        total = sum(r.weight_numel for r in self._stored)
        return sum(r.weight_bits * r.weight_numel for r in self._stored) / max(total, 1)

    @property
    def quantized_weight_numel(self) -> int:
        """Elements of the quantized weights, a tied weight once."""
        return sum(r.weight_numel for r in self._stored)

    @property
    def coverage(self) -> float:
        """The share of the weights of weight-bearing layers that is quantized (1.0: every one).

        Weight-bearing layers hold a parameter of two or more dimensions; the share counts
        elements: the quantized weights against those plus the matrix-like parameters of every
        layer left in float (`skipped`, each with its reason). Biases and norms are not weights.
        """
        quantized = self.quantized_weight_numel
        return quantized / max(quantized + self.float_weight_numel, 1)

    @property
    def avg_act_bits(self) -> Optional[float]:
        """The element-weighted mean bits of the quantized inputs: the layers' and the activation products' operands."""
        counted = [(r.input_bits, r.input_numel) for r in self.layers if r.input_bits is not None]
        for p in self.products:
            counted += [(p.left_bits, p.left_numel), (p.right_bits, p.right_numel)]
        counted = [(bits, numel) for bits, numel in counted if numel > 0]
        if not counted:
            return None
        total = sum(numel for _, numel in counted)
        return sum(bits * numel for bits, numel in counted) / total  # type: ignore[operator]

    @property
    def float32_bytes(self) -> int:
        """Every parameter of the model in float32."""
        return 4 * self.total_params

    @property
    def weight_only(self) -> bool:
        """Whether no layer quantizes its input (``quantize_inputs=False``)."""
        return bool(self.layers) and all(r.input_bits is None for r in self.layers)

    @property
    def quantized_bytes(self) -> float:
        """Quantized weights at their bit-width, their float32 steps and input ranges, and every other parameter in float32."""
        weight_bits = sum(r.weight_bits * r.weight_numel for r in self._stored)
        other = self.total_params - self.quantized_weight_numel
        steps = sum(r.weight_ranges * (r.tied_to is None) + (r.input_bits is not None) for r in self.layers) + 2 * len(self.products)
        return weight_bits / 8 + 4 * (other + steps)

    def table(self) -> str:
        header = ("layer", "kind", "w bits", "w ranges", "in bits", "w alpha", "in alpha", "params")
        rows = [
            (
                r.name,
                r.kind,
                str(r.weight_bits),
                ranges_label(r),
                "float" if r.input_bits is None else str(r.input_bits),
                f"{r.weight_alpha:.4g}",
                input_alpha_label(r),
                f"{r.params:,}",
            )
            for r in self.layers
        ]
        widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        act = self.avg_act_bits
        lines.append("")
        lines.append(
            f"average weight bits {self.avg_weight_bits:.3f}, average input bits "
            + ("n/a (weight-only)" if self.weight_only else "n/a" if act is None else f"{act:.3f}")
            + f"; weights and other parameters {self.quantized_bytes / 1024:.1f} KiB against "
            f"{self.float32_bytes / 1024:.1f} KiB in float32 ({self.float32_bytes / max(self.quantized_bytes, 1):.1f}x smaller)"
        )
        if self.agreement is not None or self.max_abs_diff is not None:
            agreement = "n/a" if self.agreement is None else f"{100 * self.agreement:.2f}%"
            lines.append(
                f"integer vs fake-quantized on {self.compared_batches} batches: argmax agreement {agreement}, "
                f"max |diff| {_figure(self.max_abs_diff)} (relative {_figure(self.max_rel_diff)}; "
                f"99% of samples within {_figure(self.typical_rel_diff)})"
            )
        if self.layer_rel_diffs:
            lines.append(
                f"each integer layer against its fake-quantized self on the same input: relative difference up to "
                f"{max(self.layer_rel_diffs.values()):.3g} over {len(self.layer_rel_diffs)} layers"
            )
        if self.uncalled_layers:
            lines.append(
                "not called by forward during the comparison (quantization bypassed, or unused): "
                + ", ".join(self.uncalled_layers)
            )
        if self.integer_metrics:
            lines.append(
                "integer model validation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.integer_metrics.items()))
            )
        lines += tied_lines(self)
        lines += product_lines(self)
        lines.append(coverage_line(self))
        if self.skipped:
            lines.append("left in float:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += batchnorm_lines(self)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def coverage_line(report: QuantizationReport) -> str:
    """The coverage sentence for the text and rich reports."""
    quantized = report.quantized_weight_numel
    return (
        f"coverage {100 * report.coverage:.2f}%: {quantized:,} of the {quantized + report.float_weight_numel:,} weights of "
        f"weight-bearing layers quantized; {len(report.skipped)} layer(s) left in float"
    )


def product_lines(report: QuantizationReport) -> list[str]:
    """The integer activation products and their operands' bits, for the text and rich reports."""
    if not report.products:
        return []
    shown = ", ".join(f"{p.name} ({p.left_bits} x {p.right_bits} bits)" for p in report.products)
    return [f"activation products multiplied as integers (left x right operand bits): {shown}"]


def tied_lines(report: QuantizationReport) -> list[str]:
    """Which layers share another's weight (stored and counted once), for the text and rich reports."""
    tied = [f"{r.name} -> {r.tied_to}" for r in report.layers if r.tied_to is not None]
    return ["tied weights, stored and counted once: " + ", ".join(tied)] if tied else []


def batchnorm_lines(report: QuantizationReport) -> list[str]:
    """Which BatchNorm was folded into which layer, and why others were kept, for the text and rich reports."""
    lines = []
    if report.folded_batchnorms:
        lines.append(
            "BatchNorm folded into the layer before it: "
            + ", ".join(f"{bn} -> {layer}" for bn, layer in report.folded_batchnorms.items())
        )
    if report.batchnorms_kept:
        lines.append("BatchNorm kept: " + "; ".join(f"{bn} ({reason})" for bn, reason in report.batchnorms_kept))
    return lines


def input_alpha_label(row: LayerReport) -> str:
    """The input's range for the tables: ``-`` (float input), ``alpha``, or ``alpha zp z`` with a zero point."""
    if row.input_alpha is None:
        return "-"
    return f"{row.input_alpha:.4g} zp {row.input_zero_point}" if row.input_zero_point else f"{row.input_alpha:.4g}"


def ranges_label(row: LayerReport) -> str:
    """``tensor``, or ``channel`` / ``group of 32`` with the count of ranges, for the tables."""
    return row.granularity if row.weight_ranges == 1 else f"{row.granularity} ({row.weight_ranges})"


def integer_model_report(model: nn.Module) -> QuantizationReport:
    """Report on a model whose quantized layers have been converted to integer layers."""
    rows: list[LayerReport] = []
    layers = list(integer_layers(model))
    ties = integer_ties(layers)
    for name, layer in layers:
        bias = layer.bias.numel() if layer.bias is not None else 0
        rows.append(
            LayerReport(
                name=name,
                kind=describe_layer(layer),
                weight_bits=layer.weight_bits,
                input_bits=layer.input_bits,
                weight_alpha=float(layer.weight_scale.max()) * num_levels(layer.weight_bits, True),
                granularity=granularity_name(layer.weight_granularity),
                weight_ranges=layer.weight_scale.numel(),
                input_alpha=None if layer.input_bits is None else float(layer.input_alpha),
                input_zero_point=layer.input_zero_point,
                # A tied weight's elements are the first layer's: counted there only.
                params=(0 if id(layer) in ties else layer.weight_codes.numel()) + bias,
                weight_numel=layer.weight_codes.numel(),
                input_numel=layer.input_numel,
                tied_to=ties.get(id(layer)),
            )
        )
    total = sum(p.numel() for p in model.parameters()) + sum(r.weight_numel for r in rows if r.tied_to is None)
    folded = {names[0]: module.into for names, module in folded_batchnorms(model)}
    products = []
    for name, product in integer_products(model):
        left, right = product.sides()
        products.append(
            ProductReport(name, left.bits, right.bits, float(left.alpha), float(right.alpha), left.numel, right.numel)
        )
    return QuantizationReport(
        layers=rows,
        skipped=left_in_float(model),
        total_params=total,
        folded_batchnorms=folded,
        float_weight_numel=float_weight_numel(model),
        products=products,
    )
