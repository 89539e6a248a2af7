"""Small image datasets for the demo and benchmarks: scikit-learn's digits and Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32, 0x0E: torch.float64}


def read_idx(path: Path) -> Tensor:
    """Read an IDX file (optionally gzipped): a magic number, the dimensions, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    count = 1
    for d in shape:
        count *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(body) != count * itemsize:
        raise ValueError(f"{path} is truncated: expected {count * itemsize} bytes of data, found {len(body)}")
    tensor = torch.frombuffer(bytearray(body), dtype=dtype)
    if itemsize > 1:
        tensor = tensor.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)  # big-endian
    return tensor.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory}; on Debian: apt-get install dataset-fashion-mnist "
        f"(files land in {DEFAULT_FASHION_MNIST_DIR}), or download the four IDX files there"
    )


def load_fashion_mnist(directory: str | Path = DEFAULT_FASHION_MNIST_DIR) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``; images as float in [0, 1], shape ``(N, 1, 28, 28)``."""
    directory = Path(directory)
    parts = {key: read_idx(_find(directory, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    to_images = lambda t: (t.float() / 255.0).unsqueeze(1)  # noqa: E731
    return (
        to_images(parts["train_images"]),
        parts["train_labels"].long(),
        to_images(parts["test_images"]),
        parts["test_labels"].long(),
    )


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits (shipped with the package), split and scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


class ImageDataModule(LightningDataModule):
    """Train/validation/test loaders over in-memory tensors; validation and test share the test split."""

    def __init__(
        self,
        name: str = "digits",
        data_dir: Optional[str] = None,
        batch_size: int = 64,
        seed: int = 0,
        train_samples: Optional[int] = None,
    ) -> None:
        super().__init__()
        if name not in ("digits", "fashion-mnist"):
            raise ValueError(f"data must be 'digits' or 'fashion-mnist', got {name!r}")
        self.name = name
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.seed = seed
        if name == "digits":
            tx, ty, vx, vy = load_digits_split(seed=seed)
        else:
            tx, ty, vx, vy = load_fashion_mnist(data_dir or DEFAULT_FASHION_MNIST_DIR)
        if train_samples is not None:
            if train_samples < 1:
                raise ValueError(f"train_samples must be >= 1, got {train_samples}")
            tx, ty = tx[:train_samples], ty[:train_samples]
        mean, std = tx.mean(), tx.std()
        self.train_set = TensorDataset((tx - mean) / std, ty)
        self.test_set = TensorDataset((vx - mean) / std, vy)
        self.image_size = tx.shape[-1]

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)
