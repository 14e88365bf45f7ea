"""The choose-before-training notebook executes headless and clean."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "choose_before_training.ipynb"


@pytest.mark.slow  # starts a Jupyter kernel, ranks and trains 6 tiny candidates
def test_choose_before_training_notebook_runs_clean(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error" or o.get("name") == "stderr"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs)
    assert "| rank | name |" in text and "predicted: Kendall tau" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
