"""`hard_fake_quant` and `noise_fake_quant` as autograd functions that keep little for backward.

Composed of torch ops, the fake quantizations of `lightning_nipq.quant.fake_quant` make
autograd hold, for every quantized tensor until its backward, the float32 input (a copy
of a bf16 one), the clamped and scaled intermediates, the range masks and the products
with the noise: 8 to 16 bytes per element, more than the layer's own activation. The
functions here give the same outputs and, to the last bit, the same gradients (their
backward is the composed one's, term for term) but keep only what that backward needs:

- hard: the input in its own dtype (2 bytes per element in bf16); backward recomputes the
  codes from it.
- noise: one byte per element saying where the input lies against the range. Uniform
  noise is not kept: the state of the generator before the draw is, and backward draws the
  same noise again from a private generator set to that state, so the caller's generator
  (checkpointed by the callbacks, so that a resumed run draws the noise an uninterrupted
  one draws) moves only in forward. Histogram noise is kept (4 bytes per element).

Their outputs need not be kept either: inside `recomputed_outputs`, where the fake-quantized
layers run, the layer's maths save a recipe instead of the quantized tensor and backward
computes it again (`kept_fake_quant_outputs` turns that off).

They run eagerly: under ``torch.compile`` the composed functions are used, which the
compiler fuses itself (`use_fused`). The composed functions stay the reference the tests
compare these with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_nipq.quant.fake_quant import _clamp_unit, code_grid
from lightning_nipq.quant.noise import NOISE_KINDS, counter_noise_enabled, sample_noise, uniform_draw

# Where an element lies against the noise proxy's range, one byte per element: the number of
# the comparisons x >= lower, x > lower, x >= alpha, x > alpha that hold.
_BELOW = 0  # x < lower: the gradient goes to the bottom of the range
_INSIDE = 2  # lower < x < alpha: noise is added
_ABOVE = 4  # x > alpha: the gradient goes to alpha
# 1 and 3 are x == lower and x == alpha: with _INSIDE, where the clamp passes the gradient to x.


_fused_enabled = True


@contextmanager
def composed_fake_quant() -> Iterator[None]:
    """Inside the block the quantizers run the composed reference functions (to compare costs)."""
    global _fused_enabled
    before, _fused_enabled = _fused_enabled, False
    try:
        yield
    finally:
        _fused_enabled = before


def use_fused(*tensors: Tensor) -> bool:
    """Whether the quantizers should call the functions here: eagerly, when autograd records a graph.

    Under ``torch.compile`` the composed functions fuse anyway, and the noise goes through
    a custom op there (see `lightning_nipq.quant.noise`); without a graph nothing is kept.
    """
    return (
        _fused_enabled
        and not torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
    )


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Rounding needs float32: in bf16 a 4-bit grid is already coarser than the data. float64
    # stays float64, for the gradient checks.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t.sum_to_size(shape) if t.shape != shape else t


def _noise_bounds(
    alpha: Tensor, bits: Tensor, signed: bool, zero_point: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """``(step, lower)`` of the noise proxy, computed as `noise_fake_quant` computes them (so they round alike)."""
    _, n = code_grid(bits, signed, zero_point)
    step = alpha / n
    if zero_point is not None:
        return step, -zero_point * step
    if signed:
        return step, -alpha
    return step, torch.zeros_like(alpha)


def _default_generator(device: torch.device) -> Optional[torch.Generator]:
    """The generator ``torch.rand(device=device)`` draws from without one, where torch names it."""
    if device.type == "cpu":
        return torch.random.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None


def _hard_output(x: Tensor, alpha: Tensor, bits: Tensor, zero_point: Optional[Tensor], signed: bool) -> Tensor:
    lower, n = code_grid(bits, signed, zero_point)
    v = _clamp_unit(x.to(_compute_dtype(x)) / alpha, lower)
    v.mul_(n)
    # round_ste's v + (round(v) - v) is round(v) exactly, but for a +0.0 where round gives -0.0.
    v.round_().add_(0.0)
    return v.mul_(alpha / n).to(x.dtype)


def _noise_output(
    xc: Tensor,
    dtype: torch.dtype,
    noise: Tensor,
    alpha: Tensor,
    bits: Tensor,
    zero_point: Optional[Tensor],
    signed: bool,
    code: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """The noise proxy's output, as ``dtype``, of ``xc`` (the input in its compute dtype) and (``code``) the one-byte
    code of where it lies against the range."""
    step, lower = _noise_bounds(alpha, bits, signed, zero_point)
    out = torch.clamp(xc, min=lower, max=alpha)
    if code:
        where = (xc >= lower).to(torch.uint8)
        where += xc > lower
        where += xc >= alpha
        where += xc > alpha
        inside = where == _INSIDE
    else:  # the same mask, for a recomputation that needs no code
        inside = (xc > lower).logical_and_(xc < alpha)
    term = inside.to(xc.dtype).mul_(noise).mul_(step)
    return out.add_(term).to(dtype), where if code else None


class _Draw:
    """Where a uniform draw came from, to draw it again: the generator's state right before it.

    The recomputation of the output (see `recomputed_outputs`) runs in backward before the
    function's own backward and leaves its draw here for it: one draw again instead of two.
    """

    def __init__(self, rng_state: Tensor, device: torch.device) -> None:
        self.rng_state, self.device = rng_state, device
        # Drawn as `sample_noise` drew it: from the stream, or counter-based (`counter_noise`).
        self.counter = counter_noise_enabled()
        self.left: Optional[Tensor] = None

    def again(self, like: Tensor) -> Tensor:
        """The same noise, shaped like ``like``, from a private generator (the caller's does not move)."""
        if self.left is not None and self.left.shape == like.shape:
            noise, self.left = self.left, None
            return noise
        generator = torch.Generator(device=self.device)
        generator.set_state(self.rng_state)
        return uniform_draw(like, generator, self.counter)


class _HardFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, alpha: Tensor, bits: Tensor, zero_point: Optional[Tensor], signed: bool
    ) -> Tensor:
        ctx.signed, ctx.x_dtype = signed, x.dtype
        ctx.save_for_backward(x, alpha, bits, zero_point)
        return _hard_output(x, alpha, bits, zero_point, signed)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, alpha, bits, zero_point = ctx.saved_tensors
        need_x, need_alpha, need_bits = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            b = bits.detach().requires_grad_(need_bits)
            lower_b, n_b = code_grid(b, ctx.signed, zero_point)
        n = n_b.detach()
        lower = lower_b.detach() if isinstance(lower_b, Tensor) else lower_b
        g = grad.to(_compute_dtype(x))
        x = x.to(g.dtype)
        u = x / alpha
        c = _clamp_unit(u, lower)
        # The terms below are the composed function's backward, term for term and summed in
        # the order autograd sums them, so that the gradients are equal to the last bit
        # (compiled steps, which run the composed function, must match eager ones).
        grad_r = g * (alpha / n)
        grad_c = grad_r * n
        grad_u = torch.where((u >= lower) & (u <= 1.0), grad_c, 0.0)  # clamp passes the edges too
        grad_x = _sum_to(grad_u / alpha, x.shape).to(ctx.x_dtype) if need_x else None
        grad_alpha = grad_bits = None
        if need_alpha or need_bits:
            rounded = (c * n).round_().add_(0.0)
            grad_s = _sum_to(g * rounded, alpha.shape)
        if need_alpha:
            from_u = _sum_to(-grad_u * (u / alpha), alpha.shape)
            grad_alpha = (grad_s / n + from_u).to(alpha.dtype)
        if need_bits:
            grad_n = _sum_to(-grad_s * ((alpha / n) / n), n.shape) + _sum_to(grad_r * c, n.shape)
            outputs, grads = [n_b], [grad_n]
            if isinstance(lower_b, Tensor):  # a zero point's bottom -z / (N - z) moves with the bits
                outputs.append(lower_b)
                grads.append(_sum_to(torch.where(u < lower, grad_c, 0.0), lower_b.shape))
            (grad_bits,) = torch.autograd.grad(outputs, b, grads)
        return grad_x, grad_alpha, grad_bits, None, None


class _NoiseFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        alpha: Tensor,
        bits: Tensor,
        zero_point: Optional[Tensor],
        signed: bool,
        kind: str,
        generator: Optional[torch.Generator],
        draw: Optional[_Draw],
    ) -> Tensor:
        # draw: where the noise comes from (see fused_noise_fake_quant); backward draws it
        # again. None: the noise is kept.
        ctx.draw = draw
        xc = x.to(_compute_dtype(x))
        noise = sample_noise(kind, xc, alpha, bits, signed, generator, zero_point)
        out, code = _noise_output(xc, x.dtype, noise, alpha, bits, zero_point, signed, code=True)
        ctx.signed, ctx.x_shape, ctx.x_dtype = signed, x.shape, x.dtype
        ctx.save_for_backward(code, alpha, bits, zero_point, None if draw is not None else noise)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        code, alpha, bits, zero_point, noise = ctx.saved_tensors
        need_x, need_alpha, need_bits = ctx.needs_input_grad[:3]
        g = grad.to(_compute_dtype(grad))
        grad_x = None
        if need_x:
            # code - 1 wraps below _BELOW to 255: the clamp passes codes 1 to 3.
            grad_x = _sum_to(torch.where((code - 1) <= _INSIDE, g, 0.0), ctx.x_shape).to(ctx.x_dtype)
        if not (need_alpha or need_bits):
            return grad_x, None, None, None, None, None, None, None
        if noise is None:
            noise = ctx.draw.again(torch.empty((), device=code.device).expand(ctx.x_shape))
        with torch.enable_grad():
            b = bits.detach().requires_grad_(need_bits)
            _, n_b = code_grid(b, ctx.signed, zero_point)
        n = n_b.detach()
        # The composed function's backward, summed in autograd's order (see _HardFakeQuant).
        grad_step = _sum_to(torch.where(code == _INSIDE, g * noise, 0.0), alpha.shape)
        grad_alpha = _sum_to(torch.where(code == _ABOVE, g, 0.0), alpha.shape)
        if zero_point is not None or ctx.signed:
            grad_lower = _sum_to(torch.where(code == _BELOW, g, 0.0), alpha.shape)
            if zero_point is not None:  # lower = -z * step
                grad_step = grad_step + grad_lower * -zero_point
            else:  # lower = -alpha
                grad_alpha = grad_alpha + -grad_lower
        grad_alpha = (grad_alpha + grad_step / n).to(alpha.dtype)
        grad_bits = None
        if need_bits:
            (grad_bits,) = torch.autograd.grad(n_b, b, _sum_to(-grad_step * ((alpha / n) / n), n.shape))
        return grad_x, grad_alpha if need_alpha else None, grad_bits if need_bits else None, None, None, None, None, None


# ---------------------------------------------------------------------- recomputed outputs
# A layer's convolution or matmul keeps its fake-quantized input for the weight's gradient: a
# second copy of an activation whose float original the layer before keeps already. Inside
# `recomputed_outputs`, autograd keeps instead how to compute it again (the float input, which
# is kept anyway, and the range, bits and generator state), and backward recomputes it, to
# the bit, when the weight's gradient needs it: one elementwise pass instead of 4 bytes per
# element held from forward to backward.


class _Offer(NamedTuple):
    output: Tensor
    x: Tensor
    x_version: int
    again: Callable[[Tensor], Tensor]


class _Recipe(NamedTuple):
    x: Any  # the float input, as the outer saved-tensor hooks packed it
    x_version: int
    again: Callable[[Tensor], Tensor]
    geometry: tuple[torch.Size, tuple[int, ...], int]  # the saved tensor's view of the output's storage


class _Offers(threading.local):
    def __init__(self) -> None:
        self.open: Optional[list[_Offer]] = None


_offers = _Offers()
_recompute_enabled = True


@contextmanager
def kept_fake_quant_outputs() -> Iterator[None]:
    """Inside the block, fake-quantized layers keep their quantized input for backward instead of computing it again.

    By default a fake-quantized layer does not hold its quantized input (and weight) from
    forward to backward: backward computes it again, to the bit, from the float input the
    layer before keeps anyway (see `recomputed_outputs`). That saves 4 bytes per element of
    each quantized input (2 in bf16) for one more elementwise pass in backward. Inside this
    block the layers keep the tensor: more memory, a shorter step. Results are the same::

        from lightning_nipq.quant import kept_fake_quant_outputs

        with kept_fake_quant_outputs():
            trainer.fit(model)
    """
    global _recompute_enabled
    before, _recompute_enabled = _recompute_enabled, False
    try:
        yield
    finally:
        _recompute_enabled = before


def _offer(output: Tensor, x: Tensor, again: Callable[[Tensor], Tensor]) -> None:
    if _offers.open is not None and output.numel() > 0:
        _offers.open.append(_Offer(output, x, x._version, again))


# torch names the saved-tensor hooks in force only privately. Without these two (another torch
# version), the layers keep their quantized inputs: hooks of ours would hide the caller's.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)


def _outer_hooks() -> Optional[tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]]]:
    # The hooks active outside (activation offloading, checkpointing, a memory count): the
    # tensors ours do not replace go through them, and the float input of a recomputed one too.
    assert _top_hooks is not None
    return _top_hooks(False)


def _can_recompute() -> bool:
    return (
        _recompute_enabled
        and _fused_enabled
        and _top_hooks is not None
        and _hooks_enabled is not None
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _hooks_enabled()
    )


@contextmanager
def recomputed_outputs() -> Iterator[None]:
    """Inside the block, a fused fake quantization's output saved for backward is computed again there instead.

    The fake-quantized layers run their quantizers and their maths inside this block. A
    saved tensor that is (a view of) the output of `fused_hard_fake_quant`, or of
    `fused_noise_fake_quant` with uniform noise, is packed as the float input it was computed
    from with the quantizer's range, bits and generator state; unpacking computes the same
    output again, to the bit, without moving any generator. Other saved tensors, and that
    float input, go through the saved-tensor hooks active outside the block, if any. Modifying
    the float input in place before backward raises, as autograd does for a saved tensor.
    Does nothing under ``torch.compile`` (what compiled code saves is the partitioner's
    choice), without autograd, where saved-tensor hooks are disabled, or inside
    `kept_fake_quant_outputs`.
    """
    if _offers.open is not None or not _can_recompute():
        yield
        return
    offers: list[_Offer] = []
    outer = _outer_hooks()

    def pack(saved: Tensor) -> tuple[Optional[_Recipe], Any]:
        if offers and saved.numel() > 0:
            pointer = saved.untyped_storage().data_ptr()
            for offer in offers:
                output = offer.output
                if (
                    output.untyped_storage().data_ptr() == pointer
                    and output.dtype == saved.dtype
                    and output.device == saved.device
                    and output.storage_offset() == 0
                ):
                    if offer.x._version != offer.x_version:
                        break  # the float input changed since: keep the output itself
                    x = outer[0](offer.x) if outer is not None else offer.x
                    geometry = (saved.size(), saved.stride(), saved.storage_offset())
                    return _Recipe(x, offer.x_version, offer.again, geometry), output.stride()
        return None, outer[0](saved) if outer is not None else saved

    def unpack(packed: tuple[Optional[_Recipe], Any]) -> Tensor:
        recipe, payload = packed
        if recipe is None:
            return outer[1](payload) if outer is not None else payload
        # Outer hooks may hand back a copy (offloading): they answer for what they packed.
        x = outer[1](recipe.x) if outer is not None else recipe.x
        if outer is None and x._version != recipe.x_version:
            raise RuntimeError(
                "The input of a fake-quantized layer was modified in place after the layer used it, and "
                "backward needs it to compute the layer's quantized input again. Use an out-of-place "
                "operation (for example ReLU(inplace=False)) after a quantized layer's input."
            )
        with torch.no_grad():
            output = recipe.again(x)
        if output.stride() != payload:
            raise RuntimeError("A recomputed fake quantization came out in another memory layout than in forward.")
        return output.as_strided(*recipe.geometry)

    _offers.open = offers
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _offers.open = None


def fused_hard_fake_quant(
    x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, zero_point: Optional[Tensor] = None
) -> Tensor:
    """`hard_fake_quant` of ``x`` in its own dtype (float32 arithmetic inside), keeping only ``x`` for backward.

    Same output (in ``x``'s dtype) and gradients, to the last bit, as
    ``hard_fake_quant(x.float(), ...)``. ``zero_point`` is a constant (no gradient).
    """
    out = _HardFakeQuant.apply(x, alpha, bits, zero_point, signed)
    constants = (alpha.detach(), bits.detach(), zero_point, signed)
    _offer(out, x, lambda x_again: _hard_output(x_again, *constants))
    return out


def fused_noise_fake_quant(
    x: Tensor,
    alpha: Tensor,
    bits: Tensor,
    signed: bool,
    noise: str = "uniform",
    generator: Optional[torch.Generator] = None,
    zero_point: Optional[Tensor] = None,
) -> Tensor:
    """`noise_fake_quant` of ``x`` with noise of kind ``noise`` drawn from ``generator`` (None: torch's own).

    The draw is `lightning_nipq.quant.noise.sample_noise`'s on ``x`` in float32, so the
    output, in ``x``'s dtype, is ``noise_fake_quant(x.float(), ...)`` with the noise the
    quantizer would draw from the same state. Backward keeps one byte per element and
    draws uniform noise again from a private copy of the generator's state (on a device
    whose default generator torch does not name, the noise is kept instead).
    ``zero_point`` is a constant (no gradient).
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    source = generator if generator is not None else _default_generator(x.device)
    # The state right before the draw: backward draws again from a copy of it.
    draw = _Draw(source.get_state(), source.device) if noise == "uniform" and source is not None else None
    out = _NoiseFakeQuant.apply(x, alpha, bits, zero_point, signed, noise, generator, draw)
    if draw is not None:
        constants = (alpha.detach(), bits.detach(), zero_point, signed)

        def again(x_again: Tensor) -> Tensor:
            noise = draw.again(x_again)
            draw.left = noise  # for the function's backward, which runs next
            xc = x_again.to(_compute_dtype(x_again))
            return _noise_output(xc, x_again.dtype, noise, *constants, code=False)[0]

        _offer(out, x, again)
    return out
