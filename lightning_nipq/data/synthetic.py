"""Calibration inputs synthesised from the float model alone: BatchNorm-statistics matching with mixup-class labels.

For post-training quantization without the training data. Starting from random noise,
Adam changes a batch of inputs so that the batch statistics of every BatchNorm layer's
input match that layer's running statistics (as ZeroQ and DeepInversion do):

    sum over BN layers l of ||mu_l(x) - running_mean_l||^2 + ||sigma_l(x) - sqrt(running_var_l)||^2

optionally plus ``ce_weight`` times a cross-entropy toward a target label. With
``labels="mixup"`` every sample's target is the soft label
``lam * onehot(y1) + (1 - lam) * onehot(y2)`` with ``y1 != y2`` and ``lam ~ Beta(alpha, alpha)``:
the mixup-class idea of Park, Lee, Choi et al. (2025), who prompt a text-to-image diffusion
model with two class names, carried over to inputs synthesised from the model itself.
``labels="single"`` uses one-hot targets (``lam = 1``) for comparison; ``labels=None``
matches the statistics alone.

Plain torch: nothing here knows about Lightning. The model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.layers.model_calls import first_tensor
from lightning_nipq.layers.model_walk import batchnorm_layers

LABEL_MODES: tuple[Optional[str], ...] = ("mixup", "single", None)
#: ``lam`` is kept this far from 0 and 1, so that a mixup target always names two classes.
LAMBDA_MARGIN = 1e-3


@dataclass
class MixupTargets:
    """Per-sample targets of one synthetic batch: ``lam * onehot(y1) + (1 - lam) * onehot(y2)``.

    For single-class targets ``y2 == y1`` and ``lam == 1``.
    """

    y1: Tensor
    y2: Tensor
    lam: Tensor

    def soft(self, num_classes: int) -> Tensor:
        """The soft labels, shape ``(batch, num_classes)``."""
        lam = self.lam.float().unsqueeze(1)
        return lam * F.one_hot(self.y1, num_classes).float() + (1.0 - lam) * F.one_hot(self.y2, num_classes).float()

    def to(self, device: torch.device | str) -> MixupTargets:
        return MixupTargets(self.y1.to(device), self.y2.to(device), self.lam.to(device))


def sample_targets(labels: Optional[str], batch_size: int, num_classes: int, mixup_alpha: float = 1.0) -> Optional[MixupTargets]:
    """Targets for one batch from torch's global generator (seed it, or use `calibration_targets`).

    ``"mixup"``: ``y1`` uniform, ``y2`` uniform over the other classes, ``lam ~ Beta(alpha, alpha)``
    kept inside ``(0, 1)``; ``"single"``: ``y1`` uniform, ``y2 = y1``, ``lam = 1``; None: no targets.
    """
    _check_labels(labels, num_classes, mixup_alpha)
    if labels is None:
        return None
    y1 = torch.randint(num_classes, (batch_size,))
    if labels == "single":
        return MixupTargets(y1, y1.clone(), torch.ones(batch_size))
    # An offset in [1, num_classes) makes y2 uniform over the classes other than y1.
    y2 = (y1 + torch.randint(1, num_classes, (batch_size,))) % num_classes
    beta = torch.distributions.Beta(torch.tensor(float(mixup_alpha)), torch.tensor(float(mixup_alpha)))
    lam = beta.sample((batch_size,)).clamp(LAMBDA_MARGIN, 1.0 - LAMBDA_MARGIN)
    return MixupTargets(y1, y2, lam)


def calibration_targets(
    num_batches: int,
    batch_size: int,
    num_classes: int,
    labels: Optional[str] = "mixup",
    mixup_alpha: float = 1.0,
    seed: int = 0,
) -> list[Optional[MixupTargets]]:
    """The targets `generate_calibration_data` uses for the same arguments, one entry per batch.

    Drawn from a generator seeded with ``seed``; torch's global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _draw_targets(num_batches, batch_size, num_classes, labels, mixup_alpha)


def _draw_targets(
    num_batches: int, batch_size: int, num_classes: int, labels: Optional[str], mixup_alpha: float
) -> list[Optional[MixupTargets]]:
    return [sample_targets(labels, batch_size, num_classes, mixup_alpha) for _ in range(num_batches)]


class BatchNormStatistics:
    """Context manager: forward hooks on the BatchNorm layers compute the statistics-matching loss of each input.

    Inside the context every forward of the model adds, per layer, ``||mu(x) - running_mean||^2 +
    ||sigma(x) - sqrt(running_var)||^2`` of the layer's input ``x`` (per channel, over the batch
    and spatial positions, the biased variance as BatchNorm normalises with); `loss` sums them.
    The hooks only read the input, so the model computes exactly what it would without them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        self.losses: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> BatchNormStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]  # BatchNorm's channel axis is 1
        var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
        std = torch.sqrt(var + module.eps)
        running_std = torch.sqrt(module.running_var.float() + module.eps)  # type: ignore[operator]
        self.losses.append((mean - module.running_mean.float()).square().sum() + (std - running_std).square().sum())  # type: ignore[union-attr]

    def loss(self) -> Tensor:
        """The sum over layers of the losses recorded since the last call, which it clears."""
        if not self.losses:
            raise RuntimeError("no BatchNorm layer saw an input in the last forward")
        total = torch.stack(self.losses).sum()
        self.losses = []
        return total


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside; every module's mode and ``requires_grad`` restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def bn_matching_loss(model: nn.Module, x: Tensor, forward: Optional[Callable[[Tensor], Any]] = None) -> float:
    """The BatchNorm statistics-matching loss of inputs ``x`` (see `BatchNormStatistics`), model left unchanged."""
    if not batchnorm_layers(model):
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to match")
    run = forward if forward is not None else model
    with preserved(model), torch.no_grad(), BatchNormStatistics(model) as stats:
        run(x.to(_model_device(model)))
        return float(stats.loss())


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring values along every axis after the channel axis."""
    terms = [x.diff(dim=d).abs().mean() for d in range(2, x.dim()) if x.shape[d] > 1]
    return torch.stack(terms).sum() if terms else x.new_zeros(())


def synthesize_batch(
    model: nn.Module,
    x: Tensor,
    targets: Optional[MixupTargets] = None,
    steps: int = 200,
    lr: float = 0.1,
    ce_weight: float = 1.0,
    tv_weight: float = 0.0,
    clamp: Optional[tuple[float, float]] = None,
    forward: Optional[Callable[[Tensor], Any]] = None,
) -> Tensor:
    """Optimise the inputs ``x`` (a starting batch, e.g. noise) with Adam; returns the result, detached.

    The loss is the BatchNorm statistics-matching loss, plus ``ce_weight`` times the
    cross-entropy of the model's logits toward ``targets.soft(...)`` when ``targets`` is given,
    plus ``tv_weight`` times the `total_variation` of ``x``. ``clamp`` keeps ``x`` in a range
    after every step. The model runs in eval mode (BatchNorm normalises with its running
    statistics, which stay untouched) and its parameters get no gradient.
    """
    has_bn = bool(batchnorm_layers(model))
    if not has_bn and targets is None:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics, so there is nothing to match "
            "without labels: ask for labels='mixup' or 'single' (a pure cross-entropy inversion), or give real or "
            "generated images (lightning_nipq.data.calibration_images.load_calibration_images)"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    run = forward if forward is not None else model
    device = _model_device(model)
    x = x.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    if targets is not None:
        targets = targets.to(device)
    optimizer = torch.optim.Adam([x], lr=lr)
    with preserved(model), BatchNormStatistics(model) as stats:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            output = run(x)
            loss = stats.loss() if has_bn else x.new_zeros(())
            if targets is not None:
                logits = first_tensor(output)
                loss = loss + ce_weight * F.cross_entropy(logits.float(), targets.soft(logits.shape[-1]))
            if tv_weight:
                loss = loss + tv_weight * total_variation(x)
            # Gradients of the inputs only: the parameters' .grad stays as the caller left it.
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            optimizer.step()
            if clamp is not None:
                with torch.no_grad():
                    x.clamp_(clamp[0], clamp[1])
    return x.detach()


def _check_labels(labels: Optional[str], num_classes: Optional[int], mixup_alpha: float) -> None:
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if labels is None:
        return
    if num_classes is None or num_classes < 1:
        raise ValueError(f"labels={labels!r} needs num_classes >= 1, got {num_classes!r}")
    if labels == "mixup" and num_classes < 2:
        raise ValueError("labels='mixup' mixes two different classes and needs num_classes >= 2; use labels='single'")
    if not mixup_alpha > 0 or math.isinf(mixup_alpha):
        raise ValueError(f"mixup_alpha must be a finite number > 0, got {mixup_alpha}")


def _infer_num_classes(model: nn.Module, shape: Sequence[int], forward: Optional[Callable[[Tensor], Any]]) -> int:
    run = forward if forward is not None else model
    # Two samples: BatchNorm1d refuses a batch of one only in training mode, but some models reshape by batch.
    probe = torch.zeros((2, *shape), device=_model_device(model))
    with preserved(model), torch.no_grad():
        logits = first_tensor(run(probe))
    if logits.dim() != 2:
        raise ValueError(
            f"cannot tell the number of classes from an output of shape {tuple(logits.shape)}: pass num_classes, "
            "or labels=None for a model that does not output (batch, classes) logits"
        )
    return int(logits.shape[-1])


def generate_calibration_data(
    model: nn.Module,
    input_shape: Sequence[int],
    num_batches: int = 4,
    batch_size: int = 32,
    num_classes: Optional[int] = None,
    labels: Optional[str] = "mixup",
    mixup_alpha: float = 1.0,
    steps: int = 200,
    lr: float = 0.1,
    ce_weight: float = 1.0,
    tv_weight: float = 0.0,
    clamp: Optional[tuple[float, float]] = None,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
    forward: Optional[Callable[[Tensor], Any]] = None,
) -> list[Tensor]:
    """Synthesise calibration batches from the float model alone, for PTQ and BatchNorm re-estimation.

    Each batch starts as standard normal noise and is optimised by `synthesize_batch`:
    the statistics of every BatchNorm layer's input are pulled to its running statistics,
    and, with labels, the model's prediction toward the batch's targets (see
    `calibration_targets`). The model is left exactly as it was: its train/eval mode, its
    parameters, their gradients and BatchNorm's running statistics; no hook stays.

    Args:
        model: the trained float model (before quantizers are attached).
        input_shape: the shape of one input without the batch axis, e.g. ``(1, 28, 28)``.
        num_batches: how many batches to synthesise.
        batch_size: inputs per batch (BatchNorm statistics are matched per batch).
        num_classes: classes of the model's output; inferred from a probe forward when None.
        labels: ``"mixup"`` (soft labels over two different classes, ``lam ~ Beta(mixup_alpha,
            mixup_alpha)``), ``"single"`` (one-hot labels) or None (statistics only).
        mixup_alpha: the Beta distribution's parameter; larger values mix closer to half and half.
        steps: Adam steps per batch.
        lr: Adam's learning rate on the inputs.
        ce_weight: weight of the cross-entropy toward the labels, relative to the statistics loss.
        tv_weight: weight of the total-variation prior (smooth images); 0 turns it off.
        clamp: ``(low, high)`` range the inputs are kept in after every step, e.g. that of
            your normalised data; None leaves them free.
        seed: seeds the labels and the starting noise; torch's global random state is left as it was.
        device: where to optimise; by default the model's device (elsewhere a copy of the model is used).
        forward: calls the model on an input batch, when ``model(x)`` is not how it is called.

    Returns:
        ``num_batches`` tensors of shape ``(batch_size, *input_shape)`` on ``device``.

    Example:

        ```python
        from lightning_nipq.data import generate_calibration_data

        batches = generate_calibration_data(model, (1, 28, 28), num_batches=8, batch_size=64, labels="mixup")
        post_training_quantize(model, batches, weight_bits=4, act_bits=4)
        ```
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be the shape of one input without the batch axis, got {tuple(input_shape)}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if labels is None and not batchnorm_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics, so labels=None leaves "
            "nothing to optimise: use labels='mixup' or 'single', or calibrate on real or generated images"
        )
    if labels is not None and num_classes is None:
        num_classes = _infer_num_classes(model, shape, forward)
    _check_labels(labels, num_classes, mixup_alpha)
    if clamp is not None and not clamp[0] < clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")
    work = model
    if device is not None and torch.device(device) != _model_device(model):
        if forward is not None:
            raise ValueError("forward calls the model where it is; leave device=None, or move the model to device first")
        # A copy on the requested device, so that the caller's model is not moved.
        work = copy.deepcopy(model).to(device)
    with torch.random.fork_rng(devices=[]):
        # Labels then starting noise from one seeded stream, drawn on the CPU so that a seed gives
        # the same data on any device; `calibration_targets` repeats the first half.
        torch.manual_seed(seed)
        targets = _draw_targets(num_batches, batch_size, num_classes or 1, labels, mixup_alpha)
        starts = [torch.randn((batch_size, *shape)) for _ in range(num_batches)]
    return [
        synthesize_batch(work, x0, t, steps=steps, lr=lr, ce_weight=ce_weight, tv_weight=tv_weight, clamp=clamp, forward=forward)
        for x0, t in zip(starts, targets)
    ]
