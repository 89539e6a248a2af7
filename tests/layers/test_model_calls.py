"""Calling the user's model on the batches it trains on: Hugging Face style dict batches need no input_fn."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from models import fast_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_nipq import HardQuantize, NIPQCallback
from lightning_nipq.layers import IntegerLayerMixin
from lightning_nipq.layers.model_calls import call_model, default_input_fn


class TokenBatches(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 30, (n, 8), generator=g)
        self.mask = torch.ones(n, 8, dtype=torch.long)
        self.mask[:, 6:] = 0
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TokenClassifier(LightningModule):
    """Called as Hugging Face models are: model(input_ids=..., attention_mask=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = F.relu(self.proj(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h.mean(dim=1))}

    def training_step(self, batch, batch_idx):
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out["logits"], batch["labels"])

    def validation_step(self, batch, batch_idx):
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        self.log("val_acc", (out["logits"].argmax(-1) == batch["labels"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_hugging_face_dict_batch_is_the_models_keyword_input_without_its_labels():
    batch = next(iter(DataLoader(TokenBatches(), batch_size=4)))
    inputs = default_input_fn(batch)
    assert set(inputs) == {"input_ids", "attention_mask"}
    model = TokenClassifier()
    assert call_model(model, batch)["logits"].shape == (4, 3)


def test_hard_quantize_compares_on_dict_batches_without_an_input_fn():
    model = TokenClassifier()
    hard = HardQuantize(compare_batches=2, verbose=False)
    data = DataLoader(TokenBatches(), batch_size=16)
    fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), hard]).fit(model, data, data)
    assert isinstance(model.proj, IntegerLayerMixin) and isinstance(model.head, IntegerLayerMixin)
    assert hard.report.compared_batches == 2 and hard.report.agreement is not None and hard.report.agreement >= 0.99
