"""Train a float CNN, quantize it with NIPQ to an average of 3 bits, convert and validate it.

    python -m lightning_nipq.demo                      # scikit-learn digits, no download
    python -m lightning_nipq.demo --data fashion-mnist --data-dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_nipq import HardQuantize, NIPQCallback, export_onnx, load_quantized, save_quantized
from lightning_nipq.demo.data import ImageDataModule
from lightning_nipq.demo.models import SmallCNN
from lightning_nipq.saving import artifact_sizes, compare_onnx


def _trainer(epochs: int, callbacks: list) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--target-bits", type=float, default=3.0)
    parser.add_argument("--float-epochs", type=int, default=None)
    parser.add_argument("--nipq-epochs", type=int, default=None)
    parser.add_argument("--hard-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=None, help="train on the first N training images only (quick trials)")
    parser.add_argument("--out", default=None, help="folder to keep the integer artifact and the ONNX file in (default: a temporary one)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless bits are within 0.1 of the target, accuracy within 2 points of float, the artifact "
        "within 1.15x its ideal size and onnxruntime (if installed) agrees on 99.9%% of test argmaxes",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")

    small = args.data == "digits"
    # Fashion-MNIST is 60,000 images: a few epochs already take minutes on a laptop CPU.
    float_epochs = args.float_epochs or (15 if small else 4)
    nipq_epochs = args.nipq_epochs or (15 if small else 5)
    seed_everything(args.seed, verbose=False)
    dm = ImageDataModule(
        args.data, args.data_dir, batch_size=64 if small else 128, seed=args.seed, train_samples=args.train_samples
    )

    print(f"== 1. float training: {float_epochs} epochs on {args.data}")
    model = SmallCNN(width=32, lr=3e-3, epochs=float_epochs)
    _trainer(float_epochs, []).fit(model, datamodule=dm)
    float_acc = _trainer(1, []).test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    print(f"float test accuracy: {100 * float_acc:.2f}%")

    print(f"== 2. NIPQ to an average of {args.target_bits:g} bits: {nipq_epochs} epochs, last {args.hard_epochs} hard")
    qmodel = SmallCNN(width=model.hparams.width, lr=1e-3, epochs=nipq_epochs)
    qmodel.load_state_dict(model.state_dict())
    nipq = NIPQCallback(target_bits=args.target_bits, hard_epochs=args.hard_epochs, quantizer_lr_factor=50.0)
    hard = HardQuantize(bn_batches=20, verbose=False)
    _trainer(nipq_epochs, [nipq, hard]).fit(qmodel, datamodule=dm)

    print("== 3. the integer model")
    int_acc = _trainer(1, []).test(qmodel, datamodule=dm, verbose=False)[0]["test_acc"]
    report = hard.report
    assert report is not None
    print(report.table())
    avg_w, avg_a = report.avg_weight_bits, report.avg_act_bits or 0.0
    print()
    print(f"float accuracy   {100 * float_acc:6.2f}%")
    print(f"integer accuracy {100 * int_acc:6.2f}%  ({100 * (int_acc - float_acc):+.2f} points)")
    print(f"average bits     weights {avg_w:.3f}, inputs {avg_a:.3f} (target {args.target_bits:g})")
    print(f"weight storage   {report.quantized_bytes / 1024:.1f} KiB against {report.float32_bytes / 1024:.1f} KiB float32")
    ok = (
        abs(avg_w - args.target_bits) <= 0.1
        and abs(avg_a - args.target_bits) <= 0.1
        and float_acc - int_acc <= 0.02
    )

    print("== 4. saving, reloading and exporting")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        test_x = dm.test_set.tensors[0]
        artifact = save_quantized(qmodel, out / "model.safetensors")
        sizes = artifact_sizes(artifact)
        print(sizes.summary())
        reloaded = load_quantized(artifact, SmallCNN(width=model.hparams.width))
        with torch.no_grad():
            identical = torch.equal(reloaded(test_x), qmodel.eval()(test_x))
        print(f"reloaded from the artifact: outputs {'identical' if identical else 'DIFFERENT'}")
        ok = ok and identical and sizes.ratio_to_ideal <= 1.15
        if importlib.util.find_spec("onnxruntime") is None:
            print("ONNX export skipped: pip install 'lightning-nipq[onnx]'")
        else:
            onnx_path = export_onnx(qmodel, out / "model.onnx", test_x[:1])
            agreement, max_abs, max_rel = compare_onnx(qmodel, onnx_path, test_x.split(256))
            print(
                f"onnxruntime on the {len(test_x)} test images: argmax agreement {100 * (agreement or 0):.2f}%, "
                f"max |diff| {max_abs:.2g} (relative {max_rel:.2g})"
            )
            ok = ok and agreement is not None and agreement >= 0.999
        if args.out:
            print(f"kept {artifact} and the ONNX file in {out}")
    print("targets met" if ok else "targets NOT met (see --help for what --check requires)")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    sys.exit(main())
