"""Calibration data from elsewhere: HardQuantize re-estimating BatchNorm from given batches, the image loader, prompts."""

import copy

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from models import GroupedConvNet, fast_trainer, image_blobs, loader
from torch import nn

from lightning_nipq import HardQuantize, NIPQCallback
from lightning_nipq.convert import freeze_quantizers, recalibrate_batchnorm
from lightning_nipq.data import as_batches, generate_calibration_data, load_calibration_images, mixup_class_prompts
from lightning_nipq.layers import IntegerLayerMixin

PIL = pytest.importorskip("PIL.Image")


class _Snapshot(Callback):
    """Copies the model as HardQuantize receives it (listed before HardQuantize)."""

    def on_train_end(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module)


def _bn_stats(model):
    return [t.clone() for t in (model.bn.running_mean, model.bn.running_var)]


def test_hard_quantize_re_estimates_batchnorm_from_the_batches_given():
    torch.manual_seed(0)
    float_model = GroupedConvNet()
    fast_trainer(1).fit(float_model, loader(image_blobs(64)))
    generated = generate_calibration_data(float_model, (4, 8, 8), num_batches=3, batch_size=16, steps=20)
    model = copy.deepcopy(float_model)
    nipq = NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1)
    snapshot = _Snapshot()
    hard = HardQuantize(bn_batches=generated, compare_batches=2, run_validation=False, verbose=False)
    fast_trainer(2, [nipq, snapshot, hard]).fit(model, loader(image_blobs(64), shuffle=True))
    assert any(isinstance(m, IntegerLayerMixin) for m in model.modules()), "converted"

    # The same steps by hand, on the same batches.
    reference = snapshot.model
    trained_stats, trained_count = _bn_stats(reference), int(reference.bn.num_batches_tracked)
    nipq.finalize_bits(reference)
    freeze_quantizers(reference)
    assert recalibrate_batchnorm(reference, generated) == 3
    for got, want in zip(_bn_stats(model), _bn_stats(reference)):
        assert torch.equal(got, want)
    # Re-estimated (an exact average over the three batches, momentum None), not the training statistics;
    # close to them all the same, as the generated inputs were made to match them.
    assert trained_count > 3 and int(model.bn.num_batches_tracked) == 3
    assert not torch.equal(_bn_stats(model)[0], trained_stats[0])


def test_a_one_shot_iterator_is_kept_for_every_fit_and_bad_values_are_refused():
    batches = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    hard = HardQuantize(bn_batches=(b for b in batches))
    assert isinstance(hard.bn_batches, list) and all(a is b for a, b in zip(hard.bn_batches, batches))
    assert HardQuantize(bn_batches=3).bn_batches == 3
    dataloader = loader(image_blobs(16), batch_size=8)
    assert HardQuantize(bn_batches=dataloader).bn_batches is dataloader
    with pytest.raises(ValueError, match="one tensor"):
        HardQuantize(bn_batches=torch.randn(8, 4, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        HardQuantize(bn_batches=[])
    with pytest.raises(ValueError, match=">= 0"):
        HardQuantize(bn_batches=-1)
    with pytest.raises(ValueError, match="iterable of input batches"):
        HardQuantize(bn_batches="generated/")
    with pytest.raises(ValueError, match="iterable of input batches"):
        HardQuantize(bn_batches=2.5)


def _save_png(path, array):
    mode = "L" if array.ndim == 2 else "RGB"
    PIL.fromarray(array, mode=mode).save(path)


def test_the_loader_reads_every_format_resizes_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _save_png(tmp_path / "a.png", grey)
    np.save(tmp_path / "b.npy", np.full((3, 1, 8, 8), 0.25, dtype=np.float32))  # a stack of three
    torch.save(torch.full((1, 16, 16), 0.75), tmp_path / "c.pt")  # one image, twice the size
    np.save(tmp_path / "d.npy", np.full((8, 8), 255, dtype=np.uint8))  # (H, W) uint8
    (tmp_path / "prompts.txt").write_text("skipped: not an image")

    batches = load_calibration_images(tmp_path, size=8, channels=1, mean=0.5, std=0.25, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 1, 8, 8), (2, 1, 8, 8)]
    images = torch.cat(batches)
    assert images.dtype == torch.float32
    expected_png = (torch.from_numpy(grey).float() / 255.0 - 0.5) / 0.25
    assert torch.allclose(images[0, 0], expected_png, atol=1e-6), "PNG scaled to [0, 1] then normalised"
    assert torch.allclose(images[1:4], torch.full((3, 1, 8, 8), -1.0)), "float tensors taken as they are"
    assert torch.allclose(images[4], torch.full((1, 8, 8), 1.0), atol=1e-6), "a constant image stays constant when resized"
    assert torch.allclose(images[5], torch.full((1, 8, 8), 2.0)), "uint8 tensors scaled like images"

    only = load_calibration_images([tmp_path / "c.pt"], batch_size=10)
    assert [tuple(b.shape) for b in only] == [(1, 1, 16, 16)]


def test_the_loader_reads_rgb_with_per_channel_statistics(tmp_path):
    pixel = np.zeros((4, 6, 3), dtype=np.uint8)
    pixel[..., 0], pixel[..., 1], pixel[..., 2] = 255, 0, 51
    _save_png(tmp_path / "x.png", pixel)
    (batch,) = load_calibration_images(tmp_path, mean=[0.5, 0.0, 0.1], std=[0.5, 1.0, 0.1])
    assert batch.shape == (1, 3, 4, 6)
    assert torch.allclose(batch[0, :, 0, 0], torch.tensor([1.0, 0.0, 1.0]), atol=1e-5)
    (grey,) = load_calibration_images(tmp_path, channels=1, size=(2, 3))
    assert grey.shape == (1, 1, 2, 3)
    with pytest.raises(ValueError, match="3 values for images with 1 channels|has 2 values"):
        load_calibration_images(tmp_path, mean=[0.5, 0.5])


def test_the_loader_rejects_bad_input_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no calibration images in"):
        load_calibration_images(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration_images(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_calibration_images(empty / "notes.txt")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((1, 8, 8), dtype=np.float32))
    np.save(mixed / "b.npy", np.zeros((1, 10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match=r"b\.npy has images of shape \(1, 10, 10\) but .*a\.npy has \(1, 8, 8\).*size="):
        load_calibration_images(mixed)
    assert torch.cat(load_calibration_images(mixed, size=8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="1 channels, expected 3.*channels first"):
        load_calibration_images(mixed, channels=3)

    odd = tmp_path / "odd"
    odd.mkdir()
    np.save(odd / "channels_last.npy", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="channels first"):
        load_calibration_images(odd / "channels_last.npy", channels=3)
    np.save(odd / "five.npy", np.zeros((1, 1, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected an image \(H, W\)"):
        load_calibration_images(odd / "five.npy")
    np.save(odd / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        load_calibration_images(odd / "objects.npy")
    np.save(odd / "ints.npy", np.zeros((1, 8, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="floating point or uint8"):
        load_calibration_images(odd / "ints.npy")
    torch.save({"images": torch.zeros(1, 8, 8)}, odd / "dict.pt")
    with pytest.raises(ValueError, match="holds a dict"):
        load_calibration_images(odd / "dict.pt")
    torch.save(nn.Linear(2, 2), odd / "module.pt")  # a pickled object: refused by weights_only, never run
    with pytest.raises(ValueError, match="weights_only"):
        load_calibration_images(odd / "module.pt")
    with pytest.raises(ValueError, match="batch_size"):
        load_calibration_images(mixed, batch_size=0)
    with pytest.raises(ValueError, match="std must be > 0"):
        load_calibration_images(mixed, size=8, std=0.0)
    with pytest.raises(ValueError, match="non-empty list"):
        load_calibration_images([])


def test_loaded_images_drive_batchnorm_re_estimation(tmp_path):
    """What a user does with images generated elsewhere: load, then re-estimate BatchNorm from them."""
    images = torch.rand(10, 4, 8, 8) * 2 + 1
    torch.save(images, tmp_path / "generated.pt")
    batches = load_calibration_images(tmp_path, batch_size=5)
    model = GroupedConvNet()
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        h = model.conv(images)
    assert torch.allclose(model.bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert [b.shape[0] for b in as_batches(images, 4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="non-empty tensor"):
        as_batches(torch.zeros(0, 3))


def test_mixup_class_prompts_name_two_different_classes_evenly():
    names = ["cat", "dog", "ship", "truck"]
    prompts = mixup_class_prompts(names, 12, seed=1)
    assert len(prompts) == 12
    assert all(p.class1 != p.class2 and f"a {p.class1}" in p.text and f"a {p.class2}" in p.text for p in prompts)
    assert all(p.text in (f"a photo of a {p.class1} and a {p.class2}",) for p in prompts)
    pairs = [frozenset((p.class1, p.class2)) for p in prompts]
    assert len(set(pairs)) == 6 and all(pairs.count(pair) == 2 for pair in set(pairs)), "all pairs, equally often"
    assert all(p.lam == 0.5 for p in prompts)
    assert mixup_class_prompts(names, 12, seed=1) == prompts
    weighted = mixup_class_prompts(names, 50, template="{c1} mixed with {c2}", mixup_alpha=1.0, seed=0)
    assert all(0.0 < p.lam < 1.0 for p in weighted) and len({p.lam for p in weighted}) == 50
    with pytest.raises(ValueError, match="two different class names"):
        mixup_class_prompts(["cat", "cat"], 4)
    with pytest.raises(ValueError, match="c2"):
        mixup_class_prompts(names, 4, template="a photo of a {c1}")
