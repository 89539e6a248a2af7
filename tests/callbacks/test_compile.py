"""torch.compile: the quantized forward compiles to one graph per mode, draws its noise from the
callback's generator exactly as eager code does, and a compiled fit converts with HardQuantize.

Most tests use the ``aot_eager`` backend: graph breaks and recompiles are decided by Dynamo
before any backend runs, and ``aot_eager`` also runs AOTAutograd (functionalisation of the
noise op, the forward/backward partition) while skipping Inductor's code generation, which
takes minutes on two cores. One slow test runs Inductor.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import pytest
import torch
import torch._dynamo
from lightning.pytorch import Callback, LightningModule, Trainer
from models import MLP, blobs, fast_trainer, loader
from torch import Tensor
from torch._dynamo.utils import counters
from torch.nn import functional as F

from lightning_nipq import HardQuantize, NIPQCallback, attach_quantizers
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations, quantized_layers, quantizers
from lightning_nipq.quant import counter_noise, counter_uniform_noise

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiles() -> int:
    return counters["frames"]["total"]


def _graph_breaks() -> dict[str, int]:
    return dict(counters["graph_break"])


def _calibrated_mlp() -> tuple[MLP, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MLP()
    attach_quantizers(model)
    x, y = blobs(64).tensors
    calibrate_activations(model, [x[:32]], forward=lambda batch: model(batch))
    return model.train(), x[:32], y[:32]


def _set_modes(model: MLP, hard_layers: int, blend: bool = False) -> None:
    for index, (_, layer) in enumerate(quantized_layers(model)):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q is not None:
                q.mode = "hard" if index < hard_layers else "noise"
                q.blend_modes = blend


def _use_generator(model: MLP, seed: int = 0) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        q.generator = generator
    return generator


def _step(forward: Callable[[Tensor], Tensor], model: MLP, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    out = forward(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_quantized_forward_compiles_to_one_graph_per_mode_without_graph_breaks_or_recompiles_per_step() -> None:
    model, x, y = _calibrated_mlp()
    _use_generator(model)
    compiled = torch.compile(model, backend=BACKEND)
    layers = len(list(quantized_layers(model)))
    for hard_layers in (0, layers):  # the noise phase, then the hard phase
        _set_modes(model, hard_layers)
        _step(compiled, model, x, y)
        after_first_step = _compiles()
        for _ in range(3):
            _step(compiled, model, x, y)
        assert _compiles() == after_first_step, "a training step recompiled"
    model.eval()
    with torch.no_grad():
        compiled(x)
        compiled(x)
    assert _graph_breaks() == {}
    # noise, hard, eval: one graph each
    assert counters["stats"]["unique_graphs"] == 3


def test_layers_switching_one_by_one_in_the_anneal_cost_one_compile_not_one_per_layer() -> None:
    model, x, y = _calibrated_mlp()
    _use_generator(model)
    compiled = torch.compile(model, backend=BACKEND)
    layers = len(list(quantized_layers(model)))
    _set_modes(model, 0, blend=True)
    _step(compiled, model, x, y)
    first = _compiles()
    for hard_layers in range(1, layers + 1):
        _set_modes(model, hard_layers, blend=True)
        _step(compiled, model, x, y)
    assert _compiles() == first
    assert _graph_breaks() == {}


@pytest.mark.parametrize("blend", [False, True], ids=["specialised", "blended"])
@pytest.mark.parametrize("hard", [False, True], ids=["noise", "hard"])
def test_compiled_steps_draw_the_same_noise_from_the_generator_as_eager_steps(hard: bool, blend: bool) -> None:
    """Compiled steps and eager steps drawing counter-based noise (`counter_noise`), from the same generator
    state: same outputs, gradients and generator state after.

    With ``blend_modes`` (the anneal), compiled code draws noise for hard layers too, so only the
    all-noise and all-hard settings match eager draw for draw; mixed settings are covered above.
    """
    model, x, y = _calibrated_mlp()
    layers = len(list(quantized_layers(model)))
    _set_modes(model, layers if hard else 0, blend=blend)
    compiled = torch.compile(model, backend=BACKEND)
    runs = {}
    for name, forward in (("eager", model), ("compiled", compiled)):
        generator = _use_generator(model, seed=123)
        with counter_noise() if name == "eager" else nullcontext():
            steps = [_step(forward, model, x, y) for _ in range(2)]
        runs[name] = steps, generator.get_state()
    (eager_steps, eager_state), (compiled_steps, compiled_state) = runs["eager"], runs["compiled"]
    for (eager_out, eager_grads), (compiled_out, compiled_grads) in zip(eager_steps, compiled_steps):
        assert torch.equal(eager_out, compiled_out)
        assert all(torch.equal(a, b) for a, b in zip(eager_grads, compiled_grads))
    if not (hard and blend):
        assert torch.equal(eager_state, compiled_state), "the compiled steps drew exactly what the eager ones did"
    assert not torch.equal(eager_steps[0][0], eager_steps[1][0]) or hard, "noise differs from step to step"


def test_eager_steps_outside_counter_noise_draw_other_noise_from_the_same_generator() -> None:
    """Eager code draws uniform noise from the generator's stream unless `counter_noise` is on: other values, same
    distribution, and the step still follows the generator (the same state gives the same step)."""
    model, x, y = _calibrated_mlp()
    outputs = {}
    for name, context in (("stream", nullcontext), ("counter", counter_noise), ("stream again", nullcontext)):
        _use_generator(model, seed=123)
        with context():
            outputs[name] = _step(model, model, x, y)[0]
    assert torch.equal(outputs["stream"], outputs["stream again"])
    assert not torch.equal(outputs["stream"], outputs["counter"])
    assert torch.allclose(outputs["stream"], outputs["counter"], atol=0.5), "the same model, other noise"


def test_histogram_noise_compiles_without_graph_breaks_and_matches_eager() -> None:
    # The histogram sampler is data-dependent (boolean masks, an all-clipped fallback); it runs
    # inside the noise op, so the graph does not see it. The stochastic bits' uniform draws are
    # counter-based in compiled code: the eager step draws them so too.
    model, x, y = _calibrated_mlp()
    for _, q in quantizers(model):
        q.noise = "histogram"
    compiled = torch.compile(model, backend=BACKEND)
    runs = []
    for forward in (model, compiled):
        generator = _use_generator(model, seed=5)
        with counter_noise():
            runs.append((_step(forward, model, x, y), generator.get_state()))
    ((eager_out, eager_grads), eager_state), ((compiled_out, compiled_grads), compiled_state) = runs
    assert torch.equal(eager_out, compiled_out) and torch.equal(eager_state, compiled_state)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, compiled_grads))
    assert _graph_breaks() == {}


class StepCompiles(Callback):
    """Frames Dynamo compiled and graph breaks it met during each training step, with the step's phase."""

    def __init__(self, nipq: NIPQCallback) -> None:
        self.nipq = nipq
        self.steps: list[dict[str, Any]] = []
        self.lightning_training_step: Any = None
        self._start = (0, 0)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Listed before NIPQCallback, so this is what Lightning put there, before the callback wraps it.
        self.lightning_training_step = vars(pl_module).get("training_step")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = (_compiles(), sum(_graph_breaks().values()))
        self._calibrating = any(not q.calibrated for _, q in quantizers(pl_module))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "phase": "calibration" if self._calibrating else self.nipq._phase(pl_module),
                "hard_quantizers": sum(q.mode == "hard" for _, q in quantizers(pl_module)),
                "compiles": _compiles() - self._start[0],
                "graph_breaks": sum(_graph_breaks().values()) - self._start[1],
            }
        )


def test_compiled_fit_then_hard_quantize_gives_a_validated_integer_model() -> None:
    torch.manual_seed(0)
    model = MLP()
    nipq = NIPQCallback(target_bits=4, hard_epochs=1, anneal_epochs=1, calibration_batches=2)
    hard = HardQuantize(verbose=False)
    recorder = StepCompiles(nipq)
    trainer = fast_trainer(4, [recorder, nipq, hard], num_sanity_val_steps=0)
    train, val = loader(blobs(128), batch_size=32), loader(blobs(64), batch_size=32)
    trainer.fit(torch.compile(model, backend=BACKEND), train, val)

    assert hard.report is not None and hard.report.agreement == 1.0 and hard.report.max_rel_diff < 1e-5
    assert all(isinstance(layer, IntegerLayerMixin) for layer in (model.stem, model.blocks[0].inner[0], model.head))
    # Lightning's compiled training_step is back in place once the callback's wrapper is gone
    assert model._compiler_ctx is not None and recorder.lightning_training_step is not None
    assert vars(model)["training_step"] is recorder.lightning_training_step

    steps = recorder.steps
    assert [s["phase"] for s in steps] == ["calibration"] * 2 + ["noise"] * 6 + ["anneal"] * 4 + ["hard"] * 4
    assert len({s["hard_quantizers"] for s in steps if s["phase"] == "anneal"}) >= 3, "layers switched one by one"
    # no training step, calibration included, meets a graph break
    assert [s["graph_breaks"] for s in steps] == [0] * 16
    # Compiles: the first step; the second, as the layers recorded their MAC counts in the
    # first forward; the first after calibration; the first of the anneal and of the hard
    # phase. None for the layers switching during the anneal, none in any other step.
    assert [s["compiles"] for s in steps] == [1, 1, 1] + [0] * 5 + [1, 0, 0, 0] + [1, 0, 0, 0]


@pytest.mark.slow
def test_inductor_compiled_training_steps_match_eager_ones() -> None:
    model, x, y = _calibrated_mlp()
    compiled = torch.compile(model)  # Inductor, as torch.compile(model) gives Lightning by default
    for hard_layers in (0, len(list(quantized_layers(model)))):
        _set_modes(model, hard_layers)
        runs = []
        for forward in (model, compiled):
            generator = _use_generator(model, seed=7)
            with counter_noise():  # for the eager step; compiled code draws counter-based noise anyway
                runs.append((_step(forward, model, x, y), generator.get_state()))
        ((eager_out, eager_grads), eager_state), ((compiled_out, compiled_grads), compiled_state) = runs
        assert torch.equal(eager_state, compiled_state)
        assert torch.allclose(eager_out, compiled_out, rtol=1e-5, atol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(eager_grads, compiled_grads))
    assert _graph_breaks() == {}


@pytest.mark.slow
def test_inductor_computes_counter_noise_to_the_bit_as_eager_torch_does() -> None:
    # Integer arithmetic that wraps, shifts of negative int32, and a float conversion: the
    # compiled kernel (vectorised, with a scalar tail: 1001 elements) must agree bit for bit.
    key = torch.tensor([-5, 2**31 - 1], dtype=torch.int32)
    like = torch.empty(7, 11, 13)
    assert torch.equal(torch.compile(counter_uniform_noise)(like, key), counter_uniform_noise(like, key))


class LoggingMLP(MLP):
    """The test MLP with what nearly every LightningModule does: ``self.log`` in ``training_step``."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


def test_a_compiled_module_that_logs_in_training_step_trains() -> None:
    # torch 2.12+ Dynamo fails on the signature check inside self.log (Lightning issue 21836);
    # the callback runs the module's log eagerly while it is attached.
    torch.manual_seed(0)
    model = LoggingMLP()
    nipq = NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1)
    trainer = fast_trainer(2, [nipq], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(torch.compile(model, backend=BACKEND), loader(blobs(64), batch_size=32))
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert any(True for _ in quantized_layers(model))
    assert "log" not in vars(model)  # the instance is as it was once fit ends
