"""Library errors speak Python; the CLI adds its flags (rome_edit.errors, rome_edit.cli.flags)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rome_edit.cli.flags import FLAGS, error_line
from rome_edit.cli.main import main
from rome_edit.errors import MissingFileError, ParameterError

PACKAGE = Path(__file__).resolve().parents[1] / "rome_edit"
# A command-line flag, or an invocation of the command line (``rome-edit stats``).
CLI_WORDS = re.compile(r"(?<![\w-])--[a-z]|rome-edit ")


def is_command_line_code(path: Path) -> bool:
    """The CLI's own modules: ``cli/`` and the gender study's commands (``study/commands/``)."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] == "cli" or parts[:2] == ("study", "commands")


def library_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not is_command_line_code(p)]


def strings_in(node: ast.AST) -> str:
    """Every string constant under ``node`` (f-string parts included), concatenated."""
    return "".join(c.value for c in ast.walk(node)
                   if isinstance(c, ast.Constant) and isinstance(c.value, str))


def test_library_error_messages_name_no_command_line_flags():
    bad = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            # raise statements, and the fix text handed to check_same_model's error
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = strings_in(node.exc)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "check_same_model"):
                text = strings_in(node)
            else:
                continue
            if CLI_WORDS.search(text):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {text[:80]!r}")
    assert not bad, "messages for a Python caller name CLI flags:\n" + "\n".join(bad)


def test_the_scan_finds_a_flag():
    """The scan above can fail: a raise that names a flag is caught."""
    tree = ast.parse('raise ValueError(f"use --ridge {x} or rome-edit stats")')
    assert CLI_WORDS.search(strings_in(tree.body[0].exc))  # type: ignore[attr-defined]


def raises_error(call: ast.Call) -> bool:
    """A call that builds an error (``…Error(...)``) or raises one (``check_same_model``)."""
    name = call.func.id if isinstance(call.func, ast.Name) else \
        call.func.attr if isinstance(call.func, ast.Attribute) else ""
    return name.endswith("Error") or name == "check_same_model"


def named_parameters(path: Path) -> list[tuple[int, str]]:
    """``parameters=`` names of errors in a module: literal tuples or a module-level tuple."""
    tree = ast.parse(path.read_text())
    constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        values = []
        if isinstance(node, ast.Call) and raises_error(node):
            values = [k.value for k in node.keywords if k.arg == "parameters"]
        elif isinstance(node, ast.arguments):  # a default such as parameters=("model",)
            names = [a.arg for a in node.args[-len(node.defaults):]] if node.defaults else []
            values = [d for a, d in zip(names, node.defaults) if a == "parameters"]
        for value in values:
            if isinstance(value, ast.Name):  # a module constant, or an argument passed on
                if value.id not in constants:
                    continue
                value = constants[value.id]
            assert isinstance(value, ast.Tuple), f"{path}:{value.lineno}: a literal tuple"
            found += [(value.lineno, e.value) for e in value.elts  # type: ignore[attr-defined]
                      if isinstance(e, ast.Constant)]
    return found


def test_every_named_parameter_has_a_command_line_spelling():
    names = [(path, line, name) for path in library_files()
             for line, name in named_parameters(path)]
    assert len(names) >= 30  # the scan sees the library's errors
    missing = [f"{p.relative_to(PACKAGE.parent)}:{line}: {name}" for p, line, name in names
               if name not in FLAGS]
    assert not missing, "add these to rome_edit.cli.flags.FLAGS:\n" + "\n".join(missing)


def test_error_line_adds_the_flags_of_the_named_parameters():
    err = ParameterError("pass stats= or set mom2_ridge.", parameters=("stats", "mom2_ridge"))
    assert error_line(err) == ("pass stats= or set mom2_ridge. (command line: --stats FILE, "
                               "mom2_ridge in the --hparams file)")
    assert error_line(ParameterError("x", parameters=("overwrite",))) == "x"  # no such flag
    assert error_line(ValueError("plain")) == "plain"
    assert error_line(KeyError("a key")) == "a key"
    missing = MissingFileError("no file", parameters=("stats",))
    assert isinstance(missing, FileNotFoundError) and missing.parameters == ("stats",)


def test_cli_error_names_the_flag_for_a_missing_statistics_file(tmp_path, capsys):
    code = main(["edit", "--subject", "Brittany", "--prompt", "Name: {}. Gender:", "--target",
                 " Male", "--stats", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "edit")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err
    assert "(command line: 'rome-edit stats --layer L --out FILE', --stats FILE)" in err
    assert not (tmp_path / "edit").exists()  # nothing written


def test_cli_error_names_the_window_flag(tmp_path, capsys):
    code = main(["trace", "--prompt", "Name: {}. Gender:", "--subject", "Brittany",
                 "--window", "99", "--out", str(tmp_path / "trace")])
    err = capsys.readouterr().err
    assert code == 2 and "pass a smaller window=" in err and "(command line: --window)" in err


def test_cli_error_names_the_whole_file_flag(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Some text.\n")
    code = main(["stats", "--layer", "1", "--corpus", str(tmp_path / "corpus"), "--whole-file",
                 "--out", str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "drop whole_file" in err and "(command line: --whole-file)" in err


@pytest.mark.parametrize("cls", [ParameterError, MissingFileError])
def test_parameters_default_to_none_named(cls):
    assert cls("message").parameters == () and str(cls("message")) == "message"
