"""The layering the docs promise (docs/architecture.md), checked on the imports themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rome_edit"
# The rooms in the order data flows (docs/architecture.md).  Each room may import only the rooms
# listed for it (and itself).
_ENGINE = ["models", "tracing", "stats", "rome", "weights", "forms", "evaluation"]
ALLOWED = {
    "models": {"models"},
    "tracing": {"models", "tracing"},
    "stats": {"models", "tracing", "stats"},
    "rome": {"models", "rome"},  # the engine: computes edits, writes nothing
    "weights": {"models", "rome", "weights"},
    "forms": {"models", "rome", "weights", "forms"},
    "evaluation": set(_ENGINE),
    "forensics": {"models", "rome", "weights", "forms", "forensics"},
    "inspection": {"models", "tracing", "inspection"},
    "linearisation": {"models", "linearisation"},
    "assembly": {"models", "tracing", "stats", "rome", "assembly"},
    "calibration": set(_ENGINE) | {"assembly", "calibration"},
    "analysis": {"analysis"},  # model-free: no model, tracing or editing imports
    "api": set(_ENGINE) | {"forensics", "inspection", "linearisation", "assembly", "calibration",
                           "analysis", "api"},  # everything but the study and the CLI
}
TOP_LEVEL = {"storage", "distributed", "errors"}  # small shared modules below every room
# The bundled model's statistics corpus is the study's synthetic world: data, stdlib only.
EXCEPTIONS = {("stats/corpus.py", "study.corpus"), ("stats/corpus.py", "study.names")}


def test_every_room_has_a_rule_and_a_docstring():
    rooms = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert rooms - {"study", "cli"} == set(ALLOWED)
    for room in rooms:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc, f"rome_edit/{room}/__init__.py needs a docstring that says its job"
        modules = [p for p in (PACKAGE / room).glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 13, f"rome_edit/{room} has {len(modules)} modules"


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


# The gender study kept apart: the generic commands (rome_edit/cli) and the toolkit's tests never
# import it; cli/main.py registers the study's commands (rome_edit/study/commands), and the
# study's own tests are listed here.
TESTS = PACKAGE.parent / "tests"
CLI_MAY_IMPORT_STUDY = {"main.py"}
STUDY_TESTS = {"test_study_data.py", "test_persist_defaults.py", "test_demo.py", "test_known.py"}


def imports_study(path: Path) -> bool:
    """Whether the file imports the study: an import statement, or ``import_module`` /
    ``__import__`` called with a module name that starts with it."""
    if any(m == "study" or m.startswith("study.") for m in rome_imports(path)):
        return True
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f, name = node.func, node.args[0].value
            called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
            if called in ("import_module", "__import__") and isinstance(name, str) and (
                    name == "rome_edit.study" or name.startswith("rome_edit.study.")):
                return True
    return False


def study_importers(cli: Path, tests: Path) -> list[str]:
    bad = [f"rome_edit/cli/{p.name}" for p in sorted(cli.glob("*.py"))
           if p.name not in CLI_MAY_IMPORT_STUDY and imports_study(p)]
    return bad + [f"tests/{p.name}" for p in sorted(tests.glob("*.py"))
                  if p.name not in STUDY_TESTS and imports_study(p)]


def test_generic_commands_and_toolkit_tests_do_not_import_the_study():
    bad = study_importers(PACKAGE / "cli", TESTS)
    assert not bad, ("the gender study belongs in rome_edit/study (its commands in "
                     "study/commands) and its tests in the STUDY_TESTS files; toolkit tests take "
                     "their subjects from tests/concepts.py:\n" + "\n".join(bad))
    assert all((TESTS / name).exists() for name in STUDY_TESTS)


def test_the_study_check_sees_an_import(tmp_path):
    (tmp_path / "cli").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "cli" / "main.py").write_text("from rome_edit.study.commands import x\n")
    (tmp_path / "cli" / "commands_x.py").write_text("import rome_edit.study.names\n")
    (tmp_path / "cli" / "commands_y.py").write_text("from rome_edit.models import loading\n")
    (tmp_path / "tests" / "test_x.py").write_text(
        "import importlib\nimportlib.import_module('rome_edit.study.task')\n")
    (tmp_path / "tests" / "test_study_data.py").write_text("from rome_edit.study import names\n")
    assert study_importers(tmp_path / "cli", tmp_path / "tests") == [
        "rome_edit/cli/commands_x.py", "tests/test_x.py"]


def test_study_data_modules_import_only_the_standard_library():
    for name in ("corpus.py", "names.py"):
        assert rome_imports(PACKAGE / "study" / name) <= {"study.names"}, name


# One assembly point (docs/architecture.md): turning (model, hparams, templates, statistics)
# into an editing run happens in rome_edit.assembly.session.Session, which rome_edit.Editor is
# built on; every command, the study, calibration, scripts and benchmarks go through one of
# them.  These resolvers are the Session's parts and are imported or called nowhere else.
ROOT = PACKAGE.parent
RESOLVERS = {"default_hparams", "resolve_hparams", "context_templates_for",
             "sample_context_templates", "inverse_for", "corpus_spec", "cached_second_moment"}
RESOLVERS_ALLOWED = {
    "rome_edit/assembly/session.py": RESOLVERS,  # the assembly point itself
    # `rome-edit stats` computes statistics as its product (the cache the Session reads);
    # it assembles no editing run: no hyperparameters, no templates, no C⁻¹.
    "rome_edit/cli/commands_stats.py": {"cached_second_moment"},
    "rome_edit/stats/__init__.py": {"cached_second_moment"},  # the public re-export
}


def resolver_uses(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every import of a resolver and every call of one (as ``name(...)`` or
    ``module.name(...)``) in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += [(node.lineno, a.name) for a in node.names if a.name in RESOLVERS]
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) \
                else None
            if name in RESOLVERS:
                found.append((node.lineno, name))
    return sorted(found)


def assembly_violations(root: Path) -> list[str]:
    bad = []
    for folder in ("rome_edit", "scripts", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            allowed = RESOLVERS_ALLOWED.get(rel, set())
            bad += [f"{rel}:{line} uses {name}" for line, name in resolver_uses(path)
                    if name not in allowed]
    return bad


def test_one_assembly_point():
    bad = assembly_violations(ROOT)
    assert not bad, ("set up an editing run with rome_edit.Editor (Editor.load / from_model / "
                     "from_loaded; calibration: editing.session.Session), not the resolvers:\n"
                     + "\n".join(bad))


def test_the_assembly_check_sees_a_direct_call(tmp_path):
    """The check is not vacuous: a module calling a resolver, however imported, is caught."""
    (tmp_path / "rome_edit").mkdir()
    (tmp_path / "rome_edit" / "x.py").write_text(
        "import rome_edit.assembly.session as s\n"
        "from rome_edit.assembly.session import inverse_for\n"
        "s.context_templates_for(1, 2)\n")
    assert assembly_violations(tmp_path) == ["rome_edit/x.py:2 uses inverse_for",
                                             "rome_edit/x.py:3 uses context_templates_for"]


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module → the package modules it imports (any import, at any depth of the file)."""
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(
        ".__init__"): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in rome_imports(path):
            full = f"rome_edit.{imported}"
            # `from rome_edit.x import y` may name a module y or a name in x
            while full not in modules and "." in full:
                full = full.rsplit(".", 1)[0]
            if full != name and not name.startswith(full + ".") and full in modules:
                targets.add(full)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop (package ``__init__`` files
    that re-export their room's names count as importers of the room, not as part of it)."""
    assert cycles(module_graph(PACKAGE)) == []


def test_the_cycle_check_sees_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# One write mechanism: weights/write.py is the one module that writes an output projection W_out
# (rank-one add/subtract, full update, snapshot/restore, copy from another model); every edit
# form, vector write, revert and forensic undo calls it.  Checked here as: no other module that
# can reach a weight matrix (imports out_proj_weight or get_weight) calls an in-place method.
WEIGHT_GETTERS = {"out_proj_weight", "get_weight"}
IN_PLACE = {"copy_", "add_", "sub_", "mul_", "div_", "zero_", "fill_", "addr_", "addmm_",
            "set_"}
WEIGHT_WRITERS = {"weights/write.py"}


def weight_writes(package: Path) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        tree = ast.parse(path.read_text())
        reaches = any(isinstance(n, ast.ImportFrom) and any(a.name in WEIGHT_GETTERS
                                                             for a in n.names)
                      for n in ast.walk(tree))
        if not reaches or rel in WEIGHT_WRITERS:
            continue
        bad += [f"{rel}:{n.lineno} calls .{n.func.attr}" for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr in IN_PLACE]
    return bad


def test_one_module_writes_weights():
    bad = weight_writes(PACKAGE)
    assert not bad, ("write weights through rome_edit.weights.write (add_rank_one, "
                     "subtract_rank_one, add_update, snapshot/restore, preserved, "
                     "copy_layers):\n" + "\n".join(bad))


def test_the_weight_write_check_sees_a_copy(tmp_path):
    (tmp_path / "x.py").write_text(
        "from rome_edit.models.architectures import out_proj_weight\n"
        "out_proj_weight(m, a, 1).copy_(w)\n")
    assert weight_writes(tmp_path) == ["x.py:2 calls .copy_"]


def test_only_the_study_commands_use_the_cli():
    """The study's library modules never import the CLI; its commands (``study/commands``) may
    reuse the CLI's shared argument helpers, and ``cli/main.py`` only registers them."""
    bad = []
    for path in sorted((PACKAGE / "study").rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[:2] == ("study", "commands"):
            continue
        bad += [f"{rel} imports rome_edit.{m}" for m in rome_imports(path)
                if m.split(".")[0] == "cli"]
    assert not bad, "\n".join(bad)
