"""Probe and test sets: labelled data as tensors, drawn reproducibly, and evaluated.

``NTKTracker`` measures the kernel on a *probe*, a fixed random subset of the training
data, and the network's loss (and accuracy) on the probe and an optional test set. This
module turns what the user passes (``(x, y)`` tensors or a map-style ``Dataset``) into
:class:`LabelledSet` tensors (:func:`load_set`, :func:`choose_probe`) and evaluates a model
on them with a :class:`~ntk_torch.losses.Loss` (:func:`evaluate`). Nothing here touches
the global RNGs or any ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .functional import Inputs, call_arguments, input_tensors, map_inputs, select_output
from .losses import Loss

__all__ = ["Data", "LabelledSet", "batch_size", "call_model", "choose_probe", "evaluate", "load_set", "sample_output"]

EVAL_BATCH = 1024
"""Examples per forward pass when evaluating the loss on a set."""

Data = Union[Tuple[Inputs, torch.Tensor], Dataset]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LabelledSet:
    """Inputs (a Tensor, tuple or dict of Tensors, batched on dim 0) and their labels.

    Attributes:
        x: the inputs.
        y: the labels or targets, ``(N, ...)``.
        indices: for a probe, the positions of its examples in the data it was drawn from.
    """

    x: Inputs
    y: torch.Tensor
    indices: Optional[Tuple[int, ...]] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> "LabelledSet":
        """The same set with every tensor on ``device`` (no copy if already there)."""
        return LabelledSet(map_inputs(self.x, lambda t: t.to(device)), self.y.to(device), self.indices)

    def batches(self, size: int) -> Iterator[Tuple[Inputs, torch.Tensor]]:
        """``(x, y)`` slices of at most ``size`` examples, in order."""
        for start in range(0, len(self), size):
            stop = start + size
            yield map_inputs(self.x, lambda t: t[start:stop]), self.y[start:stop]


def _size(data: Any, name: str) -> int:
    """The number of examples in ``data``, with an error naming ``name`` if it has none."""
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError as error:
            raise TypeError(
                f"{name} is a {type(data).__name__} without __len__; pass a map-style Dataset "
                "or (x, y) tensors"
            ) from error
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name}[1] (the labels) must be a Tensor, got {type(y).__name__}")
        sizes = {label: t.shape[0] if t.dim() else None for label, t in input_tensors(x, f"{name}[0]")}
        sizes[f"{name}[1]"] = y.shape[0] if y.dim() else None
        for label, size in sizes.items():
            if size is None:
                raise ValueError(f"{label} is a scalar; {name} must be batched on dim 0")
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{label}: {n}" for label, n in sizes.items())
            raise ValueError(f"the inputs and labels of {name} have different lengths ({listed})")
        n = y.shape[0]
    else:
        raise TypeError(
            f"{name} must be an (x, y) pair of tensors or a map-style torch Dataset of "
            f"(input, label) pairs, got {type(data).__name__}"
        )
    if n == 0:
        raise ValueError(f"{name} is empty (0 examples); it needs at least one (input, label) pair")
    return n


def batch_size(x: Inputs, y: Any, name: str) -> int:
    """The number of examples in a batch ``(x, y)``: inputs batched on dim 0 and a label
    Tensor, all of one length (else a clear error naming ``name``)."""
    return _size((x, y), name)


def _gather(data: Data, indices: Sequence[int], name: str) -> Tuple[Inputs, torch.Tensor]:
    """The examples of ``data`` at ``indices`` as batched ``(x, y)`` tensors."""
    if not isinstance(data, Dataset):
        x, y = data
        index = torch.as_tensor(indices, dtype=torch.long)
        return map_inputs(x, lambda t: t[index.to(t.device)]), y[index.to(y.device)]
    items = [data[i] for i in indices]
    first = items[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise TypeError(
            f"{name}[{indices[0]}] is a {type(first).__name__}; the items of {name} must be "
            "(input, label) pairs"
        )
    x, y = default_collate(items)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the labels of {name} collate to a {type(y).__name__}, not a Tensor")
    return x, y


def load_set(data: Data, name: str) -> LabelledSet:
    """All of ``data`` as tensors (a ``Dataset`` is read once)."""
    n = _size(data, name)
    if not isinstance(data, Dataset):
        return LabelledSet(*data)
    return LabelledSet(*_gather(data, range(n), name))


def choose_probe(data: Data, size: int, seed: int, name: str = "train") -> Tuple[LabelledSet, int]:
    """A fixed random subset of ``size`` examples of ``data``, drawn with ``seed``.

    The indices are drawn with a private ``torch.Generator`` (the global RNG is not
    touched) and sorted, so the probe keeps the data's order.

    Returns:
        The probe, with its ``indices`` into ``data``, and the size of ``data``.

    Raises:
        ValueError: ``data`` is empty or has fewer than ``size`` examples.
    """
    n = _size(data, name)
    if size > n:
        raise ValueError(
            f"probe_size={size} is larger than {name}, which has {n} examples; "
            f"pass probe_size <= {n}"
        )
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=generator)[:size].sort().values.tolist()
    x, y = _gather(data, indices, name)
    return LabelledSet(x, y, tuple(indices)), n


# --------------------------------------------------------------------------- evaluation


def call_model(
    model: nn.Module,
    x: Inputs,
    output_fn: Optional[Callable[[Any], torch.Tensor]],
    call_kwargs: Optional[Mapping[str, Any]] = None,
) -> torch.Tensor:
    """``model(x)`` (``model(*x)`` for a tuple, ``model(**x)`` for a dict) with the
    arguments that are not batched, ``call_kwargs``, then ``output_fn``."""
    args, kwargs = call_arguments(x, call_kwargs)
    return select_output(model(*args, **kwargs), output_fn)


def evaluate(
    model: nn.Module,
    data: LabelledSet,
    loss: Loss,
    output_fn: Optional[Callable[[Any], torch.Tensor]],
    device: torch.device,
    call_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict[str, float]:
    """The mean loss on ``data`` and, for class labels, the accuracy.

    Evaluated in batches of ``EVAL_BATCH`` examples moved to ``device``; the loss of the
    whole set is the example-weighted mean of the batch losses, exact for mean-reduced
    losses. The caller provides eval mode and ``torch.no_grad``.

    Returns:
        ``{"loss": float}``, plus ``"accuracy"`` (fraction of argmax hits) when the labels
        are classes.
    """
    total_loss, correct, entries, classes = 0.0, 0, 0, True
    for x, y in data.batches(EVAL_BATCH):
        x = map_inputs(x, lambda t: t.to(device))
        y = y.to(device)
        out = call_model(model, x, output_fn, call_kwargs)
        value = loss.fn(out, y)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(
                f"loss {loss.name} must return a scalar tensor, got "
                f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}"
            )
        total_loss += float(value) * y.shape[0]
        labels = loss.class_labels(y, out) if classes else None
        classes = labels is not None
        if classes:
            correct += int((out.argmax(dim=1) == labels).sum())
            entries += labels.numel()
    result = {"loss": total_loss / len(data)}
    if classes:
        result["accuracy"] = correct / entries
    return result


def sample_output(
    model: nn.Module,
    data: LabelledSet,
    output_fn: Optional[Callable[[Any], torch.Tensor]],
    call_kwargs: Optional[Mapping[str, Any]] = None,
) -> torch.Tensor:
    """The model's output on the first (up to) two examples of ``data``; the caller
    provides eval mode and ``torch.no_grad``."""
    x = map_inputs(data.x, lambda t: t[:2])
    return call_model(model, x, output_fn, call_kwargs)

