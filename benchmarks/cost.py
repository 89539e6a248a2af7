"""The cost of training with NIPQ: step time and memory against the float step, measured in one run.

    python -m benchmarks.cost                                   # CPU, the accuracy benchmark's ResNet
    python -m benchmarks.cost --device cuda --model resnet18 --batch-size 256 --image-size 224 --precision bf16-mixed

Each variant trains the same model on the same synthetic batches with Lightning: float,
NIPQ in its noise phase (learned bits, pseudo-quantization noise, the budget loss), NIPQ
in its hard phase (straight-through fake quantization with frozen bits), and LSQ. The step
time is the median time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
backward and optimizer step) after the warm-up steps; memory is the peak CUDA memory
allocated on a GPU, and on a CPU, where no allocator counts its peak, the bytes the autograd
graph holds for backward (activations and saved masks: what fake quantization adds).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import runs  # noqa: F401  (quiets Lightning's logs)
from benchmarks.models import ResNetStyle, SmallViT
from benchmarks.reporting import DOC_PATH, command_line, environment, markdown_table, write_section
from lightning_nipq import LSQCallback, NIPQCallback
from lightning_nipq.callbacks.module_hooks import wrap_method
from lightning_nipq.quant.fused_fake_quant import composed_fake_quant, kept_fake_quant_outputs
from lightning_nipq.training import MaskRecomputingPartitioner

# The hard-phase variant freezes bits at the first step, far above the target: expected here.
warnings.filterwarnings("ignore", ".*learned average bits.*")
VARIANTS = ("float", "NIPQ noise", "NIPQ hard", "LSQ")
#: The quantized variants again with the fused functions keeping their outputs for backward
#: (what the package ran before it recomputed them), and with the composed fake-quantization
#: functions (before the fused ones): ``--reference``.
KEPT = " (kept)"
COMPOSED = " (composed)"
REFERENCES = {KEPT: kept_fake_quant_outputs, COMPOSED: composed_fake_quant}
#: Compiled variants run with `MaskRecomputingPartitioner` (what the user guide recommends); these
#: run with torch's default partition, which keeps boolean masks for backward, for comparison.
MASKS_SAVED = " (masks saved)"
MASKS_SAVED_VARIANTS = ("float", "NIPQ noise")


class StepCost(Callback):
    """Times each training step and measures the memory it needs, after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.memory_bytes = 0
        self._start = 0.0
        self._saved: dict[tuple[int, int], int] = {}
        self._hooks: Optional[Any] = None

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        device = pl_module.device
        if batch_idx == self.warmup:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            else:
                # Count every storage the graph keeps for backward once (weights saved by several ops too).
                def pack(t: Tensor) -> Tensor:
                    storage = t.untyped_storage()
                    self._saved[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
                    return t

                self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                self._hooks.__enter__()
        self._sync(device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        device = pl_module.device
        self._sync(device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        if batch_idx == self.warmup:
            if device.type == "cuda":
                self.memory_bytes = torch.cuda.max_memory_allocated(device)
            elif self._hooks is not None:
                self._hooks.__exit__(None, None, None)
                self._hooks = None
                self.memory_bytes = sum(self._saved.values())

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def make_model(name: str, image_size: int, channels: int) -> LightningModule:
    if name == "resnet":
        return ResNetStyle(in_channels=channels, width=16, blocks=(1, 1, 1))
    if name == "resnet18":
        return ResNetStyle(in_channels=channels, width=64, blocks=(2, 2, 2, 2), stem_stride=1 if image_size <= 64 else 4)
    if name == "vit":
        return SmallViT(image_size=image_size, patch_size=image_size // 4, in_channels=channels)
    raise ValueError(f"unknown model {name!r}")


def callbacks_for(variant: str, bits: int) -> list[Callback]:
    if variant == "float":
        return []
    if variant == "NIPQ noise":
        return [NIPQCallback(target_bits=bits, hard_epochs=0, calibration_batches=1, log_per_layer=False)]
    if variant == "NIPQ hard":
        return [NIPQCallback(target_bits=bits, hard_epochs=1, calibration_batches=1, log_per_layer=False)]
    if variant == "LSQ":
        return [LSQCallback(weight_bits=bits, calibration_batches=1, log_per_layer=False)]
    raise ValueError(f"unknown variant {variant!r}")


def measure(variant: str, args: argparse.Namespace, loader: DataLoader, compiled: bool, masks_saved: bool = False) -> StepCost:
    for suffix, reference in REFERENCES.items():
        if variant.endswith(suffix):
            with reference():
                return measure(variant[: -len(suffix)], args, loader, compiled, masks_saved)
    if variant.endswith(MASKS_SAVED):
        return measure(variant[: -len(MASKS_SAVED)], args, loader, compiled, masks_saved=True)
    seed_everything(0, verbose=False)
    if compiled:
        # Every variant compiles afresh: Dynamo's cache per code object would otherwise fill up
        # across variants (the same model classes) and fall back to eager past its limit.
        torch._dynamo.reset()
    model = make_model(args.model, args.image_size, args.channels)
    timer = StepCost(args.warmup)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=args.warmup + args.steps,
        callbacks=[*callbacks_for(variant, args.bits), timer],
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if compiled and variant == "float":
        # The quantized variants' callbacks keep self.log out of Dynamo (Lightning issue 21836); this one has none.
        wrap_method(model, "log", torch.compiler.disable)
    options = {} if masks_saved else {"custom_partitioner_fn": MaskRecomputingPartitioner()}
    trainer.fit(torch.compile(model, options=options) if compiled else model, train_dataloaders=loader)
    del trainer, model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return timer


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["resnet", "resnet18", "vit"], default="resnet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=None, help="input channels (default: 1 below 64 pixels, else 3)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--bits", type=int, default=4, help="NIPQ target bits and LSQ bits")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (calibration, allocator, autotuning)")
    parser.add_argument("--compile", action="store_true", help="also time every variant under torch.compile")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also run the quantized variants with the fake-quantized tensors kept for backward, and with the composed (unfused) functions",
    )
    parser.add_argument("--repeats", type=int, default=1, help="run every variant this many times, interleaved; report the median")
    parser.add_argument("--doc", type=Path, default=DOC_PATH)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--section", default=None, help="section name in --doc (default: cost-<device>)")
    args = parser.parse_args(argv)
    if args.channels is None:
        args.channels = 1 if args.image_size < 64 else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.steps < 1 or args.warmup < 2:
        parser.error("--steps must be >= 1 and --warmup >= 2 (the first step calibrates the inputs)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    count = args.batch_size * 4  # a few distinct batches, cycled
    x = torch.randn(count, args.channels, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, 10, (count,), generator=generator)
    # The same few distinct batches, cycled for as many steps as are timed.
    indices = list(range(count)) * -(-(args.warmup + args.steps) * args.batch_size // count)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, sampler=indices, drop_last=True)

    rows: list[list[str]] = []
    modes = [False, True] if args.compile else [False]
    references = [v + suffix for suffix in REFERENCES for v in VARIANTS if v != "float"] if args.reference else []
    variants = list(VARIANTS) + references
    for compiled in modes:
        mode_variants = variants + ([v + MASKS_SAVED for v in MASKS_SAVED_VARIANTS] if compiled else [])
        measured: dict[str, list[StepCost]] = {variant: [] for variant in mode_variants}
        for repeat in range(args.repeats):  # interleaved, so that load drifting over the run hits every variant
            for variant in mode_variants:
                cost = measure(variant, args, loader, compiled)
                measured[variant].append(cost)
                tag = f"{' (compiled)' if compiled else '':11s} repeat {repeat}"
                print(f"{variant:24s}{tag} median step {1000 * cost.median:8.2f} ms", flush=True)
        # Each repeat's ratio to the float step of the same repeat; the median ratio, and its range.
        for variant, costs in measured.items():
            # Each against the float step compiled the same way.
            base = measured["float" + (MASKS_SAVED if variant.endswith(MASKS_SAVED) else "")]
            ratios = [c.median / f.median for c, f in zip(costs, base)]
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            memory = statistics.median(c.memory_bytes for c in costs)
            base_memory = statistics.median(c.memory_bytes for c in base)
            rows.append(
                [
                    variant + (" (torch.compile)" if compiled else ""),
                    f"{1000 * statistics.median(c.median for c in costs):.1f}" if args.device == "cuda" else "",
                    f"{statistics.median(ratios):.2f}x{spread}",
                    f"{memory / 2**20:.1f}",
                    f"{memory / max(base_memory, 1):.2f}x",
                ]
            )
    memory = "peak CUDA memory MiB" if args.device == "cuda" else "held for backward MiB"
    header = ["variant", "step ms" if args.device == "cuda" else "", "step time / float", memory, "memory / float"]
    if args.device != "cuda":  # absolute CPU times are not comparable across machines
        header, rows = [h for i, h in enumerate(header) if i != 1], [[c for i, c in enumerate(r) if i != 1] for r in rows]
    text = markdown_table(header, rows)
    print()
    print(text)
    if args.no_doc:
        return 0
    body = (
        f"Measured on {environment(torch.device(args.device))}, precision {args.precision}, with:\n\n"
        f"```\n{command_line('benchmarks.cost', argv)}\n```\n\n"
        f"Model {args.model}, batch {args.batch_size} of {args.channels}x{args.image_size}x{args.image_size} synthetic "
        f"images, {args.bits}-bit target, median of {args.steps} steps after {args.warmup} warm-up steps"
        + (
            f"; every variant run {args.repeats} times, interleaved: the step-time ratio is the median of the repeats' "
            "ratios to the float step of the same repeat, with their range in brackets"
            if args.repeats > 1
            else ""
        )
        + (
            f". Rows marked{KEPT} run the fused functions with autograd keeping each fake-quantized tensor until "
            f"backward (what the package ran before it recomputed them there), rows marked{COMPOSED} the composed "
            "fake-quantization functions (what it ran before the fused ones), for comparison"
            if args.reference
            else ""
        )
        + (
            ". Compiled rows compile with `options={\"custom_partitioner_fn\": MaskRecomputingPartitioner()}`; rows "
            f"marked{MASKS_SAVED} with torch's default partition, and take their ratios to the float step compiled "
            "that way"
            if args.compile
            else ""
        )
        + f".\n\n{text}"
    )
    write_section(args.section or f"cost-{args.device}", body, args.doc)
    print(f"\nwrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
