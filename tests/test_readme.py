"""The README's quickstart, extracted from README.md (so the two cannot drift), runs twice
in the same directory, as a user reruns it, and prints labelled results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EPOCHS = "for epoch in range(10):"


def quickstart() -> str:
    """The first Python block under the README's Quickstart heading."""
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_quickstart_runs_twice_as_written_and_prints_labelled_results(tmp_path, monkeypatch, capsys):
    """One epoch instead of ten (the loop is otherwise the README's), and the figures'
    drawing recorded rather than done (tests/test_plots.py draws them): the second run
    replaces the first's run directory instead of failing."""
    import ntk_torch.plots

    code = quickstart()
    assert EPOCHS in code, "the quickstart's loop changed: update EPOCHS"
    code = code.replace(EPOCHS, "for epoch in range(1):")
    drawn = []
    monkeypatch.setattr(ntk_torch.plots, "save_all", lambda run, out: drawn.append((run.path, out)) or [])
    monkeypatch.chdir(tmp_path)
    for attempt in range(2):
        exec(compile(code, f"README.md quickstart, run {attempt + 1}", "exec"), {})
        out = capsys.readouterr().out.splitlines()
        assert re.fullmatch(r"relative kernel change at step 23: \d+\.\d{3}", out[0]), out
        assert re.fullmatch(r"test loss at step 23: actual \d+\.\d{3}, predicted \d+\.\d{3}", out[1]), out
    assert [out for _, out in drawn] == ["runs/mine/figures"] * 2
    assert all(Path(path) == (tmp_path / "runs" / "mine").resolve() for path, _ in drawn)
