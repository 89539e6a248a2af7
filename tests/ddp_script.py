"""One NIPQ + HardQuantize fit on CPU, single-process or DDP (gloo), that records what each process ends with.

Run as ``python ddp_script.py OUT_DIR {ddp,single} {sharded,replicated}``. Lightning's
``strategy="ddp"`` starts the other ranks by running this same command line again, which
is why the DDP fit lives in a script and not in a pytest process. Each process writes
``OUT_DIR/rank{N}.pt``:

- ``steps``: per training batch, the phase, the bit-budget loss the callback computed, a
  checksum of the batch, the quantizers in hard mode, and the parameters left without a
  gradient before the optimizer step;
- ``quantizers``: ``theta``, ``alpha_raw``, frozen bits, sign, calibration flag and size of
  every quantizer once the bits are frozen, just before the integer conversion;
- ``fake_state``: the fake-quantized model's state dict at that point;
- ``integer_state``, ``outputs``: the integer model's state dict and its eval outputs on a
  fixed input;
- ``report``: HardQuantize's figures.

``sharded`` gives each rank its half of every batch (Lightning's DistributedSampler);
``replicated`` turns the sampler off so every rank sees the whole batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

# One thread per process: the two ranks share two cores, and the single-process reference
# must reduce in the same order as each rank to compare bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from models import GroupedConvNet, image_blobs, loader  # noqa: E402

from lightning_nipq import HardQuantize, NIPQCallback
from lightning_nipq.layers import quantizers  # noqa: E402

EPOCHS = 4  # noise (calibration in its first batches), noise, anneal, hard
BATCH = 16
SAMPLES = 128


class Recorder(Callback):
    """Placed after NIPQCallback and before HardQuantize, so its on_train_end sees frozen, unconverted quantizers."""

    def __init__(self, nipq: NIPQCallback) -> None:
        self.nipq = nipq
        self.steps: list[dict[str, Any]] = []
        self.quantizers: dict[str, dict[str, Any]] = {}
        self.fake_state: dict[str, Any] = {}
        self._missing_grads: Optional[list[str]] = None
        self._calibrating = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._missing_grads = None  # stays None if no optimizer step looked
        self._calibrating = any(not q.calibrated and not q.stays_float for _, q in quantizers(pl_module))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # DDP without find_unused_parameters needs a gradient for every parameter at every step.
        self._missing_grads = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        qs = [q for _, q in quantizers(pl_module)]
        loss = self.nipq._last_bit_loss
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "batch": batch_idx,
                "phase": self.nipq._phase(pl_module),
                "calibrating": self._calibrating,
                "hard_quantizers": sum(q.mode == "hard" for q in qs),
                "bit_loss": None if loss is None else loss.double().item(),
                "batch_checksum": float(batch[0].double().sum()),
                "missing_grads": self._missing_grads,
            }
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.quantizers = {
            name: {
                "theta": q.theta.detach().clone(),
                "alpha_raw": q.alpha_raw.detach().clone(),
                "frozen_bits": q.frozen_bits,
                "signed": q.signed,
                "calibrated": q.calibrated,
                "stays_float": q.stays_float,
                "size": q.size,
            }
            for name, q in quantizers(pl_module)
        }
        state = pl_module.state_dict()
        self.fake_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def main(out_dir: str, mode: str, sampling: str, budget: str = "regulariser") -> None:
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    data = image_blobs(SAMPLES)
    model = GroupedConvNet()
    # budget="regulariser": the regulariser alone moves the bits, so its term is non-zero and
    # its gradient must reach every rank alike; "enforced": the default projection moves them.
    nipq = NIPQCallback(
        target_bits=4,
        hard_epochs=1,
        anneal_epochs=1,
        calibration_batches=2,
        quantizer_lr_factor=20.0,
        enforce_budget=budget == "enforced",
    )
    recorder = Recorder(nipq)
    hard = HardQuantize(bn_batches=2, compare_batches=2, verbose=False)
    distributed = mode == "ddp"
    trainer = Trainer(
        max_epochs=EPOCHS,
        callbacks=[nipq, recorder, hard],
        accelerator="cpu",
        devices=2 if distributed else 1,
        # The default DDP: find_unused_parameters=False, so a parameter without a gradient
        # in any phase fails the next step.
        strategy="ddp" if distributed else "auto",
        use_distributed_sampler=sampling == "sharded",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, loader(data, batch_size=BATCH), loader(data, batch_size=BATCH))
    x = data.tensors[0][:32]
    with torch.no_grad():
        outputs = model.eval()(x)
    report = hard.report
    assert report is not None
    torch.save(
        {
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "steps": recorder.steps,
            "quantizers": recorder.quantizers,
            "fake_state": recorder.fake_state,
            "integer_state": model.state_dict(),
            "outputs": outputs,
            "report": {
                "avg_weight_bits": report.avg_weight_bits,
                "avg_act_bits": report.avg_act_bits,
                "agreement": report.agreement,
                "max_abs_diff": report.max_abs_diff,
                "max_rel_diff": report.max_rel_diff,
                "compared_batches": report.compared_batches,
                "layer_bits": [(row.name, row.weight_bits, row.input_bits) for row in report.layers],
            },
        },
        Path(out_dir) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
