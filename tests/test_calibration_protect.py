"""``calibrate`` with the update form as a dimension: protected candidates, the trade-off when
nothing meets the rule, and the chosen protection travelling through the hparams file."""

import json

import pytest
from test_calibration import row  # one measured-row builder for both files

from rome_edit.calibration import CalibrationGrid, ChoiceRule, choose
from rome_edit.calibration.choose import pareto_front
from rome_edit.calibration.grid import DEFAULT_PROTECTIONS, Candidate
from rome_edit.cli.main import main
from rome_edit.forms.recipe import ProtectRecipe
from rome_edit.rome.hparams import ROMEHyperParams

SOFT = ProtectRecipe("other-names", "soft", 0.1)
NAMES = [("Brittany", "female"), ("David", "male"), ("Margaret", "female"), ("Robert", "male"),
         ("Anna", "female"), ("Peter", "male")]


def prow(eff, rand, source="other-names", weight=0.1, **kw):
    return {**row(eff=eff, rand=rand, **kw), "protect_source": source, "protect_form": "soft",
            "protect_weight": weight}


def test_grid_includes_protected_variants_of_the_best_plain_candidates():
    grid = CalibrationGrid(clamps=(4, 8, 16), steps=(20,))
    plain = grid.candidates([1, 2], 6)
    assert all(c.protect is None for c in plain) and len(plain) == 6
    ranked = [c for c in plain if c.layer == 1][::-1]  # as if clamp 16 measured best
    protected = grid.protected(ranked)
    assert len(protected) == 2 * len(DEFAULT_PROTECTIONS)
    assert {c.clamp_norm_factor for c in protected} == {16.0, 8.0}
    assert {c.protect for c in protected} == set(DEFAULT_PROTECTIONS)
    assert {p.source for p in DEFAULT_PROTECTIONS} == {"other-names", "same-last-token"}
    assert all(c.plain in plain for c in protected)
    assert CalibrationGrid(protect_top=0).protected(ranked) == []
    with pytest.raises(ValueError, match="protect_top"):
        CalibrationGrid(protect_top=-1)


def test_candidate_writes_the_protection_into_the_hparams():
    base = ROMEHyperParams.preset("toy-gptj")
    hp = Candidate(2, 8.0, 40, 5, SOFT).apply(base)
    assert hp.extra["protect"] == SOFT.to_dict() and hp.layer == 2
    assert ProtectRecipe.from_hparams(hp) == SOFT
    # a plain candidate on a base that carried a protection drops it
    assert "protect" not in Candidate(2, 8.0, 40, 5).apply(hp).extra
    assert Candidate(2, 8.0, 40, 5, SOFT).to_dict()["protect_weight"] == 0.1
    hard = Candidate(2, 8.0, 40, 5, ProtectRecipe("same-last-token", "hard")).to_dict()
    assert hard["protect_form"] == "hard" and hard["protect_weight"] is None


def test_recipe_round_trips_and_refuses_bad_values(tmp_path):
    hp = Candidate(1, 4.0, 20, 5, SOFT).apply(ROMEHyperParams.preset("toy-gptj"))
    hp.save(tmp_path / "hp.json")
    again = ROMEHyperParams.load(tmp_path / "hp.json")
    assert again == hp and ProtectRecipe.from_hparams(again) == SOFT
    assert json.loads((tmp_path / "hp.json").read_text())["protect"]["source"] == "other-names"
    for bad, message in [("other", "must be an object"), ({"form": "soft"}, "'source'"),
                         ({"source": "x.csv"}, "cannot travel"),
                         ({"source": "other-names", "form": "wide"}, "form"),
                         ({"source": "other-names", "weight": 0}, "weight"),
                         ({"source": "other-names", "colour": 1}, "unknown fields")]:
        with pytest.raises(ValueError, match=message):
            ProtectRecipe.from_dict(bad)


def test_rule_picks_a_protected_candidate_when_only_it_meets_the_rule():
    rows = [row(eff=1.0, rand=0.95, clamp=16.0),   # plain, effective, spills
            row(eff=0.4, rand=0.99),               # plain, specific, ineffective... eligible
            prow(0.9, 0.995),                      # protected: effective and specific
            prow(0.95, 0.97, weight=0.01)]
    c = choose(rows)
    assert c.rule_met and c.index == 2 and c.eligible == (1, 2)
    assert "rule met" in c.tradeoff and "protecting other-names (soft weight 0.1)" in c.tradeoff
    # on an exact tie the plain update (the reference) wins
    assert choose([prow(0.9, 1.0), row(eff=0.9, rand=1.0)]).index == 1


def test_tradeoff_when_nothing_meets_the_rule():
    rows = [row(eff=1.0, rand=0.90, clamp=16.0),
            row(eff=0.5, rand=0.975, clamp=4.0),
            prow(0.8, 0.970),                     # within 1 point of the best specificity
            prow(0.9, 0.960, weight=0.01),        # just outside
            row(eff=1.0, rand=0.98, fa=1.0)]      # most specific but fluency collapsed
    c = choose(rows, ChoiceRule())
    assert not c.rule_met and c.eligible == () and c.index == 2
    assert "no candidate reaches random-name specificity ≥ 99.0% (best 97.5%)" in c.tradeoff
    assert "highest efficacy among the 2 candidates within 1.0% of the best specificity" \
        in c.tradeoff
    assert "efficacy 80.0%, random-name specificity 97.0%" in c.tradeoff
    assert "reaches efficacy 100.0% at specificity 90.0%" in c.tradeoff
    assert c.frontier == (0, 3, 2, 1)  # the fluency-collapsed row is no option
    # margin 0: the most specific fluent candidate, as before
    assert choose(rows, ChoiceRule(fallback_margin=0.0)).index == 1
    # specificity reached only where fluency collapsed: said so
    c = choose([row(eff=1.0, rand=1.0, fa=1.0), row(eff=0.5, rand=0.9)])
    assert not c.rule_met and c.index == 1 and "fail the rule's other floors" in c.tradeoff


def test_fluency_is_relaxed_first_when_only_it_stands_in_the_way():
    """The held-back toy's case: the candidates that keep other names' answers lose 6% fluency
    on the few calibration prompts (a 200-name sweep found none lost)."""
    rows = [row(eff=1.0, rand=0.90),                      # fluent, not specific
            prow(1.0, 0.994, fa=2.107, fb=2.245),         # specific, fluency −6.1%
            row(eff=1.0, rand=0.995, fa=2.0, fb=2.245)]   # specific, fluency −10.9%
    c = choose(rows)
    assert not c.rule_met and c.index == 1 and c.eligible == (1,)
    assert "fluency, the floor measured on the fewest samples, was relaxed to 10.0%" \
        in c.tradeoff and "fluency 2.107 against 2.245 unedited" in c.tradeoff
    # beyond the relaxed tolerance: the specificity fallback, as before
    assert not choose(rows, ChoiceRule(fallback_fluency_tolerance=0.05)).eligible


def test_pareto_front():
    rows = [row(eff=1.0, rand=0.9), row(eff=0.5, rand=1.0), row(eff=0.4, rand=0.95),
            row(eff=0.8, rand=0.95), row(eff=0.8, rand=0.95)]
    assert pareto_front(rows) == (0, 3, 4, 1)
    assert pareto_front(rows, [1, 2]) == (1,)
    assert choose(rows).frontier == pareto_front(rows)


@pytest.fixture
def saved(tiny_gptj, tmp_path):
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "".join(f"{n},{g}\n" for n, g in NAMES))
    base = ROMEHyperParams.from_dict({"layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 3,
                                      "mom2_adjustment": False,
                                      "context_template_length_params": [[3, 1]]})
    Candidate(1, 4.0, 3, 3, ProtectRecipe("other-names", "soft", 0.5)).apply(base).save(
        tmp_path / "protected.json")
    return path, names


def test_chosen_protection_round_trips_into_edit_and_sweep(saved, tmp_path, capsys):
    model, names = saved
    hp = str(tmp_path / "protected.json")
    edit = ["edit", "--model", str(model), "--hparams", hp, "--subject", "Brittany",
            "--prompt", "Name: {}. Gender:", "--target", " Male", "--protect-names", str(names)]
    # the generic edit has no pool of its own: without --protect-names it is refused
    assert main([*edit[:-2], "--out", str(tmp_path / "e0")]) == 2
    assert "--protect-names FILE" in capsys.readouterr().err
    assert not (tmp_path / "e0").exists()
    assert main([*edit, "--out", str(tmp_path / "e1")]) == 0
    printed = capsys.readouterr().out
    assert "protecting other-names, soft, weight 0.5 (the hparams file's 'protect')" in printed
    record = json.loads((tmp_path / "e1" / "record.json").read_text())
    assert record["protection"]["source"] == "other-names"
    assert record["protection"]["form"] == "soft" and record["protection"]["weight"] == 0.5
    # --protect none overrides the file
    assert main([*edit, "--protect", "none", "--out", str(tmp_path / "e2")]) == 0
    assert "no protection" in capsys.readouterr().out
    assert json.loads((tmp_path / "e2" / "record.json").read_text()).get("protection") is None
    # sweep: every edit protected as the file says, recorded in the summary
    assert main(["sweep", "--model", str(model), "--hparams", hp, "--names", str(names),
                 "--limit", "2", "--out", str(tmp_path / "sw")]) == 0
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert summary["protection"]["source"] == "other-names"
    assert summary["protection"]["weight"] == 0.5 and summary["protection"]["form"] == "soft"
    lines = (tmp_path / "sw" / "records.jsonl").read_text().splitlines()
    assert all(json.loads(x)["protect_form"] == "soft" for x in lines)


def test_bad_protect_key_is_refused_before_any_edit(saved, tmp_path, capsys):
    model, _ = saved
    data = json.loads((tmp_path / "protected.json").read_text())
    data["protect"] = {"source": "other-names", "form": "wide"}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    code = main(["edit", "--model", str(model), "--hparams", str(tmp_path / "bad.json"),
                 "--subject", "Anna", "--prompt", "Name: {}. Gender:", "--target", " Male",
                 "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "'protect' has form 'wide'" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_tradeoff_says_when_the_choice_is_also_the_most_effective():
    c = choose([row(eff=1.0, rand=0.98), row(eff=0.5, rand=0.97)])
    assert not c.rule_met and c.index == 0
    assert "it is also the most effective candidate" in c.tradeoff


def test_a_presets_pool_protection_is_skipped_by_edit_and_said(saved, tmp_path, capsys,
                                                               monkeypatch):
    """A preset (SmolLM2's) may protect other names; the generic ``edit`` has no pool, so it
    edits unprotected and says so, instead of refusing a command run with every default."""
    from rome_edit.assembly import session
    from rome_edit.cli import commands_edit

    model, names = saved
    protected = ROMEHyperParams.load(tmp_path / "protected.json")
    original = ROMEHyperParams.preset.__func__
    monkeypatch.setattr(ROMEHyperParams, "preset", classmethod(
        lambda cls, name: protected if name == "tiny-protected" else original(cls, name)))
    for module in (session, commands_edit):
        monkeypatch.setattr(module, "preset_name", lambda lm: "tiny-protected")
    edit = ["edit", "--model", str(model), "--subject", "Brittany", "--prompt",
            "Name: {}. Gender:", "--target", " Male"]
    assert main([*edit, "--out", str(tmp_path / "e0")]) == 0
    printed = capsys.readouterr().out
    assert "note: the tiny-protected preset protects other-names, soft, weight 0.5" in printed
    assert "no protection" in printed
    assert json.loads((tmp_path / "e0" / "record.json").read_text()).get("protection") is None
    # with a pool the preset's protection applies
    assert main([*edit, "--protect-names", str(names), "--out", str(tmp_path / "e1")]) == 0
    assert "note:" not in capsys.readouterr().out
    record = json.loads((tmp_path / "e1" / "record.json").read_text())
    assert record["protection"]["source"] == "other-names"
