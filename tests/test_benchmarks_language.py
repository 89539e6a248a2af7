"""Smoke run of benchmarks.language at tiny sizes, so that the script cannot rot."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import language
from benchmarks.models import TinyGPT


def _table(text: str) -> list[list[str]]:
    """The first Markdown table of ``text``: its header row, then its data rows."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("| "):
            if "---" not in line:
                rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows


def test_corpus_splits_by_file(tmp_path):
    for i, name in enumerate(["a.py", "b.py", "pkg/c.py", "pkg/d.py", "test/e.py", "z.py"]):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([65 + i]) * 100)
    files = language.stdlib_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.py", "b.py", "pkg/c.py", "pkg/d.py", "z.py"]
    corpus = language.load_corpus(10_000, 150, test_every=2, root=tmp_path)
    train, test = set(corpus.train.tokens.tolist()), set(corpus.test.tokens.tolist())
    assert train == {65, 67, 70} and test == {66, 68}  # a, c, z train; b, d test; no file in both
    assert corpus.train.files == 3 and corpus.train.size == 300
    assert corpus.test.files == 2 and corpus.test.size == 150  # the second file cut at the cap


def test_tiny_gpt_is_causal():
    model = TinyGPT(context=16, dim=16, depth=1, heads=2).eval()
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5) and not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.head.weight is model.tok_embed.weight


def test_language_arguments():
    args = language.parse_args([])
    assert args.section == "language" and args.mixed == [3.0, 2.5] and args.methods == list(language.METHODS)
    with pytest.raises(SystemExit):
        language.parse_args(["--dim", "30", "--heads", "4"])
    with pytest.raises(SystemExit):
        language.parse_args(["--mixed", "1.5"])


@pytest.mark.slow
def test_language_benchmark_smoke(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro by hand\n")
    argv = ["--train-bytes", "20000", "--test-bytes", "4000", "--context", "32", "--dim", "32", "--layers", "1"]
    argv += ["--batch-size", "8", "--float-steps", "20", "--qat-steps", "10", "--calibration-batches", "2"]
    argv += ["--doc", str(doc), "--float-cache", str(tmp_path / "cache")]
    assert language.main(argv) == 0
    printed = capsys.readouterr().out

    text = doc.read_text()
    assert "intro by hand" in text and text.count("<!-- begin language -->") == 1
    assert "python -m benchmarks.language --train-bytes 20000" in text and "torch threads" in text and "load average" in text
    assert "standard library of Python" in text
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    header, *rows = _table(text)
    assert "| " + " | ".join(header) + " |" in printed  # the printed table is the written one
    col = {name: i for i, name in enumerate(header)}
    settings = [(r[col["method"]], r[col["setting"]]) for r in rows]
    fixed = ["W8A8", "W4A8", "W4", "W3", "W2"]
    assert settings == [
        ("float", "FP32"),
        *[("PTQ (mse)", s) for s in fixed],
        *[("LSQ", s) for s in fixed],
        *[("NIPQ", s) for s in fixed],
        ("NIPQ mixed", "avg 3 (W only)"),
        ("NIPQ mixed", "avg 2.5 (W only)"),
    ]
    for row in rows:
        ppl = float(row[col["test perplexity"]])
        assert math.isfinite(ppl) and ppl > 1.0
        assert float(row[col["KiB"]]) > 0
        setting, w_bits, a_bits = row[col["setting"]], row[col["W bits"]], row[col["A bits"]]
        if row[col["method"]] == "float":
            assert w_bits == "32" and a_bits == "float"
            continue
        assert row[col["integer check"]] == "yes"
        if "A" in setting:  # W8A8, W4A8: every quantized input at 8 bits
            assert a_bits == "8.00" and w_bits == f"{int(setting[1]):.2f}"
        elif setting.startswith("W"):  # weight-only: inputs float
            assert a_bits == "float" and w_bits == f"{int(setting[1]):.2f}"
        else:  # NIPQ mixed, weight-only, within its budget
            target = float(setting.split()[1])
            assert a_bits == "float" and float(w_bits) <= target + 0.01
    float_kib = float(rows[0][col["KiB"]])
    assert all(float(r[col["KiB"]]) < float_kib for r in rows[1:])  # every quantized model is smaller
