"""The notebooks run top to bottom on the bundled model with small parameters.

Each notebook is executed with nbclient in a temporary working directory after its
``parameters`` cell is given small values (a nonexistent ``SWEEP_DIR``, so the first notebook
runs its own small sweep; the second then reads that sweep back).  The checks look for the key
printed results, so a notebook that runs but prints nothing useful still fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from rome_edit import load_concept_vector

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SMALL = {"N_NAMES": 12, "N_HELDOUT": 8, "SMALL_GRAD_STEPS": 6, "SMALL_MOM2_SAMPLES": 1000,
         "N_RANDOM": 2, "SEED": 0}


def with_parameters(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Replace the ``parameters`` cell's source by its defaults followed by ``values``."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "each notebook needs exactly one cell tagged 'parameters'"
    cell = cells[0]
    declared = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", cell.source, flags=re.M))
    unknown = set(values) - declared
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    cell.source = cell.source + "\n# injected by tests/test_notebooks.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in values.items())
    return nb


def execute(name: str, values: dict, cwd: Path) -> tuple[nbformat.NotebookNode, str]:
    """Run notebook ``name``; return it and all of its text output."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The committed notebook carries no outputs (stripped for git).
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: unstripped"
    client = NotebookClient(with_parameters(nb, values), kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type == "error":
                pytest.fail(f"{name}: {out.ename}: {out.evalue}")
    return nb, "".join(text)


def n_images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               for out in cell.get("outputs", []))


def number(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*(-?[0-9.]+)", text)
    assert match, f"no {pattern!r} in the notebook's output"
    return float(match.group(1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("notebooks")
    # The kernel inherits this environment: the package from this checkout even when it is not
    # installed, and a second-moment cache the two notebooks share but the user's home never sees.
    path = os.environ.get("PYTHONPATH")
    monkeypatch_module.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
    monkeypatch_module.setenv("ROME_EDIT_CACHE", str(work / "stats-cache"))
    return work


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_gender_vector_study_notebook(workdir):
    sweep = workdir / "sweep"
    nb, text = execute("01_gender_vector_study.ipynb",
                       {**SMALL, "SWEEP_DIR": str(workdir / "no-such-sweep"),
                        "SMALL_SWEEP_DIR": str(sweep), "SCALES": (0.5, 1.0, 2.0),
                        "K_FOLDS": 3, "MAX_NEW_TOKENS": 6, "OUT_DIR": str(workdir / "vec")},
                       workdir)
    assert "small sweep of 12 names" in text
    assert (sweep / "deltas.safetensors").is_file()
    # Twelve edits of the bundled model already separate perfectly; a 4-row test set allows one
    # miss. The shuffled-label control must be no better than the real labels.
    accuracy = number(r"classifier test accuracy:", text)
    assert accuracy >= 0.75
    assert number(r"shuffled-label test accuracy:", text) <= accuracy
    assert "3-fold test accuracy" in text
    assert "sign agreement with w 100%" in text  # the box optimum of a linear classifier
    assert "flip table at ‖g‖" in text and "random (mean of 2)" in text
    for key in ("flip_f_to_m", "flip_m_to_f"):  # the vector beats random directions
        assert number(rf"{key}:", text) > number(rf"{key}: [0-9.]+ vs random", text)
    vector = load_concept_vector(workdir / "vec" / "gender_vector.safetensors", expected_width=256)
    assert vector.layer == 1 and vector.classifier_test_accuracy == accuracy
    assert text.count("[Pre-ROME]:  Name: ") == 3 and "[Post-ROME, -g]: Name: " in text
    assert "[+g on Ani]: Name: Ani. Gender:" in text  # the five-line cell with a typed name
    assert n_images(nb) >= 3


@pytest.mark.slow
def test_direction_comparison_notebook(workdir):
    # Reads the first test's sweep when it ran; otherwise runs the same small sweep itself.
    sweep = str(workdir / "sweep")
    nb, text = execute("02_direction_comparison.ipynb",
                       {**SMALL, "SWEEP_DIR": sweep, "SMALL_SWEEP_DIR": sweep,
                        "SCALES": (1.0, 2.0), "INLP_ITERATIONS": 3, "RLACE_STEPS": 20},
                       workdir)
    assert "cosine table:" in text and "erasure check:" in text
    assert number(r"cos\(leace, mean-difference\) =", text) > 0.95  # the same in theory
    for name in ("box", "classifier", "mean-difference", "inlp", "rlace", "leace"):
        assert name in text
    assert "flip rates at equal norms" in text and "random (mean)" in text
    assert "directions table" in text
    assert "weights vs activations" in text and "activations" in text
    assert n_images(nb) >= 4
