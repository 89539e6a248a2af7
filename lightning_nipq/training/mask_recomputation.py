"""A ``torch.compile`` partitioner that recomputes boolean masks in backward instead of saving them, on the CPU.

Fake quantization is full of masks: which inputs lie inside the range, which were clipped,
which a ReLU zeroed. When a compiled training step splits into forward and backward,
torch's min-cut partitioner chooses which tensors the forward saves for backward by their
size, and a mask, one byte per element, is the cheapest thing to save. On the CPU that is
the slow choice: in torch 2.13 Inductor's C++ kernels write and read ``bool`` tensors
element by element through generic vector conversions, and on the benchmark's ResNet one
saved mask of 1.6 M elements took 11 ms to write, against under 1 ms for a float32 tensor
(see docs/benchmarks.md). The comparisons that make a mask are one instruction each, and
the float tensors they compare are saved anyway (a layer's input, a ReLU's output), so
recomputing them inside the backward kernels costs nothing measurable.

`MaskRecomputingPartitioner` marks every boolean CPU tensor of the joint graph "prefer
recompute" (the tag selective activation checkpointing uses) and hands the graph to torch's
own min-cut partitioner. What is computed does not change, only what is kept: a compiled step
gives the same outputs and gradients, to the bit, with and without it. Masks drawn from
random numbers (dropout) are left to the partitioner, since recomputing them would need
the random numbers kept instead. On a GPU, where Triton writes masks at full speed, nothing
is marked.

On the CPU it also turns off two of the min-cut partitioner's rules against recomputation,
which exist to keep a GPU's fused kernels whole. Under "used far apart", when a tensor feeds
a fused kernel, then an unfused op, then another fused kernel, the later kernel's work is
not recomputed; the compiler merges every quantizer's element-index tensor of one shape (the
counter-based noise's) into one, and a ReLU's output often feeds two quantized layers, so
every quantizer after the first of a shape kept a float tensor of its layer's size (the
in-range noise, or its input over the step) beside its output. Under "long fusible chains"
the same happened along a block's chain of elementwise work. On the benchmark ResNet the
compiled noise step kept 1.76x the compiled float step's memory, and 1.16x with them off, at
the same step time (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch._functorch.partitioners as partitioners
from torch import fx
from torch._inductor import custom_graph_pass
from torch.utils.checkpoint import CheckpointPolicy

#: torch's interface for a partitioner passed as Inductor's ``custom_partitioner_fn`` (recent torch only).
_PARTITIONER_BASE: Any = getattr(custom_graph_pass, "CustomPartitionerFn", None)
#: Part of Inductor's cache key: a compiled graph partitioned by an older rule is not reused.
_RULE_VERSION = "lightning_nipq.mask_recomputation/4"
#: Two of the min-cut partitioner's rules against recomputation, which it applies to help a GPU
#: fuse kernels, turned off on the CPU: under them each quantizer kept a float tensor of its
#: layer's size for backward that it can compute again from tensors kept anyway (see above).
_RELAXED_RULES = {"ban_recompute_used_far_apart": False, "ban_recompute_long_fusible_chains": False}


def _is_random(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _on_cpu(graph: fx.Graph) -> bool:
    devices = {n.meta["val"].device.type for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    return devices == {"cpu"}


def recomputable_mask(node: fx.Node) -> bool:
    """Whether ``node`` is a boolean CPU tensor the partitioner should recompute rather than save.

    Not when it comes straight from a random draw (recomputing it would mean keeping the draw),
    nor when a checkpointing policy has already said what to do with it.
    """
    value = node.meta.get("val")
    if node.op != "call_function" or not isinstance(value, torch.Tensor):
        return False
    if value.dtype != torch.bool or value.device.type != "cpu" or "recompute" in node.meta:
        return False
    return not _is_random(node) and not any(_is_random(a) for a in node.all_input_nodes)


if _PARTITIONER_BASE is not None:

    class MaskRecomputingPartitioner(_PARTITIONER_BASE):
        """Partition compiled training steps so that boolean masks are recomputed in backward, not saved.

        Pass it to Inductor as its ``custom_partitioner_fn``, for one compiled model:

        .. code-block:: python

            from lightning_nipq.training import MaskRecomputingPartitioner

            compiled = torch.compile(model, options={"custom_partitioner_fn": MaskRecomputingPartitioner()})
            trainer.fit(compiled)

        or for everything compiled in a block, with
        ``torch._inductor.config.patch(custom_partitioner_fn=MaskRecomputingPartitioner())``.
        The float model gains from it too; on a GPU it changes nothing.
        """

        def __call__(self, gm: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
            for node in gm.graph.nodes:
                if recomputable_mask(node):
                    node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            kwargs.setdefault("compiler", "inductor")
            with torch._functorch.config.patch(_RELAXED_RULES if _on_cpu(gm.graph) else {}):
                return partitioners.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

        def uuid(self) -> Any:
            return _RULE_VERSION

else:  # pragma: no cover - torch before the custom partitioner hook

    class MaskRecomputingPartitioner:  # type: ignore[no-redef]
        """Unavailable: this torch has no ``torch._inductor.config.custom_partitioner_fn``."""

        def __init__(self) -> None:
            raise RuntimeError(
                "MaskRecomputingPartitioner needs a torch whose Inductor takes a custom partitioner "
                f"(torch._inductor.config.custom_partitioner_fn); this is torch {torch.__version__}: upgrade torch, "
                "or compile without it"
            )
