"""Damaged, edited and malicious checkpoints: refused with `CheckpointMismatchError` on every loading path, never loaded silently."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch import LightningModule
from models import MLP, blobs, fast_trainer, loader

from lightning_nipq import (
    CheckpointMismatchError,
    HardQuantize,
    LSQCallback,
    NIPQCallback,
    NIPQCheckpointMixin,
    attach_quantizers,
    load_nipq_checkpoint,
)
from lightning_nipq.layers import IntegerLayerMixin, quantizers
from lightning_nipq.saving.checkpoint import DIGEST_KEY, MANIFEST_KEY, prepare_for_state_dict, quantization_state_digest

Edit = Callable[[dict[str, Any]], None]


class MixinMLP(NIPQCheckpointMixin, MLP):
    pass


class SizedMLP(MLP):
    """Saves its hyper-parameters, so a loader must rebuild it from them."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.save_hyperparameters()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints written by the callbacks: fake-quantized NIPQ and LSQ models, an integer model, one with hyper-parameters."""
    directory = tmp_path_factory.mktemp("checkpoints")
    ds = blobs(64)
    paths = {name: directory / f"{name}.ckpt" for name in ("nipq", "lsq", "integer", "sized")}
    torch.manual_seed(0)
    trainer = fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=1)])
    trainer.fit(MLP(), loader(ds))
    trainer.save_checkpoint(paths["nipq"])
    trainer = fast_trainer(1, [LSQCallback(weight_bits=4, calibration_batches=1)])
    trainer.fit(MLP(), loader(ds))
    trainer.save_checkpoint(paths["lsq"])
    trainer = fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), HardQuantize(verbose=False)])
    trainer.fit(MLP(), loader(ds), loader(ds))
    trainer.save_checkpoint(paths["integer"])
    trainer = fast_trainer(1, [NIPQCallback(target_bits=4, hard_epochs=0, calibration_batches=1)])
    trainer.fit(SizedMLP(hidden=24, lr=0.05), loader(ds))
    trainer.save_checkpoint(paths["sized"])
    return paths


def edited(source: Path, target: Path, edit: Edit, redigest: bool = True) -> Path:
    """``source`` with ``edit`` applied to its state dict; with ``redigest``, its digest recomputed as an attacker would."""
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint["state_dict"])
    if redigest:
        checkpoint[MANIFEST_KEY][DIGEST_KEY] = quantization_state_digest(checkpoint["state_dict"])
    torch.save(checkpoint, target)
    return target


def set_extra(key: str, **values: Any) -> Edit:
    return lambda state: state[key].update(values)


def set_config(key: str, **values: Any) -> Edit:
    return lambda state: state[key]["config"].update(values)


def fill(key: str, value: float) -> Edit:
    return lambda state: state[key].fill_(value)


def set_code(key: str, value: int, dtype: torch.dtype = torch.int8) -> Edit:
    def edit(state: dict[str, Any]) -> None:
        codes = state[key].to(dtype)
        codes.view(-1)[0] = value
        state[key] = codes

    return edit


LOADERS: dict[str, Callable[[Path], Any]] = {
    "mixin": lambda path: MixinMLP.load_from_checkpoint(path),
    "load_nipq_checkpoint": lambda path: load_nipq_checkpoint(MLP, path),
}


def integer_model(saved: dict[str, Path]) -> MLP:
    return load_nipq_checkpoint(MLP, saved["integer"]).eval()


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return copy.deepcopy(model.state_dict())


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


# ---------------------------------------- integer layers' extra state
INTEGER_EXTRA_STATES = {
    "input_bits=10**30": set_extra("head._extra_state", input_bits=10**30),
    "weight_bits=1": set_extra("head._extra_state", weight_bits=1),
    "weight_bits=17": set_extra("head._extra_state", weight_bits=17),
    "input_numel=-1": set_extra("head._extra_state", input_numel=-1),
    "input_signed='no'": set_extra("head._extra_state", input_signed="no"),
}


@pytest.mark.parametrize("case", INTEGER_EXTRA_STATES)
def test_out_of_range_integer_extra_state_is_refused_before_anything_loads(saved, tmp_path, case):
    field = case.split("=")[0]
    path = edited(saved["integer"], tmp_path / "bad.ckpt", INTEGER_EXTRA_STATES[case])
    for load in LOADERS.values():
        with pytest.raises(CheckpointMismatchError, match=rf"head\._extra_state: {field}.*damaged or edited"):
            load(path)
    # An integer model already there, loaded by prepare_for_state_dict (which checks the whole
    # state dict before it changes anything) or by plain load_state_dict (which refuses the
    # layer before torch copies its first tensor): the model keeps its state.
    state = torch.load(path, weights_only=True)["state_dict"]
    state["head.bias"] = state["head.bias"] + 1.0  # copied before the extra state, were the layer loaded
    model = integer_model(saved)
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError, match=rf"head\._extra_state: {field}"):
        prepare_for_state_dict(model, state)
    with pytest.raises(ValueError, match=rf"head\._extra_state: {field}"):
        model.load_state_dict(state)
    assert_unchanged(model, before)


# ---------------------------------------- integer codes and scales, quantizer parameters and settings
INVALID_INTEGER_BUFFERS = {
    "code 127 in 4 bits": (set_code("head.weight_codes", 127), r"head\.weight_codes hold .*outside ±7"),
    "code -8 in 4 bits": (set_code("head.weight_codes", -8), r"head\.weight_codes hold .*outside ±7"),
    "float codes": (lambda s: s.update({"head.weight_codes": s["head.weight_codes"].float()}), r"head\.weight_codes must be integers"),
    "scale nan": (fill("head.weight_scale", float("nan")), r"head\.weight_scale is nan"),
    "scale inf": (fill("head.weight_scale", float("inf")), r"head\.weight_scale is inf"),
    "scale 0": (fill("head.weight_scale", 0.0), r"head\.weight_scale is 0\.0"),
    "scale -1": (fill("head.weight_scale", -1.0), r"head\.weight_scale is -1\.0"),
    "input alpha nan": (fill("head.input_alpha", float("nan")), r"head\.input_alpha is nan"),
    "input alpha 0": (fill("head.input_alpha", 0.0), r"head\.input_alpha is 0\.0"),
    "input alpha -inf": (fill("head.input_alpha", float("-inf")), r"head\.input_alpha is -inf"),
    "float-input alpha nan": (fill("stem.input_alpha", float("nan")), r"stem\.input_alpha is nan"),
}


@pytest.mark.parametrize("case", INVALID_INTEGER_BUFFERS)
def test_invalid_integer_codes_and_scales_are_refused_on_every_path(saved, tmp_path, case):
    edit, message = INVALID_INTEGER_BUFFERS[case]
    path = edited(saved["integer"], tmp_path / "bad.ckpt", edit)
    for load in LOADERS.values():
        with pytest.raises(CheckpointMismatchError, match=message):
            load(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    state["head.bias"] = state["head.bias"] + 1.0
    model = integer_model(saved)
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError, match=message):
        prepare_for_state_dict(model, state)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    assert_unchanged(model, before)


def test_wider_codes_load_into_a_narrower_integer_layer_without_wrapping(saved, tmp_path):
    # 12-bit codes (int16) loaded into a 4-bit (int8) layer: copied as they were, they would wrap.
    def widen(state: dict[str, Any]) -> None:
        state["head._extra_state"] = {**state["head._extra_state"], "weight_bits": 12}
        state["head.weight_codes"] = state["head.weight_codes"].to(torch.int16) * 250
        state["head.weight_scale"] = state["head.weight_scale"] / 250

    path = edited(saved["integer"], tmp_path / "wide.ckpt", widen)
    state = torch.load(path, weights_only=True)["state_dict"]
    model = integer_model(saved)
    x = blobs(16).tensors[0]
    with torch.no_grad():
        expected = model(x)
    model.load_state_dict(state)
    assert model.head.weight_bits == 12 and model.head.weight_codes.dtype == torch.int16
    assert torch.equal(model.head.weight_codes, state["head.weight_codes"])
    for loaded in (model, load_nipq_checkpoint(MLP, path).eval(), MixinMLP.load_from_checkpoint(path).eval()):
        assert torch.equal(loaded.head.weight_codes, state["head.weight_codes"])
        with torch.no_grad():
            assert torch.allclose(loaded(x), expected, rtol=1e-5, atol=1e-5)


WQ, IQ = "head.weight_quantizer", "head.input_quantizer"
INVALID_QUANTIZERS = {
    "theta nan": ("nipq", fill(f"{WQ}.theta", float("nan")), rf"{WQ}\.theta is not finite \(nan\)"),
    "theta -inf": ("nipq", fill(f"{IQ}.theta", float("-inf")), rf"{IQ}\.theta is not finite"),
    "alpha_raw inf": ("nipq", fill(f"{IQ}.alpha_raw", float("inf")), rf"{IQ}\.alpha_raw is not finite"),
    "alpha_raw nan": ("nipq", fill(f"{WQ}.alpha_raw", float("nan")), rf"{WQ}\.alpha_raw is not finite"),
    "alpha_raw -1000": ("nipq", fill(f"{WQ}.alpha_raw", -1000.0), rf"{WQ}\.alpha_raw=-1000 gives the range softplus\(alpha_raw\) = 0"),
    "frozen_bits 100": ("nipq", set_extra(f"{WQ}._extra_state", frozen_bits=100), rf"{WQ}\._extra_state: frozen_bits=100"),
    "weight max_bits 1": (
        "nipq",
        lambda state: (
            set_config(f"{WQ}._extra_state", min_bits=1, max_bits=1)(state),
            set_extra(f"{WQ}._extra_state", frozen_bits=None)(state),
        ),
        rf"{WQ}\._extra_state: a weight quantizer's highest bits \(max_bits\) must be a whole number in \[2, 16\]",
    ),
    "unsigned weights": ("nipq", set_config(f"{WQ}._extra_state", signed=False), rf"{WQ}\._extra_state: a weight quantizer must be signed"),
    "lsq step nan": ("lsq", fill(f"{WQ}.step", float("nan")), rf"{WQ}\.step is not finite"),
    "lsq step inf": ("lsq", fill(f"{IQ}.step", float("inf")), rf"{IQ}\.step is not finite"),
    "lsq step 0": ("lsq", fill(f"{WQ}.step", 0.0), rf"{WQ}\.step=0 gives the range"),
    "lsq step 1e38": ("lsq", fill(f"{WQ}.step", 1e38), rf"{WQ}\.step=1e\+38 gives the range"),
    "lsq frozen_bits 100": ("lsq", set_extra(f"{WQ}._extra_state", frozen_bits=100), r"frozen_bits=100"),
}


@pytest.mark.parametrize("case", INVALID_QUANTIZERS)
def test_invalid_quantizer_parameters_and_settings_are_refused_on_every_path(saved, tmp_path, case):
    source, edit, message = INVALID_QUANTIZERS[case]
    path = edited(saved[source], tmp_path / "bad.ckpt", edit)
    for load in LOADERS.values():
        with pytest.raises(CheckpointMismatchError, match=message + ".*damaged or edited"):
            load(path)
    # A fake-quantized model already there: nothing of the layer is loaded, not even its weight.
    state = torch.load(path, weights_only=True)["state_dict"]
    state["head.weight"] = state["head.weight"] + 1.0
    model = load_nipq_checkpoint(MLP, saved[source])
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError, match=message):
        prepare_for_state_dict(model, state)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    assert_unchanged(model, before)


# ---------------------------------------- nothing is ever unpickled
class Payload:
    """Pickles as a call to ``exec``: unpickling it with plain pickle writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_load_nipq_checkpoint_never_unpickles_even_when_torch_is_told_to(saved, tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(saved["nipq"], weights_only=True)
    checkpoint["hyper_parameters"] = {"lr": Payload(marker)}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointMismatchError, match=r"objects other than tensors and plain data \(.*exec.*never unpickles") as error:
        load_nipq_checkpoint(MLP, tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert "weights_only=False" not in str(error.value)
    with pytest.raises(TypeError, match="weights_only=True"):
        load_nipq_checkpoint(MLP, saved["nipq"], weights_only=False)
    assert not marker.exists()


def test_load_nipq_checkpoint_builds_from_hyper_parameters_with_overrides_and_map_location(saved, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a valid checkpoint loads all the same
    model = load_nipq_checkpoint(SizedMLP, saved["sized"], map_location="cpu")
    assert model.stem.weight.shape == (24, 16) and model.lr == 0.05 and model.hparams["hidden"] == 24
    assert len(list(quantizers(model))) == 8  # 4 weights, 4 inputs (one of them left float by data flow)
    reference = torch.load(saved["sized"], weights_only=True)["state_dict"]
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items() if isinstance(value, torch.Tensor))
    overridden = load_nipq_checkpoint(SizedMLP, saved["sized"], map_location=torch.device("cpu"), lr=0.5)
    assert overridden.lr == 0.5 and overridden.stem.weight.shape == (24, 16)
    assert isinstance(overridden, LightningModule) and overridden.stem.weight.device.type == "cpu"


# ---------------------------------------- damaged files
def _flip_pickled_key(raw: bytes) -> bytes:
    return raw.replace(b"state_dict", b"st\xffte_dict", 1)


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated to half": lambda raw: raw[: len(raw) // 2],
    "last bytes cut": lambda raw: raw[:-30],
    "empty": lambda raw: b"",
    "random bytes": lambda raw: random.Random(0).randbytes(5000),
    "pickle-like bytes": lambda raw: b"\x80\x02" + random.Random(1).randbytes(3000),
    "invalid UTF-8 in a key": _flip_pickled_key,
    "text": lambda raw: "not a checkpoint ∑".encode() * 40,
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_files_raise_checkpoint_mismatch_error_never_advising_weights_only_false(saved, tmp_path, case):
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(DAMAGE[case](saved["nipq"].read_bytes()))
    with pytest.raises(CheckpointMismatchError, match=r"cannot read .*damaged") as error:
        load_nipq_checkpoint(MLP, path)
    assert "weights_only=False" not in str(error.value) and "weights_only` set to `False" not in str(error.value)


def test_a_missing_file_stays_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_nipq_checkpoint(MLP, tmp_path / "missing.ckpt")


# ---------------------------------------- the digest of the quantization state
def _flip_tensor_bytes(raw: bytes, tensor: torch.Tensor, count: int = 34) -> bytes:
    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(data)
    assert at >= 0 and raw.find(data, at + 1) < 0
    damaged = bytearray(raw)
    for i in range(count):
        damaged[at + 4 * i] ^= 0x01  # low mantissa bits: the values stay finite and plausible
    return bytes(damaged)


@pytest.mark.parametrize("source,key", [("nipq", "head.weight"), ("integer", "blocks.1.inner.0.bias")])
def test_flipped_bytes_in_tensor_data_are_detected_on_every_path(saved, tmp_path, source, key):
    raw = saved[source].read_bytes()
    tensor = torch.load(saved[source], weights_only=True)["state_dict"][key]
    path = tmp_path / "flipped.ckpt"
    path.write_bytes(_flip_tensor_bytes(raw, tensor))
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"][key], tensor)
    for load in LOADERS.values():
        with pytest.raises(CheckpointMismatchError, match="modified or damaged after it was written"):
            load(path)
    # The callbacks' load hook (a Trainer restore with ckpt_path) checks it too.
    trainer = fast_trainer(1, [NIPQCallback(target_bits=4, calibration_batches=1)])
    with pytest.raises(CheckpointMismatchError, match="modified or damaged after it was written"):
        trainer.validate(MLP(), loader(blobs(32)), ckpt_path=str(path), verbose=False)


def test_a_valid_edit_of_the_extra_state_is_detected_and_loads_with_a_new_digest(saved, tmp_path):
    edit = set_extra("head.weight_quantizer._extra_state", size=12345)  # valid, but not what was saved
    path = edited(saved["nipq"], tmp_path / "edited.ckpt", edit, redigest=False)
    for load in LOADERS.values():
        with pytest.raises(CheckpointMismatchError, match=rf"checkpoint\['nipq'\]\['{DIGEST_KEY}'\].*quantization_state_digest"):
            load(path)
    path = edited(saved["nipq"], tmp_path / "redigested.ckpt", edit)
    assert load_nipq_checkpoint(MLP, path).head.weight_quantizer.size == 12345


def test_checkpoints_without_a_digest_still_load(saved, tmp_path):
    checkpoint = torch.load(saved["nipq"], weights_only=True)
    assert checkpoint[MANIFEST_KEY][DIGEST_KEY] == quantization_state_digest(checkpoint["state_dict"])
    del checkpoint[MANIFEST_KEY][DIGEST_KEY]
    torch.save(checkpoint, tmp_path / "old-manifest.ckpt")
    # Quantizers attached by hand, the checkpoint written with no package callback: no manifest at all.
    model = MLP()
    attach_quantizers(model)
    trainer = fast_trainer(1)
    trainer.fit(model, loader(blobs(64)))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert MANIFEST_KEY not in torch.load(tmp_path / "plain.ckpt", weights_only=True)
    x = blobs(16).tensors[0]
    for path, reference in ((tmp_path / "old-manifest.ckpt", None), (tmp_path / "plain.ckpt", model.eval())):
        for load in LOADERS.values():
            loaded = load(path).eval()
            assert len(list(quantizers(loaded))) > 0
            if reference is not None:
                with torch.no_grad():
                    assert torch.equal(loaded(x), reference(x))


def test_integer_checkpoints_carry_a_digest_of_their_codes(saved):
    checkpoint = torch.load(saved["integer"], weights_only=True)
    digest = checkpoint[MANIFEST_KEY][DIGEST_KEY]
    assert digest.startswith("sha256:") and digest == quantization_state_digest(checkpoint["state_dict"])
    state = dict(checkpoint["state_dict"])
    state["head.weight_codes"] = state["head.weight_codes"].clone()
    state["head.weight_codes"].view(-1)[0] += 1 if int(state["head.weight_codes"].view(-1)[0]) < 7 else -1
    assert quantization_state_digest(state) != digest
    assert isinstance(integer_model(saved).head, IntegerLayerMixin)


def test_a_checkpoint_whose_state_dict_a_later_callback_replaced_is_sealed_after_it(tmp_path):
    # WeightAveraging swaps the averaged weights into checkpoint["state_dict"] in its own
    # on_save_checkpoint, after the package's callbacks wrote the manifest; ModelPruning
    # does the same with the pruned weights (tested with the callbacks in test_nipq_callback).
    from lightning.pytorch.callbacks import WeightAveraging

    ds = blobs(128)
    trainer = fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), WeightAveraging()])
    trainer.fit(MLP(), loader(ds))
    trainer.save_checkpoint(tmp_path / "averaged.ckpt")
    checkpoint = torch.load(tmp_path / "averaged.ckpt", weights_only=True)
    assert checkpoint["nipq"]["state_sha256"] == quantization_state_digest(checkpoint["state_dict"])
    load_nipq_checkpoint(MLP, tmp_path / "averaged.ckpt")
