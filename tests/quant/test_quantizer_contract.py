"""The contract every quantizer method must pass: its settings travel with its state, `set_range`,
freezing, and an exact integer conversion. A new method is added to METHODS."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nipq import LSQQuantizer, NIPQQuantizer
from lightning_nipq.layers import kind_of
from lightning_nipq.quant import QUANTIZER_METHODS, quantizer_from_state

#: Per method: a quantizer with every setting away from its default, and one more setting to change.
METHODS = {
    "nipq": (
        lambda: NIPQQuantizer(signed=False, min_bits=3, max_bits=6, noise="histogram", stochastic_bits=False, init_alpha=0.8),
        {"noise": "uniform"},
    ),
    "lsq": (lambda: LSQQuantizer(bits=3, signed=False, per_sample=True, init_alpha=0.8), {"per_sample": False}),
}


def test_every_method_is_under_contract():
    assert set(METHODS) == set(QUANTIZER_METHODS)


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def test_saved_state_rebuilds_the_same_quantizer_with_its_settings(method):
    make, _ = METHODS[method]
    q = make()
    q.set_range(0.7, signed=False)
    q.size, q.macs = 96, 1234
    state = q.state_dict()
    rebuilt = quantizer_from_state(state["_extra_state"])
    rebuilt.load_state_dict(state)
    assert type(rebuilt) is type(q)
    assert rebuilt.config() == q.config() != type(q)().config()  # non-default settings, kept
    assert (rebuilt.size, rebuilt.macs, rebuilt.calibrated, rebuilt.frozen_bits) == (96, 1234, True, q.frozen_bits)
    x = torch.rand(200) * 1.5
    assert torch.equal(rebuilt.eval()(x), q.eval()(x))


def test_loading_a_state_applies_its_settings_to_a_default_quantizer(method):
    make, _ = METHODS[method]
    q = make()
    fresh = type(q)()
    fresh.load_state_dict(q.state_dict())
    assert fresh.config() == q.config()


def test_configure_checks_every_setting_once_and_keeps_the_rest(method):
    make, change = METHODS[method]
    q = make()
    before = q.config()
    q.configure(**change)
    assert q.config() == {**before, **change}
    with pytest.raises(ValueError):
        q.configure(signed="yes")
    with pytest.raises(ValueError, match="settings are"):
        q.configure(unknown=1)
    assert q.config() == {**before, **change}


def test_a_saved_state_of_another_method_or_with_bad_values_is_refused(method):
    make, _ = METHODS[method]
    q = make()
    other = next(cls for kind, cls in QUANTIZER_METHODS.items() if kind != method)()
    with pytest.raises(ValueError, match="quantizer, not"):
        q.load_state_dict(other.state_dict())
    state = q.state_dict()
    for key, bad in (("frozen_bits", 100), ("size", -1), ("calibrated", "no")):
        broken = dict(state)
        broken["_extra_state"] = {**state["_extra_state"], key: bad}
        with pytest.raises(ValueError):
            type(q)().load_state_dict(broken)
    with pytest.raises(ValueError, match="method"):
        quantizer_from_state({**state["_extra_state"], "kind": "nope"})


def test_set_range_sets_the_range_and_sign_and_starts_quantizing(method):
    make, _ = METHODS[method]
    q = make()
    q.calibrated = False
    x = torch.linspace(-2, 2, 101)
    assert torch.equal(q.train()(x), x)  # uncalibrated: passes through
    q.set_range(1.25, signed=True)
    assert q.calibrated and q.signed
    assert float(q.alpha) == pytest.approx(1.25, rel=1e-6)
    out = q.eval()(x)
    assert float(out.max()) == pytest.approx(1.25, rel=1e-6) and float(out.min()) == pytest.approx(-1.25, rel=1e-6)


def test_freezing_fixes_whole_bits(method):
    make, _ = METHODS[method]
    q = make()
    bits = q.max_bits
    q.freeze_bits(bits)
    assert not q.learns_bits and q.rounded_bits() == bits
    levels = torch.unique(q.eval()(torch.linspace(-1, 1, 1001))).numel()
    assert levels <= 2**bits
    with pytest.raises(ValueError, match="cannot freeze"):
        q.freeze_bits(q.max_bits + 1)


def test_conversion_to_integer_is_exact(method):
    make, _ = METHODS[method]
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    kind = kind_of(layer)
    weight_q = type(make())(**{**make().config(), "signed": True})
    weight_q.set_range(float(layer.weight.abs().max()) * 0.8, signed=True)
    input_q = make()
    input_q.set_range(1.2, signed=False)
    kind.install_quantizers(layer, weight_q, input_q)
    layer.eval()
    x = torch.rand(64, 12) * 1.5
    with torch.no_grad():
        fake = layer(x)
        kind.to_integer(layer)
        integer = layer(x)
    assert type(layer) is kind.integer
    assert layer.weight_bits == weight_q.rounded_bits() and layer.input_bits == input_q.rounded_bits()
    assert torch.allclose(integer, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))


def test_a_zero_point_travels_with_the_state_and_converts_exactly(method):
    make, _ = METHODS[method]
    torch.manual_seed(0)
    input_q = make()
    input_q.configure(zero_point="auto")
    input_q.set_range(1.2, signed=False, negative_share=0.25)
    assert input_q.has_zero_point and int(input_q.zero_point_code()) == round(0.25 * (2 ** input_q.rounded_bits() - 1))
    rebuilt = quantizer_from_state(input_q.state_dict()["_extra_state"])
    rebuilt.load_state_dict(input_q.state_dict())
    assert rebuilt.config() == input_q.config() and rebuilt.negative_share == 0.25 and rebuilt.zero_point == "auto"
    x = torch.rand(200) * 2.0 - 0.6
    assert torch.equal(rebuilt.eval()(x), input_q.eval()(x))
    assert float(input_q(torch.zeros(1))) == 0.0
    layer = nn.Linear(12, 5)
    kind = kind_of(layer)
    weight_q = type(make())(**{**make().config(), "signed": True})
    weight_q.set_range(float(layer.weight.abs().max()) * 0.8, signed=True)
    kind.install_quantizers(layer, weight_q, input_q)
    layer.eval()
    x = torch.rand(64, 12) * 1.5 - 0.4
    with torch.no_grad():
        fake = layer(x)
        kind.to_integer(layer)
        integer = layer(x)
    assert layer.input_zero_point == int(input_q.zero_point_code()) > 0
    assert torch.allclose(integer, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
