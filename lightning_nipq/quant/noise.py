"""Noise samplers for the NIPQ noise phase: values in ``[-0.5, 0.5]``, shaped like the input."""

from __future__ import annotations

import weakref
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
        return uniform_noise(x, generator)
    if kind == "histogram":
        return histogram_noise(x, alpha, bits, signed, generator, zero_point)
    raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------- under torch.compile
# Dynamo cannot put a ``torch.Generator`` into a graph: ``torch.rand(..., generator=g)``
# breaks the graph at every quantizer. Inside compiled code the draws therefore go through
# a custom op that names the generator by a registered key, so the noise still comes from
# the callback's generator (checkpointed, resumable) and equals the eager draws. The op
# mutates a shared "order" token: that chains the draws in program order and keeps the
# compiler from merging, reordering or recomputing them (each call advances the generator).

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


_custom_op = getattr(torch.library, "custom_op", None)  # torch >= 2.4
if _custom_op is not None:
    _noise_op = _custom_op("lightning_nipq::sample_noise", mutates_args=("order",))(_sample_registered)
    _noise_op.register_fake(_fake_noise)
else:  # older torch: the draw stays a graph break
    _noise_op = _sample_registered


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

    ``x``, ``alpha`` and ``bits`` are only read (their gradients are not needed), so they
    are detached before they reach the opaque op.
    """
    if kind == "uniform" and generator_key == GLOBAL_RNG_KEY:
        # torch's own RNG is traceable, but not Tensor.random_: compiled code draws from the
        # compiler's RNG anyway, so the float draw is as good here.
        return torch.rand(x.shape, device=x.device, dtype=torch.float32) - 0.5
    zp = None if zero_point is None else zero_point.detach()
    return _noise_op(kind, x.detach(), alpha.detach(), bits.detach(), signed, generator_key, order, zp)
