"""Showing a `lightning_nipq.report.QuantizationReport`: a rich table and a bit-allocation figure.

rich and matplotlib are optional and imported only when called: without rich,
`print_report` prints the plain `QuantizationReport.table`; the figure needs
the ``plot`` extra (``pip install 'lightning-nipq[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from lightning_nipq.convert.report import (
    QuantizationReport,
    batchnorm_lines,
    coverage_line,
    input_alpha_label,
    product_lines,
    ranges_label,
    tied_lines,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from matplotlib.figure import Figure
    from rich.table import Table

PLOT_INSTALL_HINT = "pip install 'lightning-nipq[plot]'"

WEIGHT_COLOR = "#3465a4"
INPUT_COLOR = "#e8833a"
SHARE_COLOR = "#9aa5b1"
MUTED_COLOR = "#6b7280"

# Fewer bits is the more aggressive choice: warm colours draw the eye to those layers.
_BITS_STYLES = {2: "bold red", 3: "dark_orange", 4: "yellow", 5: "green", 6: "green"}


def _bits_style(bits: int) -> str:
    return _BITS_STYLES.get(bits, "cyan" if bits > 6 else "bold red")


def _caption_lines(report: QuantizationReport) -> list[str]:
    """The totals under the table: storage, the integer-versus-fake-quantized check, what stayed float."""
    ratio = report.float32_bytes / max(report.quantized_bytes, 1)
    lines = [
        f"parameters {report.quantized_bytes / 1024:.1f} KiB quantized vs "
        f"{report.float32_bytes / 1024:.1f} KiB in float32 ({ratio:.1f}x smaller)"
    ]
    if report.agreement is not None or report.max_abs_diff is not None:
        agreement = "n/a" if report.agreement is None else f"{100 * report.agreement:.2f}%"
        diff = "" if report.max_abs_diff is None else (
            f", max |diff| {report.max_abs_diff:.3g} (relative {report.max_rel_diff or 0.0:.3g})"
        )
        lines.append(f"integer vs fake-quantized on {report.compared_batches} batches: agreement {agreement}{diff}")
    if report.integer_metrics:
        lines.append("integer model: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.integer_metrics.items())))
    lines += tied_lines(report)
    lines += product_lines(report)
    lines.append(coverage_line(report))
    if report.skipped:
        lines.append("left in float: " + "; ".join(f"{name} ({reason})" for name, reason in report.skipped))
    return lines + batchnorm_lines(report)


def rich_report_table(report: QuantizationReport) -> Table:
    """The per-layer report as a ``rich.table.Table``: one row per layer, averages in the footer.

    Columns as in `QuantizationReport.table`; bit-widths are coloured from red (2 bits)
    to cyan (7 and more), and the caption holds storage, the integer check and float layers.

    Raises:
        ImportError: rich is not installed (`print_report` then falls back to plain text).
    """
    try:
        from rich.table import Table
        from rich.text import Text
    except ImportError as err:
        raise ImportError("rich_report_table needs rich: pip install rich") from err

    act = report.avg_act_bits
    table = Table(
        title="NIPQ quantization report",
        caption="\n".join(_caption_lines(report)),
        caption_justify="left",
        show_footer=True,
        header_style="bold",
        footer_style="bold",
    )
    table.add_column("layer", footer="average / total", no_wrap=True)
    table.add_column("kind")
    table.add_column("w bits", justify="right", footer=f"{report.avg_weight_bits:.2f}")
    table.add_column("w ranges")
    table.add_column("in bits", justify="right", footer="n/a" if act is None else f"{act:.2f}")
    table.add_column("w alpha", justify="right")
    table.add_column("in alpha", justify="right")
    table.add_column("params", justify="right", footer=f"{sum(r.params for r in report.layers):,}")
    for r in report.layers:
        input_bits = Text("float", style="dim italic")
        if r.input_bits is not None:
            input_bits = Text(str(r.input_bits), style=_bits_style(r.input_bits))
        table.add_row(
            r.name,
            r.kind,
            Text(str(r.weight_bits), style=_bits_style(r.weight_bits)),
            ranges_label(r),
            input_bits,
            f"{r.weight_alpha:.4g}",
            input_alpha_label(r),
            f"{r.params:,}",
        )
    return table


def print_report(report: QuantizationReport, console: Optional[Any] = None) -> None:
    """Print the report as a rich table, or as `QuantizationReport.table` text without rich.

    ``console`` is a ``rich.console.Console`` to print to (by default a new one on stdout).
    Printing on every rank of a distributed run is the caller's to avoid.
    """
    try:
        table = rich_report_table(report)
    except ImportError:
        print(report.table())
        return
    if console is None:
        from rich.console import Console
        from rich.measure import Measurement

        console = Console()
        if not console.is_terminal:
            # Output to a file or a pipe has no width; rich would squeeze the table into 80 columns.
            natural = Measurement.get(console, console.options.update_width(1000), table).maximum
            console = Console(width=max(console.width, natural))
    console.print(table)


def _import_matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError(f"the bit-allocation figure needs matplotlib: {PLOT_INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg, Patch


def bit_allocation_figure(report: QuantizationReport) -> Figure:
    """A matplotlib figure of the bits per layer: weight and input bars side by side, parameter share beside.

    Layers run top to bottom in model order. Inputs left in float get no bar but a "float
    input" mark; dashed lines give the element-weighted averages. The figure is built on the Agg
    canvas directly, without pyplot, so it never opens a window nor changes pyplot's backend.

    Raises:
        ValueError: the report has no layer.
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    if not report.layers:
        raise ValueError("the report has no quantized layer to draw")
    Figure, FigureCanvasAgg, Patch = _import_matplotlib()

    rows = report.layers
    n = len(rows)
    top_bits = max([8, *(r.weight_bits for r in rows), *(r.input_bits or 0 for r in rows)])
    row_height = 0.42 if n <= 40 else 0.28
    fig = Figure(figsize=(10.5, 1.7 + row_height * n), layout="constrained")
    FigureCanvasAgg(fig)
    # Not sharey: the share panel's tick labels (layer kinds) differ from the bits panel's (names).
    bits_ax, share_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3.2, 1.1]})

    ys = list(range(n))
    bar = 0.38
    w_bars = bits_ax.barh([y - bar / 2 for y in ys], [r.weight_bits for r in rows], height=bar, color=WEIGHT_COLOR)
    quantized_in = [(y, r.input_bits) for y, r in zip(ys, rows) if r.input_bits is not None]
    in_bars = bits_ax.barh(
        [y + bar / 2 for y, _ in quantized_in], [b for _, b in quantized_in], height=bar, color=INPUT_COLOR
    )
    bits_ax.bar_label(w_bars, padding=3, fontsize=8, color=WEIGHT_COLOR)
    bits_ax.bar_label(in_bars, padding=3, fontsize=8, color=INPUT_COLOR)
    for y, r in zip(ys, rows):
        if r.input_bits is None:
            bits_ax.text(0.12, y + bar / 2, "float input", va="center", fontsize=8, style="italic", color=MUTED_COLOR)

    avg_w = bits_ax.axvline(report.avg_weight_bits, color=WEIGHT_COLOR, ls="--", lw=1.2)
    avg_w.set_label(f"average weight {report.avg_weight_bits:.2f}")
    # Proxies: an empty container (every input float) would show in the default colour.
    handles: list[Any] = [Patch(color=WEIGHT_COLOR, label="weight bits")]
    if quantized_in:
        handles.append(Patch(color=INPUT_COLOR, label="input bits"))
    handles.append(avg_w)
    act = report.avg_act_bits
    if act is not None:
        avg_a = bits_ax.axvline(act, color=INPUT_COLOR, ls="--", lw=1.2)
        avg_a.set_label(f"average input {act:.2f}")
        handles.append(avg_a)
    bits_ax.set_xlim(0, top_bits + 0.9)
    bits_ax.set_xticks(range(0, top_bits + 1))
    bits_ax.set_xlabel("bits")
    bits_ax.set_yticks(ys, [r.name for r in rows], fontsize=9)
    bits_ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)

    total = max(sum(r.params for r in rows), 1)
    shares = [100 * r.params / total for r in rows]
    share_bars = share_ax.barh(ys, shares, height=0.6, color=SHARE_COLOR)
    share_ax.bar_label(share_bars, [f"{r.params:,}" for r in rows], padding=3, fontsize=7, color=MUTED_COLOR)
    share_ax.set_xlim(0, max(shares) * 1.5)  # room for the labels
    share_ax.set_xlabel("% of quantized params")
    share_ax.yaxis.tick_right()
    share_ax.set_yticks(ys, [r.kind for r in rows], fontsize=8, color=MUTED_COLOR)
    share_ax.tick_params(axis="y", length=0)

    for ax in (bits_ax, share_ax):
        ax.set_ylim(n - 0.45, -0.55)  # first layer on top, both panels row for row
        ax.grid(axis="x", color="#e5e7eb", lw=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    ratio = report.float32_bytes / max(report.quantized_bytes, 1)
    act_text = "n/a" if act is None else f"{act:.2f}"
    fig.suptitle(
        f"Bit allocation per layer: average weight bits {report.avg_weight_bits:.2f}, "
        f"input bits {act_text}, {ratio:.1f}x smaller than float32",
        fontsize=11,
        fontweight="bold",
    )
    return fig


def save_bit_allocation_figure(report: QuantizationReport, path: Union[str, Path], dpi: int = 110) -> Path:
    """Draw `bit_allocation_figure` to ``path`` (PNG unless the suffix names another format).

    Missing parent directories are created; a path without a suffix gets ``.png``.
    Returns the path written.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'lightning-nipq[plot]'``).
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    fig = bit_allocation_figure(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def logger_directory(trainer: Trainer) -> Optional[Path]:
    """The local directory of the trainer's first logger that has one, or None (no logger, or none local).

    ``log_dir`` (CSVLogger, TensorBoardLogger: ``.../version_N``) is preferred over
    ``save_dir`` (other loggers). Unlike ``trainer.log_dir``, this does not broadcast, so it
    is safe on rank zero alone, and it never falls back to ``default_root_dir``.
    """
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory:
            return Path(directory)
    return None
