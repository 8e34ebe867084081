"""Execute the notebooks (the study in its smoke setting) with nbclient, as CI does."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # dev extra: installed by .ci/run
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("notebook", ["quickstart.ipynb", "study/study.ipynb"])
def test_notebook_executes(notebook, tmp_path):
    path = EXAMPLES / notebook
    nb = nbformat.read(path, as_version=4)
    # run in a copy of the notebook's folder so nothing is written into the repository
    work = tmp_path / path.parent.name
    work.mkdir()
    for f in path.parent.glob("*.py"):
        (work / f.name).write_text(f.read_text())
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
