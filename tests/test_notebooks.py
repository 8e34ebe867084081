"""Execute the committed notebooks with nbclient, as CI does (the study notebook re-runs its smoke setting).

The notebooks run in their own folder (they read the shipped base and the committed results) and write
only to temporary folders, so nothing in the repository changes.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # dev extra: installed by .ci/run
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("notebook", ["quickstart.ipynb", "study/study.ipynb"])
def test_notebook_executes_and_is_committed_with_outputs(notebook):
    path = EXAMPLES / notebook
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code), f"{notebook}: commit it with its outputs (every code cell)"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
