"""Accuracy at 2, 3 and 4 bits: PTQ, LSQ and NIPQ from one float checkpoint, on Fashion-MNIST.

    python -m benchmarks.accuracy --seeds 0 1 2   # the table in docs/benchmarks.md: 3 seeds, about an hour on 2 CPU cores
    python -m benchmarks.accuracy                 # one seed (about 15 minutes)
    python -m benchmarks.accuracy --models hf-vit --quantize-products   # transformers' ViT, all-integer attention

For each model (a ResNet-style CNN with BatchNorm and a small vision transformer by
default; ``hf-vit``, transformers' ViTForImageClassification from a config, on request) the float
model is trained once; PTQ, LSQ and NIPQ at W4A4/W3A3/W2A2 and NIPQ mixed precision at the
``--mixed`` averages all start from its weights, train for the same ``--qat-epochs``, and
are converted to validated integer models. The table (test accuracy of the integer model,
average weight and input bits, packed weight size) is printed and written, with a plot,
into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from benchmarks import runs
from benchmarks.models import ResNetStyle, SmallViT, TransformersViT
from benchmarks.reporting import DOC_PATH, command_line, environment, markdown_table, write_section
from lightning_nipq.demo.data import ImageDataModule
from lightning_nipq.demo.models import ImageClassifier

MODELS = ("resnet", "vit", "hf-vit")
SECTION = "accuracy"


def model_factory(name: str, image_size: int) -> Callable[[], ImageClassifier]:
    if name == "resnet":
        return lambda: ResNetStyle(width=16, blocks=(1, 1, 1), lr=3e-3)
    if name == "vit":
        return lambda: SmallViT(image_size=image_size, patch_size=image_size // 4, dim=64, depth=4, heads=4, lr=2e-3)
    if name == "hf-vit":
        return lambda: TransformersViT(image_size=image_size, patch_size=image_size // 4, dim=64, depth=4, heads=4, lr=2e-3)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["resnet", "vit"])
    parser.add_argument("--train-samples", type=int, default=12000, help="first N training images (None: all 60,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--float-epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=3, help="epochs of LSQ and of NIPQ (including its hard epochs)")
    parser.add_argument("--hard-epochs", type=int, default=1, help="NIPQ's final epochs of hard quantization")
    parser.add_argument("--qat-lr", type=float, default=1e-3, help="weight learning rate of LSQ and NIPQ (cosine to 0)")
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 3, 2], help="uniform WbAb settings")
    parser.add_argument("--mixed", type=float, nargs="*", default=[4.0, 3.0, 2.5], help="NIPQ mixed-precision averages")
    parser.add_argument("--methods", nargs="+", choices=["ptq", "lsq", "nipq", "mixed"], default=["ptq", "lsq", "nipq", "mixed"])
    parser.add_argument("--ptq-method", choices=["minmax", "percentile", "mse"], default="mse")
    parser.add_argument(
        "--nipq-lr-factor", type=float, default=10.0, help="NIPQ quantizer learning-rate factor (the callback's default)"
    )
    parser.add_argument("--nipq-fixed-lr-factor", type=float, default=10.0, help="the same for NIPQ at fixed bits")
    parser.add_argument("--nipq-max-bits", type=int, default=8, help="NIPQ mixed: highest learnable bits (start: half a bit under)")
    parser.add_argument(
        "--nipq-weight-init", choices=["max", "mse"], default="mse", help="NIPQ's starting weight range (the callback's default)"
    )
    parser.add_argument("--lsq-lr-factor", type=float, default=1.0, help="LSQ step-size learning-rate factor")
    parser.add_argument("--noise", choices=["uniform", "histogram"], default="uniform")
    parser.add_argument(
        "--quantize-products",
        action="store_true",
        help="LSQ and NIPQ also quantize attention's two activation products (quantize_products=True; method names get ' +products')",
    )
    parser.add_argument(
        "--nipq-distillation", action="store_true", help="NIPQ (fixed and mixed) distils from the float model (LSQ has no such option)"
    )
    parser.add_argument(
        "--nipq-float-bn", action="store_true", help="NIPQ's noise phase normalises with the float model's BatchNorm statistics (eval-mode BatchNorm)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the quantized runs (float: the first)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--float-cache", type=Path, default=None, help="folder to keep trained float weights in and reuse them from (trials)"
    )
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown file to write the table and plot into")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--section", default=SECTION, help="name of the generated section in --doc")
    parser.add_argument("--no-plot", action="store_true", help="write the table without a plot")
    args = parser.parse_args(argv)
    if args.train_samples is not None and args.train_samples < 1:
        parser.error("--train-samples must be >= 1")
    if args.qat_epochs <= args.hard_epochs:
        parser.error("--qat-epochs must exceed --hard-epochs (NIPQ needs a noise phase)")
    return args


def run(args: argparse.Namespace) -> list[runs.Result]:
    data = ImageDataModule(args.data, args.data_dir, batch_size=args.batch_size, seed=args.seeds[0], train_samples=args.train_samples)
    results: list[runs.Result] = []

    def record(result: runs.Result) -> None:
        results.append(result)
        flag = "" if result.validated else "  (integer check FAILED)"
        print(
            f"{result.model:12s} {result.method:14s} {result.setting:9s} seed {result.seed}: "
            f"{100 * result.accuracy:6.2f}%  W {result.weight_bits:.2f}  A {result.act_bits:.2f}  "
            f"{result.size_kib:7.1f} KiB  {result.seconds:6.1f} s{flag}",
            flush=True,
        )

    extra = [runs.FloatBatchNormInNoisePhase()] if args.nipq_float_bn else []
    products = {"quantize_products": True} if args.quantize_products else {}
    tag = " +products" if args.quantize_products else ""
    for name in args.models:
        make = model_factory(name, data.image_size)
        float_model, float_result = runs.train_float(make, data, args.float_epochs, args.seeds[0], _cache_file(args, name))
        record(float_result)
        for seed in args.seeds:
            for bits in args.bits:
                if "ptq" in args.methods:
                    record(runs.run_ptq(float_model, data, bits, args.ptq_method, seed=seed))
                if "lsq" in args.methods:
                    cb = runs.lsq(bits, quantizer_lr_factor=args.lsq_lr_factor, **products)
                    record(runs.run_qat(float_model, data, cb, "LSQ" + tag, f"W{bits}A{bits}", args.qat_epochs, args.qat_lr, seed))
                if "nipq" in args.methods:
                    cb = runs.nipq_fixed(
                        bits,
                        args.hard_epochs,
                        noise=args.noise,
                        quantizer_lr_factor=args.nipq_fixed_lr_factor,
                        weight_init=args.nipq_weight_init,
                        distillation=args.nipq_distillation,
                        **products,
                    )
                    record(runs.run_qat(float_model, data, cb, "NIPQ" + tag, f"W{bits}A{bits}", args.qat_epochs, args.qat_lr, seed, extra_callbacks=extra))
            if "mixed" in args.methods:
                for target in args.mixed:
                    cb = runs.nipq_mixed(
                        target,
                        args.hard_epochs,
                        noise=args.noise,
                        quantizer_lr_factor=args.nipq_lr_factor,
                        weight_init=args.nipq_weight_init,
                        max_bits=args.nipq_max_bits,
                        distillation=args.nipq_distillation,
                        **products,
                    )
                    record(
                        runs.run_qat(float_model, data, cb, "NIPQ mixed" + tag, f"avg {target:g}", args.qat_epochs, args.qat_lr, seed, extra_callbacks=extra)
                    )
    return results


def _cache_file(args: argparse.Namespace, name: str) -> Optional[Path]:
    if args.float_cache is None:
        return None
    key = f"{name}-{args.data}-{args.train_samples}-{args.batch_size}-{args.float_epochs}-{args.seeds[0]}"
    return args.float_cache / f"{key}.pt"


def _mean_spread(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def table(results: list[runs.Result]) -> str:
    """One row per model, method and setting; accuracy as the mean ± sample standard deviation over seeds."""
    groups: dict[tuple[str, str, str], list[runs.Result]] = defaultdict(list)
    for r in results:
        groups[(r.model, r.method, r.setting)].append(r)
    float_acc = {r.model: r.accuracy for r in results if r.method == "float"}
    rows = []
    for (model, method, setting), group in groups.items():
        accs = [r.accuracy for r in group]
        quantized = method != "float"
        rows.append(
            [
                model,
                method,
                setting,
                f"{statistics.fmean(r.weight_bits for r in group):.2f}" if quantized else "32",
                f"{statistics.fmean(r.act_bits for r in group):.2f}" if quantized else "32",
                _mean_spread(accs),
                f"{100 * (statistics.fmean(accs) - float_acc[model]):+.2f}" if quantized and model in float_acc else "",
                f"{statistics.fmean(r.size_kib for r in group):.1f}" if quantized else "",
                runs.check_cell(group),
                f"{statistics.fmean(r.seconds for r in group):.0f}",
            ]
        )
    header = ["model", "method", "setting", "W bits", "A bits", "test acc. %", "vs float", "weights KiB", "integer check", "time s"]
    return markdown_table(header, rows)


def plot(results: list[runs.Result], path: Path) -> Optional[Path]:
    """Integer test accuracy against average weight bits, one panel per model, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib")
        return None
    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in results if r.model == model]
        for method in dict.fromkeys(r.method for r in mine if r.method != "float"):
            points: dict[float, list[float]] = defaultdict(list)
            bits_of: dict[str, float] = {}
            for r in mine:
                if r.method == method:
                    bits_of.setdefault(r.setting, r.weight_bits)
                    points[bits_of[r.setting]].append(100 * r.accuracy)
            xs = sorted(points)
            ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=method)
        for r in mine:
            if r.method == "float":
                ax.axhline(100 * r.accuracy, color="black", linestyle="--", label="float")
                break
        ax.set_title(model)
        ax.set_xlabel("average weight bits")
        ax.set_ylabel("integer model test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_bits(results: list[runs.Result], path: Path) -> Optional[Path]:
    """The bits NIPQ mixed learned for each layer (weights and inputs), one panel per model and budget, first seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    first: dict[tuple[str, str], runs.Result] = {}
    for r in results:
        if r.method.startswith("NIPQ mixed") and r.layer_bits:
            first.setdefault((r.model, r.setting), r)
    if not first:
        return None
    panels = list(first.items())
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, ((model, setting), r) in zip(axes[:, 0], panels):
        names = [name for name, _, _ in r.layer_bits]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [w for _, w, _ in r.layer_bits], width=0.4, label="weight bits")
        ax.bar([x + 0.2 for x in xs], [a or 0 for _, _, a in r.layer_bits], width=0.4, label="input bits (0: float)")
        ax.set_title(f"{model}, NIPQ mixed {setting} (seed {r.seed}): W {r.weight_bits:.2f}, A {r.act_bits:.2f} on average")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("bits")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    minutes = (time.perf_counter() - start) / 60
    text = table(results)
    print()
    print(text)
    if args.no_doc:
        return 0
    figure = None if args.no_plot else plot(results, args.doc.with_name(f"benchmarks_{args.section}.png"))
    layer_figure = None if args.no_plot else plot_layer_bits(results, args.doc.with_name(f"benchmarks_{args.section}_layer_bits.png"))
    samples = "all 60,000" if args.train_samples is None else f"the first {args.train_samples:,}"
    body = "\n\n".join(
        [
            f"Measured on {environment(torch.device(args.accelerator if args.accelerator != 'gpu' else 'cuda'))}, "
            f"in {minutes:.0f} minutes, with:\n\n```\n{command_line('benchmarks.accuracy', argv)}\n```",
            f"{args.data} ({samples} training images, the 10,000 test images), {args.float_epochs} float epochs, "
            f"{args.qat_epochs} epochs of LSQ and of NIPQ (NIPQ: the last {args.hard_epochs} hard), "
            f"seeds {', '.join(map(str, args.seeds))}. Accuracy is the converted integer model's.",
            text,
            f"![accuracy against bits]({figure.name})" if figure is not None else "",
            (
                "The bits NIPQ mixed learned for each layer (first seed; a bar at 0 input bits is a float input):\n\n"
                f"![learned bits per layer]({layer_figure.name})"
            )
            if layer_figure is not None
            else "",
        ]
    )
    write_section(args.section, body, args.doc)
    print(f"\nwrote {args.doc}" + "".join(f" and {f}" for f in (figure, layer_figure) if f is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
