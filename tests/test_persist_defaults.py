"""Commands whose results are kept say which form they used and why; ``apply --persist`` of a
vector defaults to the fitted form protecting other names, with the reference one flag away."""

import json

import pytest
import torch

from rome_edit.analysis.concept_vector import ConceptVector, save_concept_vector
from rome_edit.cli.main import main
from rome_edit.study.persisted import choose_persist_form, without_pool
from rome_edit.weights.persist import load_persisted

CTX = ["{}", "The weather was cold. {}"]
EDITED = [("Brittany", "female"), ("David", "male"), ("Margaret", "female"), ("Robert", "male")]
OTHERS = ["Anna", "Peter", "Laura", "Thomas", "Emily", "George"]


@pytest.fixture
def setup(tiny_gptj, tmp_path):
    """A saved tiny model, hparams without statistics, a vector made for it, names files."""
    from rome_edit.models.loading import load_model

    model = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(model)
    tiny_gptj.tokenizer.save_pretrained(model)
    hp = {"layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 3, "clamp_norm_factor": 4,
          "mom2_adjustment": False, "context_template_length_params": [[3, 1]]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "ctx.json").write_text(json.dumps(CTX))
    lm = load_model(model)
    width = lm.model.config.hidden_size
    vector = ConceptVector(torch.randn(width, generator=torch.Generator().manual_seed(0)),
                           "raw", 1.0, 1.0, lm.identity, 1, 1.0, 1.0)
    save_concept_vector(vector, tmp_path / "v.safetensors")
    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "".join(f"{n},{g}\n" for n, g in EDITED))
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join([n for n, _ in EDITED] + OTHERS) + "\n")
    common = ["--vector", str(tmp_path / "v.safetensors"), "--names", str(names), "--persist",
              "--model", str(model), "--hparams", str(tmp_path / "hp.json"),
              "--context-templates", str(tmp_path / "ctx.json"), "--scale", "1"]
    return tmp_path, common, names, pool


def _form_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("form: ")]
    assert len(lines) == 1, out
    return lines[0]


def test_apply_persist_defaults_to_fitted_with_other_names(setup, capsys):
    tmp_path, common, _, pool = setup
    out = tmp_path / "default"
    assert main(["apply", *common, "--protect-names", str(pool), "--out", str(out)]) == 0
    line = _form_line(capsys.readouterr().out)
    assert line.startswith("form: fitted + protect other-names (the default for a saved vector")
    assert "--many-form sequential for the reference form" in line
    meta, _ = load_persisted(out)
    assert meta["form"] == "fitted" and meta["n_protected"] == len(OTHERS)


def test_apply_persist_reference_form_is_one_flag_away(setup, capsys):
    tmp_path, common, _, pool = setup
    out = tmp_path / "reference"
    assert main(["apply", *common, "--many-form", "sequential", "--out", str(out)]) == 0
    line = _form_line(capsys.readouterr().out)
    assert line == ("form: sequential, no protection (--many-form sequential: ROME's reference "
                    "form, one rank-one update per subject)")
    meta, _ = load_persisted(out)
    assert meta["form"] == "sequential" and meta["protection"] is None


def test_apply_persist_falls_back_where_nothing_is_left_to_protect(setup, capsys):
    tmp_path, common, names, _ = setup
    out = tmp_path / "fallback"
    # the protected pool is exactly the edited names: the fitted form has nothing to keep
    assert main(["apply", *common, "--protect-names", str(names), "--out", str(out)]) == 0
    line = _form_line(capsys.readouterr().out)
    assert line.startswith("form: sequential, no protection (no name outside the edited ones")
    assert "fell back to ROME's reference form" in line
    assert load_persisted(out)[0]["form"] == "sequential"
    # asked for explicitly, the fitted form is refused instead of silently replaced
    assert main(["apply", *common, "--many-form", "fitted", "--protect-names", str(names),
                 "--out", str(tmp_path / "refused")]) == 2
    assert "no other name to protect" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_choose_persist_form_defaults_fallbacks_and_refusals():
    default = choose_persist_form(None, None)
    assert (default.form, default.protect, default.defaulted) == ("fitted", "other-names", True)
    assert choose_persist_form(None, "same-last-token").protect == "same-last-token"
    records = choose_persist_form(None, None, records=True)
    assert (records.form, records.protect) == ("sequential", None)
    assert records.line().startswith("form: sequential, no protection (the fitted form, the "
                                     "default for a --vector, cannot write records: fell back")
    none = choose_persist_form(None, "none")
    assert (none.form, none.protect) == ("sequential", None) and "--protect none" in none.line()
    assert choose_persist_form("fitted", None).protect == "other-names"
    assert choose_persist_form("batched", "other-names").line() == \
        "form: batched + protect other-names (--many-form batched)"
    with pytest.raises(ValueError, match="writes one vector"):
        choose_persist_form("fitted", None, records=True)
    with pytest.raises(ValueError, match="drop protect='none'"):
        choose_persist_form("fitted", "none")
    assert without_pool(default).form == "sequential"
    with pytest.raises(ValueError, match="no other name to protect"):
        without_pool(choose_persist_form("fitted", None))


def test_many_form_needs_persist(setup, capsys):
    tmp_path, common, _, _ = setup
    argv = [a for a in common if a != "--persist"]
    assert main(["apply", *argv, "--many-form", "sequential", "--out", str(tmp_path / "x")]) == 2
    assert "add --persist" in capsys.readouterr().err


def test_persist_vector_api_default_matches_the_cli(tiny_gptj, tmp_path, caplog):
    from rome_edit.study.persisted import other_names_protection, persist_vector
    from rome_edit.study.task import EDIT_PROMPT
    from rome_edit.weights.write import preserved

    lm, edited = tiny_gptj, [n for n, _ in EDITED]
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    protection = other_names_protection(lm, 1, EDIT_PROMPT, edited, CTX, edited + OTHERS)
    assert protection.bank.subjects == tuple(OTHERS)
    assert other_names_protection(lm, 1, EDIT_PROMPT, edited, CTX, edited) is None
    caplog.set_level("INFO", logger="rome_edit.study.persisted")
    with preserved(lm, [1]):
        persist_vector(lm, edited, vector, 1, CTX, tmp_path / "api", protection=protection,
                       progress=False)
    assert load_persisted(tmp_path / "api")[0]["form"] == "fitted"
    assert "form: fitted + protect other-names (the default" in caplog.text


@pytest.mark.parametrize("extra, expected", [
    ([], "update: ROME's rank-one update, paper form, no protection (the default, as in the "
         "paper; --protect other-names spares other names' keys, docs/beyond-rome.md)"),
    (["--update", "rome-reference"],
     "update: ROME's rank-one update, rome-reference form (--update), no protection"),
])
def test_edit_and_sweep_say_they_use_the_reference_update(setup, capsys, extra, expected):
    tmp_path, common, names, _ = setup
    model = ["--model", common[common.index("--model") + 1], "--hparams",
             str(tmp_path / "hp.json"), "--context-templates", str(tmp_path / "ctx.json")]
    assert main(["edit", "--subject", "Brittany", "--prompt", "Name: {}. Gender:", "--target",
                 " Male", *model, *extra, "--out", str(tmp_path / "edit")]) == 0
    assert expected in capsys.readouterr().out.splitlines()
    assert main(["sweep", "--names", str(names), "--limit", "2", *model, *extra,
                 "--out", str(tmp_path / "sweep")]) == 0
    assert expected in capsys.readouterr().out.splitlines()


def test_fitted_persist_without_protection_is_refused(tiny_gptj, tmp_path):
    """The fitted form keeps protected names' answers: with none it refuses, writing nothing."""
    from rome_edit.study.persisted import persist_vector

    lm = tiny_gptj
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="pass protection="):
        persist_vector(lm, [n for n, _ in EDITED], vector, 1, ["{}"], tmp_path / "never",
                       form="fitted")
    assert not (tmp_path / "never").exists()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_apply_persist_reads_keys_and_counts_flips_on_the_given_prompt(setup, capsys):
    """``--prompt`` is where keys are read and the fresh load is scored; ``--known-only`` keeps
    exactly the names the model gets right on it (checked against ``known_names`` directly)."""
    from rome_edit.models.loading import load_model
    from rome_edit.study.known import known_names
    from rome_edit.study.names import load_names

    tmp_path, common, names, _ = setup
    # a prompt without a place for the name is refused before the model loads
    assert main(["apply", *common, "--prompt", "no slot", "--out", str(tmp_path / "bad")]) == 2
    assert "exactly one '{}'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    prompt = "Person: {}. Sex:"
    lm = load_model(tmp_path / "tiny")
    right = [e.name for e in known_names(lm, load_names(names), prompt).names]
    out = tmp_path / "prompted"
    code = main(["apply", *common, "--many-form", "sequential", "--prompt", prompt,
                 "--known-only", "--out", str(out)])
    printed = capsys.readouterr()
    if not right:  # the random tiny model knows none: refused, nothing written
        assert code == 2 and "drop --known-only" in printed.err and not out.exists()
        return
    assert code == 0, printed.err
    assert f"known-only: {len(right)} of {len(EDITED)} names right" in printed.out
    meta, _ = load_persisted(out)
    assert meta["prompt"] == prompt and [e["subject"] for e in meta["edits"]] == right
    assert json.loads((out / "apply.json").read_text())["fresh_load"]["prompt"] == prompt
