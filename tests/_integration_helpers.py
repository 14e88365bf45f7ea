"""What the tests of the Lightning and Hugging Face callbacks share: a trainer's run
compared with a plain loop's records, and an optional library made missing."""

from __future__ import annotations

import builtins
import importlib
import sys

import pytest


def assert_records_match(run, expected, fields, steps, rel, abs):
    """The completed ``run`` measured ``steps``, as the plain loop's ``expected`` records
    did, with the same ``fields`` to ``rel``/``abs``."""
    assert run.status == "completed"
    assert [r["step"] for r in run.records] == [r["step"] for r in expected] == list(steps)
    for got, want in zip(run.records, expected):
        for field in fields:
            assert got[field] == pytest.approx(want[field], rel=rel, abs=abs), (field, got["step"])


def assert_missing_library_names_the_extra(monkeypatch, library, module, extra):
    """Importing ``module`` with ``library`` missing raises an ImportError saying
    ``pip install 'ntk-torch[extra]'``."""
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == library or name.startswith(library + "."):
            raise ImportError(f"No module named {library!r}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == library or m.startswith(library + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(ImportError, match=rf"pip install 'ntk-torch\[{extra}\]'"):
        importlib.import_module(module)
