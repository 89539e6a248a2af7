"""The demo's LightningModules: a classification base and a small CNN with BatchNorm."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(LightningModule):
    """Cross-entropy training, accuracy on validation and test, AdamW with a cosine schedule over ``epochs``.

    Subclasses build their layers after calling ``super().__init__`` and define ``forward``.
    """

    def __init__(self, num_classes: int = 10, lr: float = 2e-3, weight_decay: float = 1e-4, epochs: int = 10) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.epochs, 1))
        return {"optimizer": opt, "lr_scheduler": sched}


class SmallCNN(ImageClassifier):
    """Three conv-BN-ReLU blocks, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4, epochs: int = 10) -> None:
        super().__init__(num_classes, lr, weight_decay, epochs)
        self.save_hyperparameters()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))
