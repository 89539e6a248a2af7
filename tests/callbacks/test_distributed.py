"""NIPQ under DDP (two CPU processes, gloo), and the strategies the callbacks refuse.

The DDP fits run ``tests/ddp_script.py`` in a subprocess: Lightning's ``strategy="ddp"``
starts the second rank by re-running the command line, which inside pytest would re-run
pytest. Each process saves what it ended with, and the tests compare the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from models import MLP

from lightning_nipq import HardQuantize, NIPQCallback
from lightning_nipq.callbacks.strategy_support import check_strategy

SCRIPT = Path(__file__).parents[1] / "ddp_script.py"
# Variables of an enclosing distributed job would make the script join it instead of starting its own.
LAUNCH_VARIABLES = (
    "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"
)


def _run(out_dir: Path, mode: str, sampling: str, budget: str = "regulariser") -> list[dict[str, Any]]:
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), mode, sampling, budget],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=out_dir,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(path, weights_only=False) for path in sorted(out_dir.glob("rank*.pt"))]
    assert [r["rank"] for r in results] == list(range(results[0]["world_size"]))
    return results


def _tensor_dict_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]


def _quantizer_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    assert a.keys() == b.keys()
    return [
        f"{name}.{field}"
        for name in a
        for field, value in a[name].items()
        if not (torch.equal(value, b[name][field]) if isinstance(value, torch.Tensor) else value == b[name][field])
    ]


@pytest.mark.slow
def test_ddp_ranks_keep_identical_quantizers_and_convert_to_the_same_integer_model(tmp_path: Path) -> None:
    """Two DDP ranks, each with its own half of every batch, through calibration, noise, anneal and hard phases.

    Compared between the ranks, bit for bit: the quantizer parameters and Python state
    (theta, alpha_raw, frozen bits, calibrated ranges and signs) once frozen, the bit-budget
    loss at every step, and after HardQuantize the integer model's tensors, its outputs and
    the report. The ranks see different data, so any quantizer parameter DDP did not
    synchronise, any range taken from one rank's batches, or BatchNorm statistics re-estimated
    on one rank's batches would show up as a difference. The fit uses the default DDP
    (``find_unused_parameters=False``), which fails the step after a parameter got no
    gradient; every parameter is also checked for a gradient before every optimizer step.
    """
    rank0, rank1 = _run(tmp_path / "out", "ddp", "sharded")
    assert rank0["world_size"] == 2
    steps0, steps1 = rank0["steps"], rank1["steps"]
    assert len(steps0) == len(steps1) == 16
    assert all(a["batch_checksum"] != b["batch_checksum"] for a, b in zip(steps0, steps1)), "ranks saw the same data"

    # every phase ran, and every parameter had a gradient at every step of it
    assert [s["calibrating"] for s in steps0[:3]] == [True, True, False]
    assert {s["phase"] for s in steps0} == {"noise", "anneal", "hard"}
    anneal_hard_counts = [s["hard_quantizers"] for s in steps0 if s["phase"] == "anneal"]
    assert anneal_hard_counts[0] < anneal_hard_counts[-1] < 12, "the anneal ran with noise and hard layers mixed"
    assert all(s["hard_quantizers"] == 12 for s in steps0 if s["phase"] == "hard")
    assert all(s["missing_grads"] == [] for s in steps0 + steps1)

    # the same bit budget loss on both ranks at every step
    assert [s["bit_loss"] for s in steps0] == [s["bit_loss"] for s in steps1]
    assert all(s["bit_loss"] > 0 for s in steps0 if s["phase"] == "noise" and not s["calibrating"])
    assert all(s["bit_loss"] == 0 for s in steps0 if s["phase"] == "hard")

    # identical quantizers, calibrated and frozen
    assert not _quantizer_differences(rank0["quantizers"], rank1["quantizers"])
    assert all((q["calibrated"] or q["stays_float"]) and q["frozen_bits"] is not None for q in rank0["quantizers"].values())
    assert sum(bool(q["stays_float"]) for q in rank0["quantizers"].values()) == 1  # the layer fed the model input, on both ranks
    assert {q["signed"] for q in rank0["quantizers"].values()} == {True, False}, "both signs were calibrated"
    assert not _tensor_dict_differences(rank0["fake_state"], rank1["fake_state"])

    # the same integer model, outputs and report
    assert not _tensor_dict_differences(rank0["integer_state"], rank1["integer_state"])
    assert torch.equal(rank0["outputs"], rank1["outputs"])
    assert rank0["report"] == rank1["report"]
    assert rank0["report"]["agreement"] == 1.0 and rank0["report"]["avg_weight_bits"] <= 4.0
    assert rank0["report"]["compared_batches"] == 4, "both ranks' comparisons count"


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_the_budget_enforced(tmp_path: Path) -> None:
    # The default enforce_budget writes the learned bits outside the optimizer, so DDP never
    # averages them: the ranks must compute the same shift from the same sizes and MACs.
    rank0, rank1 = _run(tmp_path / "out", "ddp", "sharded", "enforced")
    assert _quantizer_differences(rank0["quantizers"], rank1["quantizers"]) == []
    assert _tensor_dict_differences(rank0["integer_state"], rank1["integer_state"]) == []
    assert torch.equal(rank0["outputs"], rank1["outputs"])
    assert rank0["report"] == rank1["report"]
    assert rank0["report"]["avg_weight_bits"] <= 4.0 + 1e-9


@pytest.mark.slow
def test_ddp_with_the_same_data_on_every_rank_reproduces_a_single_process_run(tmp_path: Path) -> None:
    """DDP and a single process, compared where they must agree exactly: the same data on every rank.

    With its DistributedSampler, DDP gives each rank a different part of the data, and the
    noise each rank draws has another shape than a single process would draw for the whole
    batch, so the two trainings legitimately differ. Here the sampler is off and each of the
    two ranks sees exactly the batches of the single-process run, with the same seed and one
    thread each. Every cross-rank operation (the gradient all-reduce, the reduction of the
    calibration statistics, the averaging of re-estimated BatchNorm statistics) then averages
    identical values and must be the identity. So the DDP run must match the single-process
    run bit for bit: every quantizer, the bit loss at every step, the fake-quantized weights,
    the integer model and its outputs. Only counts differ: each rank's re-estimation and
    comparison batches add up (``num_batches_tracked``, ``compared_batches``).
    """
    ddp = _run(tmp_path / "ddp", "ddp", "replicated")
    (single,) = _run(tmp_path / "single", "single", "replicated")
    assert len(ddp) == 2 and single["world_size"] == 1
    for rank in ddp:
        assert [s["batch_checksum"] for s in rank["steps"]] == [s["batch_checksum"] for s in single["steps"]]
        assert [s["bit_loss"] for s in rank["steps"]] == [s["bit_loss"] for s in single["steps"]]
        assert not _quantizer_differences(rank["quantizers"], single["quantizers"])
        assert not _tensor_dict_differences(rank["fake_state"], single["fake_state"])
        assert _tensor_dict_differences(rank["integer_state"], single["integer_state"]) == ["bn.num_batches_tracked"]
        tracked = "bn.num_batches_tracked"
        assert int(rank["integer_state"][tracked]) == 2 * int(single["integer_state"][tracked])
        assert torch.equal(rank["outputs"], single["outputs"])
        assert rank["report"]["compared_batches"] == 2 * single["report"]["compared_batches"]
        assert {k: v for k, v in rank["report"].items() if k != "compared_batches"} == {
            k: v for k, v in single["report"].items() if k != "compared_batches"
        }


# ---------------------------------------------------------------------- refused strategies
def _cpu_trainer(**kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        # FSDP needs a GPU in a Trainer, but the strategy object builds on CPU.
        pytest.param(FSDPStrategy, id="fsdp"),
        pytest.param(ModelParallelStrategy, id="model_parallel"),
        # DeepSpeed is not installed and its strategy cannot be initialised without it; the
        # check reads only the class, which Lightning defines without importing deepspeed.
        pytest.param(lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy), id="deepspeed"),
    ],
)
def test_sharding_strategies_are_refused_naming_what_is_supported(make: Any) -> None:
    # NIPQCallback.setup and HardQuantize.setup call this first, before touching the model.
    strategy = make()
    message = rf"NIPQCallback does not support {type(strategy).__name__}.*Supported: a single device, or DDP"
    with pytest.raises(ValueError, match=message):
        check_strategy(strategy, "NIPQCallback")


@pytest.mark.parametrize("name", ["auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true"])
def test_single_device_and_ddp_variants_pass_the_check(name: str, recwarn: pytest.WarningsRecorder) -> None:
    trainer = _cpu_trainer(devices=1 if name == "auto" else 2, strategy=name, max_epochs=1)
    assert isinstance(trainer.strategy, SingleDeviceStrategy if name == "auto" else DDPStrategy)
    check_strategy(trainer.strategy, "NIPQCallback")
    assert not [w for w in recwarn if "not tested" in str(w.message)]


def test_hard_quantize_refuses_spawned_workers_which_cannot_return_the_integer_model() -> None:
    trainer = _cpu_trainer(devices=2, strategy="ddp_spawn", max_epochs=1)
    with pytest.raises(ValueError, match="cannot hand the integer model back from a spawning strategy"):
        HardQuantize().setup(trainer, MLP(), "fit")
    with pytest.warns(UserWarning, match="the model in this process is not quantized after fit"):
        NIPQCallback().setup(trainer, MLP(), "fit")
