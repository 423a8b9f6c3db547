"""``calibrate``: the grid, the choice rule against the measured table, the written file."""

import json

import pytest

from rome_edit.calibration import CalibrationGrid, ChoiceRule, calibrate, choose
from rome_edit.calibration.grid import Candidate
from rome_edit.cli.main import main
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest
from rome_edit.stats.cache import CACHE_ENV

NAMES = [("Brittany", "female"), ("David", "male"), ("Margaret", "female"), ("Robert", "male"),
         ("Anna", "female"), ("Peter", "male"), ("Laura", "female"), ("Thomas", "male"),
         ("Emily", "female"), ("George", "male")]


def row(layer=1, clamp=4.0, steps=20, eff=0.5, rand=1.0, same=1.0, para=0.5, spec=1.0,
        city=1.0, fb=3.0, fa=3.0):
    return {"layer": layer, "clamp_norm_factor": clamp, "v_num_grad_steps": steps,
            "v_loss_layer": 5, "efficacy": eff, "specificity_random": rand,
            "specificity_same_last_token": same, "paraphrase": para, "specificity": spec,
            "city_kept": city, "fluency_before": fb, "fluency_after": fa}


def test_grid_band_excludes_and_clips():
    grid = CalibrationGrid(band=2)
    assert grid.layers_for(1, 6, excluded=(0,)) == [1, 2, 3]
    assert grid.layers_for(5, 6) == [3, 4, 5]
    assert CalibrationGrid(layers=(3, 1, 3)).layers_for(1, 6) == [1, 3]
    with pytest.raises(ValueError, match="outside"):
        CalibrationGrid(layers=(7,)).layers_for(1, 6)
    cands = CalibrationGrid(clamps=(4, 8), steps=(10,), loss_layers=(-1, 2)).candidates([1, 3], 6)
    # loss layer 2 lies below edit layer 3: skipped there only
    assert Candidate(1, 4.0, 10, 2) in cands and Candidate(3, 4.0, 10, 5) in cands
    assert not any(c.layer == 3 and c.v_loss_layer == 2 for c in cands)
    assert len(cands) == 2 * 2 + 2
    for bad in (dict(clamps=(0,)), dict(steps=(0,)), dict(band=-1), dict(loss_layers=())):
        with pytest.raises(ValueError):
            CalibrationGrid(**bad)
    with pytest.raises(ValueError, match="outside"):
        CalibrationGrid(loss_layers=(-9,)).candidates([1], 6)


def test_choice_rule():
    rows = [row(eff=1.0, rand=0.95),              # most effective but spills onto random names
            row(eff=0.9, fa=2.0),                 # fluency collapsed
            row(eff=0.8, clamp=8.0, para=0.6),
            row(eff=0.8, clamp=4.0, para=0.9),    # ties on efficacy, better CounterFact score
            row(eff=0.6)]
    c = choose(rows, ChoiceRule())
    assert c.rule_met and c.index == 3 and c.eligible == (2, 3, 4)
    # exact ties everywhere: the cheaper, gentler setting
    assert choose([row(clamp=8.0), row(clamp=4.0)]).index == 1
    # a looser rule admits the most effective one
    assert choose(rows, ChoiceRule(min_specificity_random=0.9)).index == 0
    # nothing eligible: the most specific one, flagged
    c = choose([row(eff=1.0, rand=0.5), row(eff=0.2, rand=0.8)])
    assert not c.rule_met and c.index == 1 and c.eligible == ()
    with pytest.raises(ValueError):
        ChoiceRule(min_specificity_random=1.5)
    with pytest.raises(ValueError, match="empty"):
        choose([])


@pytest.fixture
def saved_model(tiny_gptj, tmp_path):
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "".join(f"{n},{g}\n" for n, g in NAMES))
    base = {"layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 4, "clamp_norm_factor": 4,
            "mom2_adjustment": True, "mom2_dataset": "sampled", "mom2_n_samples": 16,
            "context_template_length_params": [[3, 1]]}
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "corpus.txt").write_text("".join(f"{n} lives in the city of Paris. She said that "
                                                 "the weather was cold.\n" for n, _ in NAMES))
    return path


def test_calibrate_cli_grid_rule_and_file(saved_model, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    out = tmp_path / "cal" / "hp.json"
    args = ["calibrate", "--model", str(saved_model), "--names", str(tmp_path / "names.csv"),
            "--n", "4", "--layers", "1", "2", "--clamps", "1", "8", "--steps", "2",
            "--base", str(tmp_path / "base.json"), "--n-fluency", "1", "--corpus",
            str(tmp_path / "corpus.txt"), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chosen: layer" in printed
    # default protected forms: 3 soft weights + same-last-token + null-space, on the best 2
    # per layer
    assert ("update: 4 candidates with ROME's plain rank-one update (paper form), 20 with a "
            "protected update") in printed
    report = json.loads((tmp_path / "cal" / "hp-report" / "calibration.json").read_text())
    table = report["table"]
    plain = [r for r in table if r["protect_source"] is None]
    assert len(plain) == 2 * 2 and len(table) == 4 + 2 * 2 * 5  # layers × clamps (× one step)
    assert {(r["layer"], r["clamp_norm_factor"], r["v_num_grad_steps"]) for r in plain} == \
        {(a, b, 2) for a in (1, 2) for b in (1.0, 8.0)}
    assert {(r["protect_source"], r["protect_weight"]) for r in table} == {
        (None, None), ("other-names", 0.001), ("other-names", 0.01), ("other-names", 0.1),
        ("same-last-token", 0.01), ("other-names", None)}
    assert {r["protect_form"] for r in table} == {None, "soft", "auto", "null-space"}
    # protected variants reuse the plain edits: same optimised delta
    for r in table:
        twin = next(p for p in plain if (p["layer"], p["clamp_norm_factor"]) ==
                    (r["layer"], r["clamp_norm_factor"]))
        assert r["mean_delta_over_v_orig"] == pytest.approx(twin["mean_delta_over_v_orig"])
    assert report["tradeoff"] in printed
    assert report["frontier"] and set(report["frontier"]) <= set(range(len(table)))
    # C once per layer, shared by its candidates
    assert len(list(cache.glob("mom2-layer*.safetensors"))) == 2
    # the rule, recomputed from the table
    ok = [i for i, r in enumerate(table)
          if (r["specificity_random"] if r["specificity_random"] is not None else 1) >= 0.99
          and r["fluency_after"] >= 0.95 * r["fluency_before"]]
    assert report["eligible"] == ok
    chosen = table[report["chosen_index"]]
    if ok:
        assert report["rule_met"] and report["chosen_index"] in ok
        assert chosen["efficacy"] == max(table[i]["efficacy"] for i in ok)
    # the file is the base with the chosen values, in the reference format
    hp = ROMEHyperParams.load(out)
    assert (hp.layer, hp.clamp_norm_factor, hp.v_num_grad_steps, hp.v_loss_layer) == \
        (chosen["layer"], chosen["clamp_norm_factor"], chosen["v_num_grad_steps"],
         chosen["v_loss_layer"])
    assert hp.mom2_dataset == "sampled" and hp.context_template_length_params == ((3, 1),)
    assert hp.extra.get("protect") == (None if chosen["protect_source"] is None else {
        "source": chosen["protect_source"], "form": chosen["protect_form"],
        "weight": chosen["protect_weight"] or 0.01, "threshold": 0.01, "positions": "last"})
    assert report["table"][0]["v_loss_layer"] == 3
    assert (tmp_path / "cal" / "hp-report" / "calibration_layers.png").stat().st_size > 0
    assert (tmp_path / "cal" / "hp-report" / "calibration_frontier.png").stat().st_size > 0
    md = (tmp_path / "cal" / "hp-report" / "calibration.md").read_text()
    assert "| layer |" in md and "Measured frontier" in md and "other-names soft w=0.1" in md
    # ... and it is usable with --hparams
    assert main(["edit", "--model", str(saved_model), "--hparams", str(out), "--subject",
                 "Brittany", "--prompt", "Name: {}. Gender:", "--target", " Male",
                 "--out", str(tmp_path / "edit")]) == 0
    record = json.loads((tmp_path / "edit" / "record.json").read_text())
    assert record["layer"] == hp.layer


def test_calibrate_library_measures_what_it_reports(tiny_gptj, tmp_path):
    """Each row's efficacy is the efficacy of that candidate's edits (not of another's)."""
    from rome_edit.evaluation.evaluate import evaluate_edits, summarize
    from rome_edit.rome.compute import compute_edits

    requests = [EditRequest(n, "Name: {}. Gender:", " Male" if g == "female" else " Female",
                            " Female" if g == "female" else " Male") for n, g in NAMES[:4]]
    base = ROMEHyperParams.from_dict({"layers": [1], "v_loss_layer": 3, "mom2_adjustment": False,
                                      "context_template_length_params": [[3, 1]]})
    templates = ["{}", "The weather was cold. {}"]
    result = calibrate(tiny_gptj, requests, grid=CalibrationGrid(layers=(2,), clamps=(0.5, 8),
                                                                 steps=(3,)),
                       base=base, context_templates=templates, n_fluency=0, progress=False)
    # plain rows only: a protected row scores the same edits written with another update
    plain = [r for r in result.rows if r["protect_source"] is None]
    assert len(plain) == 2
    for r in plain:
        hp = Candidate(r["layer"], r["clamp_norm_factor"], r["v_num_grad_steps"],
                       r["v_loss_layer"]).apply(base)
        again = summarize(evaluate_edits(tiny_gptj, compute_edits(
            tiny_gptj, requests, hp, templates, progress=False), progress=False))
        assert again["efficacy"] == r["efficacy"]
        assert again["specificity_random"] == r["specificity_random"]
    assert result.rows[0]["mean_delta_over_v_orig"] <= 0.5 + 1e-4  # the clamp held
    assert result.hparams.layer == 2


@pytest.mark.parametrize("extra, message", [
    (["--n", "1"], "--n must be"),
    (["--prompt", "Name: Ani."], "exactly one"),
    (["--prompt", "{} said that"], "--answers"),
    (["--known-prompt", "Name: Ani."], "exactly one"),
    (["--clamps", "0"], "clamps must be positive"),
    (["--steps", "0"], "steps must be"),
    (["--n", "40"], "female names"),
    (["--layers", "9"], "outside"),
    (["--loss-layers", "-9"], "outside"),
])
def test_calibrate_bad_input(saved_model, tmp_path, capsys, extra, message):
    before = (saved_model / "model.safetensors").read_bytes()
    out = tmp_path / "o" / "hp.json"
    code = main(["calibrate", "--model", str(saved_model), "--names",
                 str(tmp_path / "names.csv"), "--base", str(tmp_path / "base.json"),
                 "--n", "4", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()
    assert (saved_model / "model.safetensors").read_bytes() == before


def test_calibrate_out_must_be_json(saved_model, tmp_path, capsys):
    assert main(["calibrate", "--model", str(saved_model), "--out", str(tmp_path)]) == 2
    assert ".json file" in capsys.readouterr().err
