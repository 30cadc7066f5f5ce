"""visual_helper.ipynb runs top to bottom in a fresh Jupyter kernel against a real study folder
(the tiny_study fixture), with every figure produced and no cell failing."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import nbformat
import numpy as np
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "visual_helper.ipynb"


def kernel_for(tmp_path: Path, env: dict[str, str]) -> KernelManager:
    """A kernel running this interpreter (the venv's python, which has ipykernel), whatever kernels
    the machine has installed, with `env` added to its environment."""
    write_kernel_spec(tmp_path / "kernels" / "toothseg", overrides={"display_name": "ToothSeg test", "env": env})
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="toothseg", kernel_spec_manager=specs)


def run_notebook(nb, tmp_path: Path, run_dir: Path):
    # One BLAS/OpenMP thread: two threads spinning on a busy 2-core machine make tiny convolutions 100x slower.
    km = kernel_for(tmp_path, {"TOOTHSEG_RUN_DIR": str(run_dir), "TOOTHSEG_N_IMAGES": "2", "OMP_NUM_THREADS": "1"})
    client = NotebookClient(nb, km=km, timeout=180, resources={"metadata": {"path": str(REPO)}})
    return client.execute()


def outputs_of(nb, kind: str) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == kind]


def test_stored_without_outputs_as_valid_nbformat_4():
    nb = nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # Paths come from the first code cell only, overridable from the environment.
    assert 'os.environ.get("TOOTHSEG_RUN_DIR"' in code[0].source
    assert not any("TOOTHSEG_" in c.source or "runs/" in c.source for c in code[1:])


def test_runs_top_to_bottom_on_a_study_folder(tiny_study, tmp_path):
    nb = run_notebook(nbformat.read(NOTEBOOK, as_version=4), tmp_path, tiny_study)

    assert not outputs_of(nb, "error")
    text = "".join(out.get("text", "") for out in outputs_of(nb, "stream"))
    assert f"run {tiny_study}: 3 cells" in text
    rich = outputs_of(nb, "display_data") + outputs_of(nb, "execute_result")
    markdown = "".join(out.data.get("text/markdown", "") for out in rich)
    assert re.search(r"\| unet \| mim \| none \| 1 \(\d+ pairs\) \| 1 \|", markdown)  # the study table, not just a heading
    assert "per-tooth task" in markdown and "no per-tooth cells" not in text  # section 8 drew the tooth charts
    tables = "".join(out.data.get("text/html", "") for out in rich)
    assert all(init in tables for init in ("scratch", "mim", "fullimage"))  # study.csv as a DataFrame
    pngs = [out.data["image/png"] for out in rich if "image/png" in out.data]
    # study_dice.png, 2 curve figures, 2 reconstructions, comparison, gallery, one sample, saliency, tooth charts
    assert len(pngs) >= 10
    for png in pngs:
        image = cv2.imdecode(np.frombuffer(base64.b64decode(png), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 1


def test_a_failing_step_fails_the_run(tmp_path):
    """A run folder without finished cells stops the notebook at its first cell with the one-line reason."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CellExecutionError, match="no finished study cells"):
        run_notebook(nb, tmp_path, tmp_path / "empty_run")
    [error] = outputs_of(nb, "error")  # shown as the scripts print it: one line, not a traceback
    assert len(error.traceback) == 1 and error.traceback[0].startswith("error: ") and "no finished study cells" in \
        error.traceback[0]


def test_cells_are_short():
    """The notebook calls visualizer functions; logic lives in the module."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert max(len(c["source"]) for c in cells if c["cell_type"] == "code") <= 20
