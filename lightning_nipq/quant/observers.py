"""`RangeObserver`: the range, sign and zero point of uncalibrated input quantizers, from the inputs they see.

While a quantizer is uncalibrated it passes its input through and hands it to the
observer watching it. When calibration ends, `RangeObserver.finish` sets each
quantizer's range by one of `lightning_nipq.quant.range_search.RANGE_METHODS` and makes it
signed if any observed value was negative, unless the quantizer's ``zero_point`` is
``"auto"`` and `wants_zero_point` holds: then its codes are unsigned with a zero point, the
range reaching down to the smallest observed value (see `lightning_nipq.quant.fake_quant`).
The range (its top, with a zero point) comes from:

* ``"percentile"``: the mean over batches of each batch's percentile of ``|x|`` (what
  NIPQ's calibration does);
* ``"minmax"``: ``max|x|`` over all batches;
* ``"mse"``: the clipping with the least quantization error, searched on a sample of
  every batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_nipq.quant.base_quantizer import BaseQuantizer
from lightning_nipq.quant.codes import MAX_NEGATIVE_SHARE
from lightning_nipq.quant.range_search import abs_percentile, check_range_method, mse_alpha, random_subset

#: Elements of each input kept per calibration batch for the MSE search (the range itself
#: and the sign come from every element).
MSE_SAMPLES_PER_BATCH = 1 << 16

#: Combines one statistic per quantizer across processes (DDP), returning the combined values.
Reducer = Callable[[Tensor], Tensor]

#: The bound of the ``zero_point="auto"`` rule (`wants_zero_point`): the magnitude of an
#: input's most negative value over its largest magnitude.
AUTO_ZERO_POINT_RATIO = 0.5


def wants_zero_point(low: float, top: float) -> bool:
    """The ``"auto"`` rule: whether an input gets a zero point, from its smallest value ``low`` and largest magnitude ``top``.

    Yes when ``low < 0`` and ``|low| <= AUTO_ZERO_POINT_RATIO * top``: the input is mostly
    positive with a small negative tail, as GELU (minimum about -0.17) and SiLU (about -0.28)
    outputs are. Symmetric signed codes spend half their levels on ``[-alpha, 0]``, which such
    an input barely uses; unsigned codes with a zero point cover ``[low, alpha]`` with all
    ``2**b`` levels, a step ``(1 + |low| / alpha) / 2`` times the symmetric one: at least 25%
    finer within the bound, and the larger ``|low|``, the less a zero point gains. Inputs
    without negative values stay unsigned (no zero point needed), and the others signed.
    """
    return low < 0.0 and -low <= AUTO_ZERO_POINT_RATIO * top


def zero_point_share(low: float, alpha: float) -> float:
    """The ``negative_share`` that puts the bottom of a zero-point range with top ``alpha`` at ``low`` (< 0)."""
    return min(-low / (alpha - low), MAX_NEGATIVE_SHARE)


def _holds(record: dict[int, "weakref.ref[Tensor]"], t: Tensor) -> bool:
    ref = record.get(id(t))
    return ref is not None and ref() is t


class ModelInputFlow(TorchFunctionMode):
    """Follows which tensors are computed from the model's own inputs alone, while a batch runs.

    A tensor derives from the model's input if some operand of the op that made it did and no
    operand is a parameter or derives from one: ``x / 255``, ``x.view(...)`` or dropout keep
    the derivation, while an embedding lookup, a linear layer or a LayerNorm with weights end
    it. Buffers and constants (a normalisation's mean) are neither. Tensors are held weakly:
    the record never keeps an activation alive, and an address reused by a new tensor is not
    mistaken for the old one.
    """

    def __init__(self, model_inputs: list[Tensor]) -> None:
        super().__init__()
        self._from_input: dict[int, weakref.ref[Tensor]] = {}
        self._from_weights: dict[int, weakref.ref[Tensor]] = {}
        for t in model_inputs:
            self._from_input[id(t)] = weakref.ref(t)

    def is_model_input(self, t: Tensor) -> bool:
        """Whether ``t`` was computed from the model's inputs alone (or is one)."""
        return _holds(self._from_input, t)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        operands = _tensors_in((args, kwargs))
        weighted = any(isinstance(t, torch.nn.Parameter) or _holds(self._from_weights, t) for t in operands)
        from_input = not weighted and any(_holds(self._from_input, t) for t in operands)
        if weighted or from_input:
            record = self._from_weights if weighted else self._from_input
            for t in _tensors_in(out):
                try:
                    record[id(t)] = weakref.ref(t)
                except TypeError:  # not every tensor-like takes a weak reference
                    pass
        return out


def _tensors_in(value: Any, depth: int = 0) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if depth > 8:  # a batch nests a few levels at most; deeper is a cycle or not a batch
        return []
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors_in(v, depth + 1)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth + 1)]
    return []


class RangeObserver:
    """Records the inputs of the quantizers it watches, and sets their ranges and signs from them.

    Args:
        method: ``"percentile"``, ``"minmax"`` or ``"mse"`` (see the module's description).
        percentile: the percentile of ``|x|`` for ``method="percentile"``.
    """

    def __init__(self, method: str = "percentile", percentile: float = 99.9) -> None:
        check_range_method(method, percentile)
        self.method = method
        self.percentile = percentile
        self._quantizers: dict[int, BaseQuantizer] = {}
        self._names: dict[int, str] = {}
        # Sampling from the observer's own generator: the same calibration gives the same ranges.
        self._generator = torch.Generator().manual_seed(0)
        self._batches: dict[int, int] = {}
        self._max: dict[int, float] = {}
        self._min: dict[int, float] = {}
        self._percentile_sum: dict[int, float] = {}
        self._samples: dict[int, list[Tensor]] = {}
        #: Storage addresses of the model's own input tensors in the current batch (`note_model_inputs`).
        self._model_inputs: set[int] = set()
        #: Quantizers deciding by data flow whose first input was the model's own input.
        self._fed_model_input: set[int] = set()
        self._flow: Optional[ModelInputFlow] = None

    def watch(self, quantizer: BaseQuantizer, name: str = "") -> None:
        """Have ``quantizer`` (called ``name`` in messages and the saved state) report its inputs here until `finish`."""
        quantizer.observer = self
        self._quantizers[id(quantizer)] = quantizer
        self._names[id(quantizer)] = name or f"quantizer {len(self._names)}"

    def note_model_inputs(self, batch: Any) -> None:
        """Remember the tensors of ``batch`` (nested in tuples, lists and dicts): the model's own inputs.

        Call it before the model runs on each calibration batch. An input quantizer whose
        `BaseQuantizer.stays_float` is None, and whose first observed input shares its memory
        with one of them (the tensor itself or a view of it), keeps its input float. The batch
        is alive while the model runs on it, so no other tensor can share those addresses.
        """
        self._model_inputs = {t.untyped_storage().data_ptr() for t in _tensors_in(batch) if t.numel() > 0}

    @contextlib.contextmanager
    def tracing_model_inputs(self, batch: Any, follow_ops: bool = True) -> Iterator[None]:
        """Run the model on ``batch`` inside this: inputs computed from the batch alone are recognised.

        `note_model_inputs` sees a layer fed a batch tensor (or a view of one); this also sees
        one fed ``x / 255`` or a dropout of it (`ModelInputFlow`). It follows the ops only while
        some watched quantizer decides by data flow and has not seen its first input yet, and
        not with ``follow_ops=False`` (for compiled models, which cannot run under the mode).
        """
        self.note_model_inputs(batch)
        pending = any(q.stays_float is None and key not in self._batches for key, q in self._quantizers.items())
        if not pending or not follow_ops or torch.compiler.is_compiling():
            yield
            return
        flow = ModelInputFlow(_tensors_in(batch))
        self._flow = flow
        try:
            with flow:
                yield
        finally:
            self._flow = None

    @torch.no_grad()
    def observe(self, quantizer: BaseQuantizer, x: Tensor) -> None:
        """Record one input of ``quantizer``; the first one also sets its size (its weight in the average bits)."""
        key = id(quantizer)
        if quantizer.stays_float is None and key not in self._batches and x.numel() > 0:
            flow = self._flow
            if x.untyped_storage().data_ptr() in self._model_inputs or (flow is not None and flow.is_model_input(x)):
                self._fed_model_input.add(key)
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(
                f"the calibration input of {self._names.get(id(quantizer), 'a quantizer')} holds NaN or Inf values, which "
                "would give it a meaningless range; clean the calibration batches (or the layers before it)"
            )
        if quantizer.size == 0:
            quantizer.size = flat.numel()
        key = id(quantizer)
        self._batches[key] = self._batches.get(key, 0) + 1
        self._max[key] = max(self._max.get(key, 0.0), float(flat.abs().max()))
        self._min[key] = min(self._min.get(key, float("inf")), float(flat.min()))
        if self.method == "percentile":
            value = abs_percentile(flat, self.percentile, self._generator)
            self._percentile_sum[key] = self._percentile_sum.get(key, 0.0) + value
        elif self.method == "mse":
            self._samples.setdefault(key, []).append(random_subset(flat, MSE_SAMPLES_PER_BATCH, self._generator))

    def state_dict(self) -> dict[str, Any]:
        """The statistics gathered so far, by quantizer name (the MSE method's samples are not kept)."""
        stats = {}
        for key, name in self._names.items():
            if key in self._batches:
                stats[name] = {
                    "batches": self._batches[key],
                    "max": self._max[key],
                    "min": self._min[key],
                    "percentile_sum": self._percentile_sum.get(key, 0.0),
                }
        return {
            "method": self.method,
            "percentile": self.percentile,
            "statistics": stats,
            "generator": self._generator.get_state(),
            "fed_model_input": sorted(self.float_inputs()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`: the statistics of the watched quantizers of the same names."""
        if state.get("method") != self.method or state.get("percentile") != self.percentile:
            raise ValueError(
                f"they were gathered for {state.get('method')!r} at {state.get('percentile')!r}, this calibration is "
                f"{self.method!r} at {self.percentile!r}; it starts afresh"
            )
        by_name = {name: key for key, name in self._names.items()}
        for name, stats in state["statistics"].items():
            key = by_name.get(name)
            if key is None:
                continue  # a layer calibrated since, or not watched in this run
            self._batches[key] = int(stats["batches"])
            self._max[key] = float(stats["max"])
            self._min[key] = float(stats["min"])
            self._percentile_sum[key] = float(stats["percentile_sum"])
        self._generator.set_state(state["generator"])
        fed = set(state.get("fed_model_input", []))
        self._fed_model_input = {key for name, key in by_name.items() if name in fed}

    @property
    def batches_seen(self) -> int:
        """Most inputs any watched quantizer has recorded."""
        return max(self._batches.values(), default=0)

    def finish(
        self,
        reduce_mean: Optional[Reducer] = None,
        reduce_min: Optional[Reducer] = None,
        reduce_max: Optional[Reducer] = None,
    ) -> None:
        """Set every watched quantizer's range, sign and zero point, and stop observing.

        ``reduce_mean``, ``reduce_min`` and ``reduce_max`` combine the statistics across
        processes, so that every DDP rank ends with the same ranges (and, given ``reduce_min``
        and ``reduce_max``, the same choice of zero points). The MSE search needs every sample
        in one place and is not combined.

        Raises:
            RuntimeError: a watched quantizer saw no input (its layer was never called).
        """
        watched = list(self._quantizers.items())
        unseen = [key for key, _ in watched if key not in self._batches]
        if unseen:
            raise RuntimeError(
                f"{len(unseen)} input quantizer(s) saw no calibration data: their layers were never called. Give at "
                "least one batch and check that the forward (training_step, or forward/input_fn) calls every "
                "quantized layer, or exclude the layers it skips (exclude=[...])"
            )
        keys = [key for key, _ in watched]
        lows = torch.tensor([self._min[k] for k in keys], dtype=torch.float64)
        if reduce_min is not None:
            lows = reduce_min(lows)
        tops = torch.tensor([self._max[k] for k in keys], dtype=torch.float64)
        if reduce_max is not None:
            tops = reduce_max(tops)
        zero = [
            getattr(q, "zero_point", "off") == "auto" and wants_zero_point(low, top)
            for (_, q), low, top in zip(watched, lows.tolist(), tops.tolist())
        ]
        if self.method == "percentile":
            alphas = torch.tensor([self._percentile_sum[k] / self._batches[k] for k in keys], dtype=torch.float64)
            if reduce_mean is not None:
                alphas = reduce_mean(alphas)
        elif self.method == "minmax":
            alphas = tops
        else:
            alphas = torch.tensor(
                [
                    mse_alpha(
                        torch.cat(self._samples[k]),
                        q.rounded_bits(),
                        signed=low < 0.0 and not zp,
                        negative=-low if zp else None,
                    )
                    for (k, q), low, zp in zip(watched, lows.tolist(), zero)
                ],
                dtype=torch.float64,
            )
        for (key, quantizer), alpha, low, zp in zip(watched, alphas.tolist(), lows.tolist(), zero):
            quantizer.observer = None
            if quantizer.stays_float is None:
                # Decided by data flow: the model's own input stays float, every other input is quantized.
                quantizer.stays_float = key in self._fed_model_input
                if quantizer.stays_float:
                    continue
            alpha = alpha if alpha > 0 else 1.0
            share = zero_point_share(low, alpha) if zp else 0.0
            quantizer.set_range(alpha, signed=low < 0.0 and not zp, negative_share=share)
            quantizer.observer = None
        self._quantizers.clear()
        self._names.clear()
        self._samples.clear()
        self._model_inputs.clear()
        self._fed_model_input.clear()

    def float_inputs(self) -> list[str]:
        """Names of the watched quantizers that data flow has so far found fed by the model's own input."""
        return [self._names[key] for key in self._fed_model_input if key in self._names]
