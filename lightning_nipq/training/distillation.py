"""Distillation from a frozen float teacher, as the paper trains. Plain torch."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lightning_nipq.layers.model_calls import first_tensor


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension, batch mean."""
    t = float(temperature)
    student_log = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    teacher_prob = F.softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(student_log, teacher_prob, reduction="batchmean") * (t * t)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no trainable parameters."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Distiller:
    """Runs the teacher on every training forward of the student and keeps the loss.

    A forward hook on the student sees the exact ``args``/``kwargs`` of each call, so any
    ``forward`` signature works. `pop` returns the sum of the losses since the last call.
    """

    def __init__(self, teacher: nn.Module, weight: float = 1.0, temperature: float = 1.0) -> None:
        self.teacher = teacher
        self.weight = weight
        self.temperature = temperature
        self._pending: list[Tensor] = []
        self._handle: Optional[RemovableHandle] = None

    def attach(self, student: nn.Module) -> None:
        self._handle = student.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending.clear()

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            teacher_out = self.teacher(*args, **kwargs)
        loss = distillation_loss(first_tensor(output), first_tensor(teacher_out).detach(), self.temperature)
        self._pending.append(loss * self.weight)

    def pop(self) -> Optional[Tensor]:
        if not self._pending:
            return None
        total = torch.stack(self._pending).sum()
        self._pending.clear()
        return total
