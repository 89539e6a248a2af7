"""Weight granularity (per tensor, per channel, per group) and weight-only quantization, on Fashion-MNIST.

    python -m benchmarks.granularity --float-cache /tmp/bm/cache    # all three parts (about half an hour on 2 shared cores)
    python -m benchmarks.granularity --sections seeds --seeds 0 1 2 3 4
    python -m benchmarks.granularity --sections weight-only --wo-granularities channel 64

Three parts, each from float models trained once (and cached with ``--float-cache``):

* ``channel``: PTQ (``--ptq-method`` ranges), LSQ and NIPQ at fixed bits, W4A4/W3A3/W2A2,
  with one weight range per tensor against one per output channel, on the benchmark
  ResNet and ViT and on a small MobileNetV2 (depthwise separable inverted residuals,
  ReLU6, depthwise channels of different scales: `benchmarks.models.MobileNetV2Style`);
* ``seeds``: NIPQ per channel against per tensor on the MobileNetV2 at ``--seed-setting``
  over ``--seeds``, mean and sample standard deviation;
* ``weight-only``: ``quantize_inputs=False`` on a ViT of width ``--wo-dim`` (128, so that
  groups of 32 and 128 divide every linear layer's inputs; its conv patch embedding, which
  cannot have groups, stays float in every row): NIPQ and LSQ at W4/W3/W2 and NIPQ mixed
  at ``--wo-mixed`` average weight bits, per ``--wo-granularities``, and PTQ at the same
  fixed bits (no training to make up for coarse ranges);
* ``zero-point``: ``input_zero_point="off"`` against ``"auto"`` (a zero point for inputs whose
  minimum is negative but small, such as the GELU output that feeds each MLP's second linear
  layer) on ``--zp-model`` (the ViT), PTQ, LSQ and NIPQ at ``--zp-bits``, weights per channel.

Every quantized run ends as a validated integer model (HardQuantize); the tables give its
test accuracy, the average weight and input bits and the packed size (weights at their
bits, plus a float32 step per range and every unquantized parameter in float32). They are
printed and written into their own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from benchmarks import runs
from benchmarks.accuracy import model_factory as accuracy_model_factory
from benchmarks.models import MobileNetV2Style, SmallViT
from benchmarks.reporting import (
    DOC_PATH,
    command_line,
    environment,
    markdown_table,
    torch_threads,
    write_section,
)
from lightning_nipq import NIPQCallback
from lightning_nipq.demo.data import ImageDataModule
from lightning_nipq.demo.models import ImageClassifier

MODELS = ("resnet", "vit", "mobilenet")
SECTIONS = ("channel", "seeds", "weight-only", "zero-point")
SECTION = "granularity"
#: The weight-only ViT's patch embedding: a conv, which cannot have ranges per group of inputs.
PATCH_EMBED = "patch_embed"

Granularity = Union[str, int]


def granularity_arg(text: str) -> Granularity:
    """``tensor``, ``channel`` or a group size, from the command line."""
    if text in ("tensor", "channel"):
        return text
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a granularity is 'tensor', 'channel' or a group size, got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"a group size is a whole number >= 1, got {text!r}")
    return size


def label(granularity: Granularity) -> str:
    return f"group {granularity}" if isinstance(granularity, int) else granularity


def setting_arg(text: str) -> tuple[int, int]:
    """``W2A4`` as ``(2, 4)``."""
    upper = text.upper()
    if not upper.startswith("W") or "A" not in upper:
        raise argparse.ArgumentTypeError(f"a setting looks like W2A4, got {text!r}")
    try:
        weight, act = upper[1:].split("A")
        return int(weight), int(act)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting looks like W2A4, got {text!r}") from None


def model_factory(name: str, image_size: int, args: argparse.Namespace) -> Callable[[], ImageClassifier]:
    """The benchmark ResNet and ViT (as benchmarks.accuracy builds them), the MobileNetV2, the weight-only ViT."""
    if name in ("resnet", "vit"):
        return accuracy_model_factory(name, image_size)
    if name == "mobilenet":
        return lambda: MobileNetV2Style(depthwise_spread=args.mobilenet_spread, lr=3e-3)
    if name == "vit-wo":
        return lambda: SmallViT(
            image_size=image_size, patch_size=image_size // 4, dim=args.wo_dim, depth=args.wo_depth, heads=4, lr=2e-3
        )
    raise ValueError(f"unknown model {name!r}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="the parts to run")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models of the 'channel' part")
    parser.add_argument("--train-samples", type=int, default=5000, help="first N training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--float-epochs", type=int, default=8)
    parser.add_argument("--float-seed", type=int, default=0, help="seed of the float models (every row of a model starts from it)")
    parser.add_argument("--qat-epochs", type=int, default=2, help="epochs of LSQ and of NIPQ (including its hard epochs)")
    parser.add_argument("--hard-epochs", type=int, default=1, help="NIPQ's final epochs of hard quantization")
    parser.add_argument("--qat-lr", type=float, default=1e-3, help="weight learning rate of LSQ and NIPQ (cosine to 0)")
    parser.add_argument("--nipq-lr-factor", type=float, default=10.0, help="NIPQ quantizer learning-rate factor")
    parser.add_argument("--nipq-max-bits", type=int, default=8, help="NIPQ mixed: highest learnable bits")
    parser.add_argument("--lsq-lr-factor", type=float, default=1.0, help="LSQ step-size learning-rate factor")
    parser.add_argument("--ptq-method", choices=["minmax", "percentile", "mse"], default="mse")
    # Part 1
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="'channel': the WbAb settings")
    parser.add_argument("--methods", nargs="+", choices=["ptq", "lsq", "nipq"], default=["ptq", "lsq", "nipq"])
    parser.add_argument(
        "--granularities", type=granularity_arg, nargs="+", default=["tensor", "channel"], help="'channel': compared granularities"
    )
    parser.add_argument("--mobilenet-spread", type=float, default=30.0, help="MobileNetV2Style's depthwise_spread")
    # Part 2
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="'seeds': seeds of the quantized runs")
    parser.add_argument("--seed-model", choices=MODELS, default="mobilenet")
    parser.add_argument("--seed-setting", type=setting_arg, default=(2, 4), help="'seeds': NIPQ's fixed bits, e.g. W2A4")
    # Part 3
    parser.add_argument("--wo-dim", type=int, default=128, help="'weight-only': width of the ViT")
    parser.add_argument("--wo-depth", type=int, default=2)
    parser.add_argument("--wo-bits", type=int, nargs="*", default=[4, 3, 2], help="'weight-only': fixed weight bits")
    parser.add_argument("--wo-mixed", type=float, nargs="*", default=[3.0, 2.5], help="'weight-only': NIPQ mixed averages")
    parser.add_argument(
        "--wo-methods", nargs="+", choices=["ptq", "nipq", "lsq", "mixed"], default=["ptq", "nipq", "lsq", "mixed"]
    )
    parser.add_argument(
        "--wo-granularities", type=granularity_arg, nargs="+", default=["tensor", "channel", 128, 32], help="'weight-only'"
    )
    parser.add_argument("--zp-model", choices=MODELS, default="vit", help="'zero-point': the model")
    parser.add_argument("--zp-bits", type=int, nargs="+", default=[4, 3, 2], help="'zero-point': the WbAb settings")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). One, because on a machine shared with other jobs two threads "
        "oversubscribe the cores and ran 5 to 20 times slower",
    )
    parser.add_argument("--float-cache", type=Path, default=None, help="folder to keep trained float weights in and reuse them from")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown file to write the tables into")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--section", default=SECTION, help="name of the generated section in --doc")
    args = parser.parse_args(argv)
    if args.train_samples < 1:
        parser.error("--train-samples must be >= 1")
    if args.qat_epochs <= args.hard_epochs:
        parser.error("--qat-epochs must exceed --hard-epochs (NIPQ needs a noise phase)")
    if args.wo_dim % 4:
        parser.error("--wo-dim must be divisible by the 4 attention heads")
    for g in args.granularities:
        if isinstance(g, int):
            parser.error("--granularities: groups fit linear layers only, and these models have convs; use tensor/channel")
    for g in args.wo_granularities:
        if isinstance(g, int) and args.wo_dim % g:
            parser.error(
                f"--wo-granularities: a group of {g} does not divide the ViT's linear inputs ({args.wo_dim} and "
                f"{2 * args.wo_dim}); pick a --wo-dim that it divides"
            )
    return args


@dataclass
class Entry:
    """One run: its part, its weight granularity and its row."""

    section: str
    granularity: str
    result: runs.Result


@dataclass
class Outcome:
    entries: list[Entry]
    #: Float test accuracy per model name (class name, or "SmallViT dim N" for the weight-only ViT).
    float_acc: dict[str, float]
    #: The trained MobileNet's depthwise channel spread: per layer, largest over smallest channel max|W|.
    depthwise_spread: list[float]


def _cache_file(args: argparse.Namespace, name: str) -> Optional[Path]:
    if args.float_cache is None:
        return None
    if name == "mobilenet":
        name = f"mobilenet-spread{args.mobilenet_spread:g}"
    elif name == "vit-wo":
        name = f"vit-dim{args.wo_dim}-depth{args.wo_depth}"
    # resnet and vit: benchmarks.accuracy's key, so that the two scripts share their float models.
    key = f"{name}-{args.data}-{args.train_samples}-{args.batch_size}-{args.float_epochs}-{args.float_seed}"
    return args.float_cache / f"{key}.pt"


def depthwise_spread(model: torch.nn.Module) -> list[float]:
    """Per depthwise conv: the largest channel's max|W| over the smallest's."""
    spreads = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            peak = m.weight.detach().abs().amax(dim=(1, 2, 3))
            spreads.append(float(peak.max() / peak.min().clamp_min(1e-12)))
    return spreads


def run(args: argparse.Namespace) -> Outcome:
    data = ImageDataModule(args.data, args.data_dir, batch_size=args.batch_size, seed=args.float_seed, train_samples=args.train_samples)
    entries: list[Entry] = []
    done: dict[tuple[Any, ...], runs.Result] = {}
    float_models: dict[str, ImageClassifier] = {}
    float_acc: dict[str, float] = {}
    spread: list[float] = []

    def float_model(name: str) -> ImageClassifier:
        nonlocal spread
        if name not in float_models:
            model, result = runs.train_float(
                model_factory(name, data.image_size, args), data, args.float_epochs, args.float_seed, _cache_file(args, name)
            )
            float_models[name] = model
            key = f"SmallViT dim {args.wo_dim}" if name == "vit-wo" else result.model
            float_acc[key] = result.accuracy
            print(f"{key:18s} float          FP32      seed {args.float_seed}: {100 * result.accuracy:6.2f}%  {result.seconds:6.1f} s", flush=True)
            if name == "mobilenet":
                spread = depthwise_spread(model)
        return float_models[name]

    def record(section: str, granularity: Granularity, key: tuple[Any, ...], make: Callable[[], runs.Result]) -> None:
        key = (*key, granularity)
        result = done.get(key)
        if result is None:
            result = done[key] = make()
            flag = "" if result.validated else "  (integer check FAILED)"
            act = "float" if result.act_bits >= 32 else f"{result.act_bits:.2f}"
            print(
                f"{result.model:18s} {result.method:14s} {result.setting:9s} {label(granularity):9s} seed {result.seed}: "
                f"{100 * result.accuracy:6.2f}%  W {result.weight_bits:.2f}  A {act:5s} "
                f"{result.size_kib:7.1f} KiB  {result.seconds:6.1f} s{flag}",
                flush=True,
            )
        entries.append(Entry(section, label(granularity), result))

    def nipq(weight_bits: int, act_bits: int, granularity: Granularity, **kwargs: Any) -> NIPQCallback:
        return NIPQCallback(
            weight_bits=weight_bits,
            act_bits=act_bits,
            target_bits=weight_bits,
            target_act_bits=act_bits,
            hard_epochs=args.hard_epochs,
            quantizer_lr_factor=args.nipq_lr_factor,
            weight_granularity=granularity,
            log_per_layer=False,
            **kwargs,
        )

    def weight_only_ptq(model: ImageClassifier, bits: int, granularity: Granularity) -> runs.Result:
        result = runs.run_ptq(
            model, data, bits, args.ptq_method, seed=seed0, weight_granularity=granularity, quantize_inputs=False, exclude=[PATCH_EMBED]
        )
        result.setting = f"W{bits}"
        return result

    def qat(model: ImageClassifier, callback: Any, method: str, setting: str, seed: int) -> Callable[[], runs.Result]:
        return partial(runs.run_qat, model, data, callback, method, setting, args.qat_epochs, args.qat_lr, seed)

    seed0 = args.seeds[0]
    if "channel" in args.sections:
        for name in args.models:
            model = float_model(name)
            for bits in args.bits:
                setting = f"W{bits}A{bits}"
                for g in args.granularities:
                    if "ptq" in args.methods:
                        make = partial(runs.run_ptq, model, data, bits, args.ptq_method, seed=seed0, weight_granularity=g)
                        record("channel", g, (name, "ptq", setting, seed0), make)
                    if "lsq" in args.methods:
                        cb = runs.lsq(bits, quantizer_lr_factor=args.lsq_lr_factor, weight_granularity=g)
                        record("channel", g, (name, "lsq", setting, seed0), qat(model, cb, "LSQ", setting, seed0))
                    if "nipq" in args.methods:
                        record("channel", g, (name, "nipq", setting, seed0), qat(model, nipq(bits, bits, g), "NIPQ", setting, seed0))

    if "seeds" in args.sections:
        model = float_model(args.seed_model)
        w, a = args.seed_setting
        setting = f"W{w}A{a}"
        for seed in args.seeds:
            for g in ("tensor", "channel"):
                record("seeds", g, (args.seed_model, "nipq", setting, seed), qat(model, nipq(w, a, g), "NIPQ", setting, seed))

    if "weight-only" in args.sections:
        model = float_model("vit-wo")
        only: dict[str, Any] = {"quantize_inputs": False, "exclude": [PATCH_EMBED]}
        for g in args.wo_granularities:
            for bits in args.wo_bits:
                if "ptq" in args.wo_methods:
                    make = partial(weight_only_ptq, model, bits, g)
                    record("weight-only", g, ("vit-wo", "ptq", f"W{bits}", seed0), make)
                if "nipq" in args.wo_methods:
                    cb = nipq(bits, bits, g, **only)
                    record("weight-only", g, ("vit-wo", "nipq", f"W{bits}", seed0), qat(model, cb, "NIPQ", f"W{bits}", seed0))
                if "lsq" in args.wo_methods:
                    cb = runs.lsq(bits, quantizer_lr_factor=args.lsq_lr_factor, weight_granularity=g, **only)
                    record("weight-only", g, ("vit-wo", "lsq", f"W{bits}", seed0), qat(model, cb, "LSQ", f"W{bits}", seed0))
            if "mixed" in args.wo_methods:
                for target in args.wo_mixed:
                    cb = runs.nipq_mixed(
                        target,
                        args.hard_epochs,
                        quantizer_lr_factor=args.nipq_lr_factor,
                        max_bits=args.nipq_max_bits,
                        weight_granularity=g,
                        **only,
                    )
                    setting = f"avg {target:g}"
                    record("weight-only", g, ("vit-wo", "mixed", setting, seed0), qat(model, cb, "NIPQ mixed", setting, seed0))
    if "zero-point" in args.sections:
        model = float_model(args.zp_model)
        for bits in args.zp_bits:
            setting = f"W{bits}A{bits}"
            for rule in ("off", "auto"):
                key = (args.zp_model, setting, seed0)
                if "ptq" in args.methods:
                    make = partial(runs.run_ptq, model, data, bits, args.ptq_method, seed=seed0, input_zero_point=rule)
                    record("zero-point", rule, (*key, "ptq"), make)
                if "lsq" in args.methods:
                    cb = runs.lsq(bits, quantizer_lr_factor=args.lsq_lr_factor, input_zero_point=rule)
                    record("zero-point", rule, (*key, "lsq"), qat(model, cb, "LSQ", setting, seed0))
                if "nipq" in args.methods:
                    cb = nipq(bits, bits, "channel", input_zero_point=rule)
                    record("zero-point", rule, (*key, "nipq"), qat(model, cb, "NIPQ", setting, seed0))
    return Outcome(entries, float_acc, spread)


# ---------------------------------------------------------------- tables


def _acc(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _bits(values: list[float]) -> str:
    cells = list(dict.fromkeys(f"{v:.2f}" for v in values))
    return " / ".join(cells)


def _act(values: list[float]) -> str:
    return "float" if all(v >= 32 for v in values) else _bits(values)


def _pivot(entries: list[Entry], granularities: list[str], with_model: bool) -> tuple[list[str], list[list[str]]]:
    """One row per model, method and setting; accuracy and size per granularity, channel minus tensor when both ran."""
    rows: dict[tuple[str, str, str], dict[str, list[runs.Result]]] = defaultdict(lambda: defaultdict(list))
    for e in entries:
        rows[(e.result.model, e.result.method, e.result.setting)][e.granularity].append(e.result)
    delta = "tensor" in granularities and "channel" in granularities
    header = (["model"] if with_model else []) + ["method", "setting", "W bits", "A bits"]
    header += [f"{g} acc. %" for g in granularities] + (["channel − tensor"] if delta else [])
    header += [f"{g} KiB" for g in granularities] + ["integer check"]
    out = []
    for (model, method, setting), cells in rows.items():
        every = [r for g in granularities for r in cells.get(g, [])]
        row = ([model] if with_model else []) + [method, setting]
        row += [_bits([r.weight_bits for g in granularities for r in cells.get(g, [])[:1]]), _act([r.act_bits for r in every])]
        row += [_acc([r.accuracy for r in cells[g]]) if cells.get(g) else "" for g in granularities]
        if delta:
            both = cells.get("tensor") and cells.get("channel")
            diff = statistics.fmean(r.accuracy for r in cells["channel"]) - statistics.fmean(r.accuracy for r in cells["tensor"]) if both else None
            row.append("" if diff is None else f"{100 * diff:+.2f}")
        row += [f"{statistics.fmean(r.size_kib for r in cells[g]):.1f}" if cells.get(g) else "" for g in granularities]
        row.append(runs.check_cell(every))
        out.append(row)
    return header, out


def channel_table(outcome: Outcome, args: argparse.Namespace) -> str:
    header, rows = _pivot([e for e in outcome.entries if e.section == "channel"], [label(g) for g in args.granularities], True)
    return markdown_table(header, rows)


def channel_verdict(outcome: Outcome) -> str:
    """Where per channel fell behind per tensor, in words."""
    pairs: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for e in outcome.entries:
        if e.section == "channel":
            pairs[(e.result.model, e.result.method, e.result.setting)][e.granularity] = e.result.accuracy
    diffs = {k: 100 * (v["channel"] - v["tensor"]) for k, v in pairs.items() if "channel" in v and "tensor" in v}
    if not diffs:
        return ""
    ahead = sum(d > 0 for d in diffs.values())
    behind = sum(d < 0 for d in diffs.values())
    far = [f"{m} {method} {s} ({d:+.2f})" for (m, method, s), d in diffs.items() if d < -0.5]
    text = (
        f"Per channel is ahead of per tensor in {ahead} of {len(diffs)} rows and behind in {behind} "
        f"(median {statistics.median(diffs.values()):+.2f} points); "
    )
    text += ("behind by more than half a point in " + ", ".join(far) + "." if far else "never behind by more than half a point.")
    return text


def seeds_table(outcome: Outcome) -> tuple[str, str]:
    entries = [e for e in outcome.entries if e.section == "seeds"]
    groups: dict[tuple[str, str, str, str], list[runs.Result]] = defaultdict(list)
    for e in entries:
        groups[(e.result.model, e.result.method, e.result.setting, e.granularity)].append(e.result)
    header = ["model", "method", "setting", "granularity", "W bits", "A bits", "test acc. % (mean ± sd)", "per seed", "KiB", "integer check"]
    rows = [
        [
            model,
            method,
            setting,
            g,
            _bits([r.weight_bits for r in group]),
            _act([r.act_bits for r in group]),
            _acc([r.accuracy for r in group]),
            ", ".join(f"{100 * r.accuracy:.2f}" for r in group),
            f"{statistics.fmean(r.size_kib for r in group):.1f}",
            runs.check_cell(group),
        ]
        for (model, method, setting, g), group in groups.items()
    ]
    verdict = ""
    by_g = {k[3]: v for k, v in groups.items()}
    if "tensor" in by_g and "channel" in by_g:
        t = [r.accuracy for r in by_g["tensor"]]
        c = [r.accuracy for r in by_g["channel"]]
        diff = 100 * (statistics.fmean(c) - statistics.fmean(t))
        if len(t) > 1 and len(c) > 1:
            sd = 100 * max(statistics.stdev(t), statistics.stdev(c))
            beyond = "more" if abs(diff) > sd else "less"
            side = "ahead" if diff > 0 else "behind"
            verdict = (
                f"Over {len(c)} seeds per channel is {side} by {abs(diff):.2f} points, {beyond} than one seed's spread "
                f"(the larger sample standard deviation, {sd:.2f} points)."
            )
        else:
            verdict = f"With one seed per channel minus per tensor is {diff:+.2f} points; give --seeds for a spread."
    return markdown_table(header, rows), verdict


def weight_only_table(outcome: Outcome, args: argparse.Namespace) -> str:
    header, rows = _pivot([e for e in outcome.entries if e.section == "weight-only"], [label(g) for g in args.wo_granularities], False)
    return markdown_table(header, rows)


def zero_point_table(outcome: Outcome) -> str:
    """Accuracy without and with input zero points, and how many inputs took one."""
    rows: dict[tuple[str, str, str], dict[str, runs.Result]] = defaultdict(dict)
    for e in outcome.entries:
        if e.section == "zero-point":
            rows[(e.result.model, e.result.method, e.result.setting)][e.granularity] = e.result
    header = ["model", "method", "setting", "W bits", "A bits", "off acc. %", "auto acc. %", "auto − off", "inputs with a zero point"]
    header += ["auto KiB", "integer check"]
    out = []
    for (model, method, setting), cells in rows.items():
        off, auto = cells.get("off"), cells.get("auto")
        both = [r for r in (off, auto) if r is not None]
        out.append(
            [
                model,
                method,
                setting,
                _bits([r.weight_bits for r in both]),
                _act([r.act_bits for r in both]),
                f"{100 * off.accuracy:.2f}" if off else "",
                f"{100 * auto.accuracy:.2f}" if auto else "",
                f"{100 * (auto.accuracy - off.accuracy):+.2f}" if off and auto else "",
                str(auto.zero_point_inputs) if auto else "",
                f"{auto.size_kib:.1f}" if auto else "",
                runs.check_cell(both),
            ]
        )
    return markdown_table(header, out)


def seed_noise(outcome: Outcome) -> str:
    """A sentence on how far one seed's accuracy moves, from the seeds part when it ran."""
    groups: dict[str, list[float]] = defaultdict(list)
    for e in outcome.entries:
        if e.section == "seeds":
            groups[e.granularity].append(e.result.accuracy)
    sds = [100 * statistics.stdev(v) for v in groups.values() if len(v) > 1]
    if not sds:
        return "Every row is one seed: differences of a few tenths of a point between rows may be seed noise."
    return (
        f"Every row but the seeds table's is one seed; there, one configuration's accuracy has a standard deviation of "
        f"{min(sds):.2f} to {max(sds):.2f} points across seeds, so single-seed differences of that size are noise."
    )


def tables(outcome: Outcome, args: argparse.Namespace) -> dict[str, str]:
    """The printed and written text of each part that ran."""
    parts: dict[str, str] = {}
    sections = {e.section for e in outcome.entries}
    if "channel" in sections:
        parts["channel"] = channel_table(outcome, args) + "\n\n" + channel_verdict(outcome)
    if "seeds" in sections:
        text, verdict = seeds_table(outcome)
        parts["seeds"] = text + ("\n\n" + verdict if verdict else "")
    if "weight-only" in sections:
        parts["weight-only"] = weight_only_table(outcome, args)
    if "zero-point" in sections:
        parts["zero-point"] = zero_point_table(outcome)
    return parts


def publish(args: argparse.Namespace, argv: Optional[Sequence[str]], outcome: Outcome, minutes: float, load: tuple[float, float]) -> None:
    parts = tables(outcome, args)
    samples = f"the first {args.train_samples:,}"
    floats = ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in outcome.float_acc.items())
    spread = (
        f" The trained MobileNetV2Style's depthwise convs (`depthwise_spread={args.mobilenet_spread:g}` at initialisation) "
        f"have channels whose max|W| differ by {min(outcome.depthwise_spread):.0f}x to {max(outcome.depthwise_spread):.0f}x "
        "within a layer."
        if outcome.depthwise_spread
        else ""
    )
    device = torch.device(args.accelerator if args.accelerator != "gpu" else "cuda")
    body = [
        f"Measured on {environment(device)}, in {minutes:.0f} minutes, with:\n\n```\n{command_line('benchmarks.granularity', argv)}\n```",
        f"{args.data} ({samples} training images, all test images), {args.float_epochs} float epochs (seed {args.float_seed}; "
        f"every row of a model starts from the same float weights), {args.qat_epochs} epochs of LSQ and of NIPQ (NIPQ: the last "
        f"{args.hard_epochs} hard), quantized runs with seed {args.seeds[0]} unless stated. Accuracy is the converted integer "
        f"model's (HardQuantize); the size counts weights at their bits, a float32 step per weight range (so per channel and per "
        f"group pay for their ranges) and input range, and every other parameter in float32. Float test accuracy: {floats}.{spread}",
        "The machine is shared with other jobs (load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} cores), so the times are wall-clock "
        "under that load and vary between runs; accuracies do not depend on it. "
        + seed_noise(outcome),
    ]
    if "channel" in parts:
        body += [
            "**Per tensor against per channel** (fixed bits, weights and inputs quantized; PTQ with "
            f"`{args.ptq_method}` ranges, BatchNorm re-estimated):",
            parts["channel"],
        ]
    if "seeds" in parts:
        w, a = args.seed_setting
        model = {"resnet": "ResNetStyle", "vit": "SmallViT", "mobilenet": "MobileNetV2Style"}[args.seed_model]
        body += [f"**Seeds**: NIPQ on {model} at W{w}A{a}, seeds {', '.join(map(str, args.seeds))}:", parts["seeds"]]
    if "weight-only" in parts:
        body += [
            f"**Weight-only** (`quantize_inputs=False`) on a SmallViT of width {args.wo_dim} and depth {args.wo_depth} "
            f"(the accuracy benchmark's ViT has width 64, which a group of 128 does not divide; here every linear layer's "
            f"input size, {args.wo_dim} or {2 * args.wo_dim}, is a multiple of each group size). Its patch embedding is "
            f"a conv, which cannot have ranges per group, so it is excluded (`exclude=['{PATCH_EMBED}']`) and stays float32 "
            "in every row, per tensor and per channel included; the bits average over the quantized linear layers. PTQ "
            f"sets `{args.ptq_method}` ranges without training; NIPQ mixed learns one bit-width per layer under the "
            "average-bit budget:",
            parts["weight-only"],
        ]
    if "zero-point" in parts:
        model = {"resnet": "ResNetStyle", "vit": "SmallViT", "mobilenet": "MobileNetV2Style"}[args.zp_model]
        body += [
            f"**Input zero points** on {model}: `input_zero_point=\"off\"` (signed or unsigned codes, the default) against "
            '`"auto"` (unsigned codes with a zero point for an input whose calibrated minimum is negative but at most half '
            "its maximum, such as a GELU output), fixed bits, weights per channel:",
            parts["zero-point"],
        ]
    write_section(args.section, "\n\n".join(body), args.doc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    outcome = run(args)
    minutes = (time.perf_counter() - start) / 60
    print()
    for text in tables(outcome, args).values():
        print(text)
        print()
    print(f"{minutes:.1f} minutes")
    if not args.no_doc:
        publish(args, argv, outcome, minutes, (load_start, os.getloadavg()[0]))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
