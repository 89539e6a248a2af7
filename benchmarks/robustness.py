"""Robust float training and data-free calibration, measured by post-training quantization on Fashion-MNIST.

    python -m benchmarks.robustness                              # the reduced CPU run (25 minutes on a shared 2-core CPU, floats cached)
    python -m benchmarks.robustness --float-cache .float-cache   # keep the three float models for later runs

Table 1 (robust float training): the ResNet-style model of benchmarks.accuracy is trained
three times, the same epochs from the same seed: plainly, with ``RobustQuantization`` (SymReg
and SatNL) and with ``FlatnessNoise``. Each float model is then quantized by PTQ at every
``--bits`` setting and fine-tuned by LSQ at ``--qat-bits`` for ``--qat-epochs``.

Table 2 (data-free calibration): the plain float model is quantized by PTQ at every ``--bits``
setting, its ranges and its BatchNorm re-estimation calibrated on real training batches or
on batches generated from the float model alone (``generate_calibration_data``) with
single-class, mixup-class or no labels. Every source has the same number and size of batches,
and each generated set is made once and used for all bit widths.

Accuracy is always the converted integer model's, on the test set. Both tables are printed
and written, with a plot, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks import runs
from benchmarks.accuracy import model_factory
from benchmarks.reporting import DOC_PATH, command_line, environment, markdown_table, write_section
from lightning_nipq import FlatnessNoise, RobustQuantization
from lightning_nipq.data import generate_calibration_data
from lightning_nipq.demo.data import ImageDataModule

SECTION = "robustness"
MODEL = "resnet"
VARIANTS = ("plain", "robust", "flatness")
#: Calibration sources of Table 2: the row label, and the label mode of the generator (real data: no generator).
SOURCES: tuple[tuple[str, str, Optional[str]], ...] = (
    ("real", "real training batches", None),
    ("single", "generated, single-class labels", "single"),
    ("mixup", "generated, mixup-class labels", "mixup"),
    ("none", "generated, no labels (statistics only)", None),
)


@dataclass
class Outcome:
    """Everything one benchmark run measured.

    ``robust`` holds Table 1's results with ``model`` set to the float variant's row label and
    ``method`` one of ``float``, ``PTQ (...)``, ``LSQ``; ``calibration`` holds Table 2's with
    ``model`` set to the calibration source's row label. ``generation_seconds`` is keyed by that label.
    """

    robust: list[runs.Result] = field(default_factory=list)
    calibration: list[runs.Result] = field(default_factory=list)
    generation_seconds: dict[str, float] = field(default_factory=dict)
    plain_float: Optional[runs.Result] = None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--train-samples", type=int, default=12000, help="first N training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--float-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the float training and of every quantized run")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4, 3], help="uniform WbAb settings of PTQ")
    parser.add_argument("--ptq-method", choices=["minmax", "percentile", "mse"], default="mse")
    parser.add_argument("--qat-bits", type=int, default=4, help="WbAb of the LSQ fine-tuning column")
    parser.add_argument("--qat-epochs", type=int, default=3, help="epochs of LSQ fine-tuning (0: no LSQ column)")
    parser.add_argument("--qat-lr", type=float, default=1e-3, help="weight learning rate of LSQ (cosine to 0)")
    parser.add_argument("--symreg-weight", type=float, default=10.0, help="RobustQuantization's SymReg lambda")
    parser.add_argument("--flatness-bits", type=int, nargs="+", default=[3, 4], help="FlatnessNoise's target bits")
    parser.add_argument("--gen-batches", type=int, default=8, help="batches of every calibration set (real or generated)")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="inputs per calibration batch")
    parser.add_argument("--gen-steps", type=int, default=150, help="Adam steps per generated batch")
    parser.add_argument("--gen-lr", type=float, default=0.1, help="Adam's learning rate on the generated inputs")
    parser.add_argument("--mixup-alpha", type=float, default=1.0, help="Beta(alpha, alpha) of the mixup ratio")
    parser.add_argument("--ce-weight", type=float, default=1.0, help="weight of the labels' cross-entropy")
    parser.add_argument(
        "--clamp", action="store_true", help="clamp generated inputs to the normalised pixel range (default: unclamped)"
    )
    parser.add_argument("--tables", nargs="+", choices=["robust", "calibration"], default=["robust", "calibration"])
    parser.add_argument(
        "--float-cache", type=Path, default=None, help="folder to keep trained float weights in and reuse them from (trials)"
    )
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown file to write the tables and plot into")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--section", default=SECTION, help="name of the generated section in --doc")
    args = parser.parse_args(argv)
    if args.train_samples is not None and args.train_samples < 1:
        parser.error("--train-samples must be >= 1")
    if any(b < 2 for b in args.bits) or args.qat_bits < 2:
        parser.error("--bits and --qat-bits must be >= 2")
    if args.qat_epochs < 0 or args.float_epochs < 1:
        parser.error("--float-epochs must be >= 1 and --qat-epochs >= 0")
    if min(args.gen_batches, args.gen_batch_size) < 1 or args.gen_steps < 0:
        parser.error("--gen-batches and --gen-batch-size must be >= 1, --gen-steps >= 0")
    return args


def variant_label(args: argparse.Namespace, variant: str) -> str:
    if variant == "plain":
        return "plain"
    if variant == "robust":
        return f"SymReg (lambda={args.symreg_weight:g}) + SatNL"
    return f"flatness noise (bits {', '.join(map(str, args.flatness_bits))})"


def variant_callbacks(args: argparse.Namespace, variant: str) -> list[Callback]:
    if variant == "plain":
        return []
    if variant == "robust":
        return [RobustQuantization(symreg_weight=args.symreg_weight)]
    return [FlatnessNoise(target_bits=tuple(args.flatness_bits))]


def cache_file(args: argparse.Namespace, variant: str) -> Optional[Path]:
    """The cached weights of one float variant; the plain model's name is benchmarks.accuracy's, so they share it."""
    if args.float_cache is None:
        return None
    tag = {
        "plain": "",
        "robust": f"-symreg{args.symreg_weight:g}-satnl",
        "flatness": f"-flatness{'_'.join(map(str, args.flatness_bits))}",
    }[variant]
    key = f"{MODEL}{tag}-{args.data}-{args.train_samples}-{args.batch_size}-{args.float_epochs}-{args.seed}"
    return args.float_cache / f"{key}.pt"


def real_batches(data: ImageDataModule, count: int, batch_size: int, seed: int) -> list[Tensor]:
    """``count`` shuffled training batches of ``batch_size`` inputs, without labels, like the generated ones."""
    loader = DataLoader(data.train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    batches = []
    for x, _ in loader:
        batches.append(x)
        if len(batches) == count:
            break
    return batches


def _print(result: runs.Result) -> None:
    flag = "" if result.validated else "  (integer check FAILED)"
    print(
        f"{result.model:42s} {result.method:10s} {result.setting:6s}: {100 * result.accuracy:6.2f}%  "
        f"W {result.weight_bits:.2f}  A {result.act_bits:.2f}  {result.seconds:6.1f} s{flag}",
        flush=True,
    )


def run(args: argparse.Namespace) -> Outcome:
    data = ImageDataModule(args.data, args.data_dir, batch_size=args.batch_size, seed=args.seed, train_samples=args.train_samples)
    make = model_factory(MODEL, data.image_size)
    outcome = Outcome()

    def record(into: list[runs.Result], result: runs.Result, row: str) -> None:
        result = replace(result, model=row)
        into.append(result)
        _print(result)

    variants = VARIANTS if "robust" in args.tables else ("plain",)
    models = {}
    for variant in variants:
        label = variant_label(args, variant)
        model, result = runs.train_float(
            make, data, args.float_epochs, args.seed, cache_file(args, variant), variant_callbacks(args, variant), "float"
        )
        models[variant] = model
        if variant == "plain":
            outcome.plain_float = replace(result, model=label)
        if "robust" not in args.tables:
            continue
        record(outcome.robust, result, label)
        for bits in args.bits:
            record(outcome.robust, runs.run_ptq(model, data, bits, args.ptq_method, args.gen_batches, args.seed), label)
        if args.qat_epochs:
            lsq = runs.run_qat(
                model, data, runs.lsq(args.qat_bits), "LSQ", f"W{args.qat_bits}A{args.qat_bits}", args.qat_epochs, args.qat_lr, args.seed
            )
            record(outcome.robust, lsq, label)

    if "calibration" in args.tables:
        plain = models["plain"]
        shape = tuple(data.train_set.tensors[0].shape[1:])
        # The range of the normalised pixels: known from the preprocessing, not from any training image.
        pixels = data.train_set.tensors[0]
        clamp = (float(pixels.min()), float(pixels.max())) if args.clamp else None
        for key, label, mode in SOURCES:
            start = time.perf_counter()
            if key == "real":
                batches = real_batches(data, args.gen_batches, args.gen_batch_size, args.seed)
            else:
                batches = generate_calibration_data(
                    plain,
                    shape,
                    num_batches=args.gen_batches,
                    batch_size=args.gen_batch_size,
                    labels=mode,
                    mixup_alpha=args.mixup_alpha,
                    steps=args.gen_steps,
                    lr=args.gen_lr,
                    ce_weight=args.ce_weight,
                    clamp=clamp,
                    seed=args.seed,
                )
            outcome.generation_seconds[label] = time.perf_counter() - start
            print(f"{label}: {len(batches)} batches of {args.gen_batch_size} in {outcome.generation_seconds[label]:.1f} s", flush=True)
            # BatchNorm re-estimated on the set, or the float model's statistics kept: generated
            # inputs were fitted to those statistics, so re-estimating on them can only add error.
            for suffix, reestimate in ((", BN re-estimated", True), (", float BN kept", False)):
                outcome.generation_seconds[label + suffix] = outcome.generation_seconds[label]
                for bits in args.bits:
                    result = runs.run_ptq(
                        plain, data, bits, args.ptq_method, seed=args.seed, calibration=batches, reestimate_bn=reestimate
                    )
                    record(outcome.calibration, result, label + suffix)
    return outcome


def _cell(results: list[runs.Result], bits: Optional[int] = None) -> str:
    if not results:
        return ""
    r = results[0]
    text = f"{100 * r.accuracy:.2f}"
    if bits is not None and (r.weight_bits != bits or r.act_bits != bits):
        text += f" (W{r.weight_bits:.2f}A{r.act_bits:.2f})"  # the integer report disagrees with the asked bits
    return text


def _check(results: list[runs.Result]) -> str:
    return runs.check_cell(list(results))


def robust_table(outcome: Outcome, args: argparse.Namespace) -> str:
    """One row per float model: its float accuracy, PTQ at every bit width, LSQ fine-tuning."""
    rows = []
    for label in dict.fromkeys(r.model for r in outcome.robust):
        mine = [r for r in outcome.robust if r.model == label]
        row = [label, _cell([r for r in mine if r.method == "float"])]
        row += [_cell([r for r in mine if r.method.startswith("PTQ") and r.setting == f"W{b}A{b}"], b) for b in args.bits]
        if args.qat_epochs:
            row.append(_cell([r for r in mine if r.method == "LSQ"], args.qat_bits))
        row += [_check([r for r in mine if r.method != "float"]), f"{sum(r.seconds for r in mine if r.method == 'float'):.0f}"]
        rows.append(row)
    header = ["float model", "float acc. %"] + [f"PTQ W{b}A{b} %" for b in args.bits]
    if args.qat_epochs:
        header.append(f"LSQ W{args.qat_bits}A{args.qat_bits} %")
    header += ["integer check", "float train s"]
    return markdown_table(header, rows)


def calibration_table(outcome: Outcome, args: argparse.Namespace) -> str:
    """One row per calibration source: PTQ accuracy at every bit width, and the time the set took to make."""
    rows = []
    for label in dict.fromkeys(r.model for r in outcome.calibration):
        mine = [r for r in outcome.calibration if r.model == label]
        row = [label] + [_cell([r for r in mine if r.setting == f"W{b}A{b}"], b) for b in args.bits]
        row += [_check(mine), f"{outcome.generation_seconds.get(label, 0.0):.1f}"]
        rows.append(row)
    header = ["calibration data"] + [f"PTQ W{b}A{b} %" for b in args.bits] + ["integer check", "making the set s"]
    return markdown_table(header, rows)


def plot(outcome: Outcome, args: argparse.Namespace, path: Path) -> Optional[Path]:
    """Integer test accuracy against bits: one panel per table, one line per float model or calibration source."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib")
        return None
    panels = [
        (title, results)
        for title, results in (
            ("robust float training: PTQ (dotted: float)", outcome.robust),
            ("calibration data: PTQ of the plain model", outcome.calibration),
        )
        if results
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels):
        for label in dict.fromkeys(r.model for r in results):
            points = {r.weight_bits: 100 * r.accuracy for r in results if r.model == label and r.method.startswith("PTQ")}
            xs = sorted(points)
            (line,) = ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
            for r in results:
                if r.model == label and r.method == "float":  # each float model's own accuracy, in its colour
                    ax.axhline(100 * r.accuracy, color=line.get_color(), linestyle=":", linewidth=1)
        if outcome.plain_float is not None and not any(r.method == "float" for r in results):
            ax.axhline(100 * outcome.plain_float.accuracy, color="black", linestyle="--", linewidth=1, label="plain float")
        ax.set_title(title)
        ax.set_xlabel("weight and input bits")
        ax.set_xticks(sorted(set(args.bits)))
        ax.set_ylabel("integer model test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish(args: argparse.Namespace, argv: Optional[Sequence[str]], outcome: Outcome, minutes: float) -> None:
    """Print the tables and, unless ``--no-doc``, write them with the plot into ``--doc``."""
    tables = []
    if outcome.robust:
        tables.append(robust_table(outcome, args))
    if outcome.calibration:
        tables.append(calibration_table(outcome, args))
    for text in tables:
        print()
        print(text)
    if args.no_doc:
        return
    figure = plot(outcome, args, args.doc.with_name(f"benchmarks_{args.section}.png"))
    samples = "all" if args.train_samples is None else f"the first {args.train_samples:,}"
    flat_bits = ", ".join(map(str, args.flatness_bits))
    parts = [
        (
            f"Measured on {environment()}, in {minutes:.0f} minutes, with:\n\n"
            f"```\n{command_line('benchmarks.robustness', argv)}\n```"
        ),
        (
            f"{args.data} ({samples} training images, the whole test split), the ResNet-style model of the accuracy "
            f"benchmark, seed {args.seed}. Accuracy is the converted integer model's, on the test set; PTQ uses "
            f"`method=\"{args.ptq_method}\"`."
        ),
    ]
    if outcome.robust:
        parts += [
            f"**Robust float training.** Three float models, {args.float_epochs} epochs each from the same seed: "
            f"plain; `RobustQuantization(symreg_weight={args.symreg_weight:g})` (SymReg and SatNL); "
            f"`FlatnessNoise(target_bits=({flat_bits}))`. PTQ calibrates on {args.gen_batches} training batches "
            f"of {args.batch_size}"
            + (
                f"; LSQ fine-tunes at W{args.qat_bits}A{args.qat_bits} for {args.qat_epochs} epochs (lr {args.qat_lr:g})."
                if args.qat_epochs
                else "."
            ),
            tables[0],
        ]
    if outcome.calibration:
        plain = outcome.plain_float
        parts += [
            "**Data-free calibration.** The plain float model"
            + (f" ({100 * plain.accuracy:.2f}% float)" if plain is not None else "")
            + f", PTQ ranges (and, in the rows that say so, BatchNorm re-estimation) from {args.gen_batches} batches of "
            f"{args.gen_batch_size}: real training inputs, or inputs made by `generate_calibration_data` "
            f"({args.gen_steps} Adam steps per batch, lr {args.gen_lr:g}, ce_weight {args.ce_weight:g}, "
            f"mixup_alpha {args.mixup_alpha:g}, "
            + ("clamped to the normalised pixel range" if args.clamp else "unclamped")
            + ", seed "
            + f"{args.seed}). Each set is made once and used at every bit width; the last column is the time "
            "to make it.",
            tables[-1],
        ]
    if figure is not None:
        parts.append(f"![accuracy against bits]({figure.name})")
    write_section(args.section, "\n\n".join(parts), args.doc)
    print(f"\nwrote {args.doc}" + (f" and {figure}" if figure is not None else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    outcome = run(args)
    publish(args, argv, outcome, (time.perf_counter() - start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
