"""`BaseQuantizer`: what every quantizer shares with the code around it.

Attaching, calibration, the bit budget, the conversion to integers, the report and
checkpoints only read the interface defined here: whole bits (`rounded_bits`, `bits`,
`continuous_bits`, `frozen_bits`), the range (`alpha`, `signed`, `set_range`), the
calibration state, the sizes, the configuration (`config`) and ``_extra_state``. A
quantizer method (NIPQ, LSQ) fills in how its parameters give bits and range and how it
quantizes.

Every quantizer carries its whole configuration: `config` returns its constructor
settings, they are checked in one place (`check_config`) whether they come from the
constructor, from `configure` or from a saved state, and ``_extra_state`` saves them with
the method's name, so a loader rebuilds exactly the quantizer that was saved
(`lightning_nipq.quant.methods.quantizer_from_state`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nipq.quant.codes import MIN_SIGNED_BITS, check_bit_width, check_negative_share, check_zero_point_rule
from lightning_nipq.quant.fake_quant import code_grid, round_ste, zero_point
from lightning_nipq.quant.granularity import check_granularity, check_range_shape, granularity_name, grouped_view

#: The settings every quantizer has besides its method's: how many ranges it keeps (see
#: `lightning_nipq.quant.granularity`). A saved state without them is per tensor.
LAYOUT_KEYS: tuple[str, ...] = ("granularity", "range_shape")
#: The settings of an input's zero point, optional too: ``zero_point`` (what calibration does,
#: ``"off"`` or ``"auto"``, see `lightning_nipq.quant.codes.ZERO_POINT_RULES`) and
#: ``negative_share`` (the calibrated share ``f`` of the range below zero; 0: no zero point).
#: A saved state without them has no zero point.
ZERO_POINT_KEYS: tuple[str, ...] = ("zero_point", "negative_share")


def logistic_bit_width(logit: Tensor, low: Union[float, Tensor], high: Union[float, Tensor]) -> Tensor:
    """Learned bits ``low + (high - low) * sigmoid(logit)``: in ``(low, high)`` whatever the logit (see `BaseQuantizer.logistic_bits`).

    ``logit`` is one quantizer's or, with ``low`` and ``high`` tensors alike, a vector of them.
    """
    return low + (high - low) * torch.sigmoid(logit)


def whole_bits(bits: Tensor, lowest: Union[int, Tensor], highest: Union[int, Tensor]) -> Tensor:
    """``bits`` rounded to whole bits within ``[lowest, highest]``, with a straight-through gradient (`BaseQuantizer.bits`)."""
    return torch.clamp(round_ste(bits), lowest, highest)


#: A common shift of the bit logits smaller than this is the budget search's own resolution,
#: not a move: `shift_logits` leaves the logits as they are.
SHIFT_RESOLUTION = 1e-6


@torch.no_grad()
def shift_logits(logits: list[Tensor], delta: Tensor) -> None:
    """Lower each of ``logits`` (parameters, in place) by ``delta``, unless ``|delta|`` is below `SHIFT_RESOLUTION`."""
    if not logits:
        return
    delta = delta.to(logits[0].device, torch.float32)
    delta = torch.where(delta.abs() < SHIFT_RESOLUTION, torch.zeros_like(delta), delta)
    by_dtype: dict[torch.dtype, Tensor] = {}
    for logit in logits:
        if logit.dtype not in by_dtype:
            by_dtype[logit.dtype] = delta.to(logit.dtype)
        logit.sub_(by_dtype[logit.dtype])


@torch.compiler.disable
def _observe(observer: Any, quantizer: "BaseQuantizer", x: Tensor) -> None:
    # Calibration keeps Python statistics; traced, every value would be a guard and a
    # recompile. Under torch.compile it runs eagerly, at the cost of a graph break.
    observer.observe(quantizer, x)


def check_bit_range(min_bits: Any, max_bits: Any) -> None:
    """Raise a `ValueError` unless ``MIN_BITS <= min_bits <= max_bits <= MAX_BITS`` in whole numbers."""
    check_bit_width("min_bits", min_bits)
    check_bit_width("max_bits", max_bits)
    if max_bits < min_bits:
        raise ValueError(f"need min_bits <= max_bits, got min_bits={min_bits}, max_bits={max_bits}")


#: What to do about a saved state that fails its checks, for the messages that refuse it.
DAMAGED_STATE_FIX = (
    "The state dict was damaged or edited after it was saved; load an intact copy (or save the trained model again)"
)


class BaseQuantizer(nn.Module):
    """A quantizer of one tensor onto symmetric signed or unsigned integer codes.

    Codes are ``[-n, n]`` with ``n = 2**(b-1) - 1`` (signed) or ``[0, 2**b - 1]``
    (unsigned), and the range is ``[-alpha, alpha]`` or ``[0, alpha]``. An unsigned
    quantizer with a ``negative_share`` ``f > 0`` has a zero point ``z = round(f * (2**b - 1))``
    (`zero_point_code`) and the range ``[-z * s, alpha]`` with the step ``s = alpha / (2**b - 1 - z)``
    (see `lightning_nipq.quant.fake_quant`). Subclasses
    provide `alpha`, `continuous_bits`, `set_range`, ``_quantize`` (the calibrated
    forward: it takes the input in its own dtype, float64 narrowed to float32, and rounds in
    float32) and ``_parameters_in_use`` (a tensor touching every parameter).

    Args:
        config: the method's settings (`config`), checked by `check_config`: at least
            ``signed`` (codes in ``[-alpha, alpha]`` rather than ``[0, alpha]``).
        calibrated: ``False`` makes the quantizer pass its input through (and record it with
            an attached observer) until `set_range` is called.
    """

    #: Names the method in checkpoints and manifests.
    kind: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any], calibrated: bool) -> None:
        super().__init__()
        self.frozen_bits: Optional[int] = None
        self._apply_config(self.check_config(config))
        self.calibrated = bool(calibrated)
        #: Set by the NIPQ callback during the anneal; quantizers without modes ignore it.
        self.blend_modes = False
        #: Elements quantized per forward (weights: the tensor; activations: one batch's input),
        #: the weight of this quantizer in the average bit-width.
        self.size = 0
        #: Multiply-accumulates of the layer whose weight this quantizes, for the BOPs budget.
        self.macs = 0
        self.observer: Optional[Any] = None
        #: A list (set by the callback while it calibrates) makes compiled code keep the
        #: inputs here instead of calling the observer, which would break the graph; the
        #: callback hands them over after each step with `flush_observations`.
        self.deferred_observations: Optional[list[Tensor]] = None
        #: Random source of quantizers that draw noise (None: torch's global one). The
        #: callbacks set it on every quantizer.
        self.generator: Optional[torch.Generator] = None
        #: For input quantizers: ``True`` keeps the input float (the quantizer passes it through and
        #: is never calibrated), ``False`` quantizes it, ``None`` lets calibration decide by data
        #: flow: an input that is the model's own input on the first calibration batch stays float.
        self.stays_float: Optional[bool] = False

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, Any]:
        """The settings that define this quantizer: its constructor arguments, less the starting values."""
        return {key: getattr(self, key) for key in (*self.config_keys, *LAYOUT_KEYS, *ZERO_POINT_KEYS)}

    #: The names of the settings `config` returns; each is an attribute of the quantizer.
    config_keys: ClassVar[tuple[str, ...]] = ("signed", "min_bits", "max_bits")

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` checked and normalised, or a `ValueError` naming the setting and the fix.

        The one check of every setting: the constructor, `configure` and loading a saved
        state all pass through it. Methods extend it for their own settings.
        """
        required = set(cls.config_keys)
        if not isinstance(config, Mapping) or not required <= set(config) <= required | set(LAYOUT_KEYS) | set(ZERO_POINT_KEYS):
            got = sorted(config) if isinstance(config, Mapping) else type(config).__name__
            raise ValueError(
                f"a {cls.kind or cls.__name__} quantizer's settings are {sorted(cls.config_keys)} "
                f"(and optionally {list(LAYOUT_KEYS + ZERO_POINT_KEYS)}), got {got}"
            )
        config = dict(config)
        config["granularity"] = check_granularity("granularity", config.get("granularity", "tensor"))
        config["range_shape"] = check_range_shape(config["granularity"], config.get("range_shape", ()))
        if not isinstance(config["signed"], bool):
            raise ValueError(f"signed must be True or False, got {config['signed']!r}")
        if "min_bits" in config:
            check_bit_range(config["min_bits"], config["max_bits"])
        config["zero_point"] = check_zero_point_rule("zero_point", config.get("zero_point", "off"))
        config["negative_share"] = check_negative_share("negative_share", config.get("negative_share", 0.0))
        if config["negative_share"] > 0 and config["signed"]:
            raise ValueError(
                f"negative_share={config['negative_share']} gives the codes a zero point, which goes with unsigned codes; "
                "pass signed=False with it (or negative_share=0 for symmetric signed codes)"
            )
        return dict(config)

    @classmethod
    def bit_range(cls, config: Mapping[str, Any]) -> tuple[int, int]:
        """``(min_bits, max_bits)`` of a checked configuration."""
        return config["min_bits"], config["max_bits"]

    def _apply_config(self, config: Mapping[str, Any]) -> None:
        for key in (*self.config_keys, *LAYOUT_KEYS, *ZERO_POINT_KEYS):
            setattr(self, key, config[key])

    def _check_layout_unchanged(self, config: Mapping[str, Any]) -> None:
        # The range parameters have the range shape: it is fixed when the quantizer is built.
        if "range_shape" in self.__dict__ and (config["granularity"], config["range_shape"]) != (
            self.granularity,
            self.range_shape,
        ):
            raise ValueError(
                f"a quantizer's granularity is fixed when it is built: this one is {granularity_name(self.granularity)} "
                f"with ranges {self.range_shape}, not {granularity_name(config['granularity'])} with {config['range_shape']}"
            )

    def configure(self, **settings: Any) -> None:
        """Change some settings (checked as the constructor checks them), keeping the others; not the granularity."""
        config = self.check_config({**self.config(), **settings})
        self._check_layout_unchanged(config)
        self._apply_config(config)

    @property
    def ranges(self) -> int:
        """How many ranges this quantizer keeps (1 per tensor; the channels or groups otherwise)."""
        return math.prod(self.range_shape)

    # ------------------------------------------------------------------ for subclasses
    @property
    def alpha(self) -> Tensor:
        """The truncation: the largest magnitude the codes represent (the top of the range with a zero point)."""
        raise NotImplementedError

    def continuous_bits(self) -> Tensor:
        """The bit-width before rounding (the frozen value once frozen)."""
        raise NotImplementedError

    def set_range(self, alpha: Union[float, Tensor], signed: bool, negative_share: float = 0.0) -> None:
        """Set the truncation (a number, or a tensor of ``range_shape``), signedness and zero point, and start quantizing.

        ``negative_share`` (with ``signed=False``) is the share ``f`` of the range below zero:
        the codes get the zero point `zero_point_code`. 0 leaves plain signed or unsigned codes.
        """
        raise NotImplementedError

    def _grid_config(self, signed: bool, negative_share: float) -> dict[str, Any]:
        # The checked configuration with a new sign and zero point, for set_range to apply
        # once the range is accepted too: a refused call changes nothing.
        config = self.check_config({**self.config(), "signed": bool(signed), "negative_share": negative_share})
        self._check_layout_unchanged(config)
        return config

    def _quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _parameters_in_use(self) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        """Always ``"hard"``: straight-through fake quantization. NIPQ adds a ``"noise"`` mode."""
        return "hard"

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode != "hard":
            raise ValueError(f"{type(self).__name__} has only the 'hard' mode, got {mode!r}")

    # ------------------------------------------------------------------ bits
    @property
    def lowest_bits(self) -> int:
        return max(self.min_bits, MIN_SIGNED_BITS) if self.signed else self.min_bits

    @property
    def learns_bits(self) -> bool:
        return self.frozen_bits is None

    @property
    def highest_bits(self) -> int:
        # A 1-bit quantizer whose input turned out signed is promoted to 2 bits, the least
        # symmetric codes need (clamping to 1 would leave n = 0 levels and divide by zero).
        return max(self.max_bits, self.lowest_bits)

    def _whole_bits(self, bits: Tensor) -> Tensor:
        return whole_bits(bits, self.lowest_bits, self.highest_bits)

    def frozen_whole_bits(self) -> Optional[int]:
        """The whole bits `bits` gives once frozen, as a Python integer without tensor work; None while they learn."""
        if self.frozen_bits is None:
            return None
        return min(max(self.frozen_bits, self.lowest_bits), self.highest_bits)

    def bits(self, stochastic: bool = False) -> Tensor:
        """Whole bits with a straight-through gradient to the continuous bits."""
        return self._whole_bits(self.continuous_bits())

    def rounded_bits(self) -> int:
        """The bit-width eval mode uses now, as a Python integer."""
        frozen = self.frozen_whole_bits()
        return frozen if frozen is not None else int(self.bits().detach().item())

    def logistic_bits(self) -> tuple[Tensor, float, float]:
        """``(logit, low, high)`` with the learned bits ``low + (high - low) * sigmoid(logit)``.

        What moves all learned bits together (`lightning_nipq.training.BitBudget.project`);
        only methods that learn their bits have it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not learn its bits")

    def shift_bit_logit(self, delta: Tensor) -> None:
        """Lower the logit of `logistic_bits` by ``delta`` (the learned bits move within their range)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn its bits")

    def freeze_bits(self, bits: Optional[int] = None) -> None:
        """Freeze the bit-width at ``bits`` (by default the current rounded bits)."""
        value = self.rounded_bits() if bits is None else int(bits)
        # Signed codes below 2 bits are promoted to 2 when used (see highest_bits).
        if not self.min_bits <= value <= self.highest_bits:
            raise ValueError(f"cannot freeze at {value} bits: this quantizer's range is [{self.min_bits}, {self.highest_bits}]")
        self.frozen_bits = value

    def step_size(self) -> Tensor:
        """``alpha / n`` at the current rounded bits (``alpha / (N - z)`` with a zero point)."""
        bits = self.bits()
        return self.alpha / code_grid(bits, self.signed, self.zero_point_code(bits))[1]

    # ------------------------------------------------------------------ zero point
    @property
    def has_zero_point(self) -> bool:
        """Whether the codes have a zero point (calibration gave the input a negative share)."""
        return self.negative_share > 0

    def zero_point_code(self, bits: Optional[Tensor] = None) -> Optional[Tensor]:
        """The zero point at ``bits`` (by default the current rounded bits) as a float tensor, or None without one.

        ``round(negative_share * (2**bits - 1))`` (`lightning_nipq.quant.fake_quant.zero_point`):
        the quantizer keeps the share, so its zero point follows the bits it learns.
        """
        if self.negative_share == 0:
            return None
        return zero_point(self.bits() if bits is None else bits, self.negative_share)

    def codes_name(self) -> str:
        """``signed``, ``unsigned``, or ``unsigned, zero point 37 (share 0.145)`` (at the current bits), for ``repr``."""
        if not self.has_zero_point:
            return "signed" if self.signed else "unsigned"
        code = self.zero_point_code()
        assert code is not None
        return f"unsigned, zero point {int(code)} (share {self.negative_share:.3g})"

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.passes_through:
            # Zero-weighted use of the parameters: DDP expects their gradients.
            return self.passed_through(x) + self.zero_weighted_parameters().to(x.dtype)
        # ``_quantize`` rounds in float32 (in bf16 a 4-bit grid is already coarser than the data)
        # but takes a narrower input as it is: a float32 copy made here would be kept for backward.
        narrow = x.float() if x.dtype == torch.float64 else x
        return self._quantize(grouped_view(narrow, self.granularity)).reshape(x.shape).to(x.dtype)

    @property
    def passes_through(self) -> bool:
        """Whether `forward` gives its input back unchanged: the input stays float, or its range is still being measured."""
        return bool(self.stays_float) or not self.calibrated

    def passed_through(self, x: Tensor) -> Tensor:
        """``x`` as it is, observed first while the range is being measured: `forward` when `passes_through`, without the parameters' zero-weighted use.

        For a caller that gives the parameters their (zero) part in the loss some other way:
        a layer whose input is data keeps it out of autograd (see
        `lightning_nipq.layers.QuantizedLayerMixin`).
        """
        if not self.stays_float and self.training and self.observer is not None:
            if self.deferred_observations is not None and torch.compiler.is_compiling():
                # A graph break here would outlive calibration: Dynamo keeps the split
                # graph for as long as the guards before the break hold.
                self.deferred_observations.append(x.detach())
            else:
                _observe(self.observer, self, x)
        return x

    def zero_weighted_parameters(self) -> Tensor:
        """A scalar zero that every parameter takes part in: added to an output, it gives each a zero gradient.

        DDP's reducer waits for a gradient of every parameter that requires one; a quantizer
        that passes its input through would otherwise give none.
        """
        return self._parameters_in_use() * 0.0

    def flush_observations(self) -> None:
        """Give the observer the inputs that compiled code deferred (see ``deferred_observations``)."""
        if not self.deferred_observations:
            return
        pending = list(self.deferred_observations)
        self.deferred_observations.clear()  # in place: the compiled code holds this list
        if self.observer is not None:
            for x in pending:
                self.observer.observe(self, x)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": self.config(),
            "frozen_bits": self.frozen_bits,
            "calibrated": self.calibrated,
            "size": self.size,
            "macs": self.macs,
            "stays_float": self.stays_float,
        }

    def set_extra_state(self, state: Any) -> None:
        config, rest = self.check_state(state)
        self._check_layout_unchanged(config)
        self._apply_config(config)
        self.frozen_bits, self.calibrated, self.size, self.macs = rest
        # Absent in states saved before inputs could be left float by data flow: quantized.
        self.stays_float = state.get("stays_float", False)

    @classmethod
    def check_state(cls, state: Any) -> tuple[dict[str, Any], tuple[Optional[int], bool, int, int]]:
        """The checked configuration and ``(frozen_bits, calibrated, size, macs)`` of a saved ``_extra_state``.

        Raises:
            ValueError: the state is not this method's, or a value is out of range.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("config"), Mapping):
            raise ValueError(
                f"not the saved state of a lightning-nipq quantizer (no 'config' entry): {type(state).__name__}; "
                "it may come from an older lightning-nipq, whose checkpoints this version does not read"
            )
        if state.get("kind") != cls.kind:
            raise ValueError(f"the saved state is of a {state.get('kind')!r} quantizer, not {cls.kind!r}")
        config = cls.check_config(state["config"])
        low, high = cls.bit_range(config)
        if config["signed"]:
            high = max(high, MIN_SIGNED_BITS)
        frozen = state.get("frozen_bits")
        if frozen is not None and (isinstance(frozen, bool) or not isinstance(frozen, int) or not low <= frozen <= high):
            raise ValueError(f"frozen_bits={frozen!r} lies outside the quantizer's bits [{low}, {high}]")
        calibrated = state.get("calibrated")
        if not isinstance(calibrated, bool):
            raise ValueError(f"calibrated must be True or False, got {calibrated!r}")
        stays_float = state.get("stays_float", False)
        if stays_float is not None and not isinstance(stays_float, bool):
            raise ValueError(f"stays_float must be True, False or None, got {stays_float!r}")
        if stays_float and calibrated:
            raise ValueError("a quantizer whose input stays float is never calibrated, but the state says calibrated=True")
        counts = []
        for name in ("size", "macs"):
            value = state.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
            counts.append(value)
        return config, (frozen, calibrated, counts[0], counts[1])

    @classmethod
    def check_weight_config(cls, config: Mapping[str, Any]) -> None:
        """Raise a `ValueError` unless a checked configuration can quantize a weight.

        Weights take both signs, so their codes are signed, and signed codes need at least
        ``MIN_SIGNED_BITS`` bits (a quantizer whose bits cannot reach 2 is no weight quantizer).
        """
        if not config["signed"]:
            raise ValueError("a weight quantizer must be signed (weights take both signs), got signed=False")
        _, high = cls.bit_range(config)
        check_bit_width("a weight quantizer's highest bits (max_bits)", high, signed=True)

    def check_saved_parameters(self, state_dict: Mapping[str, Any], prefix: str, config: Mapping[str, Any]) -> None:
        """Raise a `ValueError` naming the key unless this quantizer's parameters in ``state_dict`` can be loaded.

        Each saved parameter (``prefix + name``; absent ones are the strict load's to report)
        must be a finite float tensor of the parameter's shape, and together they must give a
        finite, positive range under the saved checked ``config`` (`_check_saved_range`): a NaN
        or infinite parameter would make every output of the layer NaN without an error.
        """
        values: dict[str, Tensor] = {}
        for name, parameter in self._parameters.items():
            key = prefix + name
            if key not in state_dict or parameter is None:
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{key} must be a float tensor, got {got}")
            if value.shape != parameter.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, this quantizer's {name} {tuple(parameter.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{key} is not finite ({shown_value(value)})")
            values[name] = value
        problem = self._check_saved_range(values, config)
        if problem is not None:
            raise ValueError(f"{prefix}{problem}")

    @classmethod
    def _check_saved_range(cls, values: Mapping[str, Tensor], config: Mapping[str, Any]) -> Optional[str]:
        """What is wrong with the range the finite saved parameters ``values`` give, or None.

        The message starts with the parameter's name (the caller prefixes the key). Methods
        whose parameters can give a zero or infinite range override it.
        """
        return None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A float checkpoint has none of our keys: keep the quantizer as attached and
        # calibrated instead of failing a strict load, so a float checkpoint still loads.
        if not any(key.startswith(prefix) for key in state_dict):
            return
        # Checked before torch copies the first tensor: an invalid state never half-loads.
        extra_key = prefix + "_extra_state"
        try:
            config = self.check_state(state_dict[extra_key])[0] if extra_key in state_dict else self.config()
        except ValueError as e:
            raise ValueError(f"{extra_key}: {e}. {DAMAGED_STATE_FIX}") from e
        try:
            self._check_layout_unchanged(config)
        except ValueError as e:
            raise ValueError(
                f"{extra_key}: {e}; rebuild the quantizer from the saved state "
                "(lightning_nipq.quant.quantizer_from_state) or load the checkpoint with load_nipq_checkpoint"
            ) from e
        try:
            self.check_saved_parameters(state_dict, prefix, config)
        except ValueError as e:
            raise ValueError(f"{e}. {DAMAGED_STATE_FIX}") from e
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def shown_value(value: Tensor) -> str:
    """A saved tensor for a message: the number itself when it is one."""
    first = value.reshape(-1)[:1]
    if value.numel() == 1 or (value.numel() and bool((value == first).all())):
        return f"{float(first):g}"  # one number, or the same number in every range
    return f"a tensor of shape {tuple(value.shape)}"


def shown_range(alpha: Tensor) -> str:
    """A range for ``repr``: the number, or the span of per-channel or per-group ranges."""
    alpha = alpha.detach()
    if alpha.numel() == 1:
        return f"{float(alpha):.4g}"
    return f"{float(alpha.min()):.4g}..{float(alpha.max()):.4g} ({alpha.numel()} ranges)"


def inverse_softplus(y: Union[float, Tensor]) -> Union[float, Tensor]:
    """The ``x`` with ``softplus(x) == y`` (``y > 0``), for a number or elementwise for a tensor."""
    if isinstance(y, Tensor):
        y = y.double()
        return torch.where(y > 20.0, y, torch.log(torch.expm1(y.clamp_max(20.0)))).float()
    if y > 20.0:
        return y
    return math.log(math.expm1(y))
