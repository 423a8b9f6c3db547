"""The layering the docs promise (docs/architecture.md), checked on the imports themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rome_edit"
# Each layer may import only the layers listed (and itself).
ALLOWED = {
    "models": {"models"},
    "tracing": {"models", "tracing"},
    "stats": {"models", "tracing", "stats"},
    "editing": {"models", "tracing", "stats", "editing"},
    "calibration": {"models", "tracing", "stats", "editing", "calibration"},
    "analysis": {"analysis"},  # no model, no tracing, no editing
}
TOP_LEVEL = {"storage", "distributed"}  # small shared modules below every layer
# The bundled model's statistics corpus is the study's synthetic world: data, stdlib only.
EXCEPTIONS = {("stats/corpus.py", "study.corpus"), ("stats/corpus.py", "study.names")}


def rome_imports(path: Path) -> set[str]:
    """``rome_edit.X.Y`` imports of a file, as ``X.Y`` (type-checking-only imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.removeprefix("rome_edit.") for n in names if n.startswith("rome_edit.")}
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for module in rome_imports(path):
            top = module.split(".")[0]
            if top in ALLOWED[layer] | TOP_LEVEL or (rel, module) in EXCEPTIONS:
                continue
            bad.append(f"{rel} imports rome_edit.{module}")
    assert not bad, "\n".join(bad)


def test_study_data_modules_import_only_the_standard_library():
    for name in ("corpus.py", "names.py"):
        assert rome_imports(PACKAGE / "study" / name) <= {"study.names"}, name
