import gzip
import struct

import pytest
import torch

from lightning_nipq.demo.data import ImageDataModule, load_digits_split, load_fashion_mnist, read_idx


def _idx(data: torch.Tensor, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    if data.dtype == torch.uint8:
        return header + data.numpy().tobytes()
    return header + data.numpy().astype(">i4").tobytes()


def _write_fashion(directory, n_train=20, n_test=10, gz=True):
    g = torch.Generator().manual_seed(0)
    parts = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    for stem, tensor in parts.items():
        if gz:
            with gzip.open(directory / f"{stem}.gz", "wb") as f:
                f.write(_idx(tensor))
        else:
            (directory / stem).write_bytes(_idx(tensor))
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_load_exactly(tmp_path, gz):
    parts = _write_fashion(tmp_path, gz=gz)
    tx, ty, vx, vy = load_fashion_mnist(tmp_path)
    assert tx.shape == (20, 1, 28, 28) and vx.shape == (10, 1, 28, 28)
    assert torch.equal((tx[:, 0] * 255).round().to(torch.uint8), parts["train-images-idx3-ubyte"])
    assert torch.equal(vy, parts["t10k-labels-idx1-ubyte"].long())


def test_big_endian_int32_idx(tmp_path):
    data = torch.tensor([[1, -2, 70000], [3, 4, -5]], dtype=torch.int32)
    (tmp_path / "x").write_bytes(_idx(data, 0x0C))
    assert torch.equal(read_idx(tmp_path / "x"), data)


def test_bad_idx_files_raise_clear_errors(tmp_path):
    data = _idx(torch.zeros(4, 3, dtype=torch.uint8))
    (tmp_path / "short").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_digits_split_and_datamodule():
    tx, ty, vx, vy = load_digits_split()
    assert tx.shape[1:] == (1, 8, 8) and len(tx) + len(vx) == 1797
    assert 0.0 <= float(tx.min()) and float(tx.max()) <= 1.0
    dm = ImageDataModule("digits")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and abs(float(dm.train_set.tensors[0].mean())) < 1e-4
    with pytest.raises(ValueError, match="digits"):
        ImageDataModule("cifar")
    small = ImageDataModule("digits", train_samples=100)
    assert len(small.train_set) == 100 and len(small.test_set) == len(dm.test_set)
    with pytest.raises(ValueError, match="train_samples"):
        ImageDataModule("digits", train_samples=0)
