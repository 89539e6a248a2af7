"""Noise samplers for the NIPQ noise phase: values in ``[-0.5, 0.5]``, shaped like the input."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_nipq.quant.fake_quant import rounding_error

NoiseKind = Literal["uniform", "histogram"]
NOISE_KINDS: tuple[str, ...] = ("uniform", "histogram")
HISTOGRAM_BINS = 256


#: Uniform noise takes one of this many evenly spaced values in (-0.5, 0.5): 15 random bits.
NOISE_LEVELS = 1 << 15


def uniform_noise(like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``U(-0.5, 0.5)`` (float32, shaped like ``like``): the paper found it as accurate as the histogram and cheaper.

    Each sample is ``(k + 0.5) / 2**15 - 0.5`` for a uniform 15-bit ``k``, a resolution far
    below any quantization step's. The bits come from 63-bit random integers, four samples
    each: on a CPU, ``torch.rand``'s one generator call per element cost more than the whole
    fake quantization around it (13 ms for the 1.6 M elements of one ResNet activation, against
    3 ms this way).
    """
    numel = like.numel()
    words = torch.empty(((numel + 3) // 4,), dtype=torch.int64, device=like.device).random_(generator=generator)
    # random_ fills [0, 2**63): the top bit of each word is 0, so every 16-bit piece keeps its low 15 bits.
    samples = words.view(torch.int16)[:numel].bitwise_and(NOISE_LEVELS - 1)
    return samples.to(torch.float32).mul_(1.0 / NOISE_LEVELS).add_(0.5 / NOISE_LEVELS - 0.5).view(like.shape)


# ---------------------------------------------------------------------- counter-based noise
# Compiled code cannot fuse a draw from a torch.Generator into its kernels: the draw stays an
# opaque call that writes the noise to memory, and the compiler keeps that tensor for
# backward. Counter-based noise is a pure function of a small key and each element's index,
# so the kernel that quantizes computes it in registers, and anything that needs it again
# (backward) computes it again. The key comes from the quantizer's generator (two 31-bit
# integers per draw), so the noise still follows the checkpointed generator and a resumed
# run draws what an uninterrupted one draws.

#: Counter-based noise takes one of this many evenly spaced values in (-0.5, 0.5): 23 bits of the hash.
COUNTER_NOISE_LEVELS = 1 << 23
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B - (1 << 32)  # the 32-bit constant as int32: products wrap modulo 2**32 either way


def _mix(h: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xor-shift and multiply rounds) of int32 ``h``.

    Right shifts of int32 are arithmetic, so each is masked to the bits a logical shift keeps.
    Written out of plain tensor operations, which eager torch and the compilers compute alike.
    """
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MIX_1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _MIX_2
    return h ^ ((h >> 16) & 0xFFFF)


def draw_noise_key(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Two random integers in ``[0, 2**31)`` (int32, on ``device``) from ``generator`` (None: torch's own): the key
    of one counter-based draw."""
    return torch.empty((2,), dtype=torch.int32, device=device).random_(generator=generator)


def counter_uniform_noise(like: Tensor, key: Tensor) -> Tensor:
    """``U(-0.5, 0.5)`` noise shaped like ``like`` (float32), a function of ``key`` and each element's index only.

    ``key`` holds two int32 (`draw_noise_key`). Element ``i`` takes
    ``(k + 0.5) / 2**23 - 0.5`` for ``k`` 23 bits of ``mix(i * (2 * key[0] + 1) + key[1])``
    (modulo ``2**32``): the same values wherever and however often it is computed, so
    compiled code fuses it into the quantizer's kernel and backward recomputes it instead of
    keeping it. The key picks an odd multiplier and an offset, so two keys walk the hash's
    inputs along different strides: another key's sequence is not this one shifted by a few
    elements, as with an offset alone. At most ``2**31 - 1`` elements.
    """
    numel = like.numel()
    torch._check(numel < 2**31, lambda: f"counter-based noise covers at most 2**31 - 1 elements, got {numel}")
    key = key.to(device=like.device, dtype=torch.int32)
    index = torch.arange(numel, dtype=torch.int32, device=like.device)
    # One round of the hash: the compiler traces each use of an intermediate separately
    # (xor-shifts use theirs twice), so every further round would multiply its compile
    # time by eight.
    h = _mix(index * (key[0] * 2 + 1) + key[1])
    levels = ((h >> 8) & (COUNTER_NOISE_LEVELS - 1)).to(torch.float32)
    # Both steps are exact in float32, so fused (multiply-add) and separate arithmetic agree.
    return (levels * (1.0 / COUNTER_NOISE_LEVELS) + (0.5 / COUNTER_NOISE_LEVELS - 0.5)).view(like.shape)


class _CounterNoise(threading.local):
    enabled = False


_counter = _CounterNoise()


@contextmanager
def counter_noise() -> Iterator[None]:
    """Inside the block, eager quantizers draw uniform noise as compiled ones do: counter-based.

    Code under ``torch.compile`` always draws uniform noise with `counter_uniform_noise`
    (the compiler fuses it); eager code draws it from the generator's stream, which costs
    fewer elementwise passes there. Both are uniform and follow the quantizer's generator.
    In this block eager steps draw, from the same generator state, exactly the noise compiled
    steps draw: to check a compiled run against an eager one, step for step.
    """
    before, _counter.enabled = _counter.enabled, True
    try:
        yield
    finally:
        _counter.enabled = before


def counter_noise_enabled() -> bool:
    """Whether eager uniform draws are counter-based here (`counter_noise`)."""
    return _counter.enabled


def uniform_draw(like: Tensor, generator: Optional[torch.Generator], counter: bool) -> Tensor:
    """Uniform noise shaped like ``like`` from ``generator``: counter-based (a key drawn from it), or from its stream."""
    if counter:
        return counter_uniform_noise(like, draw_noise_key(generator, like.device))
    return uniform_noise(like, generator)


def histogram_noise(
    x: Tensor,
    alpha: Tensor,
    bits: Tensor,
    signed: bool,
    generator: Optional[torch.Generator] = None,
    zero_point: Optional[Tensor] = None,
) -> Tensor:
    """Sample from a 256-bin histogram of the actual rounding error of ``x``.

    This is what the paper's released code does. It crashed when every element was
    clipped (``torch.multinomial`` on an empty histogram); then there is no rounding
    error to imitate, and uniform noise is used instead.
    """
    error = rounding_error(x.float(), alpha, bits, signed, zero_point)
    if error.numel() == 0:
        return uniform_noise(x, generator)
    counts = torch.histc(error, bins=HISTOGRAM_BINS, min=-0.5, max=0.5)
    if not bool(counts.sum() > 0):
        return uniform_noise(x, generator)
    bin_index = torch.multinomial(counts, x.numel(), replacement=True, generator=generator).view(x.shape)
    within_bin = torch.rand(x.shape, device=x.device, generator=generator)
    return (bin_index.float() + within_bin) / HISTOGRAM_BINS - 0.5


def sample_noise(
    kind: str,
    x: Tensor,
    alpha: Tensor,
    bits: Tensor,
    signed: bool,
    generator: Optional[torch.Generator] = None,
    zero_point: Optional[Tensor] = None,
) -> Tensor:
    """Noise of ``kind`` shaped like ``x``; the histogram imitates the rounding error of the grid (``zero_point``: see `fake_quant`)."""
    if kind == "uniform":
        return uniform_draw(x, generator, _counter.enabled)
    if kind == "histogram":
        return histogram_noise(x, alpha, bits, signed, generator, zero_point)
    raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------- under torch.compile
# Dynamo cannot put a ``torch.Generator`` into a graph: ``torch.rand(..., generator=g)``
# breaks the graph at every quantizer. Inside compiled code the draws therefore go through
# custom ops that name the generator by a registered key, so the noise still comes from the
# callback's generator (checkpointed, resumable). Uniform noise is counter-based there: the
# op draws only its key, and the compiler fuses the noise itself into the quantizer's
# kernel; eager code inside `counter_noise` draws the same. Histogram noise is drawn whole
# by the op and equals the eager draw. The ops mutate a shared "order" token: that chains
# the draws in program order and keeps the compiler from merging, reordering or recomputing
# them (each call advances the generator).

#: Key of "no generator": torch's default one.
GLOBAL_RNG_KEY = -1
_generators: "weakref.WeakValueDictionary[int, torch.Generator]" = weakref.WeakValueDictionary()
_order_tokens: dict[str, Tensor] = {}


def register_generator(generator: Optional[torch.Generator]) -> tuple[int, Tensor]:
    """The key naming ``generator`` inside compiled code, and the token that orders its draws."""
    device = torch.device(generator.device) if generator is not None else torch.device("cpu")
    token = _order_tokens.get(str(device))
    if token is None:
        token = _order_tokens[str(device)] = torch.zeros((), dtype=torch.int64, device=device)
    if generator is None:
        return GLOBAL_RNG_KEY, token
    _generators[id(generator)] = generator  # weak: the entry goes when the generator does
    return id(generator), token


def _registered(key: int) -> Optional[torch.Generator]:
    if key == GLOBAL_RNG_KEY:
        return None
    generator = _generators.get(key)
    if generator is None:
        raise RuntimeError(
            "the noise generator of a compiled NIPQ quantizer no longer exists; set quantizer.generator again"
        )
    return generator


def _sample_registered(
    kind: str,
    x: Tensor,
    alpha: Tensor,
    bits: Tensor,
    signed: bool,
    generator_key: int,
    order: Tensor,
    zero_point: Optional[Tensor] = None,
) -> Tensor:
    order.add_(1)
    return sample_noise(kind, x, alpha, bits, signed, _registered(generator_key), zero_point)


def _fake_noise(
    kind: str,
    x: Tensor,
    alpha: Tensor,
    bits: Tensor,
    signed: bool,
    generator_key: int,
    order: Tensor,
    zero_point: Optional[Tensor] = None,
) -> Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _key_registered(on: Tensor, generator_key: int, order: Tensor) -> Tensor:
    order.add_(1)
    return draw_noise_key(_registered(generator_key), on.device)


def _fake_key(on: Tensor, generator_key: int, order: Tensor) -> Tensor:
    return torch.empty((2,), dtype=torch.int32, device=on.device)


# Defined with torch.library's schema strings rather than ``torch.library.custom_op``: the
# custom_op wrapper costs about 30 microseconds of Python per call, and a compiled NIPQ step
# calls the key op twice per quantizer (the noise and the stochastic bits), 1 ms per step
# on the benchmark ResNet. The inputs reach the ops detached, so they need no autograd kernel.
_library = torch.library.Library("lightning_nipq", "FRAGMENT")
_library.define(
    "sample_noise(str kind, Tensor x, Tensor alpha, Tensor bits, bool signed, int generator_key, Tensor(a!) order, "
    "Tensor? zero_point=None) -> Tensor"
)
_library.impl("sample_noise", _sample_registered, "CompositeExplicitAutograd")
torch.library.register_fake("lightning_nipq::sample_noise", _fake_noise, lib=_library)
_library.define("draw_noise_key(Tensor on, int generator_key, Tensor(a!) order) -> Tensor")
_library.impl("draw_noise_key", _key_registered, "CompositeExplicitAutograd")
torch.library.register_fake("lightning_nipq::draw_noise_key", _fake_key, lib=_library)
_noise_op = torch.ops.lightning_nipq.sample_noise
_key_op = torch.ops.lightning_nipq.draw_noise_key


def sample_noise_compilable(
    kind: str,
    x: Tensor,
    alpha: Tensor,
    bits: Tensor,
    signed: bool,
    generator_key: int,
    order: Tensor,
    zero_point: Optional[Tensor] = None,
) -> Tensor:
    """`sample_noise` for code under ``torch.compile``, from the generator registered as ``generator_key``.

    Uniform noise is `counter_uniform_noise` with a key the op draws from the generator;
    ``x``, ``alpha`` and ``bits`` are only read (their gradients are not needed), so they
    are detached before they reach the opaque ops.
    """
    if kind == "uniform":
        # The op takes the range only for its device: given x, the compiler would have to
        # write x to memory before the call instead of fusing x's producer with the quantizer.
        return counter_uniform_noise(x, _key_op(alpha.detach(), generator_key, order))
    zp = None if zero_point is None else zero_point.detach()
    return _noise_op(kind, x.detach(), alpha.detach(), bits.detach(), signed, generator_key, order, zp)
