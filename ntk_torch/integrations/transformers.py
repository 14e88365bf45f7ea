"""Hugging Face: :class:`NTKCallback`, the tracker on a ``transformers.Trainer``'s optimizer steps.

::

    callback = NTKCallback(train=({"input_ids": ids, "attention_mask": mask}, labels), every=10,
                           run_dir="runs/hf")
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()

When training begins, an :class:`~ntk_torch.NTKTracker` is built on the Trainer's model
and attached to its optimizer (the torch optimizer inside Accelerate's wrapper), so it
measures at step 0 and after every optimizer step the schedule picks (gradient
accumulation respected: a step is what ``state.global_step`` counts). The model is called
``model(**x)`` with the dict inputs, and ``output_fn`` picks the ``(N, O)`` outputs from
what it returns: by default its ``logits``. The data may also be one dict holding the
labels under ``"labels"`` (a tokenised batch). The run closes when training ends. Needs
``transformers`` (and ``accelerate``, which its Trainer needs).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from ..tracker import NTKTracker

try:
    from transformers import TrainerCallback
except ImportError:  # the callback cannot exist without its base class
    raise ImportError(
        "ntk_torch.integrations.transformers needs Hugging Face transformers: pip install 'ntk-torch[transformers]'"
    ) from None

__all__ = ["NTKCallback", "logits"]


def logits(output: Any) -> torch.Tensor:
    """The ``logits`` of a model output (``ModelOutput`` attribute or dict key); a tensor
    is returned as it is."""
    if isinstance(output, torch.Tensor):
        return output
    found = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if found is None:
        raise ValueError(f"the model's output ({type(output).__name__}) has no logits; pass output_fn= to pick "
                         "the (N, O) outputs")
    return found


def _split_labels(data: Any, name: str) -> Any:
    """``(inputs, labels)`` from a dict holding ``"labels"``; anything else as it is."""
    if isinstance(data, Mapping) and "labels" in data:
        return {k: v for k, v in data.items() if k != "labels"}, data["labels"]
    return data


class NTKCallback(TrainerCallback):
    """The tracker as a ``transformers.TrainerCallback``.

    Args:
        train: the training data of the probe: ``(inputs, labels)`` with ``inputs`` a dict
            of batched tensors (``input_ids``, ``attention_mask``, ...), or one such dict
            with the labels under ``"labels"``.
        test: held-out data, the same way.
        every: measure every ``every`` optimizer steps.
        run_dir: the run directory (written by the main process), or None.
        output_fn: the ``(N, O)`` outputs from the model's output (default :func:`logits`).
        **options: any other ``NTKTracker`` option (``probe_size``, ``loss``, ``mode``,
            ``forecast``, ``tensorboard``, ...); ``progress`` defaults to False.

    Attributes:
        tracker: the ``NTKTracker`` of the current training (None before it begins).
    """

    def __init__(self, train: Any, *, test: Any = None, every: int = 10, run_dir: Any = None,
                 output_fn: Optional[Callable[[Any], torch.Tensor]] = logits, **options: Any) -> None:
        self.train = _split_labels(train, "train")
        self.test = None if test is None else _split_labels(test, "test")
        self.every, self.run_dir, self.output_fn = every, run_dir, output_fn
        self.options = {"progress": False, **options}
        self.tracker: Optional[NTKTracker] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("NTKCallback needs the Trainer's model and optimizer at on_train_begin")
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
        self.tracker = NTKTracker(model, self.train, test=self.test, every=self.every, run_dir=self.run_dir,
                                  output_fn=self.output_fn, **self.options)
        self.tracker.attach(inner)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None and not self.tracker.closed:
            self.tracker.close("completed")
