"""The notebooks: committed with their results, and those results still come out.

Three kinds of check:

* the committed notebooks carry outputs (figures and printed tables), nothing on stderr, no
  error and no absolute path of a machine (fast);
* each committed notebook is re-executed with its committed parameters, exactly as
  ``make notebooks`` (``scripts/run_notebooks.py``) runs it, and every number printed is compared
  with the committed one (slow; see :func:`compare` for the tolerances);
* each notebook runs again with small parameters and a nonexistent ``SWEEP_DIR``, so the first
  runs its own small sweep (the path a user without the shipped sweep takes) and the second reads
  that sweep back (slow).

When a notebook's results change on purpose, run ``make notebooks`` and commit the notebooks.
"""

from __future__ import annotations

import copy
import os
import re

import nbformat
import pytest

from rome_edit import load_concept_vector
from rome_edit.models.gguf import find_gguf_model
from rome_edit.stats.handbook import HANDBOOK_ENV, handbook_installed
from scripts.run_notebooks import NOTEBOOKS, execute, problems

NAMES = ["01_gender_vector_study.ipynb", "02_direction_comparison.ipynb"]
# The study on SmolLM2: re-executed only where the model file and the handbook are installed
# (`make smollm2`, `apt-get install debian-handbook`; CI installs both).
REAL = "03_smollm2_study.ipynb"
REAL_MISSING = find_gguf_model("smollm2-135m-gguf") is None or not handbook_installed()
# conftest hides an installed handbook from every test; the SmolLM2 notebook needs it back.
HANDBOOK_AT_IMPORT = os.environ.get(HANDBOOK_ENV)
EVERY = [*NAMES, REAL]
REPRODUCED = [*NAMES, pytest.param(REAL, marks=pytest.mark.skipif(
    REAL_MISSING, reason="needs SmolLM2 (make smollm2) and the debian-handbook package"))]
SMALL = {"N_NAMES": 12, "N_HELDOUT": 8, "SMALL_GRAD_STEPS": 6, "SMALL_MOM2_SAMPLES": 1000,
         "N_RANDOM": 2, "SEED": 0}

# Tolerances of the re-execution, |fresh − committed| ≤ max(ATOL, RTOL·|committed|) for a
# number: cosines, classifier accuracies (1/300 per test delta of the shipped sweep) and the
# optimiser's probabilities may move by 0.01, one unit of their printed last digit; norms,
# counts and other numbers above 1 by 1%. That is what a different BLAS or library release
# changes; the sweep's own figures are read from files and do not move at all. Rates over
# held-out names (cells tagged RATES_TAG) are counts: one name of the N_HELDOUT/2 in a class
# that lands on the other side of a near-tie moves a rate by 2/N_HELDOUT (0.083 for the default
# 24), plus up to 0.01 of printed rounding (11/12 prints 0.92, 10/12 0.83); two names fail.
ATOL, RTOL = 0.01, 0.01
RATES_TAG = "rates-over-held-out-names"
# A number followed by " s" is a timing; one directly followed by "×" a ratio of two rates that
# are compared on their own (a one-name change in a small random rate moves it by a factor).
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)(?P<unit>\s?s\b|×)?")


def n_images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               for out in cell.get("outputs", []))


def cell_text(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell printed (stdout and text results), in order."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", "") + "\n")
    return "".join(parts)


def parse(text: str) -> tuple[str, list[float]]:
    """The text with each number replaced by ``#`` (timings and ratios by ``~``), the numbers.

    Runs of spaces are collapsed: a table's column widths follow the widths of its numbers."""
    numbers: list[float] = []

    def take(match: re.Match) -> str:
        if match.group("unit"):
            return "~" + match.group("unit")
        numbers.append(float(match.group(0)))
        return "#"

    skeleton = NUMBER.sub(take, text)
    skeleton = "\n".join(re.sub(r"[ \t]+", " ", line).rstrip() for line in skeleton.split("\n"))
    return skeleton, numbers


def compare(committed: str, fresh: str, atol: float = ATOL, rtol: float = RTOL) -> list[str]:
    """Differences between two printed outputs: their text apart from numbers must be equal,
    their numbers equal within ``max(atol, rtol·|committed|)``."""
    (a_text, a_num), (b_text, b_num) = parse(committed), parse(fresh)
    if a_text != b_text:
        a_lines, b_lines = a_text.split("\n"), b_text.split("\n")
        i = next((i for i, (x, y) in enumerate(zip(a_lines, b_lines)) if x != y),
                 min(len(a_lines), len(b_lines)))
        return [f"the text differs at line {i + 1}: committed "
                f"{a_lines[i] if i < len(a_lines) else '<end>'!r}, now "
                f"{b_lines[i] if i < len(b_lines) else '<end>'!r}"]
    return [f"number {k + 1}: committed {a}, now {b} (tolerance {max(atol, rtol * abs(a)):.3g})"
            for k, (a, b) in enumerate(zip(a_num, b_num))
            if abs(a - b) > max(atol, rtol * abs(a)) + 1e-9]


def parameter(nb: nbformat.NotebookNode, name: str):
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    match = re.search(rf"^{name}\s*=\s*(.+?)\s*(#.*)?$", cell.source, flags=re.M)
    assert match, f"no parameter {name}"
    return eval(match.group(1), {})  # a literal of the committed parameters cell


def with_parameters(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Append ``values`` to the ``parameters`` cell's defaults."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "each notebook needs exactly one cell tagged 'parameters'"
    cell = cells[0]
    declared = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", cell.source, flags=re.M))
    unknown = set(values) - declared
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    cell.source = cell.source + "\n# injected by tests/test_notebooks.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in values.items())
    return nb


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory, monkeypatch_module):
    # The kernels inherit this: a second-moment cache the notebooks share but the user's home
    # never sees (a fresh machine's first run, as in CI).
    cache = tmp_path_factory.mktemp("stats-cache")
    monkeypatch_module.setenv("ROME_EDIT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# -- the comparison itself can fail ------------------------------------------------------------

def test_compare_tolerates_small_moves_and_timings_only():
    committed = "accuracy 0.990 (300 test deltas)\nbox  0.76  0.87\nfitted in 12.0 s (33.0×)\n"
    assert compare(committed, "accuracy 0.995 (300 test deltas)\nbox  0.77    0.87\n"
                              "fitted in 250.3 s (11.0×)\n") == []
    assert compare(committed, committed.replace("0.76", "0.78"))  # a cosine moved by 0.02
    assert compare(committed, committed.replace("300", "304"))  # 1.3% more deltas
    assert compare(committed, committed.replace("box", "inlp"))  # another row
    assert compare(committed, committed + "extra line\n")
    assert compare("flip 0.92\n", "flip 0.83\n", atol=2 / 24 + 0.01) == []  # one of 12 names
    assert compare("flip 0.92\n", "flip 0.75\n", atol=2 / 24 + 0.01)  # two names
    # A model identity's hex digits are text, not numbers.
    assert parse("model bundled:toy-gptj@31900bfa5c84: 6 layers")[1] == [6.0]


# -- the committed notebooks -------------------------------------------------------------------

@pytest.mark.parametrize("name", EVERY)
def test_committed_notebook_shows_its_results(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert problems(nb) == [], f"{name}: run `make notebooks` and commit the result"
    assert n_images(nb) >= 3
    assert sum(bool(cell_text(c).strip()) for c in nb.cells if c.cell_type == "code") >= 6
    assert any(RATES_TAG in c.metadata.get("tags", []) for c in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRODUCED)
def test_committed_notebook_reproduces(name, stats_cache, monkeypatch):
    if name == REAL:
        if HANDBOOK_AT_IMPORT is None:
            monkeypatch.delenv(HANDBOOK_ENV, raising=False)
        else:
            monkeypatch.setenv(HANDBOOK_ENV, HANDBOOK_AT_IMPORT)
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    rate_atol = 2 / parameter(committed, "N_HELDOUT") + 0.01
    fresh = execute(copy.deepcopy(committed))  # raises on a failing cell
    found = problems(fresh)  # e.g. a new library release's warning printed by a cell
    assert not found, f"{name}:\n" + "\n".join(found)
    differences = []
    for i, (old, new) in enumerate(zip(committed.cells, fresh.cells)):
        if old.cell_type != "code":
            continue
        atol = rate_atol if RATES_TAG in old.metadata.get("tags", []) else ATOL
        differences += [f"cell {i}: {d}" for d in compare(cell_text(old), cell_text(new), atol)]
        images = [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in (old, new)]
        if images[0] != images[1]:
            differences.append(f"cell {i}: {images[0]} figures committed, {images[1]} now")
    assert not differences, (f"{name} no longer gives its committed results (if on purpose, "
                             "run `make notebooks` and commit):\n" + "\n".join(differences))


# -- small parameters, no shipped sweep --------------------------------------------------------

def run_small(name: str, values: dict) -> tuple[nbformat.NotebookNode, str]:
    nb = with_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), values)
    execute(nb)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                pytest.fail(f"{name}: {out.ename}: {out.evalue}")
    return nb, "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def number(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*(-?[0-9.]+)", text)
    assert match, f"no {pattern!r} in the notebook's output"
    return float(match.group(1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, stats_cache):
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
def test_gender_vector_study_notebook_small(workdir):
    sweep = workdir / "sweep"
    nb, text = run_small("01_gender_vector_study.ipynb",
                         {**SMALL, "SWEEP_DIR": str(workdir / "no-such-sweep"),
                          "SMALL_SWEEP_DIR": str(sweep), "SCALES": (0.5, 1.0, 2.0),
                          "K_FOLDS": 3, "MAX_NEW_TOKENS": 6, "OUT_DIR": str(workdir / "vec")})
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
def test_direction_comparison_notebook_small(workdir):
    # Reads the first test's sweep when it ran; otherwise runs the same small sweep itself.
    sweep = str(workdir / "sweep")
    nb, text = run_small("02_direction_comparison.ipynb",
                         {**SMALL, "SWEEP_DIR": sweep, "SMALL_SWEEP_DIR": sweep,
                          "SCALES": (1.0, 2.0), "INLP_ITERATIONS": 3, "RLACE_STEPS": 20})
    assert "cosine table:" in text and "erasure check:" in text
    assert number(r"cos\(leace, mean-difference\) =", text) > 0.95  # the same in theory
    for name in ("box", "classifier", "mean-difference", "inlp", "rlace", "leace"):
        assert name in text
    assert "flip rates at equal norms" in text and "random (mean)" in text
    assert "directions table" in text
    assert "weights vs activations" in text and "activations" in text
    assert n_images(nb) >= 4
