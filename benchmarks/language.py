"""Language modelling: test perplexity of a small GPT-style model under PTQ, LSQ and NIPQ, trained on the Python standard library.

    python -m benchmarks.language --float-cache /tmp/bm/cache    # the documented run (about 20 minutes on 2 shared cores)
    python -m benchmarks.language --methods nipq mixed --no-doc  # a part of it, printed only

The corpus is on every machine without a download: the ``*.py`` files of the running
Python's standard library (``sysconfig.get_paths()["stdlib"]``, without the test suites,
``idlelib``, ``lib2to3``, ``turtledemo`` and ``site-packages``), sorted by path and split by
file: every ``--test-every``-th file is a test file, the others train, so that no file is
in both. Each split is capped (``--train-bytes``, ``--test-bytes``) by taking whole files in
the order of the CRC-32 of their paths (spread over the library; the last file cut at the
cap), and read as bytes: the vocabulary is the 256 byte values.

The model (`benchmarks.models.TinyGPT`): token and position ``nn.Embedding``, ``--layers``
causal pre-norm ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention``, which the
package splits into four quantized ``nn.Linear`` projections), LayerNorm, and an
``nn.Linear`` head tied to the token embedding. It is trained once in float for
``--float-steps`` on random windows of ``--context`` bytes (cached with ``--float-cache``);
every quantized row starts from those weights:

* PTQ (``--ptq-method`` ranges, no training), LSQ and NIPQ at fixed bits: W8A8 and W4A8
  (weights and the inputs of every linear layer quantized) and weight-only W4, W3, W2
  (``quantize_inputs=False``; the inputs stay float);
* NIPQ mixed precision, weight-only, at ``--mixed`` average weight bits (one learned
  bit-width per layer under the budget).

LSQ and NIPQ train for the same ``--qat-steps`` on the same windows (NIPQ: the last
``--hard-fraction`` of them hard). Every quantized model is converted to integer layers
(HardQuantize, which also checks it against the fake-quantized model) and its test
perplexity, ``exp`` of the mean next-byte cross-entropy over non-overlapping test windows,
is measured on the integer model. The table is printed and written into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import Callback, seed_everything
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from benchmarks import runs
from benchmarks.models import TinyGPT
from benchmarks.reporting import DOC_PATH, command_line, environment, markdown_table, torch_threads, write_section
from lightning_nipq import HardQuantize, LSQCallback, NIPQCallback, QuantizationReport, hard_quantize, post_training_quantize

SECTION = "language"
METHODS = ("ptq", "lsq", "nipq", "mixed")
#: Folders of the standard library left out of the corpus: test suites, the IDE, the old 2to3 tool, the turtle demos.
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"})
#: Fixed-bit settings: (weight bits, input bits or None for weight-only).
SETTINGS: tuple[tuple[int, Optional[int]], ...] = ((8, 8), (4, 8), (4, None), (3, None), (2, None))


# ---------------------------------------------------------------- corpus


@dataclass
class Split:
    """One side of the corpus: its bytes as token ids and where they came from."""

    tokens: torch.Tensor
    files: int
    available_files: int
    available_bytes: int

    @property
    def size(self) -> int:
        return int(self.tokens.numel())


@dataclass
class Corpus:
    train: Split
    test: Split
    root: Path
    python: str


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files outside `EXCLUDED_DIRS`, sorted by path."""
    files = [p for p in root.rglob("*.py") if p.is_file() and not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _take(root: Path, files: list[Path], cap: int) -> Split:
    """Whole files in the order of their paths' CRC-32 until ``cap`` bytes (the last one cut)."""
    ordered = sorted(files, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p.as_posix()))
    chunks: list[bytes] = []
    total = used = 0
    for path in ordered:
        if total >= cap:
            break
        data = path.read_bytes()[: cap - total]
        chunks.append(data)
        total += len(data)
        used += 1
    tokens = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
    return Split(tokens, used, len(files), sum(p.stat().st_size for p in files))


def load_corpus(train_bytes: int, test_bytes: int, test_every: int = 10, root: Optional[Path] = None) -> Corpus:
    """The standard library split by file: every ``test_every``-th file (in path order) to test, the rest to train."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    test = files[test_every - 1 :: test_every]
    chosen = set(test)
    train = [p for p in files if p not in chosen]
    if not train or not test:
        raise RuntimeError(f"too few Python files under {root} ({len(files)}) to split every {test_every}th to test")
    return Corpus(_take(root, train, train_bytes), _take(root, test, test_bytes), root, platform.python_version())


class Windows(Dataset):
    """Windows of ``context`` token ids starting at ``starts``, each with the same shifted by one as its target."""

    def __init__(self, tokens: torch.Tensor, context: int, starts: torch.Tensor) -> None:
        self.tokens, self.context, self.starts = tokens, context, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        chunk = self.tokens[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]


def train_loader(corpus: Corpus, context: int, batch_size: int, steps: int, seed: int) -> DataLoader:
    """``steps`` batches of windows at random places in the training split (one epoch), drawn with ``seed``."""
    high = corpus.train.size - context
    if high < 1:
        raise ValueError(f"the training split ({corpus.train.size} bytes) is shorter than a window of {context + 1}")
    starts = torch.randint(0, high, (steps * batch_size,), generator=torch.Generator().manual_seed(seed))
    return DataLoader(Windows(corpus.train.tokens, context, starts), batch_size=batch_size, shuffle=False, drop_last=True)


def test_loader(corpus: Corpus, context: int, batch_size: int = 64) -> DataLoader:
    """Non-overlapping windows covering the test split: every byte but the first is predicted once."""
    starts = torch.arange(0, corpus.test.size - context, context)
    if len(starts) == 0:
        raise ValueError(f"the test split ({corpus.test.size} bytes) is shorter than a window of {context + 1}")
    return DataLoader(Windows(corpus.test.tokens, context, starts), batch_size=batch_size, shuffle=False)


@torch.no_grad()
def perplexity(model: torch.nn.Module, loader: DataLoader) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` (float, fake-quantized or integer) over ``loader``."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        logits = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(total / max(count, 1))


# ---------------------------------------------------------------- runs


@dataclass
class Row:
    """One run: a line of the table."""

    method: str
    setting: str
    perplexity: float
    weight_bits: float = 32.0
    #: Average bits of the quantized inputs; None when the inputs stay float (weight-only and the float model).
    act_bits: Optional[float] = None
    size_kib: float = 0.0
    validated: bool = True
    agreement: float = 1.0
    typical_rel_diff: float = 0.0
    seconds: float = 0.0
    layers: int = 0
    skipped: int = 0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-bytes", type=int, default=2_000_000, help="cap on the training split's bytes")
    parser.add_argument("--test-bytes", type=int, default=200_000, help="cap on the test split's bytes")
    parser.add_argument("--test-every", type=int, default=10, help="every Nth file (sorted by path) is a test file")
    parser.add_argument("--context", type=int, default=128, help="window length in bytes")
    parser.add_argument("--dim", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-ratio", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--float-steps", type=int, default=1500, help="optimizer steps of float training")
    parser.add_argument("--float-lr", type=float, default=2e-3, help="peak learning rate of float training (warm-up, cosine to 0)")
    parser.add_argument("--qat-steps", type=int, default=250, help="optimizer steps of LSQ and of NIPQ")
    parser.add_argument("--qat-lr", type=float, default=5e-4, help="weight learning rate of LSQ and NIPQ (cosine to 0)")
    parser.add_argument("--hard-fraction", type=float, default=0.33, help="NIPQ's final share of steps with hard quantization (the accuracy benchmark's 1 of 3 epochs)")
    parser.add_argument("--nipq-lr-factor", type=float, default=10.0, help="NIPQ quantizer learning-rate factor (the callback's default)")
    parser.add_argument("--lsq-lr-factor", type=float, default=1.0, help="LSQ step-size learning-rate factor (the callback's default)")
    parser.add_argument("--nipq-max-bits", type=int, default=8, help="NIPQ mixed: highest learnable bits")
    parser.add_argument("--ptq-method", choices=["minmax", "percentile", "mse"], default="mse")
    parser.add_argument("--calibration-batches", type=int, default=8, help="PTQ: training batches that set the input ranges")
    parser.add_argument("--mixed", type=float, nargs="*", default=[3.0, 2.5], help="NIPQ mixed: average weight bits (weight-only)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the float model and of every quantized run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). One, because on a machine shared with other jobs more threads "
        "oversubscribe the cores",
    )
    parser.add_argument("--float-cache", type=Path, default=None, help="folder to keep the trained float weights in and reuse them from")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown file to write the table into")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--section", default=SECTION, help="name of the generated section in --doc")
    args = parser.parse_args(argv)
    for name in ("train_bytes", "test_bytes", "context", "dim", "layers", "heads", "batch_size", "float_steps", "qat_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.test_every < 2:
        parser.error("--test-every must be >= 2 (every file would be a test file)")
    if args.dim % args.heads:
        parser.error(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    if not 0 < args.hard_fraction < 1:
        parser.error("--hard-fraction must be in (0, 1): NIPQ needs a noise phase and a hard phase")
    if round(args.qat_steps * args.hard_fraction) >= args.qat_steps:
        parser.error("--qat-steps is too short to leave NIPQ a noise phase before its hard phase")
    for target in args.mixed:
        if not 2.0 <= target <= args.nipq_max_bits:
            parser.error(f"--mixed: {target:g} is outside [2, --nipq-max-bits={args.nipq_max_bits}]")
    return args


def _cache_file(args: argparse.Namespace, corpus: Corpus) -> Optional[Path]:
    if args.float_cache is None:
        return None
    key = (
        f"tinygpt-py{corpus.python}-train{args.train_bytes}-every{args.test_every}-ctx{args.context}-dim{args.dim}-"
        f"layers{args.layers}-heads{args.heads}-mlp{args.mlp_ratio}-batch{args.batch_size}-steps{args.float_steps}-"
        f"lr{args.float_lr:g}-seed{args.seed}"
    )
    return args.float_cache / f"{key}.pt"


def _make_model(args: argparse.Namespace) -> TinyGPT:
    return TinyGPT(
        context=args.context, dim=args.dim, depth=args.layers, heads=args.heads, mlp_ratio=args.mlp_ratio, lr=args.float_lr
    )


def float_bytes(model: torch.nn.Module) -> int:
    """Every parameter in float32, a tied one once."""
    return 4 * sum(p.numel() for p in model.parameters())


def train_float(args: argparse.Namespace, corpus: Corpus, test: DataLoader) -> tuple[TinyGPT, Row]:
    """Train the float model (or load it from the cache) and measure its test perplexity."""
    seed_everything(args.seed, verbose=False)
    model = _make_model(args)
    cache = _cache_file(args, corpus)
    start = time.perf_counter()
    if cache is not None and cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        loader = train_loader(corpus, args.context, args.batch_size, args.float_steps, args.seed)
        runs.trainer(1).fit(model, train_dataloaders=loader)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    row = Row("float", "FP32", perplexity(model, test), size_kib=float_bytes(model) / 1024)
    row.seconds = time.perf_counter() - start
    return model, row


def _row(method: str, setting: str, model: torch.nn.Module, report: QuantizationReport, test: DataLoader, start: float) -> Row:
    return Row(
        method,
        setting,
        perplexity(model, test),
        weight_bits=report.avg_weight_bits,
        act_bits=report.avg_act_bits,
        size_kib=report.quantized_bytes / 1024,
        validated=runs.passes_check(report),
        agreement=report.agreement if report.agreement is not None else 1.0,
        typical_rel_diff=report.typical_rel_diff or 0.0,
        seconds=time.perf_counter() - start,
        layers=len(report.layers),
        skipped=len(report.skipped),
    )


def setting_name(weight_bits: int, act_bits: Optional[int]) -> str:
    return f"W{weight_bits}" if act_bits is None else f"W{weight_bits}A{act_bits}"


def run_ptq(
    args: argparse.Namespace, float_model: TinyGPT, corpus: Corpus, test: DataLoader, weight_bits: int, act_bits: Optional[int]
) -> Row:
    """Post-training quantization: ranges from the weights and from ``--calibration-batches`` training batches."""
    seed_everything(args.seed, verbose=False)
    model = copy.deepcopy(float_model)
    start = time.perf_counter()
    calibration = list(train_loader(corpus, args.context, args.batch_size, args.calibration_batches, args.seed))
    post_training_quantize(
        model,
        calibration,
        weight_bits=weight_bits,
        act_bits=act_bits if act_bits is not None else weight_bits,
        method=args.ptq_method,
        quantize_inputs=act_bits is not None,
    )
    report = hard_quantize(model, compare_batches=calibration[:8], min_agreement=0.0, max_rel_diff=math.inf)
    return _row(f"PTQ ({args.ptq_method})", setting_name(weight_bits, act_bits), model, report, test, start)


def run_qat(
    args: argparse.Namespace, float_model: TinyGPT, corpus: Corpus, test: DataLoader, callback: Callback, method: str, setting: str
) -> Row:
    """``--qat-steps`` of quantization-aware training with ``callback`` (LSQ or NIPQ), then HardQuantize."""
    seed_everything(args.seed, verbose=False)
    model = copy.deepcopy(float_model).train()
    model.lr, model.warmup = args.qat_lr, 0.0
    hard = HardQuantize(
        bn_batches=0, min_agreement=0.0, max_rel_diff=math.inf, run_validation=False, verbose=False, save_figure=False
    )
    start = time.perf_counter()
    # The same windows for every quantized run of a seed (LSQ and NIPQ see the same data).
    loader = train_loader(corpus, args.context, args.batch_size, args.qat_steps, args.seed + 1)
    runs.trainer(1, [callback, hard]).fit(model, train_dataloaders=loader)
    assert hard.report is not None
    return _row(method, setting, model, hard.report, test, start)


def lsq(args: argparse.Namespace, weight_bits: int, act_bits: Optional[int]) -> LSQCallback:
    return LSQCallback(
        weight_bits=weight_bits,
        act_bits=act_bits,
        quantize_inputs=act_bits is not None,
        quantizer_lr_factor=args.lsq_lr_factor,
        log_per_layer=False,
    )


def nipq(args: argparse.Namespace, weight_bits: int, act_bits: Optional[int]) -> NIPQCallback:
    return NIPQCallback(
        weight_bits=weight_bits,
        act_bits=act_bits,
        target_bits=weight_bits,
        target_act_bits=act_bits,
        quantize_inputs=act_bits is not None,
        hard_fraction=args.hard_fraction,
        quantizer_lr_factor=args.nipq_lr_factor,
        log_per_layer=False,
    )


def nipq_mixed(args: argparse.Namespace, target: float) -> NIPQCallback:
    return NIPQCallback(
        target_bits=target,
        max_bits=args.nipq_max_bits,
        quantize_inputs=False,
        hard_fraction=args.hard_fraction,
        quantizer_lr_factor=args.nipq_lr_factor,
        log_per_layer=False,
    )


def _print(row: Row) -> None:
    flag = "" if row.validated else "  (integer check FAILED)"
    act = "float" if row.act_bits is None else f"{row.act_bits:.2f}"
    print(
        f"{row.method:12s} {row.setting:14s} ppl {row.perplexity:8.3f}  W {row.weight_bits:5.2f}  A {act:5s} "
        f"{row.size_kib:7.1f} KiB  {row.seconds:6.1f} s{flag}",
        flush=True,
    )


def run(args: argparse.Namespace, corpus: Corpus) -> list[Row]:
    test = test_loader(corpus, args.context)
    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        _print(row)

    float_model, float_row = train_float(args, corpus, test)
    record(float_row)
    for method in ("ptq", "lsq", "nipq"):
        if method not in args.methods:
            continue
        for weight_bits, act_bits in SETTINGS:
            setting = setting_name(weight_bits, act_bits)
            if method == "ptq":
                record(run_ptq(args, float_model, corpus, test, weight_bits, act_bits))
            elif method == "lsq":
                record(run_qat(args, float_model, corpus, test, lsq(args, weight_bits, act_bits), "LSQ", setting))
            else:
                record(run_qat(args, float_model, corpus, test, nipq(args, weight_bits, act_bits), "NIPQ", setting))
    if "mixed" in args.methods:
        for target in args.mixed:
            cb = nipq_mixed(args, target)
            record(run_qat(args, float_model, corpus, test, cb, "NIPQ mixed", f"avg {target:g} (W only)"))
    return rows


# ---------------------------------------------------------------- table and doc


def table(rows: list[Row]) -> str:
    header = ["method", "setting", "W bits", "A bits", "test perplexity", "vs float", "KiB", "integer check", "time s"]
    reference = next((r.perplexity for r in rows if r.method == "float"), None)
    out = []
    for r in rows:
        quantized = r.method != "float"
        out.append(
            [
                r.method,
                r.setting,
                f"{r.weight_bits:.2f}" if quantized else "32",
                "float" if r.act_bits is None else f"{r.act_bits:.2f}",
                f"{r.perplexity:.3f}",
                f"{r.perplexity / reference:.3f}x" if quantized and reference else "",
                f"{r.size_kib:.1f}",
                runs.check_cell([r]) if quantized else "",
                f"{r.seconds:.0f}",
            ]
        )
    return markdown_table(header, out)


def _describe(args: argparse.Namespace, corpus: Corpus, model: TinyGPT, rows: list[Row]) -> str:
    quantized = next((r for r in rows if r.method != "float"), None)
    layers = f"{quantized.layers} layers quantized, {quantized.skipped} left in float; " if quantized else ""
    return (
        f"Corpus: the standard library of Python {corpus.python} (`*.py` outside {', '.join(f'`{d}`' for d in sorted(EXCLUDED_DIRS))}), "
        f"split by file, every {args.test_every}th in path order to test: training on {corpus.train.files} of "
        f"{corpus.train.available_files} files ({corpus.train.size:,} of {corpus.train.available_bytes:,} bytes), "
        f"testing on {corpus.test.files} of {corpus.test.available_files} others ({corpus.test.size:,} of "
        f"{corpus.test.available_bytes:,} bytes), bytes as tokens. `TinyGPT`: width {args.dim}, {args.layers} causal "
        f"pre-norm `nn.TransformerEncoderLayer` blocks ({args.heads} heads, MLP ratio {args.mlp_ratio}), context "
        f"{args.context} bytes, head tied to the token embedding, {sum(p.numel() for p in model.parameters()):,} parameters. "
        f"Float: {args.float_steps} steps of batch {args.batch_size} (about "
        f"{args.float_steps * args.batch_size * args.context / max(corpus.train.size, 1):.1f} passes over the training bytes; AdamW, "
        f"peak learning rate {args.float_lr:g}), "
        f"seed {args.seed}. LSQ and NIPQ: {args.qat_steps} steps on the same windows, learning rate {args.qat_lr:g} "
        f"(cosine to 0), NIPQ's last {args.hard_fraction:.0%} hard; PTQ: `{args.ptq_method}` ranges from "
        f"{args.calibration_batches} training batches. Quantized: {layers}both embeddings, the four projections of each "
        "attention (split from `nn.MultiheadAttention`), both MLP linears and the tied head, weights per channel. The "
        "two activation-by-activation products inside attention stay float. \"A bits\" averages the quantized inputs "
        "(the embeddings take token ids and have none); \"float\" means weight-only. The NIPQ mixed rows are weight-only "
        "too, so that they compare with the fixed W4, W3 and W2 rows at the same input precision. Perplexity is the "
        "integer model's, over non-overlapping test windows of the context length; KiB counts the weights at their bits, "
        "a float32 step per range and every other parameter in float32."
    )


def publish(args: argparse.Namespace, argv: Optional[Sequence[str]], corpus: Corpus, model: TinyGPT, rows: list[Row], minutes: float, load: tuple[float, float]) -> None:
    body = [
        "## Language model: perplexity on the Python standard library",
        f"Measured on {environment()}, in {minutes:.0f} minutes, with:\n\n```\n{command_line('benchmarks.language', argv)}\n```",
        _describe(args, corpus, model, rows),
        "The machine is shared with other jobs (load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} cores), so the times are wall-clock "
        "under that load; perplexities do not depend on it. One seed, and no spread measured: small differences between "
        "rows may be seed noise.",
        table(rows),
    ]
    write_section(args.section, "\n\n".join(body), args.doc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    corpus = load_corpus(args.train_bytes, args.test_bytes, args.test_every)
    print(
        f"Python {corpus.python} standard library: train {corpus.train.files} files, {corpus.train.size:,} bytes; "
        f"test {corpus.test.files} files, {corpus.test.size:,} bytes",
        flush=True,
    )
    rows = run(args, corpus)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(table(rows))
    print(f"\n{minutes:.1f} minutes")
    if not args.no_doc:
        publish(args, argv, corpus, _make_model(args), rows, minutes, (load_start, os.getloadavg()[0]))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
