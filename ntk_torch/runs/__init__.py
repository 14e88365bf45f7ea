"""Run directories: written append-only with atomic replaces, loaded without unpickling.

Layout of a run directory::

    meta.json                  {"format": "ntk_torch.run", "version": 1,
                                "keep_kernels": "log", "meta": {...user metadata...},
                                "status": "completed", "reason": "..."}
                               (status and reason: once closed with them)
    metrics.jsonl              one JSON object per line, one line per measurement
    kernels/step_00000010.npy  kernel measured at optimizer step 10 (numpy .npy, no pickle)
    forecast.json              the dense forecast, written once when the tracker closes:
                               {"steps": [0, 1, 2, ...], "fields": {"predicted_train_loss":
                               [...], ...}} (optional; Run.dense_forecast)
    summary.json               written when the writer closes: final values, configuration,
                               versions (strict JSON; Run.summary, see runs.summary)

Guarantees, so that a crash or Ctrl-C loses at most the record being written and no two
runs are ever mixed:

* The run directory is resolved first (``..`` and symbolic links followed) and taken
  race-free: ``meta.json`` is created exclusively, so a second writer on the same
  directory fails instead of appending to the first one's run.
* ``meta.json`` and every kernel file are written to a temporary file in the same
  directory (``.<name>.<random>.tmp``), fsynced, then moved into place with
  ``os.replace``: a reader sees the old file or the new one, never a mix. Leftover
  temporary files of an interrupted write are ignored by the loader.
* Each record is one ``os.write`` of a complete line to ``metrics.jsonl`` (opened with
  ``O_APPEND``), followed by ``fsync``. A line cut short by a crash is the last one.
* Every file is created with mode 0o666 (directories 0o777) under the user's umask.
* ``load_run`` reads what is readable and names the rest in ``Run.problems`` and a
  ``RuntimeWarning`` (skipped lines and kernel files, repeated or out-of-order steps,
  absurd values, a missing or empty ``metrics.jsonl``); only a bad ``meta.json`` is an
  error.

Records are JSON objects with an integer ``"step"`` (0 <= step < 2**53); values are
numbers, strings, None, lists and nested dicts. Non-finite floats are written as Python's
``json`` module writes them, the tokens ``NaN``, ``Infinity`` and ``-Infinity``, which
``json.loads`` (and so ``load_run``) reads back as floats. numpy scalars and arrays and
torch tensors are converted to Python numbers and (nested) lists.

The modules: ``files`` (names, paths, permissions, atomic and exclusive writes),
``writer`` (``RunWriter``), ``reading`` (bounded, checked reading), ``run`` (``Run``,
``load_run``).
"""

from .files import FORMAT, FORMAT_VERSION, KERNELS_DIR, META_FILE, METRICS_FILE
from .run import Curve, DenseForecast, Run, load_run
from .writer import KEEP_KERNELS, RunWriter

__all__ = ["Curve", "DenseForecast", "KEEP_KERNELS", "Run", "RunWriter", "load_run"]
