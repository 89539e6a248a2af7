"""Several optimizers (manual optimisation), each with its own scheduler and its own share of the quantizers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from models import blobs, fast_trainer, loader
from torch import Tensor, nn
from torch.nn import functional as F

import lightning_nipq
from lightning_nipq import NIPQCallback
from lightning_nipq.layers import quantizers
from lightning_nipq.training import weight_and_act_average_bits

ENCODER_LR, HEAD_LR, FACTOR = 0.05, 0.01, 20.0


class TwoOptimizers(LightningModule):
    """Encoder and head trained by different optimizers with different schedules, as in GANs or fine-tuning."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.bit_loss_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        encoder_opt, head_opt = self.optimizers()
        x, y = batch
        bit_loss = lightning_nipq.callbacks.bit_loss(self)
        self.bit_loss_calls += 1
        loss = F.cross_entropy(self(x), y) + bit_loss
        encoder_opt.zero_grad()
        head_opt.zero_grad()
        self.manual_backward(loss)
        encoder_opt.step()
        head_opt.step()

    def on_train_epoch_end(self) -> None:
        for scheduler in self.lr_schedulers():
            scheduler.step()

    def configure_optimizers(self) -> Any:
        encoder_opt = torch.optim.SGD(self.encoder.parameters(), lr=ENCODER_LR, momentum=0.9, weight_decay=1e-3)
        head_opt = torch.optim.AdamW(self.head.parameters(), lr=HEAD_LR, weight_decay=0.1)
        return [encoder_opt, head_opt], [
            torch.optim.lr_scheduler.StepLR(encoder_opt, step_size=1, gamma=0.5),
            torch.optim.lr_scheduler.ExponentialLR(head_opt, gamma=0.8),
        ]


class LearnedBits(Callback):
    """Average weight bits at each epoch end, and the bit parameters at the start and before freezing."""

    def __init__(self) -> None:
        self.weight_bits: list[float] = []
        self.start: dict[str, Tensor] = {}
        self.end: dict[str, Tensor] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = {name: q.theta.detach().clone() for name, q in quantizers(pl_module)}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            w, _ = weight_and_act_average_bits(pl_module)
        self.weight_bits.append(float(w))
        self.end = {name: q.theta.detach().clone() for name, q in quantizers(pl_module)}


def _ids(params: Any) -> set[int]:
    return {id(p) for p in params}


def test_each_optimizer_gets_a_twin_group_for_its_own_quantizers_and_bit_loss_drives_them() -> None:
    torch.manual_seed(0)
    model = TwoOptimizers()
    learned = LearnedBits()
    epochs = 3
    nipq = NIPQCallback(target_bits=3, hard_epochs=0, quantizer_lr_factor=FACTOR, calibration_batches=1)
    trainer = fast_trainer(epochs, [nipq, learned])
    trainer.fit(model, loader(blobs(256), batch_size=16, shuffle=True))

    encoder_q = _ids(p for name, q in quantizers(model) if name.startswith("encoder.") for p in q.parameters())
    head_q = _ids(p for name, q in quantizers(model) if name.startswith("head.") for p in q.parameters())
    assert encoder_q and head_q
    for optimizer, own, float_params, lr, decay in (
        (trainer.optimizers[0], encoder_q, model.encoder.parameters(), ENCODER_LR * 0.5**epochs, 1e-3),
        (trainer.optimizers[1], head_q, model.head.parameters(), HEAD_LR * 0.8**epochs, 0.1),
    ):
        main, twin = optimizer.param_groups
        # the twin holds exactly this optimizer's quantizers; the user's group only float weights
        assert _ids(twin["params"]) == own
        assert _ids(main["params"]) == _ids(float_params) - own
        assert twin["weight_decay"] == 0.0 and main["weight_decay"] == decay
        # the scheduler drives both groups, the twin at FACTOR times the rate
        assert main["lr"] == pytest.approx(lr) and twin["lr"] == pytest.approx(FACTOR * lr)
    for scheduler in (config.scheduler for config in trainer.lr_scheduler_configs):
        assert len(scheduler.base_lrs) == 2

    # the regulariser, reached only through lightning_nipq.bit_loss, moved every learned bit-width
    assert model.bit_loss_calls == epochs * 16
    # from 7.5 bits at the start to within a bit of the target of 3 by the first epoch end
    assert all(abs(w - 3.0) < 1.0 for w in learned.weight_bits), learned.weight_bits
    moved = {name for name in learned.start if not torch.equal(learned.start[name], learned.end[name])}
    float_inputs = {name for name, q in quantizers(model) if q.stays_float}  # fed the model's own input: no bits to learn
    assert moved == set(learned.start) - float_inputs, "every quantizer, in either optimizer, learned its bits"
    assert "training_step" not in vars(model), "manual optimisation gets no training_step wrapper"
