"""Execute the notebooks in place, so the committed copies show their results.

    python scripts/run_notebooks.py                 # every notebooks/*.ipynb (`make notebooks`)
    python scripts/run_notebooks.py notebooks/02_direction_comparison.ipynb

Each notebook runs top to bottom with its default parameters in a fresh ``python3`` kernel whose
working directory is ``notebooks/`` (so it reads the shipped ``../vectors/bundled-sweep``) and
whose ``PYTHONPATH`` starts with this checkout, then is written back with its outputs. The key
statistics ``C`` come from the usual cache (``$ROME_EDIT_CACHE`` or ``~/.cache/rome-edit/stats``)
and are computed there on first use. A notebook is not written back when a cell fails, writes to
stderr (warnings, progress bars) or prints an absolute path of this machine: committed, those
would fail ``tests/test_notebooks.py``.

``tests/test_notebooks.py`` imports :func:`execute` and :func:`problems` from here, so the test
re-executes the notebooks exactly as this script does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 1800  # a first run computes C from the corpus inside one cell


def execute(nb: nbformat.NotebookNode, cwd: Path = NOTEBOOKS,
            env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Run ``nb`` in place in a fresh ``python3`` kernel started in ``cwd``.

    The kernel's ``PYTHONPATH`` starts with this checkout, so it runs the package here even when
    another copy is installed. Raises ``nbclient.exceptions.CellExecutionError`` on the first
    failing cell.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # Built here first, matplotlib's font cache never has a kernel print "Matplotlib is building
    # the font cache" to stderr on a fresh machine.
    import matplotlib.font_manager  # noqa: F401
    env["TQDM_DISABLE"] = "1"
    # One intra-op thread: the same floating-point reduction order on every machine whatever its
    # core count (so reruns reproduce the committed numbers), and on the toy model no slower;
    # on a busy machine several threads are several times slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    # record_timing=False: no per-cell timestamps in the metadata, so a rerun diffs only where a
    # result changed.
    # --log-level=ERROR: no kernel-launcher chatter (TCP transport notices) on the console.
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            record_timing=False, extra_arguments=["--log-level=ERROR"],
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    return nb


def merge_streams(outputs: list) -> list:
    """Join consecutive stream outputs of the same name (stdout, stderr).

    Where the kernel splits a cell's printing into messages depends on timing, so unjoined, two
    runs with the same text would differ in the file. Figures between prints stay in place."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.output_type == "stream" and prev is not None and prev.output_type == "stream"
                and prev.name == out.name):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def machine_paths() -> list[str]:
    """Absolute paths of this machine that must not appear in a committed notebook."""
    candidates = {str(ROOT), str(Path.home()), tempfile.gettempdir(), "/tmp/", "/home/",
                  "/root/", "/Users/"}
    cache = os.environ.get("ROME_EDIT_CACHE")
    if cache:
        candidates.add(cache)
    # "/" alone or a short prefix like "/tmp" would match ordinary text such as "a/tmp".
    return sorted(p for p in candidates if len(p) > 3)


def text_outputs(cell: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """``(kind, text)`` of every output of a code cell: stream name or MIME text."""
    found = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            found.append((out.name, out.text))
        elif out.output_type in ("execute_result", "display_data"):
            found.append(("text/plain", out.get("data", {}).get("text/plain", "")))
        elif out.output_type == "error":
            found.append(("error", f"{out.ename}: {out.evalue}"))
    return found


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What makes an executed notebook unfit to commit: empty, failing, noisy or local."""
    found = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not any(c.get("outputs") for c in code):
        found.append("no outputs at all (stripped or never executed)")
    paths = machine_paths()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is None:
            found.append(f"cell {i}: not executed")
        for kind, text in text_outputs(cell):
            if kind in ("stderr", "error"):
                found.append(f"cell {i}: {kind} output: {text.strip()[:200]!r}")
            for path in paths:
                if path in text:
                    found.append(f"cell {i}: prints the local path {path!r}")
    return found


def run(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    execute(nb)
    seconds = time.perf_counter() - start
    found = problems(nb)
    if found:
        rejected = Path(tempfile.mkdtemp(prefix="rome-edit-notebook-")) / path.name
        nbformat.write(nb, rejected)
        raise SystemExit(f"{path.name}: not written back (the executed copy is {rejected}):\n  "
                         + "\n  ".join(found) + "\nFix the notebook (quiet the warning, print "
                         "a relative path) and run this script again.")
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to execute (default: every notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if path.resolve().parent != NOTEBOOKS:
            raise SystemExit(f"{path}: only notebooks in {NOTEBOOKS.relative_to(ROOT)}/ run here "
                             "(they look up ../vectors/bundled-sweep from that folder)")
        seconds = run(path.resolve())
        print(f"executed {path.resolve().relative_to(ROOT)} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
