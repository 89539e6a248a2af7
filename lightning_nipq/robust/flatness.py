"""Flatness pre-conditioning: train the float model with noise the size of the rounding error it will later suffer.

A reconstruction of Xia, Pang and Cai (2025), "Efficiently Training A Flat Neural Network
Before It has been Quantizated", from its abstract and summary (the full text was not
available). During float training, the weight and the input of every layer that will be
quantized get independent Gaussian noise whose variance is the variance of uniform rounding
error at the target bit-width, ``step**2 / 12``. To second order the expected loss grows by
``sum_l tr(H_l) * sigma_l**2 / 2``, so the training also lowers the Hessian's trace: it
seeks a flat minimum that post-training quantization barely moves.

Plain torch, no Lightning: `attach_flatness_noise` gives each selected layer an instance
``forward`` that runs the layer's own maths on ``(input + noise, weight + noise, bias)``
in training mode and the clean maths otherwise. No parameter, buffer or class changes, so
``state_dict`` keys, DDP and float checkpoints are untouched, and `FlatnessNoiseHandle.detach`
deletes the override so the layers are plain again.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.layers.forms import is_integer, is_quantized
from lightning_nipq.layers.layer_kinds import supported_names
from lightning_nipq.layers.model_walk import check_patterns, plan_layers
from lightning_nipq.quant.codes import MAX_BITS, MIN_SIGNED_BITS, check_bit_width, is_bit_width, num_levels

Bits = Union[int, Sequence[int]]
_MASK63 = (1 << 63) - 1


def rounding_noise_std(x: Tensor, bits: int, per_channel: bool = False, signed: Optional[bool] = None) -> Tensor:
    """Standard deviation ``step / sqrt(12)`` of the rounding error of ``x`` at ``bits`` (detached).

    The step is the range over the largest integer code of `lightning_nipq.quant.num_levels`:
    signed ``max|x| / (2**(bits-1) - 1)``, unsigned ``max(x) / (2**bits - 1)``.

    Args:
        x: the tensor to be quantized.
        bits: the bit-width (at least 2).
        per_channel: one range per slice along dim 0 (the output channel of a weight); the
            result then has shape ``(C, 1, ..., 1)``. Otherwise one range for the whole
            tensor and a 0-dim result.
        signed: the code range; ``None`` picks unsigned where the values are all
            non-negative (per channel with ``per_channel``) and signed otherwise, without
            a host-device synchronisation.

    Returns:
        A tensor broadcastable to ``x``, with no gradient: the range is a statistic of
        ``x``, not something to train through.
    """
    check_bit_width("bits", bits, signed=True)
    x = x.detach()
    if per_channel:
        flat = x.reshape(x.shape[0], -1) if x.dim() > 0 else x.reshape(1, 1)
        absmax = flat.abs().amax(dim=1)
        low = flat.amin(dim=1)
        shape = (x.shape[0],) + (1,) * max(x.dim() - 1, 0)
    else:
        absmax, low, shape = x.abs().amax(), x.amin(), ()
    b = torch.tensor(float(bits), device=x.device)
    n_signed, n_unsigned = num_levels(b, True), num_levels(b, False)
    if signed is None:
        # For non-negative values max|x| == max(x), so only the level count depends on the sign.
        levels = torch.where(low < 0, n_signed, n_unsigned)
    else:
        levels = n_signed if signed else n_unsigned
    std = absmax.float() / levels / math.sqrt(12.0)
    return std.to(x.dtype).reshape(shape)


def rounding_noise(
    x: Tensor,
    bits: int,
    per_channel: bool = False,
    signed: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
    scale: float = 1.0,
) -> Tensor:
    """A Gaussian sample shaped like ``x`` with the variance of its rounding error at ``bits``, times ``scale``.

    See `rounding_noise_std` for ``per_channel`` and ``signed``. The sample carries no
    gradient, so ``x + rounding_noise(x, ...)`` passes gradients to ``x`` unchanged.
    ``generator`` may live on another device than ``x`` (the sample is then moved).
    """
    std = rounding_noise_std(x, bits, per_channel, signed)
    device = generator.device if generator is not None else x.device
    sample = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return sample * (std * scale)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (a splitmix64 chain): distinct keys give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (int(value) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & _MASK63


def check_target_bits(target_bits: Bits) -> tuple[int, ...]:
    """``target_bits`` as a tuple of distinct whole bit-widths in ``[2, 16]``, or a `ValueError` saying why not."""
    values = (target_bits,) if isinstance(target_bits, (int, float)) else target_bits
    try:
        values = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"target_bits must be an int or a sequence of ints, got {target_bits!r}") from None
    if not values:
        raise ValueError("target_bits is empty; give one bit-width (4) or several ((3, 4, 8))")
    for value in values:
        if not is_bit_width(value, signed=True):
            raise ValueError(
                f"target bits must be whole numbers in [{MIN_SIGNED_BITS}, {MAX_BITS}] (weights are signed, so 1 bit "
                f"has no non-zero level), got {value!r}"
            )
    if len(set(values)) != len(values):
        raise ValueError(f"target_bits has repeated values {values}; list each bit-width once")
    return tuple(int(v) for v in values)


class _NoisyForward:
    """The instance ``forward`` of one selected layer while noise is attached."""

    def __init__(self, handle: FlatnessNoiseHandle, name: str, layer: nn.Module, noisy_input: bool) -> None:
        self.handle = handle
        self.name = name
        self.layer = layer
        self.noisy_input = noisy_input

    def __call__(self, input: Tensor) -> Tensor:
        layer = self.layer
        if not layer.training:
            return type(layer).forward(layer, input)
        handle = self.handle
        bits = handle.draw_bits(self.name)
        weight = layer.weight
        if handle.weight_noise:
            generator = handle.generator(weight.device)
            weight = weight + rounding_noise(weight, bits, True, True, generator=generator, scale=handle.scale)
        if handle.input_noise and self.noisy_input:
            input = input + rounding_noise(input, bits, generator=handle.generator(input.device), scale=handle.scale)
        if isinstance(layer, nn.Linear):
            return F.linear(input, weight, layer.bias)
        return layer._conv_forward(input, weight, layer.bias)  # type: ignore[operator]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A copy of a model taken during training (an EMA or SWA average) must be a plain
        # model: give the copied layer its class's own forward rather than a second handle.
        copied_layer = memo.get(id(self.layer))
        if copied_layer is None:
            copied_layer = copy.deepcopy(self.layer, memo)
        return type(copied_layer).forward.__get__(copied_layer)


class FlatnessNoiseHandle:
    """Noise attached to a model by `attach_flatness_noise`; `detach` (or leaving a ``with`` block) removes it.

    Noise is drawn from generators the handle owns. `reseed` re-keys them from the seed and
    a counter (Lightning's callback uses epoch and batch index), which makes every step's
    noise a function of ``(seed, rank, key)``: reproducible, and identical after a resume.
    With several target bit-widths, every training-mode call of every layer draws one of
    them uniformly (shared by that call's weight and input noise).

    Attributes:
        layers: names of the layers that get noise, in registration order.
        float_input: names of the layers whose input gets no noise.
        skipped: ``(name, reason)`` for the layers left alone.
        last_bits: the bit-width each layer used in its latest noisy call.
    """

    def __init__(
        self,
        target_bits: tuple[int, ...],
        weight_noise: bool,
        input_noise: bool,
        scale: float,
        seed: int,
    ) -> None:
        self.target_bits = target_bits
        self.weight_noise = weight_noise
        self.input_noise = input_noise
        self.scale = scale
        self.seed = seed
        self.layers: list[str] = []
        self.float_input: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.last_bits: dict[str, int] = {}
        self._forwards: list[_NoisyForward] = []
        self._noise_generators: dict[torch.device, torch.Generator] = {}
        self._bits_generator = torch.Generator().manual_seed(mix_seed(seed, 1))
        self._key: tuple[int, ...] = ()
        self._rank = 0

    @property
    def attached(self) -> bool:
        return bool(self._forwards)

    def generator(self, device: torch.device) -> torch.Generator:
        """The noise generator for ``device``, made on first use from the seed and the current key."""
        device = torch.device(device)
        gen = self._noise_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._noise_seed())
            self._noise_generators[device] = gen
        return gen

    def _noise_seed(self) -> int:
        return mix_seed(self.seed, 0, self._rank, *self._key)

    def reseed(self, *key: int, rank: int = 0) -> None:
        """Restart the noise from ``(seed, rank, *key)`` and the bit draws from ``(seed, *key)``.

        The bit draws leave ``rank`` out so that all DDP processes train the same
        bit-width configuration in a step, while their noise samples differ.
        """
        self._key = tuple(int(k) for k in key)
        self._rank = int(rank)
        for gen in self._noise_generators.values():
            gen.manual_seed(self._noise_seed())
        self._bits_generator.manual_seed(mix_seed(self.seed, 1, *self._key))

    def draw_bits(self, name: str) -> int:
        """The bit-width for one noisy call of layer ``name``: the only one, or a uniform draw among several."""
        if len(self.target_bits) == 1:
            bits = self.target_bits[0]
        else:
            index = int(torch.randint(len(self.target_bits), (1,), generator=self._bits_generator))
            bits = self.target_bits[index]
        self.last_bits[name] = bits
        return bits

    def state_dict(self) -> dict[str, Any]:
        """The seed, the current key and the generators' states (CPU tensors), to continue the same streams."""
        return {
            "seed": self.seed,
            "key": list(self._key),
            "rank": self._rank,
            "bits_generator": self._bits_generator.get_state(),
            "noise_generators": {str(d): g.get_state() for d, g in self._noise_generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._key = tuple(int(k) for k in state["key"])
        self._rank = int(state["rank"])
        self._bits_generator.set_state(state["bits_generator"])
        self._noise_generators = {}
        for device, gen_state in state["noise_generators"].items():
            self.generator(torch.device(device)).set_state(gen_state)

    def detach(self) -> None:
        """Give every layer its class's forward back; safe to call twice."""
        for fwd in self._forwards:
            if vars(fwd.layer).get("forward") is fwd:
                del fwd.layer.forward
        self._forwards = []

    def __enter__(self) -> FlatnessNoiseHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def attach_flatness_noise(
    model: nn.Module,
    target_bits: Bits = 4,
    weight_noise: bool = True,
    input_noise: bool = True,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    float_input_layers: Optional[Sequence[str]] = None,
    noise_scale: float = 1.0,
    seed: int = 0,
) -> FlatnessNoiseHandle:
    """Add rounding-sized Gaussian noise to the weights and inputs of ``model``'s quantizable layers in training mode.

    The layers are those the package quantizes (`lightning_nipq.layers.plan_layers`: plain
    ``nn.Linear``/``nn.Conv1d/2d/3d``, filtered by ``include``/``exclude``). Weights get
    per-output-channel noise for a signed symmetric range; inputs get per-tensor noise
    from the current batch's range, unsigned when the batch is non-negative. In eval mode
    the layers compute exactly their clean output.

    Args:
        model: a float model; nothing about its parameters or classes changes.
        target_bits: the bit-width the model will be quantized to, or several to draw from
            (every call of every layer draws one).
        weight_noise: add noise to the weights.
        input_noise: add noise to the layer inputs.
        include: shell-style module-name patterns of the layers to perturb (default: all supported).
        exclude: module-name patterns to leave clean.
        float_input_layers: layers whose input gets no noise because it stays float when
            quantized (default: the first selected layer, which takes the raw input).
        noise_scale: multiplies the noise's standard deviation (1: exactly the rounding error's).
        seed: seeds the noise and the bit draws.

    Returns:
        The handle: `FlatnessNoiseHandle.detach` removes the noise; it is also a context manager.

    Example:

        ```python
        with attach_flatness_noise(model, target_bits=4) as noise:
            for step, (x, y) in enumerate(batches):
                noise.reseed(step)
                loss = F.cross_entropy(model(x), y)
                ...
        ```
    """
    bits = check_target_bits(target_bits)
    if not weight_noise and not input_noise:
        raise ValueError("weight_noise and input_noise are both off, so there is nothing to add; turn one on")
    if not isinstance(noise_scale, (int, float)) or isinstance(noise_scale, bool) or not noise_scale > 0:
        raise ValueError(f"noise_scale must be a number > 0 (1: the rounding error's own size), got {noise_scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    float_input_layers = check_patterns("float_input_layers", float_input_layers)
    if any(is_quantized(m) or is_integer(m) for m in model.modules()):
        raise ValueError(
            "the model already holds quantized layers: flatness noise is for the float training before "
            "quantization; attach it before post_training_quantize or NIPQCallback, not with them"
        )
    targets, skipped = plan_layers(model, include, exclude)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layer ({supported_names()}) to add noise to; check include/exclude"
        )
    overridden = [name for name, layer in targets if "forward" in vars(layer)]
    if overridden:
        raise ValueError(
            f"layers {overridden} already have an instance forward (flatness noise attached twice?); "
            "detach the earlier handle first"
        )
    names = [name for name, _ in targets]
    float_inputs = {names[0]} if float_input_layers is None else set(float_input_layers)
    unknown = float_inputs - set(names)
    if unknown:
        raise ValueError(f"float_input_layers {sorted(unknown)} are not among the selected layers {names}")

    handle = FlatnessNoiseHandle(bits, weight_noise, input_noise, float(noise_scale), seed)
    handle.skipped = skipped
    for name, layer in targets:
        fwd = _NoisyForward(handle, name, layer, noisy_input=name not in float_inputs)
        # An instance attribute shadows the class's forward for nn.Module.__call__ and
        # leaves hooks, parameter names and the class itself as they were.
        layer.forward = fwd  # type: ignore[method-assign]
        handle._forwards.append(fwd)
        handle.layers.append(name)
        if name in float_inputs:
            handle.float_input.append(name)
    return handle
