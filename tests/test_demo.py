"""The demo end to end on scikit-learn's digits: the acceptance figures of the package."""

import pytest

from lightning_nipq.demo.__main__ import main


@pytest.mark.slow
def test_demo_meets_its_targets_on_digits(capsys):
    # --check exits 1 unless both averages are within 0.1 bit of 3, integer accuracy is
    # within 2 points of float accuracy, the artifact is within 1.15x its ideal packed
    # size and reloads identically, and onnxruntime agrees on 99.9% of test argmaxes
    assert main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "targets met" in out and "average weight bits" in out
    assert "x the ideal packed size" in out and "outputs identical" in out and "onnxruntime on the 450 test images" in out
