"""LightningCLI: both callbacks configured from the example's YAML and from command-line flags.

Runs examples/cli/train.py in-process on digits with a few batches per epoch, so the
callbacks are at hand to inspect; ``python examples/cli/train.py`` calls the same ``cli_main``.
"""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_nipq import HardQuantize, NIPQCallback, load_quantized
from lightning_nipq.demo.models import SmallCNN
from lightning_nipq.layers import IntegerLayerMixin

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "cli"
NIPQ_CONFIG = EXAMPLE_DIR / "nipq_digits.yaml"

# Two epochs of a few batches cannot move the bits from 7.5 to the target: the callback
# says so, and freezing cuts them to fit, which is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:NIPQ. the learned average bits")


# The example is a script, not a package module: load it from its path.
_spec = importlib.util.spec_from_file_location("nipq_cli_example", EXAMPLE_DIR / "train.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.fixture(autouse=True)
def _script_argv(monkeypatch):
    # LightningCLI warns when both args= and a command line (here pytest's) are present.
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE_DIR / "train.py")])


def tiny_trainer(root: Path) -> list[str]:
    # Everything that makes the run short and keeps its files in tmp_path.
    return [
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]


INPUT_FN_CALLS = []


def images(batch):
    """An ``input_fn`` given to HardQuantize by its import path."""
    INPUT_FN_CALLS.append(len(batch))
    return batch[0]


def callback(trainer, cls):
    (found,) = [c for c in trainer.callbacks if isinstance(c, cls)]
    return found


def setting(cb, name):
    # NIPQCallback keeps its quantizer arguments in quantizer_config.
    if hasattr(cb, name):
        return getattr(cb, name)
    return getattr(cb.quantizer_config, name)


def supported_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}


def average_weight_bits(layers):
    # Computed from the integer layers themselves, not from the callback's report.
    total = sum(layer.weight_codes.numel() for layer in layers)
    return sum(layer.weight_bits * layer.weight_codes.numel() for layer in layers) / total


def test_yaml_config_sets_every_callback_argument_and_ends_integer(tmp_path):
    # A flag after the config overrides it; on `callbacks` it reaches the last one, NIPQCallback.
    overrides = ["--trainer.max_epochs=2", "--trainer.callbacks.hard_epochs=1"]
    cli = example.cli_main(["fit", "--config", str(NIPQ_CONFIG), *overrides, *tiny_trainer(tmp_path)])

    config = yaml.safe_load(NIPQ_CONFIG.read_text())
    given = {entry["class_path"]: entry["init_args"] for entry in config["trainer"]["callbacks"]}
    given["lightning_nipq.NIPQCallback"]["hard_epochs"] = 1
    nipq, hard = callback(cli.trainer, NIPQCallback), callback(cli.trainer, HardQuantize)
    # The config lists every argument of both callbacks: each must reach the instance.
    for cb, path in ((nipq, "lightning_nipq.NIPQCallback"), (hard, "lightning_nipq.HardQuantize")):
        assert set(given[path]) == set(inspect.signature(type(cb)).parameters), f"{path}: the example omits arguments"
        for name, value in given[path].items():
            assert setting(cb, name) == value, f"{path}.{name}"
    assert cli.model.hparams.epochs == 2  # linked to trainer.max_epochs

    layers = supported_layers(cli.model)
    assert layers and all(isinstance(m, IntegerLayerMixin) for m in layers.values())
    assert average_weight_bits(layers.values()) <= given["lightning_nipq.NIPQCallback"]["target_bits"]
    assert hard.report is not None and "val_acc" in hard.report.integer_metrics
    assert (tmp_path / "config.yaml").exists()  # LightningCLI saved the resolved config


def test_command_line_flags_configure_both_callbacks(tmp_path):
    INPUT_FN_CALLS.clear()
    artifact = tmp_path / "digits.safetensors"
    cli = example.cli_main(
        [
            "fit",
            "--trainer.max_epochs=2",
            *tiny_trainer(tmp_path),
            # Arguments after a `callbacks+=` apply to that callback.
            "--trainer.callbacks+=lightning_nipq.NIPQCallback",
            "--trainer.callbacks.target_bits=2.5",
            "--trainer.callbacks.hard_epochs=1",
            "--trainer.callbacks.quantizer_lr_factor=50",
            "--trainer.callbacks.exclude=[classifier]",
            "--trainer.callbacks+=HardQuantize",  # short name: a known Callback subclass
            "--trainer.callbacks.bn_batches=2",
            "--trainer.callbacks.compare_batches=1",
            f"--trainer.callbacks.input_fn={__name__}.images",
            "--trainer.callbacks.verbose=false",
            "--model.width=8",
            "--data.batch_size=32",
            f"--artifact={artifact}",
        ]
    )

    nipq, hard = callback(cli.trainer, NIPQCallback), callback(cli.trainer, HardQuantize)
    assert (nipq.target_bits, nipq.target_act_bits, nipq.hard_epochs) == (2.5, 2.5, 1)
    assert (nipq.quantizer_lr_factor, nipq.exclude) == (50.0, ["classifier"])
    assert (hard.bn_batches, hard.compare_batches, hard.input_fn, hard.verbose) == (2, 1, images, False)
    assert INPUT_FN_CALLS, "HardQuantize never called the input_fn given on the command line"

    layers = supported_layers(cli.model)
    integer = [m for name, m in layers.items() if name != "classifier"]
    assert integer and all(isinstance(m, IntegerLayerMixin) for m in integer)
    assert not isinstance(layers["classifier"], IntegerLayerMixin)  # excluded: left in float
    assert average_weight_bits(integer) <= 2.5

    # --artifact saved the integer model; it reloads into a fresh float instance bit for bit.
    x = torch.randn(5, 1, 8, 8)
    restored = load_quantized(artifact, SmallCNN(width=8))
    with torch.no_grad():
        assert torch.equal(restored(x), cli.model.eval()(x))

    # `validate --artifact` runs that integer model: the same accuracy HardQuantize measured
    # on the same validation batch at the end of fit.
    validate = example.cli_main(["validate", "--model.width=8", "--data.batch_size=32", f"--artifact={artifact}", *tiny_trainer(tmp_path / "validate")])
    assert all(isinstance(m, IntegerLayerMixin) for name, m in supported_layers(validate.model).items() if name != "classifier")
    assert float(validate.trainer.callback_metrics["val_acc"]) == pytest.approx(hard.report.integer_metrics["val_acc"], abs=1e-6)


def test_float_checkpoint_sets_the_starting_weights(tmp_path):
    float_model = SmallCNN(width=32)
    with torch.no_grad():
        for tensor in float_model.state_dict().values():
            tensor.add_(1)  # unlike any fresh initialisation, whatever the seed
    path = tmp_path / "float.ckpt"
    torch.save({"state_dict": float_model.state_dict()}, path)  # the layout of a Lightning checkpoint

    # run=False: parse and instantiate only; the weights are loaded before any subcommand would run.
    args = ["--config", str(NIPQ_CONFIG), *tiny_trainer(tmp_path)]
    fresh = example.cli_main(args, run=False).model.state_dict()
    loaded = example.cli_main([*args, "--float_checkpoint", str(path)], run=False).model.state_dict()

    for key, value in float_model.state_dict().items():
        assert torch.equal(loaded[key], value), key
        assert not torch.equal(fresh[key], value), key


def test_a_wrong_callback_value_is_reported_by_the_callback(tmp_path):
    # jsonargparse checks types; the callbacks' own checks name the argument and the fix.
    with pytest.raises(ValueError, match=r"target_bits=9\.0 is outside"):
        example.cli_main(["--config", str(NIPQ_CONFIG), "--trainer.callbacks.target_bits=9", *tiny_trainer(tmp_path)], run=False)
