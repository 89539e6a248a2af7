"""Step-based runs and short fine-tunes: the hard phase at the end of max_steps, the budget met by the end of the noise phase."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from models import MLP, TinyTransformer, blobs, fast_trainer, loader
from torch.utils.data import DataLoader, IterableDataset

from lightning_nipq import HardQuantize, NIPQCallback
from lightning_nipq.layers import quantized_layers, quantizers


class NoiseEnd(Callback):
    """The learned bits at the last step before the hard phase, and the steps of each phase."""

    def __init__(self) -> None:
        self.phases: dict[int, str] = {}
        self.last_noise: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        nipq = next(c for c in trainer.callbacks if isinstance(c, NIPQCallback))
        phase = nipq._phase(pl_module)
        self.phases[trainer.global_step] = phase
        if phase != "hard":
            pairs = [(layer.weight_quantizer, layer.input_quantizer) for _, layer in quantized_layers(pl_module)]
            sized = lambda qs: [q for q in qs if q is not None and q.calibrated and q.size]  # noqa: E731
            for label, group in (("weight", sized(w for w, _ in pairs)), ("input", sized(a for _, a in pairs))):
                if not group:
                    continue  # inputs before calibration
                total = sum(q.size for q in group)
                # The learned bits: the continuous ones, which stochastic rounding trains at on average.
                self.last_noise[label] = sum(q.size * float(q.continuous_bits()) for q in group) / total
                self.last_noise[label + "_spread"] = max(float(q.continuous_bits()) for q in group) - min(
                    float(q.continuous_bits()) for q in group
                )


@pytest.mark.parametrize("make,batch_size", [(MLP, 32), (TinyTransformer, 16)], ids=["MLP", "TinyTransformer"])
def test_max_steps_alone_ends_in_a_hard_phase_with_the_budget_met(make, batch_size):
    torch.manual_seed(0)
    watch = NoiseEnd()
    hard = HardQuantize(verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fast_trainer(-1, [NIPQCallback(target_bits=3), watch, hard], max_steps=66)
        trainer.fit(make(), loader(blobs(256), batch_size=batch_size, shuffle=True), loader(blobs(64)))
    assert trainer.global_step == 66
    # the last 10% of the steps (7 of 66) are hard, the rest noise
    assert [watch.phases[s] for s in range(59)] == ["noise"] * 59 and {watch.phases[s] for s in range(59, 66)} == {"hard"}
    assert abs(watch.last_noise["weight"] - 3) <= 0.25 and abs(watch.last_noise["input"] - 3) <= 0.25, watch.last_noise
    assert watch.last_noise["weight_spread"] > 0.05  # the layers learned different bits
    assert not [w for w in caught if "above the target" in str(w.message)]
    # and the freeze fills the budget with whole bits, which differ between layers
    assert hard.report is not None and 2.95 <= hard.report.avg_weight_bits <= 3.0 + 1e-9
    assert len({row.weight_bits for row in hard.report.layers}) > 1, [row.weight_bits for row in hard.report.layers]


class Stream(IterableDataset):
    """A dataset of unknown length."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(zip(*self.data.tensors))


def test_hard_fraction_needs_a_known_number_of_steps():
    steps = []

    class Count(Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    with pytest.raises(ValueError, match="need a known number of optimizer steps"):
        fast_trainer(2, [NIPQCallback(target_bits=4, hard_fraction=0.2), Count()]).fit(MLP(), DataLoader(Stream(blobs(64)), batch_size=16))
    assert steps == []
    # epochs of unknown length work in epochs
    fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1)]).fit(
        MLP(), DataLoader(Stream(blobs(64)), batch_size=16)
    )
    with pytest.raises(ValueError, match="either in epochs"):
        NIPQCallback(hard_epochs=1, hard_fraction=0.1)
    with pytest.raises(ValueError, match="hard_fraction must be a number in"):
        NIPQCallback(hard_fraction=1.5)


def test_a_step_schedule_resumes_in_the_right_phase(tmp_path):
    data = blobs(80)  # 5 batches an epoch, 20 steps: the hand-over from step 12, hard from step 16

    class Crash(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("crash")

    def run(ckpt_path=None, crash=False):
        torch.manual_seed(0)
        model = MLP()
        watch = NoiseEnd()
        checkpoints = ModelCheckpoint(dirpath=tmp_path / ("crashed" if crash else "other"), save_last=True)
        callbacks = [NIPQCallback(target_bits=4, hard_fraction=0.2, anneal_fraction=0.2, calibration_batches=1), watch, checkpoints]
        trainer = fast_trainer(-1, callbacks + ([Crash()] if crash else []), max_steps=20, enable_checkpointing=True)
        trainer.fit(model, loader(data, batch_size=16), ckpt_path=ckpt_path)
        return model, watch, callbacks[0]

    straight, watch, straight_nipq = run()
    assert [watch.phases[s] for s in (11, 12, 15, 16, 19)] == ["noise", "anneal", "anneal", "hard", "hard"]
    with pytest.raises(RuntimeError, match="crash"):
        run(crash=True)  # stops after 10 steps, in the noise phase
    resumed, resumed_watch, resumed_nipq = run(ckpt_path=str(tmp_path / "crashed" / "last.ckpt"))
    assert min(resumed_watch.phases) == 10
    assert [resumed_watch.phases[s] for s in (11, 12, 16)] == ["noise", "anneal", "hard"]
    # The phases follow the global step, which the checkpoint restores. (Parameters are not
    # compared: with max_steps, Lightning itself replays the data differently after a resume.)
    assert all(q.frozen_bits is not None for _, q in quantizers(resumed))
    assert {name for name, _ in quantizers(resumed)} == {name for name, _ in quantizers(straight)}
    # The sensitivities measured before the crash came back with the checkpoint: the resumed
    # run froze its bits on as many noise-phase steps as the uninterrupted one.
    names = [name for name, q in quantizers(straight) if straight_nipq.sensitivity.observed_steps(name)]
    assert names
    assert [resumed_nipq.sensitivity.observed_steps(n) for n in names] == [straight_nipq.sensitivity.observed_steps(n) for n in names]


def test_learned_bits_and_weight_ranges_start_at_the_target_under_the_enforced_budget():
    from lightning_nipq import attach_quantizers
    from lightning_nipq.quant import weight_ranges

    nipq = NIPQCallback(target_bits=3)
    assert nipq.quantizer_config.init_bits == 3.0
    model = MLP()
    weights = {name: layer.weight.detach().clone() for name, layer in model.named_modules() if isinstance(layer, torch.nn.Linear)}
    attach_quantizers(model, nipq.quantizer_config)
    for name, layer in quantized_layers(model):
        q = layer.weight_quantizer
        # Bits learned from 3 (the target), not from 7.5; ranges at the MSE clipping for 3 bits.
        assert float(q.continuous_bits()) == pytest.approx(3.0, abs=1e-4)
        expected = weight_ranges(weights[name], "channel", q.range_shape, 3, "mse")
        assert torch.allclose(q.alpha.detach(), expected.reshape(q.alpha.shape), rtol=1e-5)
    # Without the projection the bits start half a bit under max_bits, as before; a given init_bits is kept.
    assert NIPQCallback(target_bits=3, enforce_budget=False).quantizer_config.init_bits is None
    assert NIPQCallback(target_bits=3, init_bits=6).quantizer_config.init_bits == 6
