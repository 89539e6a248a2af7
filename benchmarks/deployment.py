"""Where the integer model is deployed: ONNX file size and onnxruntime CPU latency of each export form, in one run.

    python -m benchmarks.deployment                          # the four models (about 15 minutes on 2 shared cores)
    python -m benchmarks.deployment --models cnn resnet      # some of them
    python -m benchmarks.deployment --float-cache /tmp/bm/deploy   # keep the trained float weights for later runs

For each model the float model is trained briefly, quantized after training (PTQ, ``mse``
ranges, one range per output channel) at ``--weight-bits``/``--act-bits`` with BatchNorm
re-estimated and folded, and checked. Then the float model (``torch.onnx.export``) and the
integer model in each form of `lightning_nipq.export_onnx` are written and run by onnxruntime
on the CPU with ``--threads`` threads:

* ``QDQ int8``: the QDQ form at opset 18, every weight code stored as int8;
* ``QDQ``: the QDQ form at opset 21, codes of at most 4 bits stored as INT4; run exactly
  (`lightning_nipq.saving.ORT_EXACT_CONFIG`), in onnxruntime's float kernels;
* ``fused``: the form onnxruntime's optimizer turns into integer kernels, with its default optimizations.

The models: the CNN of the issue that asked for this (the demo's SmallCNN at width 75, 0.3 M
parameters, on scikit-learn's digits upsampled to 32x32), the accuracy benchmark's ResNet and
ViT on Fashion-MNIST, and a BERT-style encoder built from a transformers ``BertConfig``
(``BertForSequenceClassification``, never pretrained weights) that reads each 8x8 digit as a
sequence of 64 pixel-intensity tokens after a [CLS] token.

Latency: every form's session runs one batch per round, the forms in turn (a different order
each round), so that a change in the machine's load falls on all of them alike; the table
gives the median over the rounds with the 10th to 90th percentile, and the median of each
round's ratio to the float model. Sizes are the files as written, the float file without
external data and, like the exported ones, without the exporter's per-node debugging metadata.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks import runs  # noqa: F401  (quiets Lightning's logs)
from benchmarks.models import ResNetStyle, SmallViT
from benchmarks.reporting import DOC_PATH, command_line, environment, markdown_table, write_section
from lightning_nipq import export_onnx, hard_quantize, post_training_quantize
from lightning_nipq.demo.data import DEFAULT_FASHION_MNIST_DIR, load_digits_split, load_fashion_mnist
from lightning_nipq.demo.models import SmallCNN
from lightning_nipq.saving import onnx_session

MODELS = ("cnn", "resnet", "vit", "bert")
SECTION = "deployment"
#: The export forms after the float model: (row name, export_onnx arguments).
FORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("QDQ int8", {"form": "qdq", "opset": 18}),
    ("QDQ", {"form": "qdq"}),
    ("fused", {"form": "fused"}),
)
#: onnxruntime CPU operators that compute on integer codes.
INTEGER_KERNELS = ("QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulNBits")
#: Float operators that carry a layer's weight (or attention's products) in onnxruntime's optimized graph.
FLOAT_KERNELS = ("Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` from a config, called on token ids alone, returning the logits."""

    def __init__(self, hidden: int = 128, layers: int = 2, heads: int = 4, vocab: int = 18, classes: int = 10) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=128,
            num_labels=classes,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids).logits


@dataclass
class Task:
    """One model to benchmark: how to build it, and its data."""

    key: str
    name: str
    make: Callable[[], nn.Module]
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    epochs: int
    lr: float
    batch_size: int = 64

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.make().parameters())


@dataclass
class Row:
    """One model in one form."""

    model: str
    form: str
    size_bytes: int
    accuracy: float
    agreement: Optional[float]  # argmax agreement with the integer PyTorch model (None: the float model)
    kernels: str
    b1: list[float] = field(default_factory=list)
    b64: list[float] = field(default_factory=list)
    ratio_b1: list[float] = field(default_factory=list)
    ratio_b64: list[float] = field(default_factory=list)


def _digits(size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train_x, train_y, test_x, test_y = load_digits_split()
    if size is not None:
        train_x, test_x = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (train_x, test_x))
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def _tokens(images: Tensor) -> Tensor:
    """8x8 digits (in [0, 1]) as 65 tokens: [CLS] (17), then the 64 pixel intensities 0..16."""
    pixels = torch.round(images.flatten(1) * 16).long()
    return torch.cat([torch.full((len(images), 1), 17, dtype=torch.long), pixels], dim=1)


def build_task(name: str, args: argparse.Namespace) -> Task:
    if name == "cnn":
        tx, ty, vx, vy = _digits(32)
        make_cnn = lambda: SmallCNN(width=args.cnn_width)  # noqa: E731
        return Task("cnn", "SmallCNN (digits 32x32)", make_cnn, tx, ty, vx, vy, args.cnn_epochs, 2e-3)
    if name == "bert":
        tx, ty, vx, vy = load_digits_split()
        make = lambda: BertClassifier(hidden=args.bert_hidden, layers=args.bert_layers)  # noqa: E731
        # Small batches: on 1,347 sequences the encoder learns to pool into [CLS] in far fewer epochs.
        return Task("bert", "BERT (digits as tokens)", make, _tokens(tx), ty, _tokens(vx), vy, args.bert_epochs, 1e-3, 16)
    tx, ty, vx, vy = load_fashion_mnist(args.data_dir)
    tx, ty = tx[: args.train_samples], ty[: args.train_samples]
    vx, vy = vx[: args.test_samples], vy[: args.test_samples]
    mean, std = tx.mean(), tx.std()
    tx, vx = (tx - mean) / std, (vx - mean) / std
    if name == "resnet":
        make: Callable[[], nn.Module] = lambda: ResNetStyle(width=16, blocks=(1, 1, 1))  # noqa: E731
        return Task("resnet", "ResNetStyle (Fashion-MNIST)", make, tx, ty, vx, vy, args.image_epochs, 3e-3)
    if name == "vit":
        make = lambda: SmallViT(image_size=28, patch_size=7, dim=64, depth=4, heads=4)  # noqa: E731
        return Task("vit", "SmallViT (Fashion-MNIST)", make, tx, ty, vx, vy, args.image_epochs, 2e-3)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def train(task: Task, seed: int, cache: Optional[Path]) -> nn.Module:
    """The float model, trained with AdamW and a one-cycle schedule (or loaded from ``cache``)."""
    batch_size = task.batch_size
    torch.manual_seed(seed)
    model = task.make()
    if cache is not None and cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    steps = task.epochs * math.ceil(len(task.train_y) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=task.lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    for _ in range(task.epochs):
        order = torch.randperm(len(task.train_y))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(task.train_x[batch]), task.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval()


def quantize(float_model: nn.Module, task: Task, args: argparse.Namespace) -> nn.Module:
    """PTQ at W``weight_bits``A``act_bits``; BatchNorm (if any) re-estimated and folded; the integer model checked."""
    model = copy.deepcopy(float_model).eval()
    calibration = list(task.train_x[: args.calibration_batches * 64].split(64))
    post_training_quantize(model, calibration, weight_bits=args.weight_bits, act_bits=args.act_bits, method="mse")
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bn_batches = calibration if has_batchnorm else None
    hard_quantize(model, bn_batches=bn_batches, compare_batches=calibration[:4], fold_batchnorm=has_batchnorm)
    return model.eval()


@torch.no_grad()
def torch_predictions(model: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([model(batch).argmax(dim=-1) for batch in x.split(256)])


def onnx_predictions(session: Any, x: Tensor) -> Tensor:
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: b.numpy()})[0]).argmax(dim=-1) for b in x.split(256)])


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node debugging metadata from a float export, as export_onnx does for its own."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    for items in (graph.node, graph.initializer, graph.value_info, graph.input, graph.output):
        for item in items:
            del item.metadata_props[:]
    onnx.save(model, str(path))


def export_float(model: nn.Module, example: Tensor, path: Path) -> Path:
    program = torch.onnx.export(
        copy.deepcopy(model).eval(),
        (example,),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        verbose=False,
    )
    program.save(str(path), external_data=False)
    _strip_metadata(path)
    return path


def kernels(path: Path, workdir: Path) -> str:
    """Which kernels onnxruntime chose: its integer ones, and the float ones that carry weights or products."""
    import onnx

    saved = workdir / f"{path.stem}.optimized.onnx"
    onnx_session(path, threads=1, optimized_model_path=saved)
    ops = collections.Counter(node.op_type for node in onnx.load(str(saved)).graph.node)
    integer = ", ".join(f"{ops[k]} {k}" for k in INTEGER_KERNELS if ops[k])
    floating = ", ".join(f"{ops[k]} {k}" for k in FLOAT_KERNELS if ops[k])
    return f"int: {integer or 'none'}; float: {floating or 'none'}"


def time_sessions(sessions: dict[str, Any], inputs: Tensor, rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per run of each session on ``inputs``: one run each per round, in a rotating order."""
    feeds = {name: {s.get_inputs()[0].name: inputs.numpy()} for name, s in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return times


def benchmark(task: Task, args: argparse.Namespace, workdir: Path) -> list[Row]:
    start = time.perf_counter()
    key = f"{task.key}-{task.params}-{len(task.train_y)}-{task.epochs}-{task.batch_size}-{task.lr:g}-{args.seed}"
    cache = None if args.float_cache is None else args.float_cache / f"{key}.pt"
    float_model = train(task, args.seed, cache)
    integer_model = quantize(float_model, task, args)
    example = task.test_x[:1]
    stem = task.key
    paths = {"float": export_float(float_model, example, workdir / f"{stem}-float.onnx")}
    for form, options in FORMS:
        paths[form] = export_onnx(integer_model, workdir / f"{stem}-{form.replace(' ', '-')}.onnx", example, **options)
    print(f"{task.name}: trained, quantized and exported in {time.perf_counter() - start:.0f} s", flush=True)

    reference = torch_predictions(integer_model, task.test_x)
    float_accuracy = float((torch_predictions(float_model, task.test_x) == task.test_y).float().mean())
    integer_accuracy = float((reference == task.test_y).float().mean())
    print(f"  torch: float {100 * float_accuracy:.2f}%, integer {100 * integer_accuracy:.2f}%", flush=True)
    sessions = {name: onnx_session(path, threads=args.threads) for name, path in paths.items()}
    rows = []
    for name, path in paths.items():
        predictions = onnx_predictions(sessions[name], task.test_x)
        accuracy = float((predictions == task.test_y).float().mean())
        agreement = None if name == "float" else float((predictions == reference).float().mean())
        rows.append(Row(task.name, name, path.stat().st_size, accuracy, agreement, kernels(path, workdir)))
    for batch, rounds, attr in ((1, args.rounds_b1, "b1"), (64, args.rounds_b64, "b64")):
        inputs = task.test_x[:batch]
        if len(inputs) < batch:  # a smoke run's test split may be smaller
            inputs = inputs.repeat(math.ceil(batch / len(inputs)), *([1] * (inputs.dim() - 1)))[:batch]
        times = time_sessions(sessions, inputs, rounds)
        for row in rows:
            setattr(row, attr, times[row.form])
            getattr(row, f"ratio_{attr}").extend(t / f for t, f in zip(times[row.form], times["float"]))
    for row in rows:
        agreement = "" if row.agreement is None else f", agreement {100 * row.agreement:.2f}%"
        print(
            f"  {row.form:9s} {row.size_bytes / 1024:8.1f} KiB  b1 {1e3 * statistics.median(row.b1):7.2f} ms  "
            f"b64 {1e3 * statistics.median(row.b64):8.2f} ms ({statistics.median(row.ratio_b64):.2f}x)  "
            f"acc {100 * row.accuracy:.2f}%{agreement}  [{row.kernels}]",
            flush=True,
        )
    return rows


def _spread(values: list[float], scale: float = 1e3, digits: int = 2) -> str:
    """``median [p10-p90]`` of ``values`` times ``scale``."""
    ordered = sorted(v * scale for v in values)
    p10 = ordered[int(0.1 * (len(ordered) - 1))]
    p90 = ordered[math.ceil(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(ordered):.{digits}f} [{p10:.{digits}f}-{p90:.{digits}f}]"


def table(rows: list[Row]) -> str:
    floats = {r.model: r for r in rows if r.form == "float"}
    header = [
        "model",
        "form",
        "file KiB",
        "size / float",
        "batch 1 ms",
        "batch 64 ms",
        "batch 64 / float",
        "test acc. %",
        "agreement %",
        "onnxruntime kernels",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.model,
                r.form,
                f"{r.size_bytes / 1024:.1f}",
                f"{r.size_bytes / floats[r.model].size_bytes:.3f}x",
                _spread(r.b1),
                _spread(r.b64, digits=1),
                "1.00x" if r.form == "float" else _spread(r.ratio_b64, scale=1.0) + "x",
                f"{100 * r.accuracy:.2f}",
                "" if r.agreement is None else f"{100 * r.agreement:.2f}",
                r.kernels,
            ]
        )
    return markdown_table(header, body)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds-b1", type=int, default=200, help="timed rounds at batch 1")
    parser.add_argument("--rounds-b64", type=int, default=30, help="timed rounds at batch 64")
    parser.add_argument("--data-dir", default=DEFAULT_FASHION_MNIST_DIR, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--train-samples", type=int, default=6000, help="first N Fashion-MNIST training images")
    parser.add_argument("--test-samples", type=int, default=10000, help="first N Fashion-MNIST test images")
    parser.add_argument("--image-epochs", type=int, default=3, help="float epochs of the ResNet and the ViT")
    parser.add_argument("--cnn-epochs", type=int, default=5, help="float epochs of the digits CNN")
    parser.add_argument("--cnn-width", type=int, default=75, help="SmallCNN width (75: 0.3 M parameters)")
    parser.add_argument("--bert-epochs", type=int, default=12)
    parser.add_argument("--bert-hidden", type=int, default=128)
    parser.add_argument("--bert-layers", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=8, help="PTQ calibration batches of 64 training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float-cache", type=Path, default=None, help="folder to keep trained float weights in and reuse them from")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the ONNX files (default: a temporary one)")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown file to write the table into")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--section", default=SECTION, help="name of the generated section in --doc")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds_b1 < 1 or args.rounds_b64 < 1:
        parser.error("--threads, --rounds-b1 and --rounds-b64 must be >= 1")
    return args


def versions() -> str:
    import onnx
    import onnxruntime
    import onnxscript

    return f"onnx {onnx.__version__}, onnxscript {onnxscript.__version__}, onnxruntime {onnxruntime.__version__}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    rows: list[Row] = []
    params = {}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            task = build_task(name, args)
            params[task.name] = task.params
            rows += benchmark(task, args, workdir)
    text = table(rows)
    print()
    print(text)
    if args.no_doc:
        return 0
    minutes = (time.perf_counter() - start) / 60
    models = "; ".join(f"{name}: {count / 1e6:.2f} M parameters" for name, count in params.items())
    body = (
        f"Measured on {environment()}; {versions()}; onnxruntime CPUExecutionProvider with {args.threads} intra-op "
        f"thread(s), in {minutes:.0f} minutes, with:\n\n```\n{command_line('benchmarks.deployment', argv)}\n```\n\n"
        f"W{args.weight_bits}A{args.act_bits} after training (PTQ, `mse` ranges per output channel, BatchNorm "
        f"re-estimated and folded). {models}. Latency: median over {args.rounds_b1} (batch 1) and {args.rounds_b64} "
        f"(batch 64) rounds, 10th-90th percentile in brackets; every form runs once per round, in turn, and "
        f"\"batch 64 / float\" is the median of each round's ratio. Test accuracy is onnxruntime's; agreement is the "
        f"argmax agreement with the integer PyTorch model on the same test images. Kernels: the operators of "
        f"onnxruntime's optimized graph (saved with `SessionOptions.optimized_model_filepath`) that multiply: its "
        f"integer kernels, and its float convolutions and matrix products (weights, or attention's activations).\n\n{text}"
    )
    write_section(args.section, body, args.doc)
    print(f"\nwrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
