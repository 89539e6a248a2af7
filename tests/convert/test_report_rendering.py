"""The rich report table, the bit-allocation figure, and the logger directory helper."""

import dataclasses
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from models import MLP, blobs, fast_trainer

from lightning_nipq import QuantizationReport, attach_quantizers, hard_quantize
from lightning_nipq.convert import LayerReport, print_report, save_bit_allocation_figure
from lightning_nipq.convert.report_rendering import bit_allocation_figure, logger_directory, rich_report_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report(layers=None):
    layers = layers or [
        LayerReport("stem", "Conv2d", 5, None, 0.8125, None, 448, 432, 0),
        LayerReport("blocks.0.dw", "Conv2d(depthwise)", 2, 4, 0.25, 3.5, 160, 144, 4096),
        LayerReport("blocks.0.pw", "Conv2d", 3, 3, 0.5, 6.25, 2320, 2304, 4096),
        LayerReport("head", "Linear", 4, 8, 1.5, 2.0, 650, 640, 64),
    ]
    return QuantizationReport(
        layers=layers,
        skipped=[("attn", "nn.MultiheadAttention uses its packed in_proj_weight")],
        total_params=sum(r.params for r in layers) + 32,
        agreement=0.9984,
        max_abs_diff=1.5e-3,
        max_rel_diff=2e-5,
        compared_batches=8,
        integer_metrics={"val_acc": 0.875},
    )


def _rows(text):
    """Cells of each table line that has column separators."""
    lines = [line.strip().strip("│") for line in text.splitlines() if line.count("│") >= 7]
    return [[cell.strip() for cell in line.split("│")] for line in lines]


def test_rich_table_has_one_row_per_layer_with_the_reports_cells():
    pytest.importorskip("rich")
    from rich.console import Console

    report = _report()
    table = rich_report_table(report)
    assert [c.header for c in table.columns] == ["layer", "kind", "w bits", "w ranges", "in bits", "w alpha", "in alpha", "params"]
    assert table.row_count == len(report.layers)
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    rows = _rows(text)
    body, footer = rows[:-1], rows[-1]  # the header is drawn with heavy bars, not "│"
    assert body == [
        ["stem", "Conv2d", "5", "tensor", "float", "0.8125", "-", "448"],
        ["blocks.0.dw", "Conv2d(depthwise)", "2", "tensor", "4", "0.25", "3.5", "160"],
        ["blocks.0.pw", "Conv2d", "3", "tensor", "3", "0.5", "6.25", "2,320"],
        ["head", "Linear", "4", "tensor", "8", "1.5", "2", "650"],
    ]
    assert footer[2] == f"{report.avg_weight_bits:.2f}" and footer[4] == f"{report.avg_act_bits:.2f}"
    assert footer[7] == "3,578"
    ratio = report.float32_bytes / report.quantized_bytes
    caption = " ".join(text.split())
    for expected in (f"{ratio:.1f}x smaller", "agreement 99.84%", "on 8 batches", "val_acc=0.875", "attn (nn.Multi"):
        assert expected in caption, expected


def test_print_report_prints_the_rich_table_unsqueezed(capsys):
    pytest.importorskip("rich")
    print_report(_report())
    out = capsys.readouterr().out
    assert "NIPQ quantization report" in out
    # Captured output is no terminal: the table keeps its natural width instead of 80 columns.
    assert any("│ blocks.0.dw" in line and "│ Conv2d(depthwise) │" in line for line in out.splitlines())


def test_without_rich_print_report_falls_back_to_the_plain_table(monkeypatch, capsys):
    report = _report()
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    monkeypatch.setitem(sys.modules, "rich.text", None)
    with pytest.raises(ImportError, match="pip install rich"):
        rich_report_table(report)
    print_report(report)
    assert capsys.readouterr().out.strip() == report.table().strip()


def test_figure_draws_each_layers_bits_and_marks_float_inputs():
    pytest.importorskip("matplotlib")
    report = _report()
    fig = bit_allocation_figure(report)
    bits_ax, share_ax = fig.axes
    widths = [p.get_width() for p in bits_ax.patches]
    # Weight bars (one per layer), then input bars (one per quantized input).
    assert widths == [5, 2, 3, 4, 4, 3, 8]
    assert [t.get_text() for t in bits_ax.get_yticklabels()] == [r.name for r in report.layers]
    # Bar-end labels of the weights, then of the inputs, then the float-input mark.
    assert [t.get_text() for t in bits_ax.texts] == ["5", "2", "3", "4", "4", "3", "8", "float input"]
    assert sum(p.get_width() for p in share_ax.patches) == pytest.approx(100.0)
    title = fig.get_suptitle()
    assert f"{report.avg_weight_bits:.2f}" in title and f"{report.avg_act_bits:.2f}" in title


def test_saved_png_is_valid_sized_with_the_layers_and_changes_with_the_bits(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    report = _report()
    path = save_bit_allocation_figure(report, tmp_path / "new" / "bits")
    assert path == tmp_path / "new" / "bits.png" and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        width, height = image.size
        first = np.asarray(image.convert("RGB"))
    assert 800 <= width <= 2000 and 300 <= height <= 1500

    again = np.asarray(Image.open(save_bit_allocation_figure(report, tmp_path / "again.png")).convert("RGB"))
    assert np.array_equal(first, again), "the same report draws the same picture"

    layers = [dataclasses.replace(report.layers[0], weight_bits=2), *report.layers[1:]]
    changed = np.asarray(Image.open(save_bit_allocation_figure(_report(layers), tmp_path / "c.png")).convert("RGB"))
    assert changed.shape == first.shape and not np.array_equal(first, changed)

    more = [dataclasses.replace(r, name=f"{r.name}.{i}") for i in range(5) for r in report.layers]
    with Image.open(save_bit_allocation_figure(_report(more), tmp_path / "more.png")) as image:
        assert image.size[1] > 2 * height, "height grows with the layer count"


def test_figure_of_a_real_integer_model_report(tmp_path):
    pytest.importorskip("matplotlib")
    model = MLP()
    attach_quantizers(model, float_input_layers=["stem"])
    for layer in (model.blocks[0].inner[0], model.blocks[1].inner[0], model.head):
        layer.input_quantizer.set_range(4.0, signed=False)
    x = blobs(32).tensors[0]
    report = hard_quantize(model, compare_batches=[(x,)])
    fig = bit_allocation_figure(report)
    assert len(fig.axes[0].patches) == len(report.layers) + 3
    assert save_bit_allocation_figure(report, tmp_path / "mlp.png").stat().st_size > 10_000


def test_missing_matplotlib_names_the_plot_extra_and_empty_reports_are_refused(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.patches", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-nipq\[plot\]'"):
        save_bit_allocation_figure(_report(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="no quantized layer"):
        bit_allocation_figure(QuantizationReport(layers=[], skipped=[], total_params=0))


class _RemoteLogger(Logger):
    """A logger that keeps nothing on disk, like a tracking server without a local cache."""

    name = "remote"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_logger_directory_is_the_run_directory_of_the_first_local_logger(tmp_path):
    csv_logger = CSVLogger(tmp_path, name="csv", version="run")
    trainer = fast_trainer(logger=[_RemoteLogger(), csv_logger, CSVLogger(tmp_path / "other")])
    assert logger_directory(trainer) == tmp_path / "csv" / "run" == Path(csv_logger.log_dir)
    assert logger_directory(fast_trainer(logger=CSVLogger(tmp_path))) == tmp_path / "lightning_logs" / "version_0"
    assert logger_directory(fast_trainer(logger=[_RemoteLogger()])) is None
    assert logger_directory(fast_trainer(logger=False)) is None


def test_logger_directory_of_tensorboard_is_its_version_directory(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = fast_trainer(logger=[TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path)])
    assert logger_directory(trainer) == tmp_path / "tb" / "version_0"
