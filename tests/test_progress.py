"""Progress on the terminal (ntk_torch.progress): phase lines with their time, and the
tracker's bar, which knows its total, shows the step-0 phase and keeps the user's own
print lines whole (rendered here as a terminal would show them)."""

from __future__ import annotations

import io
import re
import sys
import warnings

import pytest
import torch
from torch import nn

from ntk_torch import progress
from ntk_torch.tracker import NTKTracker


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def render(text):
    """The lines a terminal shows for ``text``: ``\\r`` returns to the line's start and
    what follows overwrites it."""
    lines, line, column = [], [], 0
    for char in text:
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        else:
            if column < len(line):
                line[column] = char
            else:
                line.append(char)
            column += 1
    return lines + ["".join(line).rstrip()]


def test_a_phase_off_a_terminal_is_one_line_written_at_its_end(capsys):
    with progress.phase("figures") as drawing:
        print("inside", file=sys.stderr)
        drawing.detail = "7 figures"
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "inside"
    assert re.fullmatch(r"ntk-torch: figures \.\.\. 7 figures, \d+\.\d s", err.splitlines()[1])
    with progress.phase("quiet", enabled=False):
        pass
    with pytest.raises(ValueError), progress.phase("failing"):
        raise ValueError("boom")
    assert capsys.readouterr().err == ""  # the error's own message says it


def test_a_phase_on_a_terminal_shows_its_label_first_and_messages_on_their_own_lines(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.phase("step 0"):
        assert terminal.getvalue() == "ntk-torch: step 0 ..."  # before the work is done
    with progress.phase("report"):
        progress.write("ntk-torch: warning: something")
    with pytest.raises(KeyboardInterrupt), progress.phase("training"):
        raise KeyboardInterrupt
    lines = render(terminal.getvalue())
    assert re.fullmatch(r"ntk-torch: step 0 \.\.\. \d+\.\d s", lines[0])
    assert lines[1] == "ntk-torch: report ..." and lines[2] == "ntk-torch: warning: something"
    assert re.fullmatch(r"ntk-torch: report \.\.\. \d+\.\d s", lines[3])
    assert re.fullmatch(r"ntk-torch: training \.\.\. interrupted after \d+\.\d s", lines[4])


def _train_with_prints(steps=6, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=2, forecast=None, **options)
    with tracker.attach(optimizer):
        for step in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            print(f"epoch {step}", "loss", 0.5, end="")  # a line written in pieces
            print()
            if step == 3:
                warnings.warn("a warning of the user's", UserWarning)
    return tracker


def _printed(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_on_a_terminal_the_bar_knows_its_total_and_the_users_prints_stay_whole(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _printed  # as Python prints warnings, outside pytest's capture
        _train_with_prints(total_steps=6)
    assert sys.stdout is terminal and sys.stderr is terminal  # given back at close
    written = terminal.getvalue()
    assert "NTK (step 0: kernel)" in written  # the step-0 phase, not a silent 0
    lines = render(written)
    assert [line for line in lines if line.startswith("epoch")] == [f"epoch {i} loss 0.5" for i in range(6)]
    assert any(line.endswith("UserWarning: a warning of the user's") for line in lines)
    assert re.match(r"NTK: 100%\|.*\| 6/6 .*4 measurements, relative change", lines[-2]), lines
    assert lines[-1] == ""


def test_off_a_terminal_prints_stay_alone_on_stdout_and_the_tracker_writes_two_lines(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_with_prints()
    out, err = capfd.readouterr()
    assert out.splitlines() == [f"epoch {i} loss 0.5" for i in range(6)]
    assert "\r" not in err
    lines = err.splitlines()
    assert re.fullmatch(r"NTK: step 0: kernel \.\.\. \d+\.\d s", lines[0])
    assert re.fullmatch(r"NTK: 6 steps, 4 measurements, relative change \S+", lines[1])
    assert len(lines) == 2


def test_progress_false_writes_nothing(capfd):
    _train_with_prints(steps=2, progress=False)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("total, error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_a_bad_total_steps_is_named(total, error):
    with pytest.raises(error, match="total_steps must be"):
        NTKTracker(nn.Linear(3, 2), (torch.randn(4, 3), torch.randn(4, 2)), loss="mse", probe_size=4,
                   total_steps=total)
