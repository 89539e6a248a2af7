"""Counter-based uniform noise: its distribution, its dependence on the key alone, and where it is used."""

import pytest
import torch

from lightning_nipq.quant.noise import (
    COUNTER_NOISE_LEVELS,
    counter_noise,
    counter_noise_enabled,
    counter_uniform_noise,
    draw_noise_key,
    sample_noise,
    uniform_noise,
)

CPU = torch.device("cpu")


def _key(seed: int) -> torch.Tensor:
    return draw_noise_key(torch.Generator().manual_seed(seed), CPU)


def test_counter_noise_lies_on_its_grid_inside_the_half_open_unit_and_takes_the_input_shape() -> None:
    for shape in [(), (0,), (7,), (3, 5, 2)]:
        like = torch.empty(shape, dtype=torch.bfloat16)
        noise = counter_uniform_noise(like, _key(0))
        assert noise.shape == like.shape and noise.dtype == torch.float32
    noise = counter_uniform_noise(torch.empty(100_000), _key(0))
    assert float(noise.min()) > -0.5 and float(noise.max()) < 0.5
    levels = (noise + 0.5) * COUNTER_NOISE_LEVELS - 0.5
    assert torch.equal(levels, levels.round()), "every value is (k + 0.5) / 2**23 - 0.5"


def test_counter_noise_is_uniform_and_uncorrelated_between_neighbours() -> None:
    n = 1 << 20
    noise = counter_uniform_noise(torch.empty(n), _key(1)).double()
    assert abs(float(noise.mean())) < 4 * (1 / 12 / n) ** 0.5
    assert float(noise.var()) == pytest.approx(1 / 12, rel=0.01)
    # Chi-square over 64 equal bins: 63 degrees of freedom, 99.99th percentile about 118.
    counts = torch.histc(noise, bins=64, min=-0.5, max=0.5)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 118
    for lag in (1, 2, 4096):
        r = torch.corrcoef(torch.stack([noise[:-lag], noise[lag:]]))[0, 1]
        assert abs(float(r)) < 0.01


def test_consecutive_pairs_and_draws_with_consecutive_keys_are_uniform_together() -> None:
    # Chi-square on a 16 x 16 grid: 255 degrees of freedom, 99.99th percentile about 346.
    def chi2(a: torch.Tensor, b: torch.Tensor) -> float:
        cells = ((a + 0.5) * 16).long() * 16 + ((b + 0.5) * 16).long()
        counts = torch.bincount(cells, minlength=256).double()
        expected = a.numel() / 256
        return float(((counts - expected) ** 2 / expected).sum())

    noise = counter_uniform_noise(torch.empty(1 << 18), _key(2))
    assert chi2(noise[0::2], noise[1::2]) < 346
    # The same elements under the keys a generator gives one draw after another.
    generator = torch.Generator().manual_seed(4)
    draws = torch.stack([counter_uniform_noise(torch.empty(64), draw_noise_key(generator, CPU)) for _ in range(2048)])
    assert chi2(draws[:-1].flatten(), draws[1:].flatten()) < 346


def test_the_noise_depends_on_the_key_alone_and_keys_one_apart_do_not_shift_the_sequence() -> None:
    like = torch.empty(4096)
    key = torch.tensor([12345, 678], dtype=torch.int32)
    assert torch.equal(counter_uniform_noise(like, key), counter_uniform_noise(torch.empty(64, 64), key).flatten())
    base = counter_uniform_noise(like, key)
    for other in ([12346, 678], [12345, 679], [-12345, 678]):
        noise = counter_uniform_noise(like, torch.tensor(other, dtype=torch.int32))
        assert abs(float(torch.corrcoef(torch.stack([base, noise]))[0, 1])) < 0.1
        # Adding one to the counter's offset must not give the same sequence moved by one element.
        assert not torch.equal(noise[:-1], base[1:])
        assert (noise[:-1] == base[1:]).float().mean() < 0.01


def test_keys_come_from_the_generator_which_they_advance() -> None:
    generator = torch.Generator().manual_seed(3)
    first, second = draw_noise_key(generator, CPU), draw_noise_key(generator, CPU)
    assert first.dtype == torch.int32 and first.shape == (2,)
    assert not torch.equal(first, second)
    generator.manual_seed(3)
    assert torch.equal(draw_noise_key(generator, CPU), first)


def test_sample_noise_draws_from_the_stream_unless_counter_noise_is_on() -> None:
    x = torch.randn(1000)
    alpha, bits = torch.tensor(1.0), torch.tensor(4.0)
    generator = torch.Generator()
    assert not counter_noise_enabled()
    generator.manual_seed(0)
    assert torch.equal(sample_noise("uniform", x, alpha, bits, True, generator), uniform_noise(x, generator.manual_seed(0)))
    with counter_noise():
        assert counter_noise_enabled()
        generator.manual_seed(0)
        drawn = sample_noise("uniform", x, alpha, bits, True, generator)
    assert not counter_noise_enabled()
    assert torch.equal(drawn, counter_uniform_noise(x, _key(0)))


def test_counter_noise_refuses_more_elements_than_its_counter_holds() -> None:
    huge = torch.empty(()).expand(1 << 16, 1 << 15)  # 2**31 elements, no memory
    with pytest.raises(RuntimeError, match="at most 2\\*\\*31 - 1 elements"):
        counter_uniform_noise(huge, _key(0))
