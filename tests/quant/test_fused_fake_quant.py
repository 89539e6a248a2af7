"""The fused fake quantizations against the composed ones of fake_quant.py, which stay the reference."""

import contextlib
from typing import Optional

import pytest
import torch

from lightning_nipq import LSQConfig, LSQQuantizer, NIPQConfig, NIPQQuantizer, attach_quantizers
from lightning_nipq.layers import calibrate_activations
from lightning_nipq.layers.model_walk import quantizers
from lightning_nipq.quant.fake_quant import code_grid, hard_fake_quant, noise_fake_quant, zero_point
from lightning_nipq.quant.fused_fake_quant import fused_hard_fake_quant, fused_noise_fake_quant, kept_fake_quant_outputs
from lightning_nipq.quant.granularity import grouped_view
from lightning_nipq.quant.noise import counter_noise, sample_noise

# (x's shape, alpha's shape): per tensor, per output channel of a conv weight, per group of 8
# of a (4, 24) weight in its grouped view.
LAYOUTS = {"tensor": ((6, 20), ()), "channel": ((4, 3, 2, 2), (4, 1, 1, 1)), "group": ((4, 3, 8), (4, 3, 1))}
# (signed, share of the range below zero): symmetric, unsigned, unsigned with a zero point.
GRIDS = {"signed": (True, None), "unsigned": (False, None), "zero_point": (False, 0.3)}


def _case(layout: str, grid: str, bits: float, dtype=torch.float64, seed: int = 0):
    """x (with values on the range's edges and on rounding ties), alpha, bits, signed and zero point."""
    x_shape, alpha_shape = LAYOUTS[layout]
    signed, share = GRIDS[grid]
    gen = torch.Generator().manual_seed(seed)
    # Powers of two: x / alpha is exact, so an x put on an edge or a tie lands on it.
    alpha = 2.0 ** torch.randint(-1, 2, alpha_shape, generator=gen).to(dtype)
    bits_t = torch.tensor(bits, dtype=dtype)
    zp = None if share is None else zero_point(bits_t, share).to(dtype)
    lower, n = code_grid(bits_t, signed, zp)
    a = alpha.expand(x_shape)
    x = torch.randn(x_shape, generator=gen, dtype=dtype) * 1.3 * a
    k = torch.randint(int(torch.floor(lower * n)), int(n), x_shape, generator=gen).to(dtype)
    pick = torch.arange(x.numel()).reshape(x_shape) % 8
    step = alpha / n
    noise_lower = -zp * step if zp is not None else (-alpha if signed else torch.zeros_like(alpha))
    x = torch.where(pick == 0, a, x)
    x = torch.where(pick == 1, lower * a, x)  # hard's bottom: x / alpha == lower
    x = torch.where(pick == 2, noise_lower.expand(x_shape), x)  # the noise proxy's bottom
    x = torch.where(pick == 3, (k + 0.5) / n * a, x)  # v = k + 0.5: a rounding tie
    x = torch.where(pick == 4, -a, x)
    return x, alpha, bits_t, signed, zp


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _assert_equal(fused, reference):
    """Equal to the last bit: compiled steps run the composed functions and must match eager ones."""
    for f, r in zip(fused, reference):
        assert f.shape == r.shape and f.dtype == r.dtype
        assert torch.equal(f, r), (f - r).abs().max()


@pytest.mark.parametrize("bits", [3.0, 3.3])
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hard_matches_the_composed_function_on_edges_and_ties(layout, grid, bits):
    x, alpha, b, signed, zp = _case(layout, grid, bits)
    lower, n = code_grid(b, signed, zp)
    v = torch.clamp(x / alpha, min=torch.as_tensor(lower, dtype=x.dtype), max=torch.ones((), dtype=x.dtype)) * n
    assert (x == alpha).any() and (x / alpha == lower).any()
    if bits == 3.0:
        assert (v - torch.floor(v) == 0.5).sum() >= 3  # exact ties, rounded half to even
    ref_in, fused_in = _leaves(x, alpha, b), _leaves(x, alpha, b)
    ref = hard_fake_quant(*ref_in, signed, zp)
    fused = fused_hard_fake_quant(*fused_in, signed, zp)
    assert torch.equal(fused, ref)
    _assert_equal(_grads(fused, fused_in), _grads(ref, ref_in))


@pytest.mark.parametrize("bits", [3.0, 3.3])
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("source", ["stream", "counter"])
def test_noise_matches_the_composed_function_with_the_same_draw(layout, grid, bits, source):
    x, alpha, b, signed, zp = _case(layout, grid, bits)
    assert (x == alpha).any() and (x == -alpha).any()
    ref_in, fused_in = _leaves(x, alpha, b), _leaves(x, alpha, b)
    gen = torch.Generator().manual_seed(7)
    with counter_noise() if source == "counter" else contextlib.nullcontext():
        noise = sample_noise("uniform", x, alpha, b, signed, gen, zp)
        ref = noise_fake_quant(*ref_in, signed, noise, zp)
        gen.manual_seed(7)
        fused = fused_noise_fake_quant(*fused_in, signed, "uniform", gen, zp)
    after_forward = gen.get_state()
    assert torch.equal(fused, ref)
    # Backward draws the noise again, from its own copy of the state (as forward drew it,
    # from the stream or counter-based, whatever holds when backward runs): the gradients to
    # alpha and bits (which read the noise) are the reference's, and gen has not moved.
    _assert_equal(_grads(fused, fused_in), _grads(ref, ref_in))
    assert torch.equal(gen.get_state(), after_forward)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_noise_from_torchs_default_generator_is_drawn_again_without_moving_it(grid):
    x, alpha, b, signed, zp = _case("channel", grid, 4.0)
    ref_in, fused_in = _leaves(x, alpha, b), _leaves(x, alpha, b)
    torch.manual_seed(3)
    ref = noise_fake_quant(*ref_in, signed, sample_noise("uniform", x, alpha, b, signed, None, zp), zp)
    torch.manual_seed(3)
    fused = fused_noise_fake_quant(*fused_in, signed, "uniform", None, zp)
    after_forward = torch.random.get_rng_state()
    assert torch.equal(fused, ref)
    _assert_equal(_grads(fused, fused_in), _grads(ref, ref_in))
    assert torch.equal(torch.random.get_rng_state(), after_forward)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_histogram_noise_matches_the_composed_function(grid):
    x, alpha, b, signed, zp = _case("group", grid, 3.0)
    ref_in, fused_in = _leaves(x, alpha, b), _leaves(x, alpha, b)
    gen = torch.Generator().manual_seed(11)
    ref = noise_fake_quant(*ref_in, signed, sample_noise("histogram", x, alpha, b, signed, gen, zp), zp)
    gen.manual_seed(11)
    fused = fused_noise_fake_quant(*fused_in, signed, "histogram", gen, zp)
    assert torch.equal(fused, ref)
    _assert_equal(_grads(fused, fused_in), _grads(ref, ref_in))


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bf16_inputs_give_the_quantizers_former_outputs(dtype, grid):
    """What BaseQuantizer did: the composed function on ``x.float()``, cast back to x's dtype."""
    x, alpha, b, signed, zp = _case("channel", grid, 4.0, dtype=torch.float32)
    x = x.to(dtype)
    zp32 = None if zp is None else zp.float()
    ref_in, fused_in = _leaves(x, alpha, b), _leaves(x, alpha, b)
    ref = hard_fake_quant(ref_in[0].float(), *ref_in[1:], signed, zp32).to(dtype)
    fused = fused_hard_fake_quant(*fused_in, signed, zp32)
    assert fused.dtype == dtype and torch.equal(fused, ref)
    _assert_equal(_grads(fused, fused_in), _grads(ref, ref_in))
    ref_in, fused_in = _leaves(x, alpha, b), _leaves(x, alpha, b)
    gen = torch.Generator().manual_seed(5)
    noise = sample_noise("uniform", x.float(), alpha, b, signed, gen, zp32)
    ref = noise_fake_quant(ref_in[0].float(), *ref_in[1:], signed, noise, zp32).to(dtype)
    gen.manual_seed(5)
    fused = fused_noise_fake_quant(*fused_in, signed, "uniform", gen, zp32)
    assert fused.dtype == dtype and torch.equal(fused, ref)
    _assert_equal(_grads(fused, fused_in), _grads(ref, ref_in))


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_functions_keep_far_less_for_backward(dtype):
    x = torch.randn(256, 1024).to(dtype).requires_grad_()
    alpha = torch.full((256, 1), 1.5, requires_grad=True)
    bits = torch.tensor(4.0, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    input_bytes, small = x.numel() * x.element_size(), 4096

    def composed_noise():
        noise = sample_noise("uniform", x.float(), alpha, bits, True, gen)
        return noise_fake_quant(x.float(), alpha, bits, True, noise).to(dtype)

    hard = _saved_bytes(lambda: fused_hard_fake_quant(x, alpha, bits, True))
    noise = _saved_bytes(lambda: fused_noise_fake_quant(x, alpha, bits, True, "uniform", gen))
    reference_hard = _saved_bytes(lambda: hard_fake_quant(x.float(), alpha, bits, True).to(dtype))
    reference_noise = _saved_bytes(composed_noise)
    assert hard <= input_bytes + small < reference_hard  # the input itself (shared with its layer)
    assert noise <= x.numel() + small < reference_noise  # one byte per element
    assert reference_noise >= 8 * x.numel()


def _reference_quantizer_forward(q: NIPQQuantizer, x: torch.Tensor, gen: Optional[torch.Generator]) -> torch.Tensor:
    """NIPQQuantizer's training forward in noise mode as it was composed, drawing in the same order."""
    bits = q.bits(stochastic=q.stochastic_bits)
    zp = q.zero_point_code(bits)
    alpha = q.alpha
    view = grouped_view(x.float(), q.granularity)
    noise = sample_noise(q.noise, view, alpha.detach(), bits.detach(), q.signed, gen, zp)
    return noise_fake_quant(view, alpha, bits, q.signed, noise, zp).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"signed": True, "granularity": "channel", "range_shape": (16, 1)},
        {"signed": True, "granularity": 8, "range_shape": (16, 4, 1)},
        {"signed": False, "negative_share": 0.2},
        {"signed": False, "noise": "histogram"},
    ],
)
def test_nipq_quantizer_in_noise_mode_gives_its_former_outputs_and_gradients(kwargs, dtype):
    torch.manual_seed(0)
    shape = (16, 32)  # a Linear's weight, or a batch of its inputs
    fused_q = NIPQQuantizer(min_bits=2, max_bits=6, init_bits=4.4, init_alpha=1.2, **kwargs).train()
    ref_q = NIPQQuantizer(min_bits=2, max_bits=6, init_bits=4.4, init_alpha=1.2, **kwargs).train()
    ref_q.load_state_dict(fused_q.state_dict())
    x = torch.randn(shape).to(dtype)
    x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused_q.generator = torch.Generator().manual_seed(21)
    gen = ref_q.generator = torch.Generator().manual_seed(21)
    fused = fused_q(x_fused)
    ref = _reference_quantizer_forward(ref_q, x_ref, gen)
    assert fused.dtype == dtype and torch.equal(fused, ref)
    assert torch.equal(fused_q.generator.get_state(), gen.get_state())  # the same draws, in the same order
    target = torch.randn(shape)
    (fused.float() * target).sum().backward()
    (ref.float() * target).sum().backward()
    assert torch.equal(fused_q.generator.get_state(), gen.get_state())
    _assert_equal([x_fused.grad, *(p.grad for p in fused_q.parameters())], [x_ref.grad, *(p.grad for p in ref_q.parameters())])


def test_quantizers_keep_the_composed_path_without_autograd():
    q = NIPQQuantizer(fixed_bits=4, min_bits=4, max_bits=4, init_alpha=1.0).train()
    x = torch.randn(64, 8)
    q.generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        without = q(x)
    q.generator = torch.Generator().manual_seed(1)
    assert torch.equal(q(x), without)
    lsq = LSQQuantizer(bits=3, signed=False, init_alpha=1.0, negative_share=0.25).train()
    x = torch.randn(64, 8, requires_grad=True)
    fused = lsq(x)
    with torch.no_grad():
        assert torch.equal(fused, lsq(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lsq_quantizer_gives_the_composed_paths_outputs_and_gradients(monkeypatch, dtype):
    torch.manual_seed(0)
    q = LSQQuantizer(bits=3, signed=False, init_alpha=1.0, negative_share=0.25, granularity="channel", range_shape=(8, 1))
    x = (torch.randn(8, 40) * 0.8).to(dtype)
    target = torch.randn(8, 40)
    results = []
    for fused in (True, False):
        monkeypatch.setattr("lightning_nipq.quant.lsq_quantizer.use_fused", lambda *tensors, on=fused: on)
        q.zero_grad()
        leaf = x.clone().requires_grad_()
        out = q(leaf)
        (out.float() * target).sum().backward()
        results.append([out, leaf.grad, q.step.grad.clone()])
    _assert_equal(*results)


# ---------------------------------------------------------------------- recomputed outputs


def _quantized_convs(config, mode: str) -> torch.nn.Module:
    """Two fake-quantized convolutions and a linear layer, calibrated, in ``mode``, each quantizer with its own generator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)
    )
    attach_quantizers(model, config)
    calibrate_activations(model, [torch.randn(16, 3, 8, 8)], lambda batch: model(batch))
    for index, (_, quantizer) in enumerate(quantizers(model)):
        if isinstance(quantizer, NIPQQuantizer):
            quantizer.mode = mode
            quantizer.generator = torch.Generator().manual_seed(index)
    return model.train()


def _step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, keep: bool):
    """Output, input and parameter gradients, bytes saved for backward (seen by an outer hook), generator states."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.clone().requires_grad_()
    with contextlib.ExitStack() as stack:
        if keep:
            stack.enter_context(kept_fake_quant_outputs())
        if dtype == torch.bfloat16:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        out = model(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    states = [q.generator.get_state() for _, q in quantizers(model) if getattr(q, "generator", None) is not None]
    return out, grads, sum(saved.values()), states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "method, mode, source",
    [("nipq", "noise", "stream"), ("nipq", "noise", "counter"), ("nipq", "hard", "stream"), ("lsq", "hard", "stream")],
)
def test_layers_recompute_their_quantized_input_in_backward_to_the_bit(method, mode, source, dtype):
    config = LSQConfig() if method == "lsq" else NIPQConfig()
    x = torch.randn(32, 3, 8, 8)
    recomputed, kept = _quantized_convs(config, mode), _quantized_convs(config, mode)
    with counter_noise() if source == "counter" else contextlib.nullcontext():
        out, grads, held, states = _step(recomputed, x, dtype, keep=False)
        ref_out, ref_grads, ref_held, ref_states = _step(kept, x, dtype, keep=True)
    assert torch.equal(out, ref_out)
    assert len(grads) == len(ref_grads) >= 7  # the input, weights and biases, ranges (and bits)
    _assert_equal(grads, ref_grads)
    # Backward draws the noise again from copies: the generators stand where forward left them.
    assert all(torch.equal(a, b) for a, b in zip(states, ref_states))
    # The second convolution's quantized input alone: 32 x 8 x 6 x 6 elements.
    assert ref_held - held >= 32 * 8 * 6 * 6 * (2 if dtype == torch.bfloat16 else 4)


def test_an_input_modified_in_place_after_the_layer_used_it_is_refused_in_backward():
    model = _quantized_convs(NIPQConfig(), "noise")
    hidden = model[1](model[0](torch.randn(4, 3, 8, 8)))
    out = model[2](hidden)
    hidden.add_(1.0)  # the float input the quantized one would be computed again from
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_recomputation_works_inside_activation_checkpointing():
    # Hard mode: checkpointing runs forward again, which would draw new noise from the quantizers' generators.
    x = torch.randn(8, 3, 8, 8)
    checkpointed, plain = _quantized_convs(NIPQConfig(), "hard"), _quantized_convs(NIPQConfig(), "hard")
    out = torch.utils.checkpoint.checkpoint(checkpointed, x, use_reentrant=False)
    out.square().sum().backward()
    plain(x).square().sum().backward()
    _assert_equal([p.grad for p in checkpointed.parameters()], [p.grad for p in plain.parameters()])


def test_recomputation_works_under_offloading_hooks():
    # save_on_cpu packs copies: the float input the quantized one is computed from comes back as one.
    x = torch.randn(8, 3, 8, 8)
    offloaded, plain = _quantized_convs(NIPQConfig(), "noise"), _quantized_convs(NIPQConfig(), "noise")
    with torch.autograd.graph.save_on_cpu():
        out = offloaded(x)
    out.square().sum().backward()
    plain(x).square().sum().backward()
    _assert_equal([p.grad for p in offloaded.parameters()], [p.grad for p in plain.parameters()])
