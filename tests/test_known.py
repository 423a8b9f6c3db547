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
    # the neighbours are counted among known names only (John and Mary answer themselves)
    from rome_edit.models.loading import load_model
    pool = known_names(load_model(str(saved_model)), ENTRIES)
    assert selection["neighbours"] == {"n_tested": 4, "n_known": len(pool.names)}
    assert f"known-only neighbours: {len(pool.names)} of 4 names" in printed.out


def test_calibrate_known_only_samples_known_names(saved_model, tmp_path,  # noqa: F811
                                                  monkeypatch, capsys):
    """``calibrate --known-only`` filters the names on the few-shot prompt before the sample is
    drawn, as ``sweep --known-only`` does, and ``--prompt few-shot`` edits on that prompt."""
    from rome_edit.models.loading import load_model
    from rome_edit.study.commands import calibrate as command
    from rome_edit.study.known import KnownNames

    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "".join(f"{e.name},{e.gender}\n" for e in ENTRIES))
    known = known_names(load_model(str(saved_model)), ENTRIES)
    args = ["calibrate", "--model", str(saved_model), "--names", str(names),
            "--base", str(tmp_path / "hp.json"), "--context-templates", str(tmp_path / "ctx.json"),
            "--known-only", "--prompt", "few-shot", "--n", "2", "--layers", "1",
            "--clamps", "4", "--steps", "2", "--protect-top", "0", "--n-fluency", "0",
            "--out", str(tmp_path / "cal.json")]
    code = main(args)
    captured = capsys.readouterr()
    assert f"known-only: {known.n_right} of 4 names right" in captured.out
    # the random tiny model answers Male for every name: no female name is known, so the
    # balanced sample is refused with the fix, after the filter and before any edit
    assert {e.gender for e in known.names} == {"male"}
    assert code == 2 and "lower --n" in captured.err and not (tmp_path / "cal.json").exists()
    # with a filter that keeps one name of each gender the run goes on with those two
    two = (ENTRIES[0], ENTRIES[2])  # Anna, Peter
    monkeypatch.setattr(command, "known_names", lambda lm, entries, prompt: KnownNames(
        two, prompt, len(entries), 2, 0.5, 0.5))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "known-only: 2 of 6 names right" in out
    assert "on 2 edits of 'Name: John. Gender: Male\\n" in out and (tmp_path / "cal.json").exists()
