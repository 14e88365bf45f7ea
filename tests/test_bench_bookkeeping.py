"""The bookkeeping benchmark's table and one real measurement (smoke tests, not timings)."""

import sys

import pytest

from ntk_torch import cli

if str(cli.SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(cli.SCRIPTS_DIR))
import bench_bookkeeping  # noqa: E402


def test_table_has_a_row_per_case_and_setting():
    case = {"kernel": 0.02, "bookkeeping": 0.005, "fields": 0.003, "measurements": 4}
    cases = {f"{mode}/{spectrum}": case for mode, spectrum in bench_bookkeeping.CASES}
    lines = bench_bookkeeping.table({"1 (taskset -c 0)": {"cases": cases}, "all (2)": {"cases": cases}})
    assert len(lines) == 2 + 2 * len(bench_bookkeeping.CASES)
    assert lines[2] == "| trace | auto | 1 (taskset -c 0) | 20.0 | 5.0 | 25% | 3.0 | 2.0 | 4 |"
    assert lines[-1].startswith("| full | full | all (2) |")


@pytest.mark.slow
def test_measure_reads_the_records_of_a_tracked_run():
    figures = bench_bookkeeping.measure("trace", "auto", epochs=1)
    assert figures["measurements"] >= 2
    assert 0 < figures["fields"] < figures["bookkeeping"]
    assert figures["kernel"] > 0
