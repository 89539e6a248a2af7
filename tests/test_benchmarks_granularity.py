"""Smoke run of benchmarks.granularity at tiny sizes on digits, so that the script cannot rot."""

from __future__ import annotations

import pytest
import torch

from benchmarks import granularity
from benchmarks.models import MobileNetV2Style


def _tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text`` in order, each as its header row then its data rows."""
    tables: list[list[list[str]]] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("| "):
            inside = False
            continue
        if "---" in line:
            continue
        if not inside:
            tables.append([])
            inside = True
        tables[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


def test_mobilenet_depthwise_channels_differ_in_scale():
    model = MobileNetV2Style(depthwise_spread=30.0)
    spreads = granularity.depthwise_spread(model)
    assert len(spreads) == len(model.depthwise_convs()) == 6 and min(spreads) > 10.0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10) and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert max(granularity.depthwise_spread(MobileNetV2Style(depthwise_spread=1.0))) < 10.0


def test_granularity_arguments():
    args = granularity.parse_args(["--wo-granularities", "channel", "32", "--seed-setting", "w3a3"])
    assert args.wo_granularities == ["channel", 32] and args.seed_setting == (3, 3)
    with pytest.raises(SystemExit):  # 48 does not divide the ViT's inputs of 128
        granularity.parse_args(["--wo-granularities", "48"])
    with pytest.raises(SystemExit):  # the conv models cannot have groups
        granularity.parse_args(["--granularities", "tensor", "16"])


@pytest.mark.slow
def test_granularity_benchmark_smoke(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro by hand\n")
    argv = ["--data", "digits", "--train-samples", "128", "--batch-size", "64", "--float-epochs", "1", "--qat-epochs", "2"]
    argv += ["--models", "mobilenet", "--bits", "2", "--methods", "ptq", "nipq", "--seeds", "0", "1"]
    argv += ["--wo-dim", "32", "--wo-depth", "1", "--wo-bits", "2", "--wo-mixed", "2.5", "--wo-methods", "ptq", "nipq", "mixed"]
    argv += ["--wo-granularities", "channel", "16", "--zp-bits", "3", "--float-cache", str(tmp_path / "cache"), "--doc", str(doc)]
    assert granularity.main(argv) == 0
    printed = capsys.readouterr().out

    text = doc.read_text()
    assert "intro by hand" in text and text.count("<!-- begin granularity -->") == 1
    assert "python -m benchmarks.granularity --data digits" in text and "torch threads" in text and "load average" in text
    assert "exclude=['patch_embed']" in text
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # the MobileNet, the weight-only ViT and the zero-point ViT
    channel, seeds, weight_only, zero_point = _tables(text)
    assert all(len(table) > 1 for table in (channel, seeds, weight_only, zero_point))
    assert "| " + " | ".join(channel[0]) + " |" in printed  # the printed tables are the written ones

    # Part 1: a row per method, per-tensor and per-channel accuracy side by side, bits as asked.
    header, *rows = channel
    col = {name: i for i, name in enumerate(header)}
    assert [(r[col["model"]], r[col["method"]], r[col["setting"]]) for r in rows] == [
        ("MobileNetV2Style", "PTQ (mse)", "W2A2"),
        ("MobileNetV2Style", "NIPQ", "W2A2"),
    ]
    for row in rows:
        assert row[col["W bits"]] == "2.00" and row[col["A bits"]] == "2.00"
        tensor, channel_acc = float(row[col["tensor acc. %"]]), float(row[col["channel acc. %"]])
        assert 0.0 <= tensor <= 100.0 and 0.0 <= channel_acc <= 100.0
        assert float(row[col["channel − tensor"]]) == pytest.approx(channel_acc - tensor, abs=0.011)
        assert float(row[col["channel KiB"]]) > float(row[col["tensor KiB"]]) > 0  # a stored step per channel
        assert row[col["integer check"]] == "yes"

    # Part 2: both granularities over both seeds, mean ± sd, and a verdict on the spread.
    header, *rows = seeds
    assert [r[3] for r in rows] == ["tensor", "channel"] and all(r[2] == "W2A4" and r[5] == "4.00" for r in rows)
    for row in rows:
        mean, sd = (float(x) for x in row[6].split(" ± "))
        per_seed = [float(x) for x in row[7].split(", ")]
        assert len(per_seed) == 2 and all(0.0 <= a <= 100.0 for a in per_seed)
        assert mean == pytest.approx(sum(per_seed) / 2, abs=0.011) and sd >= 0.0
    assert "Over 2 seeds per channel is" in text and "one seed's spread" in text

    # Part 3: weight-only, inputs float, a group column, the mixed budget held.
    header, *rows = weight_only
    col = {name: i for i, name in enumerate(header)}
    assert "group 16 acc. %" in col and "channel acc. %" in col and "tensor acc. %" not in col
    settings = {(r[col["method"]], r[col["setting"]]): r for r in rows}
    assert set(settings) == {("PTQ (mse)", "W2"), ("NIPQ", "W2"), ("NIPQ mixed", "avg 2.5")}
    for row in rows:
        assert row[col["A bits"]] == "float"
        assert all(0.0 <= float(row[col[f"{g} acc. %"]]) <= 100.0 for g in ("channel", "group 16"))
        assert float(row[col["group 16 KiB"]]) > float(row[col["channel KiB"]])  # more ranges, more stored steps
    assert settings[("NIPQ", "W2")][col["W bits"]] == settings[("PTQ (mse)", "W2")][col["W bits"]] == "2.00"
    assert all(float(b) <= 2.5 for b in settings[("NIPQ mixed", "avg 2.5")][col["W bits"]].split(" / "))

    # Part 4: input zero points off and auto side by side; the ViT's GELU outputs take one.
    header, *rows = zero_point
    col = {name: i for i, name in enumerate(header)}
    assert [(r[col["model"]], r[col["method"]], r[col["setting"]]) for r in rows] == [
        ("SmallViT", "PTQ (mse)", "W3A3"),
        ("SmallViT", "NIPQ", "W3A3"),
    ]
    for row in rows:
        off, auto = float(row[col["off acc. %"]]), float(row[col["auto acc. %"]])
        assert float(row[col["auto − off"]]) == pytest.approx(auto - off, abs=0.011)
        assert int(row[col["inputs with a zero point"]]) >= 1 and row[col["integer check"]] == "yes"
    assert 'input_zero_point=\\"off\\"' not in text and '`input_zero_point="off"`' in text
