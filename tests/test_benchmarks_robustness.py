"""Smoke run of benchmarks.robustness at tiny sizes on digits, so that the script cannot rot."""

from __future__ import annotations

import pytest
import torch

from benchmarks import accuracy, robustness


def _tables(text: str) -> dict[str, list[list[str]]]:
    """The Markdown tables of ``text`` keyed by their first header cell, each as header row then data rows."""
    tables: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("| "):
            current = []
            continue
        if "---" in line:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not current:
            tables[cells[0]] = current
        current.append(cells)
    return tables


@pytest.mark.slow
def test_robustness_benchmark_smoke(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro by hand\n")
    cache = tmp_path / "cache"
    bits = [6, 3]
    argv = ["--data", "digits", "--train-samples", "128", "--batch-size", "64", "--float-epochs", "1", "--qat-epochs", "1"]
    argv += ["--bits", *map(str, bits), "--gen-batches", "2", "--gen-batch-size", "16", "--gen-steps", "3"]
    argv += ["--float-cache", str(cache), "--doc", str(doc)]
    args = robustness.parse_args(argv)
    outcome = robustness.run(args)
    robustness.publish(args, argv, outcome, minutes=0.1)

    text = doc.read_text()
    assert "intro by hand" in text and text.count("<!-- begin robustness -->") == 1 and "<!-- end robustness -->" in text
    assert "python -m benchmarks.robustness --data digits --train-samples 128" in text
    assert (tmp_path / "benchmarks_robustness.png").stat().st_size > 0
    tables = _tables(text)

    # Table 1: a row per float model, a column per PTQ setting plus float and LSQ.
    header, *rows = tables["float model"]
    ptq_columns = [f"PTQ W{b}A{b} %" for b in bits]
    assert header[1] == "float acc. %" and header[2:4] == ptq_columns and header[4] == "LSQ W4A4 %"
    labels = [robustness.variant_label(args, v) for v in robustness.VARIANTS]
    assert [r[0] for r in rows] == labels
    for row in rows:
        assert all(0.0 <= float(cell) <= 100.0 for cell in row[1:5])  # a cell with wrong bits would not parse
    assert rows[0][1] == f"{100 * outcome.plain_float.accuracy:.2f}"

    # Table 2: a row per calibration source, all three label modes of the generator among them.
    header, *rows = tables["calibration data"]
    assert header[1:3] == ptq_columns and header[-1] == "making the set s"
    sources = [label + suffix for _, label, _ in robustness.SOURCES for suffix in (", BN re-estimated", ", float BN kept")]
    assert [r[0] for r in rows] == sources
    for row in rows:
        assert all(0.0 <= float(cell) <= 100.0 for cell in row[1:3])
    for _, label, mode in robustness.SOURCES[1:]:
        assert outcome.generation_seconds[label] > 0.0

    # Every quantized run has the bits asked for, as the integer model's report counts them.
    for results, row_labels in ((outcome.robust, labels), (outcome.calibration, sources)):
        for label in row_labels:
            ptq = [r for r in results if r.model == label and r.method == "PTQ (mse)"]
            assert sorted(r.setting for r in ptq) == sorted(f"W{b}A{b}" for b in bits)
            for r in ptq:
                asked = int(r.setting[1 : r.setting.index("A")])
                assert (r.weight_bits, r.act_bits) == (asked, asked)
                assert 0.0 <= r.accuracy <= 1.0
    lsq = [r for r in outcome.robust if r.method == "LSQ"]
    assert len(lsq) == 3 and all((r.weight_bits, r.act_bits) == (4, 4) for r in lsq)

    # One cached float model per training variant; the plain one under benchmarks.accuracy's name, so they share it.
    files = [robustness.cache_file(args, v) for v in robustness.VARIANTS]
    assert len(set(files)) == 3 and all(f.exists() for f in files)
    shared = accuracy._cache_file(accuracy.parse_args(argv[:8] + ["--float-cache", str(cache)]), "resnet")
    assert shared == files[0]
    states = [torch.load(f, weights_only=True) for f in files]
    assert states[0].keys() == states[1].keys() == states[2].keys()  # SatNL folded back: plain float checkpoints
    for other in states[1:]:
        assert not torch.equal(states[0]["stem.0.weight"], other["stem.0.weight"])  # the variants trained differently
