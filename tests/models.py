"""Small LightningModules and data for the tests."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def blobs(n: int = 256, dim: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Linearly separable-ish Gaussian blobs: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def image_blobs(n: int = 128, channels: int = 4, size: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, channels, size, size, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    return TensorDataset(centers[y] + 0.5 * torch.randn(n, channels, size, size, generator=g), y)


def loader(ds: TensorDataset, batch_size: int = 32, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def fast_trainer(max_epochs: int = 2, callbacks: Optional[list] = None, **kwargs: Any) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return Trainer(max_epochs=max_epochs, callbacks=callbacks or [], **defaults)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) + x


class MLP(LightningModule):
    """Nested submodules, keyword-only forward arguments, a dict from training_step."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.stem = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([Block(hidden), Block(hidden)])
        self.head = nn.Linear(hidden, classes)
        self.lr = lr

    def forward(self, x: Tensor, *, scale: float = 1.0, return_features: bool = False) -> Any:
        h = F.relu(self.stem(x * scale))
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)
        return (logits, h) if return_features else logits

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x, scale=1.0)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class GroupedConvNet(LightningModule):
    """Conv1d, grouped and depthwise Conv2d, Conv3d, BatchNorm, and a tensor returned from training_step."""

    def __init__(self, channels: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.grouped(h))
        h = self.depthwise(h)  # signed input to the next layer
        b, c, hh, ww = h.shape
        seq = self.conv1d(h.flatten(2)).view(b, c, hh, ww)
        vol = self.conv3d(seq.unsqueeze(1))  # (b, 2, c, hh, ww)
        return self.head(vol.mean(dim=(3, 4)).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


class TinyTransformer(LightningModule):
    """A transformer encoder layer (with its MultiheadAttention) behind a linear embedding."""

    def __init__(self, dim: int = 16, classes: int = 4, seq: int = 4) -> None:
        super().__init__()
        self.seq = seq
        self.embed = nn.Linear(dim // seq * 2, dim)
        self.encoder = nn.TransformerEncoderLayer(d_model=dim, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.view(x.shape[0], self.seq // 2, -1).repeat(1, 2, 1))
        return self.head(self.encoder(tokens).mean(dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def train_on_tensors(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 1e-2, batch_size: int = 64) -> nn.Module:
    """Plain Adam and cross-entropy over shuffled mini-batches (no Lightning); returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
