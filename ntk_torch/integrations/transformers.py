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

A callback does not see its Trainer, so to log the records where the Trainer logs add the
callback with :meth:`NTKCallback.add_to` (or pass ``trainer=``)::

    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    NTKCallback.add_to(trainer, train=(inputs, labels), every=10, run_dir="runs/hf")
    trainer.train()

Each new record's numbers then go through ``trainer.log`` as ``ntk/<field>`` at the step
measured: into ``trainer.state.log_history`` and to every callback's ``on_log`` (the
TensorBoard, Weights & Biases, ... callbacks of ``report_to``, the console printer).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from ..sinks import scalars
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
        trainer: the ``transformers.Trainer`` whose ``log`` receives each record's numbers
            (``ntk/<field>``; see :meth:`add_to`); None logs nothing.
        **options: any other ``NTKTracker`` option (``probe_size``, ``loss``, ``mode``,
            ``forecast``, ``tensorboard``, ...); ``progress`` defaults to False.

    Attributes:
        tracker: the ``NTKTracker`` of the current training (None before it begins).
    """

    def __init__(self, train: Any, *, test: Any = None, every: int = 10, run_dir: Any = None,
                 output_fn: Optional[Callable[[Any], torch.Tensor]] = logits, trainer: Any = None,
                 **options: Any) -> None:
        if trainer is not None and not callable(getattr(trainer, "log", None)):
            raise TypeError(f"trainer must be a transformers.Trainer (with a log method), got {type(trainer).__name__}")
        self.train = _split_labels(train, "train")
        self.test = None if test is None else _split_labels(test, "test")
        self.every, self.run_dir, self.output_fn, self.trainer = every, run_dir, output_fn, trainer
        self.options = {"progress": False, **options}
        self.tracker: Optional[NTKTracker] = None
        self._logged = 0

    @classmethod
    def add_to(cls, trainer: Any, train: Any, **options: Any) -> "NTKCallback":
        """A callback logging through ``trainer`` (``trainer=trainer``), added to it with
        ``trainer.add_callback``; ``options`` as for the constructor. Returns the callback."""
        callback = cls(train, trainer=trainer, **options)
        trainer.add_callback(callback)
        return callback

    def _log_new(self, state: Any) -> None:
        """Each record not yet logged, as ``{"ntk/<field>": value}``, through ``trainer.log``
        (main process only; the records are rank 0's)."""
        if self.tracker is None:
            return
        new, self._logged = self.tracker.records[self._logged:], len(self.tracker.records)
        if self.trainer is None or not getattr(state, "is_world_process_zero", True):
            return
        for record in new:
            self.trainer.log({f"ntk/{name}": value for name, value in scalars(record).items()})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("NTKCallback needs the Trainer's model and optimizer at on_train_begin")
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
        self.tracker = NTKTracker(model, self.train, test=self.test, every=self.every, run_dir=self.run_dir,
                                  output_fn=self.output_fn, **self.options)
        self._logged = 0
        self.tracker.attach(inner)
        self._log_new(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._log_new(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None and not self.tracker.closed:
            self.tracker.close("completed")
        self._log_new(state)
