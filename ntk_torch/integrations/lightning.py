"""Lightning: :class:`NTKCallback`, the tracker on a ``lightning.Trainer``'s optimizer steps.

::

    trainer = lightning.Trainer(max_steps=1000, callbacks=[NTKCallback(train=(x, y), every=10,
                                                                    run_dir="runs/lit")])
    trainer.fit(module, loader)

When fitting starts, an :class:`~ntk_torch.NTKTracker` is built on the LightningModule
(its ``forward`` is the network ``f(x)``) and attached to the trainer's first optimizer:
it measures at step 0 and after every scheduled **optimizer** step, so with
``accumulate_grad_batches=k`` a step is k batches, as in the trainer's ``global_step``.
Under DDP every rank takes part and rank 0 writes the run (the tracker's own rule). Each
new record's numbers go to the trainer's loggers as ``ntk/<field>`` at the record's step
(``logger.log_metrics``). The run closes when fitting ends (``"completed"``) or fails
(``"failed"``, or ``"interrupted"`` on Ctrl-C). Needs the optional extra ``lightning``.
"""

from __future__ import annotations

from typing import Any, Optional

from ..lifecycle import ending
from ..sinks import scalars
from ..tracker import NTKTracker

try:
    from lightning.pytorch import Callback
except ImportError:  # the callback cannot exist without its base class
    raise ImportError("ntk_torch.integrations.lightning needs Lightning: pip install 'ntk-torch[lightning]'") from None

__all__ = ["NTKCallback"]


class NTKCallback(Callback):
    """The tracker as a Lightning callback.

    Args:
        train: the training data the tracker draws its probe from (as ``NTKTracker``'s
            ``train``: ``(x, y)`` tensors or a dataset).
        test: held-out data, as ``NTKTracker``'s ``test``.
        every: measure every ``every`` optimizer steps.
        run_dir: the run directory (written by rank 0), or None for records in memory.
        log: send each record's numbers to the trainer's loggers.
        **options: any other ``NTKTracker`` option (``probe_size``, ``loss``, ``mode``,
            ``output_fn``, ``forecast``, ``keep_kernels``, ``tensorboard``, ...);
            ``progress`` defaults to False (Lightning draws its own bar).

    Attributes:
        tracker: the ``NTKTracker`` of the current fit (None before the first one);
            ``tracker.records`` are its measurements.
    """

    def __init__(self, train: Any, *, test: Any = None, every: int = 10, run_dir: Any = None, log: bool = True,
                 **options: Any) -> None:
        super().__init__()
        self.train, self.test, self.every, self.run_dir, self.log = train, test, every, run_dir, log
        self.options = {"progress": False, **options}
        self.tracker: Optional[NTKTracker] = None
        self._attachment: Any = None
        self._logged = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.optimizers:
            raise ValueError("NTKCallback needs an optimizer: configure_optimizers returned none")
        self.tracker = NTKTracker(pl_module, self.train, test=self.test, every=self.every, run_dir=self.run_dir,
                                  **self.options)
        self._logged = 0
        self._attachment = self.tracker.attach(trainer.optimizers[0])
        self._log_new(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log_new(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._end(None)
        self._log_new(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end(exception)

    def _end(self, error: Optional[BaseException]) -> None:
        """Close the tracker (its last step measured) with the status of how fitting ended."""
        if self.tracker is not None and self._attachment is not None:
            self._attachment = None
            self.tracker.close(*(ending(error) if error is not None else ("completed", None)))

    def _log_new(self, trainer: Any) -> None:
        """Send the records not yet logged to the trainer's loggers (rank 0 only)."""
        if self.tracker is None:
            return
        new, self._logged = self.tracker.records[self._logged:], len(self.tracker.records)
        if not (self.log and trainer.is_global_zero):
            return
        for record in new:
            metrics = {f"ntk/{name}": value for name, value in scalars(record).items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=int(record["step"]))
