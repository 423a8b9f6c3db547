"""The main job: ``rome-edit demo --quick`` end to end on the bundled model."""

import json

import pytest

from rome_edit.cli.main import main


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROME_EDIT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for dotted in ("model.gender_accuracy", "trace.recommended_layer", "sweep.efficacy",
                   "sweep.specificity", "sweep.n_edits", "classifier.test_accuracy",
                   "classifier.shuffled_test_accuracy", "vector.flip_f_to_m",
                   "vector.flip_m_to_f", "vector.keep_m", "vector.keep_f",
                   "control.flip_f_to_m", "control.flip_m_to_f", "seconds.total"):
        section, key = dotted.split(".")
        assert key in report[section], dotted
    assert report["model"]["gender_accuracy"] > 0.95
    assert report["trace"]["recommended_layer"] >= 1  # layer 0 is excluded on GPT-J
    assert report["sweep"]["efficacy"] > 0.7
    assert report["classifier"]["test_accuracy"] > 0.9
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "![" in md and "Which direction carries the concept" in md
    for line in md.splitlines():
        if line.startswith("!["):
            assert (tmp_path / "demo" / line.split("(")[1].rstrip(")")).exists()
