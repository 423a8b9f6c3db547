"""Fitting ``v*`` to other wordings as well (hparams ``fit_phrasings``; tiny models)."""

import dataclasses

import pytest
import torch

from rome_edit import FitPhrasing
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import key_stars
from rome_edit.rome.request import EditRequest, rewriting_layouts
from rome_edit.rome.value_batched import optimise_values
from rome_edit.rome.value_reference import optimise_value

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
PROMPT = "{}. Gender:"  # the subject first: the phrasings below read it at the same key
IS_MY = FitPhrasing("{} is my", ((" Male", " brother"), (" Female", " sister")))
ONLY_MALE = FitPhrasing("{} was born a", ((" Male", " baby boy"),))  # several tokens
ELSEWHERE = FitPhrasing("Name: {} is my", ((" Male", " brother"), (" Female", " sister")))
REQS = [EditRequest("Brittany", PROMPT, " Male", " Female"),
        EditRequest("David", PROMPT, " Female", " Male"),
        EditRequest("Christopher", PROMPT, " Male", " Female")]


def _hp(lm, phrasings=(), **kw):
    return ROMEHyperParams(**{"layers": (1,), "v_loss_layer": lm.n_layers - 1,
                              "v_num_grad_steps": 6, "mom2_adjustment": False,
                              "fit_phrasings": phrasings, **kw})


def test_layouts_add_rows_for_the_phrasings_that_answer_the_target(tiny_gptj):
    tok = tiny_gptj.tokenizer
    plain, kl = rewriting_layouts(tok, REQS[0], CTX)
    rows, kl2 = rewriting_layouts(tok, REQS[0], CTX, (IS_MY, ELSEWHERE, ONLY_MALE))
    assert kl2 == kl and rows[: len(CTX)] == plain  # the edit prompt's rows come first
    assert len(rows) == 3 * len(CTX)
    brother = tuple(tok(" brother", add_special_tokens=False)["input_ids"])
    boy = tuple(tok(" baby boy", add_special_tokens=False)["input_ids"])
    assert len(boy) > 1
    assert all(r.targets == brother for r in rows[len(CTX): 2 * len(CTX)])
    assert all(r.targets == boy for r in rows[2 * len(CTX):])
    # the answer's tokens but the last follow the prompt, as for the edit's own target
    assert rows[2 * len(CTX)].ids[-(len(boy) - 1):] == boy[:-1]
    assert tok.decode(rows[len(CTX)].ids[: rows[len(CTX)].lookup + 1]) == "Brittany"
    # every row of a phrasing reads the subject at the edit prompt's key: the same text before
    for a, b in zip(rows[: len(CTX)], rows[len(CTX): 2 * len(CTX)]):
        assert a.ids[: a.lookup + 1] == b.ids[: b.lookup + 1]
    # a female target has no answer in ONLY_MALE: only IS_MY's rows are added
    female, _ = rewriting_layouts(tok, REQS[1], CTX, (IS_MY, ONLY_MALE))
    assert len(female) == 2 * len(CTX)
    # ELSEWHERE reads the subject after other text, at another key: it never joins
    name_prompt = EditRequest("Brittany", "Name: {}. Gender:", " Male")
    assert not ELSEWHERE.joins(REQS[0]) and ELSEWHERE.joins(name_prompt)
    assert not IS_MY.joins(name_prompt)
    assert rewriting_layouts(tok, name_prompt, CTX, (IS_MY,))[0] == \
        rewriting_layouts(tok, name_prompt, CTX)[0]


@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_batched_equals_one_at_a_time_with_phrasings(tokenizer, family):
    """Requests using different numbers of phrasings run in separate chunks; results keep the
    request order, and k* stays the edit prompt's (Eq. 3), whatever the phrasings."""
    from conftest import make_tiny

    lm = make_tiny(family, tokenizer)
    hp = _hp(lm, (IS_MY, ONLY_MALE))
    fast = optimise_values(lm, REQS, hp, CTX, progress=False)
    k_star = key_stars(lm, 1, [r.prompt for r in REQS], [r.subject for r in REQS], CTX)
    plain = optimise_values(lm, REQS, _hp(lm), CTX, progress=False)
    for i, (req, f) in enumerate(zip(REQS, fast)):
        ref = optimise_value(lm, req, hp, CTX)
        assert len(ref.losses) == len(f.losses)
        assert (f.delta - ref.delta).norm() / ref.delta.norm() < 1e-5
        assert (f.k_star - k_star[i]).norm() / k_star[i].norm() < 1e-5
        assert (f.v_init - plain[i].v_init).norm() / plain[i].v_init.norm() < 1e-6
        # the phrasings change the fit
        assert (f.delta - plain[i].delta).norm() / plain[i].delta.norm() > 1e-3


def test_a_phrasing_that_repeats_the_prompt_leaves_the_fit_unchanged(tiny_gptj):
    """Eq. 4's NLL is a mean over rows: the edit prompt's rows twice give the same loss, so
    the same δ (ground truth from the plain fit)."""
    lm = tiny_gptj
    same = FitPhrasing(PROMPT, ((" Male", " Male"), (" Female", " Female")))
    twice = optimise_values(lm, REQS, _hp(lm, (same,)), CTX, progress=False)
    once = optimise_values(lm, REQS, _hp(lm), CTX, progress=False)
    for a, b in zip(twice, once):
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
        assert (a.delta - b.delta).norm() / b.delta.norm() < 1e-5


def test_the_text_start_form_uses_them_and_the_edits_own_fit_does_not(tiny_gptj):
    """``Name: {}. Gender:`` reads the subject after ``Name:``; its text-start form
    (``{}. Gender:``) at the key ``{} is my`` reads too: only the form's value changes."""
    lm = tiny_gptj
    hp = _hp(lm, (IS_MY,), subject_forms=("text-start",))
    reqs = [dataclasses.replace(r, prompt="Name: {}. Gender:") for r in REQS[:2]]
    recs = compute_edits(lm, reqs, hp, CTX, progress=False)
    for rec in recs:
        assert rec.hparams["fit_phrasings"] == [IS_MY.to_dict()]
        assert ROMEHyperParams.from_dict(rec.hparams) == hp
        assert len(rec.forms) == 1
    without = compute_edits(lm, reqs, dataclasses.replace(hp, fit_phrasings=()), CTX,
                            progress=False)
    for a, b in zip(recs, without):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.k_star, b.k_star)
        assert torch.equal(a.forms[0].k_star, b.forms[0].k_star)
        assert not torch.allclose(a.forms[0].v_star, b.forms[0].v_star)


def test_a_phrasing_that_joins_nothing_is_reported(tiny_gptj, caplog):
    lm = tiny_gptj
    reqs = [dataclasses.replace(REQS[0], prompt="Name: {}. Gender:")]
    with caplog.at_level("WARNING", logger="rome_edit.rome.compute"):
        compute_edits(lm, reqs, _hp(lm, (IS_MY,), v_num_grad_steps=1), CTX, progress=False)
    assert "no fit phrasing joins" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rome_edit.rome.compute"):
        compute_edits(lm, reqs, _hp(lm, (IS_MY,), v_num_grad_steps=1,
                                    subject_forms=("text-start",)), CTX, progress=False)
    assert "no fit phrasing joins" not in caplog.text


def test_hparams_option_round_trips_and_is_checked():
    assert "fit_phrasings" not in ROMEHyperParams().to_dict()  # reference files unchanged
    data = {"fit_phrasings": [{"prompt": "{} is my", "answers": {" Male": " brother"}}]}
    hp = ROMEHyperParams.from_dict(data)
    assert hp.fit_phrasings == (FitPhrasing("{} is my", ((" Male", " brother"),)),)
    assert hp.fit_phrasings[0].answer_for(" Male") == " brother"
    assert hp.fit_phrasings[0].answer_for(" Female") is None
    assert ROMEHyperParams.from_dict(hp.to_dict()) == hp and hash(hp) == hash(
        ROMEHyperParams.from_dict(hp.to_dict()))
    with pytest.raises(ValueError, match="exactly one"):
        ROMEHyperParams.from_dict({"fit_phrasings": [{"prompt": "is my", "answers": {"a": "b"}}]})
    with pytest.raises(ValueError, match="needs answers"):
        ROMEHyperParams.from_dict({"fit_phrasings": [{"prompt": "{} is my", "answers": {}}]})
    with pytest.raises(ValueError, match="'prompt' holding"):
        ROMEHyperParams.from_dict({"fit_phrasings": [{"prompt": "{} is my"}]})
    with pytest.raises(ValueError, match="'prompt' holding"):
        ROMEHyperParams.from_dict({"fit_phrasings": ["{} is my"]})


def test_the_command_line_says_what_the_value_is_fitted_to():
    from rome_edit.cli.commands_edit import phrasings_line

    assert phrasings_line(()) is None
    line = phrasings_line((IS_MY, ONLY_MALE))
    assert "'{} is my', '{} was born a'" in line and "fit_phrasings" in line
