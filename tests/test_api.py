"""The top-level Python API: edits as revertible handles, concept vectors applied through the
editor, a second concept (a city swap) through the same generic calls, and the README example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rome_edit
from rome_edit import (
    BinaryTask,
    DeltaSet,
    Editor,
    EditRequest,
    HeldOut,
    KeptFact,
    Paraphrase,
    ROMEHyperParams,
    VectorApplier,
)
from rome_edit.rome.hparams import ROMEHyperParams as HP

ROOT = Path(__file__).resolve().parents[1]
CTX = ["{}", "The weather was cold. {}"]
PROMPT = "Name: {}. Gender:"


def tiny_editor(lm) -> Editor:
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=6,
                         clamp_norm_factor=10, mom2_adjustment=False)
    return Editor(lm, hp, CTX, progress=False)


def weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def same_weights(lm, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_import_is_cheap_and_exports_are_documented():
    code = ("import sys, rome_edit; heavy = [m for m in ('torch', 'transformers', 'sklearn') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "[]"
    for name in rome_edit.__all__:
        assert getattr(rome_edit, name).__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rome_edit.nope  # noqa: B018


def test_edit_handle_reverts_bit_identically_and_in_order(tiny_gptj):
    lm = tiny_gptj
    ed = tiny_editor(lm)
    before = weights(lm)
    p0 = ed.answer_probs(PROMPT, "Brittany", [" Male"])[" Male"]
    with ed.edit("Brittany", PROMPT, " Male", " Female") as h:
        assert h.active and len(h.records) == 1 and h.records[0].layer == 1
        assert not same_weights(lm, before)
        assert ed.answer_probs(PROMPT, "Brittany", [" Male"])[" Male"] > p0
    assert not h.active and same_weights(lm, before)

    first = ed.edit("David", PROMPT, " Female", " Male")  # the persistent form
    after_first = weights(lm)
    second = ed.edit_many([EditRequest("Margaret", PROMPT, " Male", " Female")])
    with pytest.raises(ValueError, match="revert .* first"):
        first.revert()
    assert first.active  # the refused revert changed nothing
    second.revert()
    assert same_weights(lm, after_first)
    first.revert()
    assert same_weights(lm, before)
    with pytest.raises(ValueError, match="already reverted"):
        first.revert()

    bad = replace(second.records[0], model_identity="other@123")
    with pytest.raises(ValueError, match="was made on"):
        ed.apply_records([second.records[0], bad])
    assert same_weights(lm, before) and ed._stack == []


def test_protected_edit_through_the_editor(tiny_gptj):
    from rome_edit.forms.protect import ProtectSettings
    from rome_edit.models.layers import layer_output

    lm = tiny_gptj
    ed = tiny_editor(lm)
    before = weights(lm)
    others = ["David", "Anna", "Daniel", "Tiffany"]
    protection = ed.protection(PROMPT, ["Brittany", *others], settings=ProtectSettings("hard"))
    keys = protection.bank.keys[1:]  # the other names' (Brittany's own key moves)
    out_before = layer_output(lm, 1, keys)
    with ed.edit("Brittany", PROMPT, " Male", " Female", protection=protection) as h:
        record = h.records[0]
        kept = (layer_output(lm, 1, keys) - out_before).abs().max().item()
        landed = layer_output(lm, 1, record.k_star[None])[0]
    assert same_weights(lm, before)
    assert record.protection["names"] == others and record.protection["form"] == "hard"
    assert kept < 1e-4 and (landed - record.v_star).norm() / record.v_star.norm() < 1e-5
    with ed.edit("Brittany", PROMPT, " Male", " Female") as h:
        moved = (layer_output(lm, 1, keys) - out_before).abs().max().item()
    assert moved > 100 * kept  # without protection the other names' outputs move


def test_locate_and_calibrate_choose_the_editors_settings(tiny_gptj):
    from rome_edit.calibration import CalibrationGrid

    ed = tiny_editor(tiny_gptj)
    cases = [("Brittany", " Female"), ("David", " Male"), ("Margaret", " Female"),
             ("Robert", " Male")]
    located = ed.locate(PROMPT, cases, noise="3x", min_effect=-1.0, use=False)
    assert ed.layer == 1  # use=False leaves the editor alone
    ed.locate(PROMPT, cases, noise="3x", min_effect=-1.0)
    assert ed.layer == located.recommended_layer
    requests = [EditRequest(s, PROMPT, " Male" if a == " Female" else " Female", a)
                for s, a in cases]
    result = ed.calibrate(requests, grid=CalibrationGrid(layers=(2,), clamps=(8,), steps=(3,)),
                          base=ed.hparams, context_templates=CTX, n_fluency=0)
    assert ed.hparams == result.hparams and ed.layer == 2
    with ed.edit("Brittany", PROMPT, " Male") as h:
        assert h.records[0].layer == 2 and h.records[0].hparams["v_num_grad_steps"] == 3


def test_inverse_is_computed_once_per_statistics_setting(tiny_gptj, monkeypatch):
    import rome_edit.assembly.session as session_mod
    from rome_edit.stats import Stability

    calls = []
    monkeypatch.setattr(session_mod, "inverse_for", lambda lm, hp, *a, **kw: calls.append(
        (hp.layer, hp.mom2_n_samples, kw["until_stable"])) or object())
    rule = Stability(min_cosine=0.99)
    # The session resolves the corpus (once) before inverse_for: a corpus that is there.
    hp = replace(tiny_editor(tiny_gptj).hparams, mom2_adjustment=True, mom2_dataset="bundled")
    ed = Editor(tiny_gptj, hp, CTX, until_stable=rule, progress=False)
    first = ed.inverse
    assert ed.inverse is first and calls == [(1, ed.hparams.mom2_n_samples, rule)]
    ed.hparams = replace(ed.hparams, clamp_norm_factor=3.0)  # not a statistics setting
    assert ed.inverse is first and len(calls) == 1
    ed.hparams = ed.hparams.with_layer(2)
    assert ed.inverse is not first and calls[-1][0] == 2
    ed.hparams = replace(ed.hparams, mom2_n_samples=7)
    ed.inverse  # noqa: B018
    assert calls[-1] == (2, 7, rule) and len(calls) == 3


def test_from_model_is_from_loaded_on_the_wrapped_model(tiny_gptj, tmp_path):
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(CTX))
    ed = Editor.from_model(tiny_gptj.model, tiny_gptj.tokenizer, name=tiny_gptj.name, layer=2,
                           update_form="rome-reference", context_templates=templates,
                           progress=False)
    ref = Editor.from_loaded(tiny_gptj, layer=2, update_form="rome-reference")
    assert ed.lm.identity == tiny_gptj.identity and ed.lm.model is tiny_gptj.model
    assert ed.hparams == ref.hparams
    assert (ed.layer, ed.hparams.update_form) == (2, "rome-reference")
    assert ed.context_templates == CTX  # read from the file, not sampled
    ed.hparams = replace(ed.hparams, mom2_adjustment=False)
    assert ed.inverse is None and ed.solver is None


def test_session_resolves_a_corpus_once_for_every_layer(tiny_gptj, monkeypatch):
    """Calibration's guarantee: every layer's statistics read the same corpus object (a
    sampled corpus is sampled once)."""
    import rome_edit.assembly.session as session_mod

    resolved, used = [], []
    monkeypatch.setattr(session_mod, "resolve_corpus",
                        lambda spec, lm=None: resolved.append(spec) or object())
    monkeypatch.setattr(session_mod, "inverse_for",
                        lambda lm, hp, stats, corpus, **kw: used.append((hp.layer, corpus)))
    hp = replace(tiny_editor(tiny_gptj).hparams, mom2_adjustment=True, mom2_dataset="sampled")
    session = session_mod.Session(tiny_gptj, hp, CTX, progress=False)
    session.inverse_at(1), session.inverse_at(2), session.inverse_at(3)
    assert resolved == ["sampled"]
    assert [layer for layer, _ in used] == [1, 2, 3] and len({id(c) for _, c in used}) == 1


def _planted_delta_set(lm, n: int = 40) -> DeltaSet:
    """Deltas of the tiny model's width with a planted direction separating the labels."""
    g = torch.Generator().manual_seed(0)
    width = lm.model.config.n_embd
    labels = torch.arange(n) % 2
    direction = torch.randn(width, generator=g)
    deltas = torch.randn(n, width, generator=g) + 3 * (2 * labels[:, None] - 1) * direction
    return DeltaSet(deltas, labels, tuple(f"s{i}" for i in range(n)), lm.identity, 1,
                    ("B→A", "A→B"), PROMPT)


def test_vector_applied_is_the_appliers_rank_one_edit(tiny_gptj):
    lm = tiny_gptj
    ed = tiny_editor(lm)
    ds = _planted_delta_set(lm)
    vector = ds.box_vector(scale=1.5)
    assert vector.classes == ("B→A", "A→B") and vector.prompt == PROMPT
    subjects = ["Brittany", "David"]
    applier = VectorApplier(lm, 1, subjects, [1, 0], [BinaryTask(PROMPT, (" Female", " Male"))],
                            CTX, None)
    batched = applier.answer_logits(vector.signed(-2.0))  # each row sees its own edit
    before = weights(lm)
    for i, subject in enumerate(subjects):
        with vector.applied(ed, subject, scale=-2.0) as h:
            assert h.layers == (1,) and not same_weights(lm, before)
            written = applier.answer_logits(None)[i]
        torch.testing.assert_close(written, batched[i], rtol=1e-4, atol=1e-4)
    assert same_weights(lm, before)
    torch.testing.assert_close(vector.signed(-2.0), -vector.rescaled(2.0).vector)
    with pytest.raises(ValueError, match="non-zero"):
        vector.signed(0.0)
    other = DeltaSet(ds.deltas, ds.labels, ds.subjects, "other@123", 1, ds.classes, PROMPT)
    with pytest.raises(ValueError, match="was made on"):
        other.box_vector().applied(ed, "Ani")
    assert same_weights(lm, before)


def test_analysis_of_any_labelled_delta_set_needs_no_model(tiny_gptj, tmp_path):
    ds = _planted_delta_set(tiny_gptj)
    result = rome_edit.analyze(ds, tmp_path)
    assert result["classes"] == ["B→A", "A→B"]
    assert result["classifier"]["test_accuracy"] == 1.0
    assert (tmp_path / "concept_vector.safetensors").is_file()
    back = rome_edit.load_concept_vector(tmp_path / "concept_vector.safetensors")
    assert back.classes == ("B→A", "A→B") and back.prompt == PROMPT
    dirs = ds.directions(inlp_iterations=2, rlace_steps=10)
    leace = ds.direction_vector(dirs["leace"], 2.0)
    assert leace.norm == pytest.approx(2.0 * ds.mean_norm, rel=1e-5)


CITY_PROMPT = "{} lives in the city of"
SWAP = {"Paris": " London", "London": " Paris"}


@pytest.mark.slow
def test_second_concept_city_swap_on_the_bundled_model(tmp_path):
    """A city swap (Paris ↔ London) runs through the same generic calls as the gender study:
    sweep with city labels → DeltaSet → probe and box vector → held-out application."""
    from concepts import bundled_facts

    ed = Editor.load(progress=False)
    ed.hparams = replace(ed.hparams, v_num_grad_steps=10, mom2_adjustment=False,
                         context_template_length_params=((5, 2),))
    # the bundled model's world, as its training text states it
    cities, genders = bundled_facts("city"), bundled_facts("gender")
    Person = namedtuple("Person", "name gender city")
    people = [Person(n, genders[n].lower(), c) for n, c in cities.items() if c in SWAP]
    paris = [p for p in people if p.city == "Paris"]
    london = [p for p in people if p.city == "London"]
    edited = [p for pair in zip(paris[:8], london[:8]) for p in pair]
    heldout = paris[8:12] + london[8:12]
    requests = [EditRequest(p.name, CITY_PROMPT, SWAP[p.city], " " + p.city, paraphrases=(
        Paraphrase(f"Record for {{}}: {p.gender}, lives in", SWAP[p.city], " " + p.city),))
        for p in edited]
    labels = [int(p.city == "Paris") for p in edited]
    gender = KeptFact("gender", PROMPT, (" Female", " Male"))
    summary = ed.sweep(requests, tmp_path / "sweep", labels=labels,
                       classes=("London→Paris", "Paris→London"), kept=[gender])
    assert summary["n_edits"] == 16 and summary["classes"] == ["London→Paris", "Paris→London"]
    for key in ("efficacy", "paraphrase", "specificity", "gender_kept"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["mean_p_new_after"] > summary["mean_p_new_before"]  # the edits took

    ds = DeltaSet.from_sweep(tmp_path / "sweep")
    assert ds.classes == ("London→Paris", "Paris→London") and ds.class_counts == (8, 8)
    assert ds.prompt == CITY_PROMPT and ds.labels.tolist() == labels
    probe = ds.probe()
    assert probe.test_accuracy >= 0.8 >= probe.shuffled_test_accuracy
    result = rome_edit.analyze(
        ds, tmp_path / "analysis", ed.lm,
        HeldOut(tuple(p.name for p in heldout), tuple(int(p.city == "Paris") for p in heldout),
                (BinaryTask(CITY_PROMPT, (" Paris", " London")),)),
        ed.context_templates, None, rome_edit.AnalysisSettings(scales=(2.0,), n_random=2))
    assert result["heldout"]["baseline_accuracy"] >= 0.75  # the model knows their cities
    table = result["vector_weights"]
    assert (table["n_label1"], table["n_label0"]) == (4, 4)
    assert table["flip_label1"] + table["flip_label0"] >= \
        result["control_weights"]["flip_label1"]["mean"] + \
        result["control_weights"]["flip_label0"]["mean"]
    # every direction of the concept is judged against its control, with the recorded rates
    verdicts = {v["key"]: v for v in result["verdict_weights"]}
    for key in ("flip_label1", "flip_label0"):
        assert verdicts[key]["rate"] == table[key]
        assert verdicts[key]["control"] == result["control_weights"][key]["mean"]
        assert verdicts[key]["verdict"] in ("informative", "weak", "uninformative")
    assert "control_rates" in result["scale_curves"] and "best_informative_scale" in result


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python section should hold one example"
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python example, verbatim, with a cheaper preset (fewer optimisation steps,
    context templates and statistics documents) so that it runs in seconds."""
    real = HP.preset.__func__

    def cheap(cls, name):
        return replace(real(cls, name), v_num_grad_steps=8, mom2_n_samples=300,
                       context_template_length_params=((5, 1),))

    monkeypatch.setattr(HP, "preset", classmethod(cheap))
    monkeypatch.setenv("ROME_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"probe accuracy ([0-9.]+)", out).group(1))
    assert accuracy >= 0.75
    assert (tmp_path / "runs" / "gender" / "deltas.safetensors").is_file()
    assert out.count("\n") >= 3  # the two completions and the accuracy


def test_from_sweep_keeps_the_sweeps_settings_or_takes_another_corpus(tiny_gptj, tmp_path,
                                                                       monkeypatch):
    """``Editor.from_sweep`` rebuilds the sweep's editor (hparams, templates, the same ``C``);
    with ``corpus=`` only the statistics change."""
    monkeypatch.setenv("ROME_EDIT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(model)
    tiny_gptj.tokenizer.save_pretrained(model)
    for name, words in (("a.txt", "cats sleep in the sun"), ("b.txt", "ships sail far away")):
        (tmp_path / name).write_text("".join(f"Line {i}: {words} {i}.\n" for i in range(30)))
    hp = replace(tiny_editor(tiny_gptj).hparams, v_num_grad_steps=2, mom2_adjustment=True,
                 mom2_dataset=str(tmp_path / "a.txt"), mom2_n_samples=30)
    ed = Editor.load(model, hparams=hp, context_templates=CTX, progress=False)
    ed.sweep([EditRequest("Brittany", PROMPT, " Male", " Female")], tmp_path / "sweep")
    keys = torch.randn(3, tiny_gptj.model.config.n_inner or 4 * tiny_gptj.model.config.n_embd,
                       generator=torch.Generator().manual_seed(0))
    again = Editor.from_sweep(tmp_path / "sweep", model, progress=False)
    assert again.hparams == ed.hparams and again.context_templates == ed.context_templates
    torch.testing.assert_close(again.inverse.solve(keys), ed.inverse.solve(keys))
    other = Editor.from_sweep(tmp_path / "sweep", model, progress=False,
                              corpus=str(tmp_path / "b.txt"))
    assert other.hparams == ed.hparams and other.context_templates == ed.context_templates
    assert not torch.allclose(other.inverse.solve(keys), ed.inverse.solve(keys), rtol=1e-3)
