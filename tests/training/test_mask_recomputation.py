"""MaskRecomputingPartitioner: a compiled step keeps no boolean mask for backward on the CPU, nor a
second float tensor per quantizer, computes what the default partition computes to the bit,
and leaves random masks alone.

Most tests partition with AOTAutograd and no code generation (the partition is what is
tested, and Inductor's C++ compile takes long on two cores); one slow test runs Inductor
through ``torch.compile(options=...)``, the way the user guide says to.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch._dynamo
from models import MLP, blobs
from torch import Tensor, nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table
from torch.nn import functional as F
from torch.utils.checkpoint import CheckpointPolicy

from lightning_nipq import attach_quantizers
from lightning_nipq.layers import calibrate_activations, quantized_layers, quantizers
from lightning_nipq.training import MaskRecomputingPartitioner
from lightning_nipq.training.mask_recomputation import recomputable_mask


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _no_codegen(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
    return make_boxed_func(gm.forward)


def _backend(partition_fn: Callable[..., Any]) -> Any:
    # Inductor's decompositions, so that the partitioner sees the graph it sees under Inductor.
    return aot_autograd(fw_compiler=_no_codegen, bw_compiler=_no_codegen, partition_fn=partition_fn, decompositions=select_decomp_table())


def _default_partition(gm: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
    return min_cut_rematerialization_partition(gm, joint_inputs, compiler="inductor", **kwargs)


def _quantized_mlp(hard: bool) -> tuple[MLP, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MLP()
    attach_quantizers(model)
    x, y = blobs(64).tensors
    calibrate_activations(model, [x[:32]], forward=lambda batch: model(batch))
    for _, layer in quantized_layers(model):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q is not None:
                q.mode = "hard" if hard else "noise"
    return model.train(), x[:32], y[:32]


def _step(forward: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor], list[torch.dtype]]:
    """One training step's output and gradients, and the dtypes of what autograd kept for backward."""
    kept: list[torch.dtype] = []

    def pack(t: Tensor) -> Tensor:
        kept.append(t.dtype)
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], kept


@pytest.mark.parametrize("hard", [False, True], ids=["noise", "hard"])
def test_a_quantized_step_keeps_no_mask_and_computes_what_the_default_partition_does(hard: bool) -> None:
    model, x, y = _quantized_mlp(hard)
    runs = []
    for partition in (_default_partition, MaskRecomputingPartitioner()):
        torch._dynamo.reset()
        generator = torch.Generator().manual_seed(3)
        for _, q in quantizers(model):
            q.generator = generator
        runs.append(_step(torch.compile(model, backend=_backend(partition), fullgraph=True), model, x, y))
    (out, grads, kept_default), (out_masked, grads_masked, kept) = runs
    # The default partition keeps masks (one byte an element): what this partitioner is for.
    assert torch.bool in kept_default
    assert torch.bool not in kept
    assert torch.equal(out, out_masked)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_masked))


class _ResidualNet(nn.Module):
    """A stem and one downsampling residual block: the block's input feeds two quantized convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        )
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.head(F.relu(self.body(h) + self.shortcut(h)).mean(dim=(2, 3)))


def _kept_bytes(model: nn.Module, partition: Callable[..., Any], x: Tensor, y: Tensor) -> tuple[int, Tensor, list[Tensor]]:
    """The bytes a compiled step of ``model`` keeps for backward (each storage once), its output and gradients."""
    torch._dynamo.reset()
    for _, q in quantizers(model):
        q.generator = torch.Generator().manual_seed(3)
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.compile(model, backend=_backend(partition), fullgraph=True)(x)
    F.cross_entropy(out, y).backward()
    return sum(storages.values()), out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["noise", "hard"])
def test_a_quantized_step_keeps_at_most_1_3x_the_float_step_where_a_tensor_feeds_two_layers(mode: str) -> None:
    # Under the partitioner's default rules each quantizer kept, besides its quantized output,
    # a float tensor of the same size it can compute again from what backward keeps anyway
    # (the in-range noise, or the input over the step): 1.66x (noise) and 1.46x (hard) here.
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 16, 16), torch.randint(0, 4, (32,))
    model = _ResidualNet().train()
    float_bytes = _kept_bytes(model, MaskRecomputingPartitioner(), x, y)[0]
    attach_quantizers(model)
    calibrate_activations(model, [x], forward=lambda batch: model(batch))
    for _, q in quantizers(model):
        q.mode = mode
    kept, out, grads = _kept_bytes(model, MaskRecomputingPartitioner(), x, y)
    kept_by_default, out_by_default, grads_by_default = _kept_bytes(model, _default_partition, x, y)
    assert kept <= 1.3 * float_bytes < kept_by_default, (kept / float_bytes, kept_by_default / float_bytes)
    assert torch.equal(out, out_by_default)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_by_default))


def test_a_dropout_mask_is_not_drawn_again_in_backward() -> None:
    # Recomputing a mask drawn from random numbers would need new numbers: the gradient must
    # follow the mask the forward used.
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    dropped = torch.compile(lambda t: F.dropout(t, p=0.5, training=True), backend=_backend(MaskRecomputingPartitioner()))
    out = dropped(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * 2.0)


def test_which_nodes_it_marks_boolean_cpu_masks_not_random_ones_nor_those_a_policy_decided() -> None:
    graph = torch.fx.Graph()
    a = graph.placeholder("a")
    nodes = {
        "mask": graph.call_function(torch.ops.aten.gt.Scalar, (a, 0.0)),
        "float": graph.call_function(torch.ops.aten.relu.default, (a,)),
        "decided": graph.call_function(torch.ops.aten.lt.Scalar, (a, 1.0)),
        "meta device": graph.call_function(torch.ops.aten.ge.Scalar, (a, 0.0)),
    }
    draw = graph.call_function(torch.ops.aten.rand_like.default, (a,))
    nodes["random"] = graph.call_function(torch.ops.aten.lt.Scalar, (draw, 0.5))
    for name, node in nodes.items():
        node.meta["val"] = torch.zeros(3, dtype=torch.float32 if name == "float" else torch.bool, device="meta" if name == "meta device" else "cpu")
    nodes["decided"].meta["recompute"] = CheckpointPolicy.MUST_SAVE
    assert {name for name, node in nodes.items() if recomputable_mask(node)} == {"mask"}
    assert not recomputable_mask(a)


def test_its_cache_key_is_fixed_so_inductor_reuses_what_it_compiled() -> None:
    assert MaskRecomputingPartitioner().uuid() == MaskRecomputingPartitioner().uuid()
    assert isinstance(MaskRecomputingPartitioner().uuid(), str)


@pytest.mark.slow
def test_inductor_compiles_a_quantized_step_with_it_from_the_options_the_user_guide_gives() -> None:
    model, x, y = _quantized_mlp(hard=False)
    runs = []
    for options in ({}, {"custom_partitioner_fn": MaskRecomputingPartitioner()}):
        torch._dynamo.reset()
        generator = torch.Generator().manual_seed(3)
        for _, q in quantizers(model):
            q.generator = generator
        runs.append(_step(torch.compile(model, options=options), model, x, y))
    (out, grads, kept_default), (out_masked, grads_masked, kept) = runs
    assert torch.bool in kept_default and torch.bool not in kept
    assert torch.allclose(out, out_masked, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_masked))
