"""Smoke run of benchmarks/deployment.py at tiny sizes, so that it cannot rot."""

from __future__ import annotations

import pytest

from benchmarks import conv_kernels, deployment


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ") and "---" not in line]


@pytest.mark.slow
def test_deployment_benchmark_smoke(tmp_path):
    doc = tmp_path / "benchmarks.md"
    argv = ["--models", "cnn", "bert", "--cnn-width", "8", "--cnn-epochs", "1", "--bert-hidden", "32", "--bert-layers", "1"]
    argv += ["--bert-epochs", "1", "--rounds-b1", "2", "--rounds-b64", "2", "--calibration-batches", "2", "--doc", str(doc)]
    assert deployment.main(argv) == 0
    text = doc.read_text()
    assert "<!-- begin deployment -->" in text and "python -m benchmarks.deployment --models cnn bert" in text
    assert "onnxruntime 1." in text and "1 intra-op thread" in text
    rows = {(r[0], r[1]): r for r in _rows(text)[1:]}
    forms = ["float"] + [name for name, _ in deployment.FORMS]
    assert set(rows) == {(model, form) for model in ("SmallCNN (digits 32x32)", "BERT (digits as tokens)") for form in forms}
    for (model, form), row in rows.items():
        size, accuracy = float(row[3].rstrip("x")), float(row[7])
        assert 0.0 <= accuracy <= 100.0
        if form == "float":
            assert size == 1.0 and row[8] == ""
        else:
            assert size < 1.0 and float(row[8]) >= 99.0  # tiny, barely trained models: near ties may flip
        if form == "fused":
            assert "MatMulIntegerToFloat" in row[9]
    # INT4 codes make the opset-21 QDQ file smaller than the int8 one.
    for model in ("SmallCNN (digits 32x32)", "BERT (digits as tokens)"):
        assert float(rows[(model, "QDQ")][2]) < float(rows[(model, "QDQ int8")][2])


def test_conv_kernels_benchmark_smoke(tmp_path):
    doc = tmp_path / "benchmarks.md"
    assert conv_kernels.main(["--shapes", "8x6", "--batch-size", "2", "--rounds", "2", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "<!-- begin conv-kernels -->" in text and "python -m benchmarks.conv_kernels --shapes 8x6" in text
    rows = _rows(text)[1:]
    assert [r[1] for r in rows] == list(conv_kernels.VARIANTS)
    assert rows[0][3] == "1.00x" and all(float(r[2]) > 0 for r in rows)
