"""Smoke runs of the benchmark scripts at tiny sizes, so that they cannot rot."""

from __future__ import annotations

import re

import pytest

from benchmarks import accuracy, cost
from benchmarks.reporting import write_section


def test_write_section_replaces_only_its_own_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    write_section("a", "first", doc)
    write_section("b", "other", doc)
    write_section("a", "second", doc)
    text = doc.read_text()
    assert "hand-written intro" in text and "other" in text and "second" in text and "first" not in text
    assert text.count("<!-- begin a -->") == 1


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ") and "---" not in line]


@pytest.mark.slow
def test_accuracy_benchmark_smoke(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    argv = ["--data", "digits", "--train-samples", "192", "--batch-size", "64", "--float-epochs", "1", "--qat-epochs", "2"]
    argv += ["--bits", "2", "--mixed", "3", "--doc", str(doc)]
    assert accuracy.main(argv) == 0
    text = doc.read_text()
    assert "<!-- begin accuracy -->" in text and "python -m benchmarks.accuracy --data digits" in text
    assert (tmp_path / "benchmarks_accuracy.png").stat().st_size > 0
    assert (tmp_path / "benchmarks_accuracy_layer_bits.png").stat().st_size > 0
    assert "![learned bits per layer](benchmarks_accuracy_layer_bits.png)" in text
    rows = {(r[0], r[1], r[2]): r for r in _rows(text)[1:]}
    assert len(rows) == 2 * 5  # float, PTQ, LSQ, NIPQ, NIPQ mixed for each model
    for model in ("ResNetStyle", "SmallViT"):
        for method in ("PTQ (mse)", "LSQ", "NIPQ"):
            row = rows[(model, method, "W2A2")]
            assert row[3] == "2.00" and row[4] == "2.00" and row[8] == "yes"  # bits as asked, integer model validated
        mixed = rows[(model, "NIPQ mixed", "avg 3")]
        assert float(mixed[3]) <= 3.0 and float(mixed[4]) <= 3.0 and mixed[8] == "yes"  # the budget holds
        assert all(0.0 <= float(rows[k][5]) <= 100.0 for k in rows if k[0] == model)


@pytest.mark.slow
def test_cost_benchmark_smoke(tmp_path):
    doc = tmp_path / "benchmarks.md"
    argv = ["--batch-size", "8", "--steps", "2", "--warmup", "2", "--doc", str(doc), "--section", "cost-smoke"]
    assert cost.main([*argv, "--reference", "--repeats", "2"]) == 0
    text = doc.read_text()
    rows = {r[0]: r for r in _rows(text)[1:]}
    quantized = ("NIPQ noise", "NIPQ hard", "LSQ")
    assert set(rows) == set(cost.VARIANTS) | {v + suffix for suffix in (cost.KEPT, cost.COMPOSED) for v in quantized}
    assert rows["float"][1] == "1.00x (1.00-1.00)" and rows["float"][3] == "1.00x"
    assert "run 2 times, interleaved" in text and "composed fake-quantization functions" in text
    # Recomputing the fake-quantized tensors in backward holds less than keeping them.
    for variant in quantized:
        assert float(rows[variant][2]) < float(rows[variant + cost.KEPT][2])
    ratio = lambda cell: float(re.sub("x.*$", "", cell))  # noqa: E731
    # The float step's memory is the floor (NIPQ's noise phase adds a byte per element), and the
    # fused functions keep less than the composed ones.
    assert ratio(rows["NIPQ noise"][3]) > 1.0
    for variant in quantized:
        assert ratio(rows[variant][3]) >= 1.0 and ratio(rows[variant][1]) > 0.0
        assert ratio(rows[variant][3]) < ratio(rows[variant + cost.COMPOSED][3])


def test_accuracy_benchmark_nipq_variants_smoke(tmp_path):
    """The investigation's NIPQ variants: distillation from the float model and float BatchNorm statistics in the noise phase."""
    doc = tmp_path / "benchmarks.md"
    argv = ["--data", "digits", "--train-samples", "192", "--batch-size", "64", "--float-epochs", "1", "--qat-epochs", "2"]
    argv += ["--models", "resnet", "--bits", "2", "--mixed", "--methods", "nipq", "--nipq-distillation", "--nipq-float-bn"]
    argv += ["--doc", str(doc), "--no-plot"]
    assert accuracy.main(argv) == 0
    rows = {(r[0], r[1], r[2]): r for r in _rows(doc.read_text())[1:]}
    row = rows[("ResNetStyle", "NIPQ", "W2A2")]
    assert row[3] == "2.00" and row[8] == "yes"


def test_accuracy_benchmark_transformers_vit_with_products_smoke(tmp_path):
    """transformers' ViT as a benchmark model, with attention's activation products quantized."""
    pytest.importorskip("transformers")
    doc = tmp_path / "benchmarks.md"
    argv = ["--data", "digits", "--train-samples", "128", "--batch-size", "64", "--float-epochs", "1", "--qat-epochs", "2"]
    argv += ["--models", "hf-vit", "--bits", "3", "--mixed", "--methods", "nipq", "--quantize-products"]
    argv += ["--doc", str(doc), "--no-plot"]
    assert accuracy.main(argv) == 0
    rows = {(r[0], r[1], r[2]): r for r in _rows(doc.read_text())[1:]}
    row = rows[("TransformersViT", "NIPQ +products", "W3A3")]
    assert row[3] == "3.00" and row[4] == "3.00" and row[8] == "yes"  # the products' operands at 3 bits too
