"""Calling a model on a batch, and finding the logits in what it returns: for code that runs the user's model.

Batches come as a tensor, a tuple or list whose first element is the input, or a dict; the
model may return a tensor, a dict with ``"logits"`` (Hugging Face), or a tuple.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from torch import Tensor, nn

#: Maps a batch to the model input: a tensor, a tuple (passed as ``*args``) or a dict (``**kwargs``).
InputFn = Callable[[Any], Any]
#: Dict keys tried, in order, for the model input of a dict batch.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
#: Keys that mark a Hugging Face style dict batch: the whole dict less its labels is the input.
KEYWORD_INPUT_KEYS = ("input_ids", "inputs_embeds")
#: Keys of the targets in such a batch, which the model is called without.
LABEL_KEYS = ("labels", "label", "label_ids")


def default_input_fn(batch: Any) -> Any:
    """The model input of a batch: the batch itself, its first element, a usual dict key, or
    for a Hugging Face style dict (one with ``input_ids``) the dict less its labels, passed as
    keyword arguments."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        if any(key in batch for key in KEYWORD_INPUT_KEYS):
            # {"input_ids", "attention_mask", "labels", ...}: called as model(**inputs) without the labels.
            return {key: value for key, value in batch.items() if key not in LABEL_KEYS}
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"cannot tell the model input in a batch of type {type(batch).__name__}; "
        "pass input_fn=lambda batch: ... returning the input (a tuple is passed as *args, a dict as **kwargs)"
    )


def call_model(model: nn.Module, batch: Any, input_fn: Optional[InputFn] = None) -> Any:
    """``model`` applied to the input ``input_fn`` (default `default_input_fn`) finds in ``batch``."""
    inputs = (input_fn or default_input_fn)(batch)
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def first_tensor(output: Any) -> Tensor:
    """The logits of a model output: the tensor itself, ``output["logits"]``, or the first tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], Tensor):
            return output["logits"]
        values: Sequence[Any] = list(output.values())
    elif isinstance(output, Sequence):
        values = output
    else:
        values = []
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find a tensor of outputs in a {type(output).__name__}")
