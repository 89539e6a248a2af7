"""Flatness pre-conditioning: the noise's size, where it goes, its reproducibility, and that it leaves no trace."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import MLP, blobs, fast_trainer, loader
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq import FlatnessNoise, attach_quantizers
from lightning_nipq.robust import attach_flatness_noise, rounding_noise_std
from lightning_nipq.robust.flatness import rounding_noise

DOC = Path(__file__).resolve().parents[2] / "docs" / "flatness.md"


def signed_var(absmax: Tensor, bits: int) -> Tensor:
    return (absmax / (2 ** (bits - 1) - 1)) ** 2 / 12


def unsigned_var(top: Tensor, bits: int) -> Tensor:
    return (top / (2**bits - 1)) ** 2 / 12


def scaled_linear(in_features: int, scales: list[float]) -> nn.Linear:
    """A Linear whose output channels have very different ranges, so per-tensor noise would be far off."""
    layer = nn.Linear(in_features, len(scales))
    with torch.no_grad():
        layer.weight.mul_(torch.tensor(scales).unsqueeze(1))
    return layer


def wrapped(layer: nn.Module) -> nn.Sequential:
    """The layer inside a model (the package selects submodules, never the root)."""
    return nn.Sequential(layer)


def weight_noise_draws(layer: nn.Module, probe: Tensor, draws: int) -> Tensor:
    """``draws`` samples of the weight noise, read off the layer's response to one-hot inputs.

    ``probe`` holds one one-hot input per weight element of an output channel, so the
    output's departure from the clean output is exactly the noise, shaped ``(out, elements)``.
    """
    layer.eval()
    with torch.no_grad():
        clean = layer(probe)
        layer.train()
        samples = [(layer(probe) - clean).reshape(probe.shape[0], -1).T for _ in range(draws)]
    return torch.stack(samples)  # (draws, out, elements)


# ---------------------------------------------------------------- the noise's size


def test_rounding_noise_std_formula():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.05, -0.02]])
    std = rounding_noise_std(w, 4, per_channel=True, signed=True)
    assert std.shape == (2, 1)
    expected = torch.tensor([[2.0 / 7], [0.1 / 7]]) / math.sqrt(12)
    torch.testing.assert_close(std, expected)
    x = torch.tensor([0.0, 3.0, 1.5])
    torch.testing.assert_close(rounding_noise_std(x, 3), torch.tensor(3.0 / 7 / math.sqrt(12)))  # auto: unsigned
    torch.testing.assert_close(rounding_noise_std(-x, 3), torch.tensor(3.0 / 3 / math.sqrt(12)))  # auto: signed
    torch.testing.assert_close(rounding_noise_std(x, 3, signed=True), torch.tensor(3.0 / 3 / math.sqrt(12)))
    w.requires_grad_(True)
    assert not rounding_noise_std(w, 4, per_channel=True).requires_grad
    assert not rounding_noise(w, 4, per_channel=True).requires_grad


def test_linear_weight_noise_has_the_rounding_variance_per_output_channel():
    scales = [0.05, 0.3, 1.0, 4.0]
    layer = scaled_linear(32, scales)
    handle = attach_flatness_noise(wrapped(layer), target_bits=4, seed=0)
    assert handle.layers == handle.float_input == ["0"]  # the only layer keeps a float input
    noise = weight_noise_draws(layer, torch.eye(32), draws=400)
    expected = signed_var(layer.weight.detach().abs().amax(dim=1), 4)
    measured = noise.permute(1, 0, 2).reshape(len(scales), -1)
    # 12,800 Gaussian samples per channel: the variance's relative standard error is 1.3%.
    torch.testing.assert_close(measured.var(dim=1), expected, rtol=0.06, atol=0)
    assert (measured.mean(dim=1).abs() < 4 * expected.sqrt() / math.sqrt(measured.shape[1])).all()
    kurtosis = (measured**4).mean(dim=1) / measured.var(dim=1) ** 2
    assert ((kurtosis - 3).abs() < 0.25).all(), f"not Gaussian (uniform noise has kurtosis 1.8): {kurtosis}"


def test_conv_weight_noise_is_per_output_channel():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.02, 0.2, 1.0, 3.0]).view(4, 1, 1, 1))
    attach_flatness_noise(wrapped(conv), target_bits=3, seed=1)
    probe = torch.eye(27).reshape(27, 3, 3, 3)  # one input per weight element of a channel
    noise = weight_noise_draws(conv, probe, draws=300)
    measured = noise.permute(1, 0, 2).reshape(4, -1)
    expected = signed_var(conv.weight.detach().abs().amax(dim=(1, 2, 3)), 3)
    torch.testing.assert_close(measured.var(dim=1), expected, rtol=0.08, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_input_noise_has_the_rounding_variance_per_tensor(signed):
    layer = nn.Linear(6, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(6))
        layer.bias.zero_()
    attach_flatness_noise(wrapped(layer), target_bits=4, weight_noise=False, float_input_layers=[], seed=2)
    x = torch.randn(64, 6) * torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 10.0])
    if not signed:
        x = x.abs()
    with torch.no_grad():
        noise = torch.stack([layer(x) - x for _ in range(200)])  # (draws, batch, features)
    top = x.abs().max()
    expected = signed_var(top, 4) if signed else unsigned_var(top, 4)
    # One variance for every feature, whatever its own scale (per-tensor), from the batch's range and sign.
    per_feature = noise.reshape(-1, 6).var(dim=0)
    torch.testing.assert_close(per_feature, expected.expand(6), rtol=0.08, atol=0)
    torch.testing.assert_close(noise.var(), expected, rtol=0.03, atol=0)


def test_first_layer_input_stays_clean_by_default_and_later_inputs_get_noise():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    seen: dict[str, Tensor] = {}
    model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o.detach()))
    handle = attach_flatness_noise(model, weight_noise=False, seed=0)
    assert handle.layers == ["0", "2"] and handle.float_input == ["0"]
    x = torch.randn(16, 4)
    with torch.no_grad():
        clean_first = F.linear(x, model[0].weight, model[0].bias)
        out = model(x)
        torch.testing.assert_close(seen["first"], clean_first, rtol=0, atol=0)
        assert not torch.allclose(out, F.linear(F.relu(clean_first), model[2].weight, model[2].bias))


def test_several_bits_draw_per_layer_per_call_with_the_matching_variance():
    layer = scaled_linear(16, [1.0, 1.0])
    handle = attach_flatness_noise(wrapped(layer), target_bits=(3, 4, 8), seed=3)
    probe = torch.eye(16)
    layer.eval()
    with torch.no_grad():
        clean = layer(probe)
        layer.train()
        by_bits: dict[int, list[Tensor]] = {3: [], 4: [], 8: []}
        for step in range(600):
            handle.reseed(step)
            noise = layer(probe) - clean
            by_bits[handle.last_bits["0"]].append(noise)
    counts = {b: len(v) for b, v in by_bits.items()}
    assert all(150 < c < 250 for c in counts.values()), counts  # uniform over the three
    absmax = layer.weight.abs().amax(dim=1)
    for bits, samples in by_bits.items():
        measured = torch.stack(samples).permute(2, 0, 1).reshape(2, -1).var(dim=1)
        torch.testing.assert_close(measured, signed_var(absmax, bits), rtol=0.12, atol=0)


def test_several_bits_are_reproducible_and_independent_between_layers():
    def sequence(seed: int) -> list[tuple[int, ...]]:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
        handle = attach_flatness_noise(model, target_bits=(3, 4, 8), seed=seed)
        draws = []
        for step in range(60):
            handle.reseed(step)
            model(torch.randn(2, 4))
            draws.append(tuple(handle.last_bits[n] for n in handle.layers))
        return draws

    a, b, c = sequence(5), sequence(5), sequence(6)
    assert a == b and a != c
    assert any(len(set(d)) > 1 for d in a), "layers of one step should draw independently"
    assert {bits for d in a for bits in d} == {3, 4, 8}


# ---------------------------------------------------------------- modes, gradients, seeds


def test_eval_mode_is_exactly_the_clean_model():
    model = MLP()
    plain = copy.deepcopy(model)
    attach_flatness_noise(model, target_bits=2, seed=0)
    x = torch.randn(8, 16)
    model.eval()
    plain.eval()
    for _ in range(3):
        assert torch.equal(model(x), plain(x))
    model.train()
    assert not torch.allclose(model(x), plain(x))


def test_gradients_reach_the_clean_weights_and_inputs_unchanged_by_the_noise():
    layer = scaled_linear(5, [0.5, 2.0, 1.0])
    attach_flatness_noise(wrapped(layer), target_bits=2, input_noise=False, seed=0)
    x = torch.randn(7, 5, requires_grad=True)
    layer(x).sum().backward()
    # d sum((W + N) x) / dW = sum of x: identity through the noise, and no gradient through
    # the detached range (the largest |w| of each row would get one otherwise).
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(3, 5), rtol=0, atol=1e-6)
    assert not torch.allclose(x.grad, layer.weight.detach().sum(0).expand(7, 5))  # the noisy weight

    layer2 = scaled_linear(5, [0.5, 2.0, 1.0])
    attach_flatness_noise(wrapped(layer2), target_bits=2, weight_noise=False, float_input_layers=[], seed=0)
    x2 = torch.randn(7, 5, requires_grad=True)
    layer2(x2).sum().backward()
    torch.testing.assert_close(x2.grad, layer2.weight.detach().sum(0).expand(7, 5), rtol=0, atol=1e-6)
    assert not torch.allclose(layer2.weight.grad, x2.detach().sum(0).expand(3, 5))  # the noisy input
    assert layer2.bias.grad is not None


def test_noise_is_reproducible_from_the_seed_and_key():
    def outputs(seed: int, key: int) -> Tensor:
        torch.manual_seed(0)
        model = MLP()
        handle = attach_flatness_noise(model, target_bits=3, seed=seed)
        handle.reseed(key)
        torch.manual_seed(123)  # the global generator plays no part
        return model(torch.ones(4, 16)).detach()

    assert torch.equal(outputs(1, 0), outputs(1, 0))
    assert not torch.equal(outputs(1, 0), outputs(2, 0))
    assert not torch.equal(outputs(1, 0), outputs(1, 1))


def test_handle_state_dict_continues_the_same_stream():
    model = MLP()
    handle = attach_flatness_noise(model, target_bits=(3, 4), seed=4)
    x = torch.randn(4, 16)
    model(x)
    state = handle.state_dict()
    expected = model(x).detach()
    handle.detach()
    again = attach_flatness_noise(model, target_bits=(3, 4), seed=99)
    again.load_state_dict(state)
    assert torch.equal(model(x), expected)


def test_detach_and_context_manager_restore_the_plain_forward():
    model = MLP()
    with attach_flatness_noise(model) as handle:
        assert all("forward" in vars(dict(model.named_modules())[n]) for n in handle.layers)
        copied = copy.deepcopy(model)
    assert not any("forward" in vars(m) for m in model.modules())
    # A copy taken while attached computes the plain forward of its own layers.
    x = torch.randn(3, 16)
    copied.load_state_dict(model.state_dict())
    assert torch.equal(copied(x), model(x))
    assert copied.stem.forward.__self__ is copied.stem


# ---------------------------------------------------------------- Lightning


class Probe(MLP):
    """Records whether two forwards of the same batch differ, in training and in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.noisy_train: list[bool] = []
        self.noisy_val: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, _ = batch
        self.noisy_train.append(not torch.equal(self(x), self(x)))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        self.noisy_val.append(not torch.equal(self(x), self(x)))
        super().validation_step(batch, batch_idx)


def fit(model: MLP, callback: Any = None, max_epochs: int = 2, **kwargs: Any) -> Any:
    trainer = fast_trainer(max_epochs, callbacks=[callback] if callback is not None else [], **kwargs)
    trainer.fit(model, loader(blobs()), loader(blobs()))
    return trainer


def test_fit_trains_with_noise_validates_clean_and_leaves_the_plain_model():
    torch.manual_seed(0)
    model = Probe()
    keys = list(model.state_dict())
    trainer = fit(model, FlatnessNoise(target_bits=4, seed=0))
    assert model.noisy_train and all(model.noisy_train)
    assert model.noisy_val and not any(model.noisy_val)
    assert trainer.callback_metrics["val_acc"] > 0.8
    assert list(model.state_dict()) == keys
    assert not any("forward" in vars(m) for m in model.modules())
    assert [type(m) for m in model.modules()][1:] == [type(m) for m in MLP().modules()][1:]
    plain = MLP()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(8, 16)
    model.train()
    plain.train()
    assert torch.equal(model(x), plain(x))


def test_fit_is_reproducible_from_the_seed_and_the_noise_changes_training():
    def trained(callback: Any) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = MLP()
        fit(model, callback, max_epochs=1)
        return model.state_dict()

    a, b = trained(FlatnessNoise(seed=7)), trained(FlatnessNoise(seed=7))
    c, clean = trained(FlatnessNoise(seed=8)), trained(None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], clean[k]) for k in a)


def test_checkpoint_is_a_plain_float_checkpoint_and_resuming_draws_the_same_noise(tmp_path):
    torch.manual_seed(0)
    straight = MLP()
    fit(straight, FlatnessNoise(target_bits=(3, 4), seed=5), max_epochs=2)

    torch.manual_seed(0)
    first = MLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = fast_trainer(1, callbacks=[FlatnessNoise(target_bits=(3, 4), seed=5), ckpt], enable_checkpointing=True)
    trainer.fit(first, loader(blobs()), loader(blobs()))
    path = next(tmp_path.glob("*.ckpt"))

    checkpoint = torch.load(path, weights_only=True)
    plain = MLP()
    plain.load_state_dict(checkpoint["state_dict"], strict=True)  # no extra keys, none missing
    assert set(checkpoint["state_dict"]) == set(MLP().state_dict())
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("FlatnessNoise")]
    assert state["seed"] == 5 and state["target_bits"] == [3, 4]

    torch.manual_seed(0)
    resumed = MLP()
    resume_cb = FlatnessNoise(target_bits=(3, 4))  # seed=None: taken from the checkpoint
    trainer = fast_trainer(2, callbacks=[resume_cb])
    trainer.fit(resumed, loader(blobs()), loader(blobs()), ckpt_path=str(path))
    assert resume_cb.seed == 5
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_fit_that_fails_still_detaches():
    class Failing(MLP):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            raise RuntimeError("boom")

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, FlatnessNoise())
    assert not any("forward" in vars(m) for m in model.modules())


def test_include_exclude_select_the_layers():
    model = MLP()
    handle = attach_flatness_noise(model, include=["blocks.*"], exclude=["blocks.1.*"])
    assert handle.layers == ["blocks.0.inner.0"] and handle.float_input == ["blocks.0.inner.0"]
    assert ("head", "not matched by include") in handle.skipped
    handle.detach()
    handle = attach_flatness_noise(model, float_input_layers=["head"])
    assert handle.layers == ["stem", "blocks.0.inner.0", "blocks.1.inner.0", "head"] and handle.float_input == ["head"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_bits": 1}, r"whole numbers in \[2, 16\]"),
        ({"target_bits": 3.5}, r"whole numbers in \[2, 16\]"),
        ({"target_bits": 17}, r"whole numbers in \[2, 16\]"),
        ({"target_bits": True}, r"whole numbers in \[2, 16\]"),
        ({"target_bits": ()}, "target_bits is empty"),
        ({"target_bits": (4, 4)}, "repeated"),
        ({"target_bits": "4"}, r"whole numbers"),
        ({"weight_noise": False, "input_noise": False}, "both off"),
        ({"noise_scale": 0.0}, "noise_scale must be a number > 0"),
        ({"noise_scale": -1}, "noise_scale must be a number > 0"),
        ({"include": "stem"}, "include must be a list"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlatnessNoise(**kwargs)
    with pytest.raises(ValueError, match=message):
        attach_flatness_noise(MLP(), **kwargs)


def test_invalid_layer_choices_raise_clear_errors():
    model = MLP()
    with pytest.raises(ValueError, match="matches no module"):
        attach_flatness_noise(model, include=["encoder.*"])
    with pytest.raises(ValueError, match="float_input_layers .*'nope'.* are not among the selected layers"):
        attach_flatness_noise(model, float_input_layers=["nope"])
    with pytest.raises(ValueError, match=r"no quantizable layer \(Linear, Conv1d, Conv2d, Conv3d, "):
        attach_flatness_noise(nn.Sequential(nn.ReLU()))
    handle = attach_flatness_noise(model)
    with pytest.raises(ValueError, match="attached twice"):
        attach_flatness_noise(model)
    handle.detach()
    quantized = MLP()
    attach_quantizers(quantized)
    with pytest.raises(ValueError, match="already holds quantized layers"):
        attach_flatness_noise(quantized)
    with pytest.raises(ValueError, match="already holds quantized layers"):
        fit(quantized, FlatnessNoise(), max_epochs=1)


def test_callback_state_round_trip_and_changed_settings_warn():
    callback = FlatnessNoise(target_bits=(3, 8), noise_scale=0.5, seed=11)
    state = callback.state_dict()
    assert state == {"target_bits": [3, 8], "weight_noise": True, "input_noise": True, "noise_scale": 0.5, "seed": 11}
    fresh = FlatnessNoise(target_bits=(3, 8), noise_scale=0.5)
    fresh.load_state_dict(state)
    assert fresh.seed == 11
    with pytest.warns(UserWarning, match="changed settings"):
        FlatnessNoise(target_bits=4, seed=11).load_state_dict(state)


@pytest.mark.slow
def test_docs_example_runs():
    """The runnable example of docs/flatness.md: float training with noise, then PTQ and integer conversion."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)[0]
    namespace: dict[str, Any] = {"__name__": "flatness_doc_example"}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert namespace["results"]["flat"]["float"] > 0.8


DDP_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from models import MLP, blobs, loader
from lightning.pytorch import Trainer
from lightning_nipq import FlatnessNoise

torch.manual_seed(0)
model = MLP()
keys = list(model.state_dict())
trainer = Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[FlatnessNoise(target_bits=(3, 4), seed=3)])
trainer.fit(model, loader(blobs()))
torch.save({{"rank": trainer.global_rank, "state": model.state_dict(), "keys": keys,
            # The root is left out: Lightning's DDP wrapper redirects the LightningModule's own forward.
            "leaked": [n for n, m in model.named_modules() if n and "forward" in vars(m)]}},
           f"rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_trains_with_noise_and_leaves_plain_models(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_flat.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    launch = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(p, weights_only=True) for p in sorted(tmp_path.glob("rank*.pt"))]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert list(r["state"]) == r["keys"] and r["leaked"] == []
    # DDP kept the replicas in sync: no extra parameters, the same gradients on both ranks.
    assert all(torch.equal(results[0]["state"][k], results[1]["state"][k]) for k in results[0]["keys"])
