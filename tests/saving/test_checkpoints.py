"""Quantized checkpoints: resuming after a crash, reloading into fresh modules, validating after conversion."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from models import MLP, GroupedConvNet, blobs, fast_trainer, image_blobs, loader
from resume_setup import run

from lightning_nipq import (
    CheckpointMismatchError,
    HardQuantize,
    NIPQCallback,
    NIPQCheckpointMixin,
    load_nipq_checkpoint,
    load_quantized,
    save_quantized,
)
from lightning_nipq.layers import IntegerLayerMixin, QuantizedLayerMixin, quantizers


class MixinMLP(NIPQCheckpointMixin, MLP):
    pass


class MixinConvNet(NIPQCheckpointMixin, GroupedConvNet):
    pass


@pytest.mark.slow
def test_resume_after_a_real_crash_matches_an_uninterrupted_run(tmp_path):
    # a separate process trains and is SIGKILLed in the middle of epoch 3 (the anneal phase)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "resume_setup.py"), str(tmp_path), "3", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = tmp_path / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 2
    resumed = run(ckpt_path=str(last))
    straight = run()
    for (name, a), (_, b) in zip(quantizers(resumed), quantizers(straight)):
        assert a.frozen_bits == b.frozen_bits and a.frozen_bits is not None, name
        assert torch.allclose(a.alpha, b.alpha, atol=1e-6), name
        assert torch.allclose(a.theta, b.theta, atol=1e-6), name
    for (name, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


class SnapshotAt(Callback):
    """Save a checkpoint at the end of an epoch and record the model's eval outputs then."""

    def __init__(self, epoch, path, inputs):
        self.epoch, self.path, self.inputs, self.outputs = epoch, path, inputs, None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            pl_module.eval()
            with torch.no_grad():
                self.outputs = pl_module(self.inputs)
            pl_module.train()
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("phase_epoch,frozen", [(0, False), (2, True)])
@pytest.mark.parametrize("cls,data", [(MixinMLP, lambda: blobs(128)), (MixinConvNet, lambda: image_blobs(64))])
def test_fresh_module_reloads_noise_and_hard_phase_checkpoints(tmp_path, phase_epoch, frozen, cls, data):
    ds = data()
    path = tmp_path / "snap.ckpt"
    snap = SnapshotAt(phase_epoch, path, ds.tensors[0][:32])
    trainer = fast_trainer(3, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), snap])
    trainer.fit(cls(), loader(ds))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["nipq"]["phase"] == ("hard" if frozen else "noise")
    for reload in (cls.load_from_checkpoint, lambda p: load_nipq_checkpoint(cls.__mro__[2], p)):
        fresh = reload(path).eval()
        assert any(isinstance(m, QuantizedLayerMixin) for m in fresh.modules())
        assert all((q.frozen_bits is not None) == frozen for _, q in quantizers(fresh) if q.learns_bits or frozen)
        with torch.no_grad():
            assert torch.equal(fresh(snap.inputs), snap.outputs)


def test_integer_model_checkpoint_reloads_into_a_fresh_module(tmp_path):
    ds = image_blobs(64)
    model = MixinConvNet()
    trainer = fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), HardQuantize(verbose=False)])
    trainer.fit(model, loader(ds), loader(ds))
    trainer.save_checkpoint(tmp_path / "int.ckpt")
    fresh = MixinConvNet.load_from_checkpoint(tmp_path / "int.ckpt").eval()
    assert all(isinstance(getattr(fresh, n), IntegerLayerMixin) for n in ("conv", "grouped", "depthwise", "conv1d", "conv3d", "head"))
    x = ds.tensors[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))


def test_validate_and_test_with_ckpt_path_work_after_hard_quantize(tmp_path):
    ds = blobs(128)
    model = MLP()  # no mixin: the callbacks in the trainer rebuild the checkpoint's layers
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max", save_last=True)
    hard = HardQuantize(verbose=False)
    trainer = fast_trainer(3, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), hard, ckpt], enable_checkpointing=True)
    trainer.fit(model, loader(ds), loader(ds))
    assert isinstance(model.head, IntegerLayerMixin)
    best = trainer.validate(model, loader(ds), ckpt_path="best", verbose=False)[0]["val_acc"]
    assert isinstance(model.head, QuantizedLayerMixin)  # the checkpoint holds the fake-quantized model
    reference = load_nipq_checkpoint(MLP, ckpt.best_model_path).eval()
    x, y = ds.tensors
    with torch.no_grad():
        assert best == pytest.approx(float((reference(x).argmax(-1) == y).float().mean()))
        assert torch.equal(model.eval()(x), reference(x))
    trainer.validate(model, loader(ds), ckpt_path="last", verbose=False)


def test_checkpoints_that_do_not_match_raise_clear_errors(tmp_path):
    ds = blobs(64)
    trainer = fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=1)])
    trainer.fit(MixinMLP(), loader(ds))
    trainer.save_checkpoint(tmp_path / "a.ckpt")

    class Fewer(NIPQCheckpointMixin, MLP):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([self.blocks[0]])

    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.inner\.0: no such module"):
        Fewer.load_from_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    checkpoint["nipq"]["version"] = 99
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointMismatchError, match="upgrade lightning-nipq"):
        MixinMLP.load_from_checkpoint(tmp_path / "b.ckpt")


def test_non_default_quantizer_settings_reload_from_the_checkpoint_and_the_artifact(tmp_path):
    ds = blobs(128)
    settings = {"noise": "histogram", "stochastic_bits": False}
    callback = NIPQCallback(target_bits=4, min_bits=3, max_bits=6, hard_epochs=1, calibration_batches=1, **settings)
    snap = SnapshotAt(0, tmp_path / "noise.ckpt", ds.tensors[0][:32])  # a noise-phase checkpoint
    hard = HardQuantize(verbose=False)
    model = MLP()
    fast_trainer(2, [callback, snap, hard]).fit(model, loader(ds), loader(ds))

    expected = {"min_bits": 3, "max_bits": 6, **settings}
    for reload in (MixinMLP.load_from_checkpoint, lambda p: load_nipq_checkpoint(MLP, p)):
        fresh = reload(tmp_path / "noise.ckpt")
        loaded = list(quantizers(fresh))
        assert len(loaded) == 8  # 4 weights, 4 inputs (the stem's stays float: the model's own input)
        for name, q in loaded:
            assert {k: q.config()[k] for k in expected} == expected, name
            assert q.frozen_bits is None, name
        with torch.no_grad():
            assert torch.equal(fresh.eval()(snap.inputs), snap.outputs)

    # A Trainer restore (validate with ckpt_path) rebuilds the same quantizers on the integer model.
    restored = fast_trainer(1, [NIPQCallback(target_bits=4, min_bits=3, max_bits=6, **settings)])
    restored.validate(model, loader(ds), ckpt_path=str(tmp_path / "noise.ckpt"), verbose=False)
    assert all({k: q.config()[k] for k in expected} == expected for _, q in quantizers(model))

    # The integer model keeps its bits, signs and float-input layer through the artifact.
    integer = MLP()
    fast_trainer(2, [NIPQCallback(target_bits=4, min_bits=3, max_bits=6, hard_epochs=1, calibration_batches=1, **settings), HardQuantize(verbose=False)]).fit(
        integer, loader(ds), loader(ds)
    )
    save_quantized(integer, tmp_path / "model.safetensors")
    reloaded = load_quantized(tmp_path / "model.safetensors", MLP())
    layers = lambda m: {n: (l.weight_bits, l.input_bits, l.input_signed) for n, l in m.named_modules() if isinstance(l, IntegerLayerMixin)}
    assert layers(reloaded) == layers(integer) and all(3 <= bits[0] <= 6 for bits in layers(integer).values())
    assert layers(integer)["stem"][1] is None
    with torch.no_grad():
        assert torch.equal(reloaded(ds.tensors[0]), integer.eval()(ds.tensors[0]))
