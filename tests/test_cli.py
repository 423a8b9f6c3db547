"""The command line end to end on a tiny saved model: outputs, exit codes, no tracebacks."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from rome_edit.cli.main import main

CTX = ["{}", "The weather was cold. {}"]


@pytest.fixture
def saved_model(tiny_gptj, tmp_path):
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    hp = {"layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 4, "clamp_norm_factor": 4,
          "mom2_adjustment": False, "context_template_length_params": [[3, 1]]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "ctx.json").write_text(json.dumps(CTX))
    return path


def common(tmp_path, saved_model):
    return ["--model", str(saved_model), "--hparams", str(tmp_path / "hp.json"),
            "--context-templates", str(tmp_path / "ctx.json")]


def test_info_and_generate(saved_model, capsys):
    assert main(["info", "--model", str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert "gptj" in out and "transformer.h.{}.mlp.fc_out" in out and "parallel" in out
    assert main(["generate", "--model", str(saved_model), "--prompt", "Name: Ani. Gender:",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Name: Ani. Gender:")


def test_edit_sweep_analyze_apply(saved_model, tmp_path, capsys):
    args = common(tmp_path, saved_model)
    assert main(["edit", "--subject", "Brittany", "--prompt", "Name: {}. Gender:", "--target",
                 " Male", *args, "--out", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "record.safetensors").exists()
    names = tmp_path / "names.csv"
    rows = ["name,gender"] + [f"{n},{g}" for n, g in [
        ("Brittany", "female"), ("David", "male"), ("Margaret", "female"), ("Robert", "male"),
        ("Anna", "female"), ("Peter", "male"), ("Laura", "female"), ("Thomas", "male"),
        ("Emily", "female"), ("George", "male")]]
    names.write_text("\n".join(rows) + "\n")
    assert main(["sweep", "--names", str(names), *args, "--batch-size", "4",
                 "--out", str(tmp_path / "sweep")]) == 0
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["n_edits"] == 10 and summary["layer"] == 1
    assert main(["analyze", str(tmp_path / "sweep"), "--no-model",
                 "--out", str(tmp_path / "an")]) == 0
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    for key in ("classifier", "vector", "deltas", "directions"):
        assert key in analysis
    assert "test_accuracy" in analysis["classifier"]
    vector = tmp_path / "an" / "gender_vector.safetensors"
    assert main(["apply", "--vector", str(vector), "--names", str(names), "--model",
                 str(saved_model), "--hparams", str(tmp_path / "hp.json"), "--mode",
                 "activations", "--out", str(tmp_path / "ap")]) == 0
    table = json.loads((tmp_path / "ap" / "apply.json").read_text())["table"]
    assert table["n_female"] == 5 and table["n_male"] == 5


@pytest.mark.parametrize("argv, message", [
    (["edit", "--subject", "Zed", "--prompt", "Name: Ani.", "--target", " Male"], "exactly one"),
    (["edit", "--subject", "Ani", "--prompt", "Name: {}.", "--target", " "], "target is empty"),
    (["edit", "--subject", "Ani", "--prompt", "Name: {}.", "--target", " Male", "--layer", "9"],
     "out of range"),
])
def test_errors_exit_2_without_traceback(saved_model, tmp_path, capsys, argv, message):
    before = (saved_model / "model.safetensors").read_bytes()
    code = main([*argv, *common(tmp_path, saved_model), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert (saved_model / "model.safetensors").read_bytes() == before


def test_unknown_model_path_is_a_clear_error(capsys, tmp_path):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "could not load model" in capsys.readouterr().err


def test_version_is_the_installed_release(capsys):
    import rome_edit

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    installed = metadata.version("rome-edit")
    # a mismatch here means stale install metadata: `pip install -e .` rewrites it
    assert capsys.readouterr().out == f"rome-edit {installed}\n"
    assert rome_edit.__version__ == installed


def test_version_answers_without_importing_torch():
    code = ("import sys\nfrom rome_edit.cli.main import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.splitlines() == [f"rome-edit {metadata.version('rome-edit')}", "False"]


def test_help_marks_the_gender_study_commands():
    """`rome-edit --help` says which commands are the gender study's, and only those."""
    import argparse

    from rome_edit.cli.main import build_parser

    study = {"locate", "calibrate", "sweep", "analyze", "apply", "demo"}
    parser = build_parser()
    epilog = parser.format_help().split("The gender study", 1)[1]
    assert all(name in epilog for name in study)
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    marked = {c.dest for c in commands._choices_actions if c.help.startswith("gender study:")}
    assert marked == study
    assert {"trace", "edit", "forensics", "stats", "lens"} <= set(commands.choices) - marked
