"""RobustQuantization: float training that leaves a model easy to quantize (SymReg and SatNL)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_nipq.callbacks.loss_injection import add_to_loss
from lightning_nipq.callbacks.module_hooks import find_callback, wrap_method
from lightning_nipq.callbacks.strategy_support import check_strategy
from lightning_nipq.layers.layer_kinds import supported_names
from lightning_nipq.layers.model_walk import check_patterns, plan_layers
from lightning_nipq.robust.saturation import (
    DEFAULT_SATURATION_SCALE,
    attach_saturation,
    fold_all,
    fold_state_dict,
    saturated_layers,
    unfold_state_dict,
)
from lightning_nipq.robust.symmetry import is_depthwise, symmetry_penalty

#: Where Lightning checkpoints keep each saturated layer's scale and latent, beside the plain weights.
CHECKPOINT_KEY = "robust_quantization"
CHECKPOINT_FORMAT = "lightning-nipq/robust-quantization"
CHECKPOINT_VERSION = 1


class RobustQuantization(Callback):
    r"""Train a float model so that it survives quantization: symmetric weights (SymReg), bounded weights (SatNL).

    A reconstruction of Park, Jang and Park, "Symmetry Regularization and Saturating
    Nonlinearity for Robust Quantization" (ECCV 2022) from its abstract and method
    summary; the full text was not available. For every ``nn.Linear`` and
    ``nn.Conv1d/2d/3d`` of the LightningModule:

    - SatNL (``saturation=True``): in ``setup``, before ``configure_optimizers``, the
      weight is re-parameterised as ``W = s * tanh(V / s)`` with a fixed ``s`` per layer
      (``saturation_scale`` times the layer's ``max|W|`` then), so your optimizer trains
      ``V`` and ``W`` stays strictly inside ``(-s, s)``. When fit ends the map is folded
      back: the model has plain ``weight`` parameters and its original state-dict keys.
    - SymReg (``symreg_weight > 0``): ``symreg_weight`` times the sum over layers
      (depthwise convolutions excepted) of the mean of ``(w(i) + w(n+1-i))^2`` over the
      sorted weights' lower half is added to your training loss.

    Checkpoints written during fit hold plain ``<layer>.weight`` entries, so they load
    strictly into a fresh model without this callback; each saturated layer's ``s`` and
    exact ``V`` travel under ``checkpoint["robust_quantization"]``, from which resuming
    restores them. Quantize the result afterwards, with `lightning_nipq.post_training_quantize`
    or `lightning_nipq.NIPQCallback` in a later fit (not in the same one).

    Args:
        symreg_weight: strength ``lambda`` of the symmetry penalty (0 turns SymReg off).
        saturation: re-parameterise weights through ``s * tanh(V / s)`` during fit.
        saturation_scale: ``s`` as a multiple of each layer's ``max|W|`` at the start of fit (> 1).
        include: shell-style module-name patterns of the layers to treat (default: all supported layers).
        exclude: module-name patterns of layers to leave alone.
        log_penalty: log the weighted penalty as ``robust/symmetry_loss`` on every training step.

    Example:

        ```python
        from lightning.pytorch import Trainer
        from lightning_nipq.callbacks.robust_quantization import RobustQuantization

        trainer = Trainer(max_epochs=10, callbacks=[RobustQuantization()])
        trainer.fit(model, datamodule=dm)  # model is a plain float model again
        ```
    """

    def __init__(
        self,
        symreg_weight: float = 10.0,
        saturation: bool = True,
        saturation_scale: float = DEFAULT_SATURATION_SCALE,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        log_penalty: bool = True,
    ) -> None:
        if isinstance(symreg_weight, bool) or not isinstance(symreg_weight, (int, float)) or not math.isfinite(symreg_weight) or symreg_weight < 0:
            raise ValueError(f"symreg_weight must be a finite number >= 0 (0 turns SymReg off), got {symreg_weight!r}")
        if not isinstance(saturation, bool):
            raise ValueError(f"saturation must be True or False, got {saturation!r}")
        if isinstance(saturation_scale, bool) or not isinstance(saturation_scale, (int, float)) or not saturation_scale > 1 or not math.isfinite(saturation_scale):
            raise ValueError(
                f"saturation_scale must be a finite number > 1 (s must lie above every initial weight, "
                f"so that the initial weights are representable), got {saturation_scale!r}"
            )
        if symreg_weight == 0 and not saturation:
            raise ValueError("RobustQuantization has nothing to do: set symreg_weight > 0, saturation=True, or both")
        if not isinstance(log_penalty, bool):
            raise ValueError(f"log_penalty must be True or False, got {log_penalty!r}")

        self.symreg_weight = float(symreg_weight)
        self.saturation = saturation
        self.saturation_scale = float(saturation_scale)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.log_penalty = log_penalty

        self.skipped: list[tuple[str, str]] = []
        self._names: list[str] = []
        self._symreg_layers: list[nn.Module] = []
        self._module: Optional[LightningModule] = None
        self._undo: list[Callable[[], None]] = []
        self._last_penalty: Optional[Tensor] = None
        self._penalty_calls = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict see the plain model; checkpoints already hold plain weights
        check_strategy(trainer.strategy, "RobustQuantization")  # SymReg sorts, and SatNL bounds, whole weights
        if any(True for _ in saturated_layers(pl_module)):
            raise RuntimeError(
                "the model already holds saturated weights (another RobustQuantization is running?); "
                "use one RobustQuantization per Trainer"
            )
        targets, self.skipped = plan_layers(pl_module, self.include, self.exclude)
        if not targets:
            raise ValueError(
                f"{type(pl_module).__name__} has no layer to treat (supported: {supported_names()})"
                + (f"; left out: {self.skipped[:5]}" if self.skipped else "")
                + ". Check include/exclude."
            )
        self._names = [name for name, _ in targets]
        self._symreg_layers = [layer for _, layer in targets if not is_depthwise(layer)]
        if self.saturation:
            for _, layer in targets:
                attach_saturation(layer, factor=self.saturation_scale)
        rank_zero_info(
            f"RobustQuantization: {len(targets)} layers"
            + (" saturated" if self.saturation else "")
            + (f", {len(self._symreg_layers)} under SymReg (lambda={self.symreg_weight:g})" if self.symreg_weight else "")
            + (f"; left alone: {[n for n, _ in self.skipped]}" if self.skipped else "")
        )
        self._module = pl_module
        if self.saturation:
            self._wrap(pl_module, "on_save_checkpoint", self._save_wrapper)
            self._wrap(pl_module, "on_load_checkpoint", self._load_wrapper)
        if self.symreg_weight > 0 and pl_module.automatic_optimization:
            self._wrap(pl_module, "training_step", self._training_step_wrapper)

    def _wrap(self, pl_module: LightningModule, hook: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self._undo.append(wrap_method(pl_module, hook, make))

    def _training_step_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if output is None:
                return output
            return add_to_loss(output, self.symmetry_loss(self._module), "RobustQuantization")  # type: ignore[arg-type]

        return training_step

    def _save_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            # The module hook runs for every checkpoint, weights-only ones included (the
            # callbacks' hook does not), and the user's own hook then sees plain weights.
            self.fold_checkpoint(checkpoint)
            original(checkpoint)

        return on_save_checkpoint

    def _load_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            original(checkpoint)
            self.unfold_checkpoint(checkpoint)  # right before Lightning loads the state dict, strictly

        return on_load_checkpoint

    def _unwrap(self) -> None:
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ checkpoints
    def fold_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Give a Lightning checkpoint plain ``<layer>.weight`` entries; keep ``s`` and ``V`` under ``"robust_quantization"``."""
        module = self._module
        if module is None or "state_dict" not in checkpoint:
            return
        names = [name for name, _ in saturated_layers(module, remove_duplicate=False)]
        saved = fold_state_dict(checkpoint["state_dict"], names)
        if saved:
            checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "layers": saved}

    def unfold_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Turn a checkpoint's plain weights of the saturated layers back into ``V`` and ``s``, in place."""
        module = self._module
        if module is None or "state_dict" not in checkpoint:
            return
        names = [name for name, _ in saturated_layers(module, remove_duplicate=False)]
        if not names:
            return
        entry = checkpoint.get(CHECKPOINT_KEY) or {}
        if entry and (entry.get("format") != CHECKPOINT_FORMAT or not isinstance(entry.get("version"), int)):
            raise ValueError(f"checkpoint[{CHECKPOINT_KEY!r}] is not a lightning-nipq robust-quantization entry")
        if entry.get("version", 0) > CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint[{CHECKPOINT_KEY!r}] has version {entry['version']}, newer than this lightning-nipq "
                f"reads ({CHECKPOINT_VERSION}); upgrade lightning-nipq"
            )
        fresh = unfold_state_dict(checkpoint["state_dict"], names, entry.get("layers"), self.saturation_scale)
        if fresh:
            rank_zero_warn(
                f"RobustQuantization: the checkpoint has no saturation scale for {fresh}; it was written without "
                "saturation. Their scales are chosen afresh from the stored weights, and optimizer state for these "
                "weights, if resumed, refers to the plain weights."
            )

    # ------------------------------------------------------------------ the loss
    def symmetry_loss(self, pl_module: LightningModule) -> Tensor:
        """``symreg_weight`` times the summed symmetry penalty of the treated layers' (saturated) weights.

        With automatic optimisation it is added to your loss for you; with manual
        optimisation add ``symmetry_loss(self)`` (the module-level function) to the loss
        you backpropagate.
        """
        self._penalty_calls += 1
        if self.symreg_weight == 0 or not self._symreg_layers:
            loss = torch.zeros((), device=pl_module.device)
        else:
            loss = sum((symmetry_penalty(layer.weight) for layer in self._symreg_layers), torch.zeros((), device=pl_module.device))
            loss = loss * self.symreg_weight
        self._last_penalty = loss.detach()
        return loss

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._penalty_calls = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not pl_module.automatic_optimization and self.symreg_weight > 0 and self._penalty_calls == 0:
            raise RuntimeError(
                "RobustQuantization: with manual optimisation, add symmetry_loss(self) (from "
                "lightning_nipq.callbacks.robust_quantization) to the loss you backpropagate in training_step; "
                "the symmetry penalty is not applied otherwise"
            )
        if self.log_penalty and self._last_penalty is not None:
            pl_module.log("robust/symmetry_loss", self._last_penalty, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ fold-back
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Also reached when fit stops on an exception: the model is left plain either way.
        if stage == "fit":
            self._finish(pl_module)

    def _finish(self, pl_module: LightningModule) -> None:
        self._unwrap()
        folded = fold_all(pl_module)
        if folded:
            rank_zero_info(f"RobustQuantization: folded the saturation of {len(folded)} layers back into plain weights")
        self._module = None
        self._symreg_layers = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "symreg_weight": self.symreg_weight,
            "saturation": self.saturation,
            "saturation_scale": self.saturation_scale,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = [k for k, v in state_dict.items() if getattr(self, k, v) != v]
        if changed:
            rank_zero_warn(f"RobustQuantization: resuming with changed settings {changed}; the new values are used")


def symmetry_loss(pl_module: LightningModule) -> Tensor:
    """The weighted symmetry penalty of the `RobustQuantization` training ``pl_module``, for manual optimisation.

    Example:

        ```python
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = self.task_loss(batch) + symmetry_loss(self)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        ```
    """
    callback = find_callback(pl_module.trainer, RobustQuantization)
    if callback is None:
        raise RuntimeError("symmetry_loss needs a RobustQuantization among the Trainer's callbacks")
    return callback.symmetry_loss(pl_module)
