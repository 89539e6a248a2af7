"""One NIPQ run, built identically in the test process and in the process that crashes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from models import MLP, blobs, loader  # noqa: E402

from lightning_nipq import NIPQCallback  # noqa: E402

EPOCHS = 5


class ScheduledMLP(MLP):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


class KillAt(Callback):
    """SIGKILL the process in the middle of an epoch: a real crash, nothing cleaned up."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def run(checkpoint_dir: str | None = None, ckpt_path: str | None = None, kill: tuple[int, int] | None = None) -> ScheduledMLP:
    seed_everything(0, verbose=False)
    model = ScheduledMLP()
    callbacks: list[Callback] = [
        NIPQCallback(target_bits=3, hard_epochs=1, anneal_epochs=1, quantizer_lr_factor=10.0, calibration_batches=2)
    ]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=-1, every_n_epochs=1))
    if kill is not None:
        callbacks.append(KillAt(*kill))
    trainer = Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, loader(blobs(256), batch_size=32), ckpt_path=ckpt_path)
    return model


if __name__ == "__main__":
    run(checkpoint_dir=sys.argv[1], kill=(int(sys.argv[2]), int(sys.argv[3])))
