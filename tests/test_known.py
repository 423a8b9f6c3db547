"""The known-only filter: only names the model gets right are edited and counted."""

import json

import torch
from test_cli import common, saved_model  # noqa: F401  (the tiny saved model fixture)

from rome_edit.cli.main import main
from rome_edit.study import known as known_module
from rome_edit.study.known import FEW_SHOT_PREFIX, FEW_SHOT_PROMPT, known_names
from rome_edit.study.names import NameEntry
from rome_edit.study.task import EDIT_PROMPT

ENTRIES = [NameEntry("Anna", "female"), NameEntry("John", "male"), NameEntry("Peter", "male"),
           NameEntry("Laura", "female"), NameEntry("Mary", "female"), NameEntry("Tom", "male")]


def test_known_names_keeps_exactly_the_right_answers(tiny_gptj, monkeypatch):
    seen = {}

    def fake_choose(model, tokenizer, prompts, candidates):
        seen["prompts"], seen["candidates"] = prompts, candidates
        # index 0 = female answer, 1 = male: Anna right, Peter wrong, Laura right, Tom right
        said = {"Anna": 0, "Peter": 0, "Laura": 0, "Tom": 1}
        return torch.tensor([said[p.rsplit("Name: ", 1)[1].split(".")[0]] for p in prompts])

    monkeypatch.setattr(known_module, "choose_between", fake_choose)
    known = known_names(tiny_gptj, ENTRIES)
    # John and Mary answer themselves in the few-shot prefix: not tested
    assert [p.removeprefix(FEW_SHOT_PREFIX) for p in seen["prompts"]] == [
        "Name: Anna. Gender:", "Name: Peter. Gender:", "Name: Laura. Gender:",
        "Name: Tom. Gender:"]
    assert seen["candidates"] == [" Female", " Male"]
    assert [e.name for e in known.names] == ["Anna", "Laura", "Tom"]
    assert (known.n_tested, known.accuracy) == (4, 0.75)
    assert (known.accuracy_female, known.accuracy_male) == (1.0, 0.5)
    assert known.to_json()["prompt"] == FEW_SHOT_PROMPT and known.to_json()["n_known"] == 3
    first = known_names(tiny_gptj, ENTRIES, limit=1, chunk=2)  # stops after the first chunk
    assert [e.name for e in first.names] == ["Anna"] and first.n_tested == 2

    seen.clear()
    monkeypatch.setattr(known_module, "choose_between",
                        lambda m, t, prompts, c: torch.ones(len(prompts), dtype=torch.long))
    plain = known_names(tiny_gptj, ENTRIES, EDIT_PROMPT)  # no prefix: every name is tested
    assert plain.n_tested == 6 and [e.gender for e in plain.names] == ["male"] * 3


def test_sweep_known_only_edits_and_records_only_known_names(saved_model, tmp_path,  # noqa: F811
                                                             capsys):
    rows = ["name,gender"] + [f"{e.name},{e.gender}" for e in ENTRIES]
    names = tmp_path / "names.csv"
    names.write_text("\n".join(rows) + "\n")
    out = tmp_path / "sweep"
    code = main(["sweep", "--names", str(names), *common(tmp_path, saved_model),
                 "--known-only", "--prompt", "few-shot", "--limit", "2", "--batch-size", "2",
                 "--out", str(out)])
    printed = capsys.readouterr()
    if code != 0:  # a random tiny model may know no name: then nothing is written
        assert "gets no name right" in printed.err and not (out / "summary.json").exists()
        return
    summary = json.loads((out / "summary.json").read_text())
    selection = summary["selection"]
    assert selection["prompt"] == FEW_SHOT_PROMPT and selection["n_tested"] == 4
    assert summary["prompt"] == FEW_SHOT_PROMPT
    assert summary["n_edits"] == min(2, selection["n_known"])
    assert json.loads((out / "sweep.json").read_text())["selection"] == selection
    assert f"known-only: {selection['n_right']} of 4 names" in printed.out
