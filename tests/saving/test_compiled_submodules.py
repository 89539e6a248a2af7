"""Models whose submodules are wrapped in ``torch.compile``: saved and loaded by canonical names, compiled or not."""

import json

import lightning
import pytest
import torch
from lightning.pytorch import LightningModule
from safetensors import safe_open
from torch import nn

import lightning_nipq
from lightning_nipq import ArtifactError, CheckpointMismatchError, NIPQCheckpointMixin, load_nipq_checkpoint, load_quantized, save_quantized
from lightning_nipq.layers import calibrate_activations, quantizers
from lightning_nipq.layers.module_names import canonical_name, model_keys
from lightning_nipq.saving import artifact
from lightning_nipq.saving.artifact import read_manifest
from lightning_nipq.saving.checkpoint import (
    DIGEST_KEY,
    MANIFEST_KEY,
    _digest,
    check_manifest,
    prepare_for_checkpoint,
    prepare_for_state_dict,
    quantization_manifest,
    quantization_state_digest,
    seal_manifest,
)


class Net(LightningModule):
    """A convolutional ``features`` block (compiled in place if asked, as users do) and a linear head."""

    def __init__(self, compiled: bool = False, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 4)
        if compiled:
            self.features = torch.compile(self.features, backend="eager")

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class MixinNet(NIPQCheckpointMixin, Net):
    pass


def batch():
    return torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def fresh(compiled, **kwargs):
    torch.manual_seed(123)  # other weights than the saved model: everything must come from the file
    return Net(compiled, **kwargs).eval()


def fake_quantized(compiled, x):
    torch.manual_seed(0)
    model = Net(compiled)
    with torch.no_grad():
        for _ in range(2):
            model(x)  # BatchNorm statistics that are not the defaults
    model.eval()
    lightning_nipq.attach_quantizers(model)
    calibrate_activations(model, [x], forward=model)
    for _, q in quantizers(model):
        q.freeze_bits(4)
    return model.eval()


def integer(compiled, x, fold=False):
    model = fake_quantized(compiled, x)
    lightning_nipq.hard_quantize(model, compare_batches=[x], fold_batchnorm=fold)
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_canonical_names_leave_out_every_compile_segment():
    assert canonical_name("features._orig_mod.0.weight") == "features.0.weight"
    assert canonical_name("_orig_mod.a._orig_mod.b") == "a.b"
    assert canonical_name("head.weight") == "head.weight"
    compiled = fresh(True)
    assert any("_orig_mod" in key for key in compiled.state_dict())
    translated = model_keys(compiled, fresh(False).state_dict())
    assert list(translated) == list(compiled.state_dict())


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
def test_artifact_of_a_compiled_submodule_loads_into_plain_and_compiled_models(tmp_path, fold):
    x = batch()
    model = integer(True, x, fold)
    expected = outputs(model, x)
    path = save_quantized(model, tmp_path / "m.safetensors")
    manifest = read_manifest(path)
    assert "_orig_mod" not in json.dumps(manifest)
    assert {entry["name"] for entry in manifest["layers"]} == {"features.0", "features.3", "head"}
    if fold:
        assert manifest["folded_batchnorms"][0]["name"] == "features.1"
        assert manifest["folded_batchnorms"][0]["into"] == "features.0"
    with safe_open(str(path), framework="pt") as f:
        assert not [key for key in f.keys() if "_orig_mod" in key]
    for compiled in (False, True):
        loaded = load_quantized(path, fresh(compiled))
        assert torch.equal(outputs(loaded, x), expected), compiled
        if fold:
            folded = loaded.features[1] if not compiled else loaded.features._orig_mod[1]
            assert folded.into == ("features._orig_mod.0" if compiled else "features.0")  # the layer's name in this model
        # and it saves again to the same names
        again = read_manifest(save_quantized(loaded, tmp_path / f"again{compiled}.safetensors"))
        assert again["layers"] == manifest["layers"]


def test_artifact_of_a_plain_model_loads_into_a_compiled_one(tmp_path):
    x = batch()
    model = integer(False, x, fold=True)
    path = save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(path, fresh(True))
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_artifact_written_with_compile_segments_still_loads(tmp_path, monkeypatch):
    # As files were written before names were canonical: under the compiled module's own names.
    x = batch()
    model = integer(True, x, fold=True)
    with monkeypatch.context() as m:
        m.setattr(artifact, "canonical_name", lambda name: name)
        path = save_quantized(model, tmp_path / "old.safetensors")
    assert "features._orig_mod.0" in json.dumps(read_manifest(path))
    for compiled in (True, False):
        loaded = load_quantized(path, fresh(compiled))
        assert torch.equal(outputs(loaded, x), outputs(model, x)), compiled


def test_artifact_refuses_a_real_mismatch_compiled_or_not(tmp_path):
    x = batch()
    path = save_quantized(integer(True, x), tmp_path / "m.safetensors")
    for compiled in (False, True):
        model = fresh(compiled, width=6)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ArtifactError, match=r"does not match.*tensors of another shape: features\.0\.weight"):
            load_quantized(path, model)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # left as it was


@pytest.mark.parametrize("form", ["fake", "integer"])
@pytest.mark.parametrize("saved_compiled", [True, False], ids=["compiled-to-plain", "plain-to-compiled"])
def test_state_dict_loads_across_compiled_and_plain(form, saved_compiled):
    x = batch()
    model = fake_quantized(saved_compiled, x) if form == "fake" else integer(saved_compiled, x, fold=True)
    state = model.state_dict()
    target = fresh(not saved_compiled)
    translated = prepare_for_state_dict(target, state)
    assert list(translated) == list(target.state_dict())  # the target's own names
    target.load_state_dict(translated, strict=True)
    assert torch.equal(outputs(target.eval(), x), outputs(model, x))


def test_state_dict_mismatch_and_duplicate_names_are_refused():
    x = batch()
    state = integer(True, x).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"does not match the model.*features\.0"):
        prepare_for_state_dict(fresh(False, width=6), state)
    doubled = {**state, **{canonical_name(k): v for k, v in state.items()}}
    with pytest.raises(CheckpointMismatchError, match="one entry under two names"):
        prepare_for_state_dict(fresh(False), doubled)


def checkpoint_file(tmp_path, model, compiled, legacy_digest=False):
    checkpoint = {
        "state_dict": model.state_dict(),
        MANIFEST_KEY: quantization_manifest(model),
        "hyper_parameters": {"compiled": compiled, "width": 8},
        "pytorch-lightning_version": lightning.__version__,
    }
    seal_manifest(checkpoint)
    if legacy_digest:
        checkpoint[MANIFEST_KEY][DIGEST_KEY] = _digest(checkpoint["state_dict"], canonical=False)
    path = tmp_path / f"compiled={compiled}.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("saved_compiled", [True, False], ids=["compiled-to-plain", "plain-to-compiled"])
def test_checkpoints_load_across_compiled_and_plain(tmp_path, saved_compiled):
    x = batch()
    model = integer(saved_compiled, x, fold=True)
    path = checkpoint_file(tmp_path, model, saved_compiled)
    expected = outputs(model, x)
    loaded = load_nipq_checkpoint(Net, path, compiled=not saved_compiled).eval()
    assert isinstance(loaded.features, nn.Sequential) == saved_compiled  # loaded into the other form
    assert torch.equal(outputs(loaded, x), expected)
    # Lightning's own load: on_load_checkpoint (the mixin), then load_state_dict(checkpoint["state_dict"], strict=True).
    loaded = MixinNet.load_from_checkpoint(path, compiled=not saved_compiled, weights_only=True).eval()
    assert torch.equal(outputs(loaded, x), expected)
    # The hook a Trainer restore calls rewrites the checkpoint's keys in place, leaving the digest valid.
    checkpoint = torch.load(path, weights_only=True)
    target = fresh(not saved_compiled)
    prepare_for_checkpoint(target, checkpoint)
    assert list(checkpoint["state_dict"]) == list(target.state_dict())
    check_manifest(checkpoint)
    target.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(outputs(target.eval(), x), expected)


def test_digest_is_the_same_for_compiled_and_plain_names_and_old_digests_still_check(tmp_path):
    x = batch()
    model = integer(True, x, fold=True)
    state = model.state_dict()
    plain_state = prepare_for_state_dict(fresh(False), state)
    assert not any("_orig_mod" in key for key in plain_state)
    assert quantization_state_digest(plain_state) == quantization_state_digest(state)
    path = checkpoint_file(tmp_path, model, True, legacy_digest=True)
    checkpoint = torch.load(path, weights_only=True)
    check_manifest(checkpoint)  # the digest of the keys as they were, written before canonical names
    loaded = load_nipq_checkpoint(Net, path, compiled=False).eval()
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    checkpoint["state_dict"]["head.weight_codes"] = checkpoint["state_dict"]["head.weight_codes"].neg()
    with pytest.raises(CheckpointMismatchError, match="does not match the digest"):
        check_manifest(checkpoint)
