"""RobustQuantization: the symmetry penalty, the saturating re-parameterisation, fold-back, checkpoints, resuming."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from models import MLP, GroupedConvNet, blobs, fast_trainer, image_blobs, loader
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lightning_nipq import RobustQuantization
from lightning_nipq.callbacks import symmetry_loss
from lightning_nipq.callbacks.robust_quantization import CHECKPOINT_KEY
from lightning_nipq.robust import attach_saturation, fold_saturation, symmetry_penalty
from lightning_nipq.robust.saturation import (
    LATENT_KEY,
    SCALE_KEY,
    Saturation,
    desaturate,
    fold_state_dict,
    initial_scale,
    saturate,
    saturated_layers,
    saturation_of,
    unfold_state_dict,
)
from lightning_nipq.robust.symmetry import is_depthwise, total_symmetry_penalty

ROOT = Path(__file__).resolve().parents[2]


def linear_penalty(model: nn.Module) -> float:
    return float(total_symmetry_penalty([m for m in model.modules() if isinstance(m, nn.Linear)]))


# ---------------------------------------------------------------------------- SymReg, plain torch
def test_symmetry_penalty_is_zero_for_mirrored_tensors():
    x = torch.randn(500)
    mirrored = torch.cat([x, -x])[torch.randperm(1000)].reshape(10, 100)
    assert float(symmetry_penalty(mirrored)) == 0.0
    assert float(symmetry_penalty(torch.tensor([-2.0, 0.7, 2.0]))) == 0.0  # the middle element of an odd count is unpaired
    assert float(symmetry_penalty(torch.tensor([3.0]))) == 0.0


def test_symmetry_penalty_matches_hand_computation():
    # sorted: -1, 1, 2, 3 -> pairs (-1 + 3) = 2 and (1 + 2) = 3 -> mean(4, 9) = 6.5
    assert float(symmetry_penalty(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))) == pytest.approx(6.5)
    # sorted: 0, 1, 5 -> one pair (0 + 5) = 5 -> 25
    assert float(symmetry_penalty(torch.tensor([5.0, 0.0, 1.0]))) == pytest.approx(25.0)
    skewed = torch.rand(1000)  # all positive: far from symmetric
    assert float(symmetry_penalty(skewed)) > 0.1


def test_symmetry_penalty_gradient_step_makes_weights_more_symmetric():
    w = (torch.rand(64, 32) ** 2 - 0.1).requires_grad_()  # skewed to the right
    before = symmetry_penalty(w)
    before.backward()
    before = before.detach()
    with torch.no_grad():
        stepped = w - 200.0 * w.grad
    assert float(symmetry_penalty(stepped)) < 0.5 * float(before)


def test_depthwise_detection():
    assert is_depthwise(nn.Conv2d(8, 8, 3, groups=8))
    assert is_depthwise(nn.Conv1d(4, 8, 3, groups=4))
    assert not is_depthwise(nn.Conv2d(8, 8, 3, groups=4))
    assert not is_depthwise(nn.Conv2d(1, 8, 3))  # one input channel, one group: an ordinary conv
    assert not is_depthwise(nn.Linear(4, 4))


# ---------------------------------------------------------------------------- SatNL, plain torch
def test_saturate_stays_strictly_inside_and_inverts():
    s = torch.tensor(0.5)
    v = torch.tensor([1e4, -1e4, 30.0, -5.0, 0.3, 0.0])  # far into saturation, where tanh rounds to 1
    w = saturate(v, s)
    assert bool((w.abs() < s).all())
    moderate = torch.linspace(-1.0, 1.0, 101)
    assert torch.allclose(desaturate(saturate(moderate, s), s), moderate, atol=1e-5)
    assert bool(torch.isfinite(desaturate(torch.tensor([0.5, -0.5, 0.7]), s)).all())  # at or past the edge: clamped


def test_initial_scale():
    w = torch.tensor([[0.2, -0.4], [0.1, 0.0]])
    assert initial_scale(w, 1.5) == pytest.approx(0.6)
    assert initial_scale(torch.zeros(3, 16), 2.0) == pytest.approx(2.0 / math.sqrt(16))  # zero-initialised layer
    with pytest.raises(ValueError, match="must be > 1"):
        initial_scale(w, 1.0)


def test_attach_keeps_the_function_and_fold_is_exact():
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    plain_out = layer(x)
    keys = list(layer.state_dict())
    latent = layer.weight
    saturation = attach_saturation(layer, factor=1.5)
    assert saturation_of(layer) is saturation
    assert layer.parametrizations.weight.original is latent  # the optimizer's parameter object stays
    assert torch.allclose(layer(x), plain_out, atol=1e-6)
    with torch.no_grad():
        latent.mul_(5.0)  # push some weights into saturation
    parameterised_out = layer(x)
    assert bool((layer.weight.abs() < saturation.scale).all())
    fold_saturation(layer)
    assert type(layer) is nn.Linear and saturation_of(layer) is None
    assert list(layer.state_dict()) == keys
    assert torch.equal(layer(x), parameterised_out)
    with pytest.raises(ValueError, match="not above max"):
        attach_saturation(layer, scale=0.1 * float(layer.weight.abs().max()))


def test_state_dict_fold_and_unfold_round_trip_exactly():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    for layer in (model[0], model[2]):
        attach_saturation(layer)
    with torch.no_grad():
        model[0].parametrizations.weight.original[0, :3] = torch.tensor([40.0, -40.0, 12.0])  # tanh rounds to +-1
    parameterised = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in saturated_layers(model)]
    sd = dict(parameterised)
    saved = fold_state_dict(sd, names)
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # a plain model's keys, in its order
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    plain.load_state_dict(sd, strict=True)
    x = torch.randn(3, 6)
    assert torch.equal(plain(x), model(x))
    unfold_state_dict(sd, names, saved)
    assert set(sd) == set(parameterised)
    for key in parameterised:
        assert torch.equal(sd[key], parameterised[key]), key  # the saturated latents too
    # Without the saved latents the latents come from atanh: exact inside, bounded at the edge.
    sd2 = dict(parameterised)
    saved2 = fold_state_dict(sd2, names)
    unfold_state_dict(sd2, names, {n: {"scale": e["scale"]} for n, e in saved2.items()})
    recovered = sd2[f"0.{LATENT_KEY}"]
    assert bool(torch.isfinite(recovered).all())
    assert not torch.equal(recovered, parameterised[f"0.{LATENT_KEY}"])  # atanh cannot give back 40 or 12
    expected = saturate(parameterised[f"0.{LATENT_KEY}"], parameterised[f"0.{SCALE_KEY}"])
    assert torch.allclose(saturate(recovered, sd2[f"0.{SCALE_KEY}"]), expected, atol=1e-6)


def test_saturation_rejects_bad_scale():
    with pytest.raises(ValueError, match="finite number > 0"):
        Saturation(0.0)


# ---------------------------------------------------------------------------- the callback
class Probe(Callback):
    """Checks the saturated layers on every step and what the optimizer holds; records the outputs before fold-back."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.steps = 0
        self.max_ratio = 0.0
        self.outputs_before_fold: torch.Tensor | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.initial_latents = {n: l.parametrizations.weight.original.detach().clone() for n, l in saturated_layers(pl_module)}
        optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert optimised == {id(p) for p in pl_module.parameters()}
        assert all(id(l.parametrizations.weight.original) in optimised for _, l in saturated_layers(pl_module))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        layers = list(saturated_layers(pl_module))
        assert len(layers) == 4
        for _, layer in layers:
            s = layer.parametrizations.weight[0].scale
            w = layer.weight
            assert bool((w.abs() < s).all()), "a saturated weight reached its bound"
            self.max_ratio = max(self.max_ratio, float(w.abs().max() / s))
        self.steps += 1

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        assert any(True for _ in saturated_layers(pl_module))  # folded only after this
        with torch.no_grad():
            self.outputs_before_fold = pl_module(self.x)


class HotMLP(MLP):
    """A learning rate high enough that Adam drives some latents deep into saturation."""

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.2)


def test_fit_keeps_weights_inside_and_folds_back_to_a_plain_model():
    model = HotMLP()
    keys = list(MLP().state_dict())
    x = blobs(16, seed=1).tensors[0]
    probe = Probe(x)
    fast_trainer(3, [RobustQuantization(symreg_weight=1.0), probe]).fit(model, loader(blobs()))
    assert probe.steps == 24
    assert probe.max_ratio > 0.999  # the bound was really pressed against
    assert list(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(model.stem) is nn.Linear and type(model.head) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(x), probe.outputs_before_fold)
    fresh = MLP()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert "training_step" not in vars(model) and "on_save_checkpoint" not in vars(model)


def test_symreg_makes_trained_weights_more_symmetric_than_plain_training():
    def trained(callbacks: list) -> float:
        torch.manual_seed(0)
        model = MLP()
        fast_trainer(3, callbacks).fit(model, loader(blobs()))
        return linear_penalty(model)

    torch.manual_seed(0)
    initial = linear_penalty(MLP())
    plain = trained([])
    with_symreg = trained([RobustQuantization(symreg_weight=10.0, saturation=False)])
    with_both = trained([RobustQuantization(symreg_weight=10.0)])
    assert plain > initial  # ordinary training skews the weights
    assert with_symreg < 0.2 * plain
    assert with_symreg < initial
    assert with_both < 0.2 * plain


def test_penalty_is_added_to_the_loss_and_logged():
    seen = {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            x, y = batch
            with torch.no_grad():
                task = F.cross_entropy(pl_module(x), y)
                penalty = 3.0 * linear_penalty(pl_module)
            seen["pair"] = (float(outputs["loss"]), float(task), penalty)
            seen["logged"] = float(trainer.callback_metrics["robust/symmetry_loss"])

    # lr=0 keeps the weights as they were when the loss was computed.
    model = MLP(lr=0.0)
    fast_trainer(1, [RobustQuantization(symreg_weight=3.0, saturation=False), Grab()], limit_train_batches=1).fit(
        model, loader(blobs())
    )
    loss, task, penalty = seen["pair"]
    assert penalty > 0
    assert loss == pytest.approx(task + penalty, rel=1e-5)
    assert seen["logged"] == pytest.approx(penalty, rel=1e-5)


def test_conv_layers_and_depthwise_exclusion():
    model = GroupedConvNet()
    callback = RobustQuantization(symreg_weight=1.0, exclude=["head"])
    keys = list(GroupedConvNet().state_dict())
    seen = {}

    class Look(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            seen["saturated"] = [n for n, _ in saturated_layers(pl_module)]

    fast_trainer(1, [callback, Look()]).fit(model, loader(image_blobs()))
    assert seen["saturated"] == ["conv", "grouped", "depthwise", "conv1d", "conv3d"]
    assert ("head", "matched by exclude") in callback.skipped
    assert list(model.state_dict()) == keys
    assert type(model.depthwise) is nn.Conv2d


def test_symreg_layer_choice_skips_depthwise():
    model = GroupedConvNet()
    callback = RobustQuantization(symreg_weight=1.0, saturation=False)
    seen = {}

    class Look(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            seen["layers"] = list(callback._symreg_layers)

    fast_trainer(1, [callback, Look()], limit_train_batches=1).fit(model, loader(image_blobs()))
    assert model.depthwise not in seen["layers"]
    assert model.grouped in seen["layers"] and model.conv3d in seen["layers"] and len(seen["layers"]) == 5


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_trainer(tmp_path: Path, epochs: int, callbacks: list, **kwargs: Any):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}", **kwargs)
    return fast_trainer(epochs, callbacks + [ckpt], enable_checkpointing=True), ckpt


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoint_holds_plain_weights_and_loads_into_a_fresh_model(tmp_path, weights_only):
    model = HotMLP()
    trainer, _ = _checkpoint_trainer(tmp_path, 1, [RobustQuantization(symreg_weight=1.0)], save_weights_only=weights_only)
    trainer.fit(model, loader(blobs()))
    checkpoint = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == list(MLP().state_dict())
    assert set(checkpoint[CHECKPOINT_KEY]["layers"]) == {"stem", "blocks.0.inner.0", "blocks.1.inner.0", "head"}
    fresh = MLP()
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = blobs(8, seed=2).tensors[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))  # saved after the last step: the same weights the fold gave
    loaded = MLP.load_from_checkpoint(tmp_path / "epoch=0.ckpt")  # Lightning's own loader, strict
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    torch.manual_seed(0)
    straight = HotMLP()
    trainer, _ = _checkpoint_trainer(tmp_path, 4, [RobustQuantization(symreg_weight=1.0)])
    trainer.fit(straight, loader(blobs()))

    checkpoint = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    saved_scales = {n: float(e["scale"]) for n, e in checkpoint[CHECKPOINT_KEY]["layers"].items()}
    # Deep in saturation atanh cannot give the latents back: resuming exactly needs the saved ones.
    atanh_error = max(
        float((desaturate(saturate(e["latent"], e["scale"]), e["scale"]) - e["latent"]).abs().max())
        for e in checkpoint[CHECKPOINT_KEY]["layers"].values()
    )
    assert atanh_error > 1e-4

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = HotMLP()
    scales = {}

    class Scales(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            scales.update({n: float(l.parametrizations.weight[0].scale) for n, l in saturated_layers(pl_module)})

    trainer2 = fast_trainer(4, [RobustQuantization(symreg_weight=1.0), Scales()])
    trainer2.fit(resumed, loader(blobs()), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert scales == saved_scales
    assert list(resumed.state_dict()) == list(straight.state_dict())
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_validate_with_a_checkpoint_path_sees_plain_weights(tmp_path):
    model = HotMLP()
    trainer, _ = _checkpoint_trainer(tmp_path, 1, [RobustQuantization()])
    trainer.fit(model, loader(blobs()))
    other = MLP()
    result = fast_trainer(1, [RobustQuantization()]).validate(other, loader(blobs(64)), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert "val_acc" in result[0]
    assert torch.equal(other.head.weight, model.head.weight)


# ---------------------------------------------------------------------------- manual optimisation
class ManualMLP(MLP):
    def __init__(self, use_penalty: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.use_penalty = use_penalty

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.use_penalty:
            loss = loss + symmetry_loss(self)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimisation_with_symmetry_loss():
    torch.manual_seed(0)
    model = ManualMLP()
    fast_trainer(3, [RobustQuantization(symreg_weight=10.0)]).fit(model, loader(blobs()))
    torch.manual_seed(0)
    plain = MLP()
    fast_trainer(3).fit(plain, loader(blobs()))
    assert linear_penalty(model) < 0.2 * linear_penalty(plain)
    assert list(model.state_dict()) == list(MLP().state_dict())


def test_manual_optimisation_without_symmetry_loss_is_an_error():
    with pytest.raises(RuntimeError, match="add symmetry_loss"):
        fast_trainer(1, [RobustQuantization()], limit_train_batches=1).fit(ManualMLP(use_penalty=False), loader(blobs()))


def test_symmetry_loss_without_the_callback_is_an_error():
    model = MLP()
    model.trainer = fast_trainer(1)
    with pytest.raises(RuntimeError, match="needs a RobustQuantization"):
        symmetry_loss(model)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"symreg_weight": -1.0}, "symreg_weight must be a finite number >= 0"),
        ({"symreg_weight": float("nan")}, "symreg_weight must be a finite number >= 0"),
        ({"saturation_scale": 1.0}, "saturation_scale must be a finite number > 1"),
        ({"saturation_scale": 0.5}, "saturation_scale must be a finite number > 1"),
        ({"saturation": "yes"}, "saturation must be True or False"),
        ({"symreg_weight": 0.0, "saturation": False}, "nothing to do"),
        ({"include": "head"}, "include must be a list of module-name patterns"),
        ({"exclude": [3]}, "exclude must be a list of module-name patterns"),
        ({"log_penalty": 1}, "log_penalty must be True or False"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RobustQuantization(**kwargs)


def test_a_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no module"):
        fast_trainer(1, [RobustQuantization(include=["encoder.*"])]).fit(MLP(), loader(blobs()))


def test_changed_settings_on_resume_warn():
    callback = RobustQuantization(symreg_weight=2.0)
    with pytest.warns(UserWarning, match="changed settings"):
        callback.load_state_dict({"symreg_weight": 1.0, "saturation": True, "saturation_scale": 1.5})
    assert callback.state_dict() == {"symreg_weight": 2.0, "saturation": True, "saturation_scale": 1.5}


# ---------------------------------------------------------------------------- the documentation's example
@pytest.mark.slow
def test_documentation_example_runs():
    page = (ROOT / "docs" / "robust-training.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    namespace: dict[str, Any] = {"__name__": "robust_training_example"}
    exec(compile(block, "docs/robust-training.md", "exec"), namespace)
    assert list(namespace["model"].state_dict()) == list(type(namespace["model"])().state_dict())
