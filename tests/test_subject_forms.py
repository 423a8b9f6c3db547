"""Writing an edit at several spellings of its subject (hparams ``subject_forms``; tiny models)."""

import dataclasses

import pytest
import torch

from rome_edit.errors import ParameterError
from rome_edit.forms.protect import ProtectSettings
from rome_edit.forms.protected_keys import Protection, build_bank, protect_records
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.layers import layer_output
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.context import form_prompt, form_templates
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.rome.update import joint_directions
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.weights.write import applied, row_edits, stacked_terms

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
PROMPT = "Name: {}. Gender:"
FORMS = ("unspaced", "text-start")


def _setup(lm, forms=FORMS, seed=0):
    d_mlp = out_proj_weight(lm.model, lm.arch, 1).shape[1 - int(lm.arch.out_proj_transposed)]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_mlp, d_mlp, generator=g, dtype=torch.float64)
    c = a @ a.T / d_mlp + torch.eye(d_mlp, dtype=torch.float64)
    c = (c + c.T) / 2
    inverse = InverseSecondMoment.from_matrix(c).with_provenance(
        {"model_identity": lm.identity, "layer": 1, "d_mlp": d_mlp})
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=5,
                         subject_forms=forms)
    return hp, inverse, c


def _keys(rec):
    return torch.stack([rec.k_star, *(f.k_star for f in rec.forms)])


def test_form_prompts_and_templates():
    assert form_prompt(PROMPT, "unspaced") == "Name:{}. Gender:"
    few_shot = "Name: John. Gender: Male\nName: {}. Gender:"
    assert form_prompt(few_shot, "unspaced") == "Name: John. Gender: Male\nName:{}. Gender:"
    assert form_prompt(few_shot, "text-start") == "{}. Gender:"
    assert form_prompt(PROMPT, "text-start") == "{}. Gender:"
    assert form_prompt("{} said that", "text-start") == "{} said that"
    assert form_templates(CTX, "text-start") == ["{}"] and form_templates(CTX, "unspaced") == CTX
    assert form_prompt("Tag {{x}}: {}. Gender {{y}}:", "unspaced") == "Tag {{x}}:{}. Gender {{y}}:"
    assert form_prompt("Tag {{x}}: {}. Gender {{y}}:", "text-start") == "{}. Gender {{y}}:"
    with pytest.raises(ParameterError, match="already unspaced"):
        form_prompt("{} said that", "unspaced")


def test_hparams_option_round_trips_and_is_checked():
    assert "subject_forms" not in ROMEHyperParams().to_dict()  # reference files unchanged
    hp = ROMEHyperParams.from_dict({"subject_forms": ["text-start"]})
    assert hp.subject_forms == ("text-start",)
    assert ROMEHyperParams.from_dict(hp.to_dict()) == hp
    with pytest.raises(ParameterError, match="each form once"):
        ROMEHyperParams(subject_forms=("spaced",))
    with pytest.raises(ParameterError, match="each form once"):
        ROMEHyperParams(subject_forms=("unspaced", "unspaced"))
    with pytest.raises(ValueError, match="update_form to 'paper'"):
        ROMEHyperParams(subject_forms=("unspaced",), update_form="rome-reference")


def test_joint_directions_are_the_minimum_norm_multi_key_write():
    """``U = (ŨKᵀ)⁻¹Ũ`` gives ``ΔW = R U`` = ROME's Eq. 2 with several keys,
    ``R (K C⁻¹ Kᵀ)⁻¹ K C⁻¹``, whatever scale each one-key direction had."""
    g = torch.Generator().manual_seed(1)
    d, n = 12, 3
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    c_inv = torch.linalg.inv(a @ a.T + torch.eye(d, dtype=torch.float64))
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    res = torch.randn(n, 5, generator=g, dtype=torch.float64)
    scaled = (keys @ c_inv) * torch.tensor([[2.0], [-0.3], [7.0]], dtype=torch.float64)
    u = joint_directions(scaled, keys).double()
    assert torch.allclose(u @ keys.T, torch.eye(n, dtype=torch.float64), atol=1e-5)
    closed = res.T @ torch.linalg.solve(keys @ c_inv @ keys.T, keys @ c_inv)
    assert torch.allclose(res.T @ u, closed, atol=1e-4 * closed.abs().max())
    with pytest.raises(ParameterError, match="nearly the same"):
        joint_directions(torch.stack([scaled[0], scaled[0]]), torch.stack([keys[0], keys[0]]))


def test_every_form_is_written_exactly_and_reverted_bit_for_bit(tiny_gptj, tmp_path):
    lm = tiny_gptj
    hp, inverse, _ = _setup(lm)
    req = EditRequest("Brittany", PROMPT, " Male", " Female")
    (rec,) = compute_edits(lm, [req], hp, CTX, inverse, progress=False)
    assert [f.form for f in rec.forms] == list(FORMS)
    assert [f.prompt for f in rec.forms] == ["Name:{}. Gender:", "{}. Gender:"]
    # each form's key and value are those of a one-key edit on its prompt
    one = dataclasses.replace(hp, subject_forms=())
    (alone,) = compute_edits(lm, [dataclasses.replace(req, prompt="{}. Gender:")], one, ["{}"],
                             inverse, progress=False)
    assert torch.allclose(rec.forms[1].k_star, alone.k_star)
    assert torch.allclose(rec.forms[1].v_star, alone.v_star, atol=1e-5)
    # the main delta is the one-key edit's: the forms add terms, they do not change it
    (main,) = compute_edits(lm, [req], one, CTX, inverse, progress=False)
    assert torch.equal(rec.delta, main.delta) and torch.equal(rec.k_star, main.k_star)
    keys = _keys(rec)
    targets = torch.stack([rec.v_star, *(f.v_star for f in rec.forms)])
    weight = out_proj_weight(lm.model, lm.arch, 1)
    before = weight.detach().clone()
    with applied(lm, [rec]):
        after = layer_output(lm, 1, keys)
    assert torch.equal(weight, before)
    assert torch.allclose(after, targets, atol=1e-4 * targets.abs().max())
    # a one-key write reaches the other forms' keys only partly
    with applied(lm, [main]):
        partial = layer_output(lm, 1, keys[1:])
    assert (partial - targets[1:]).abs().max() > 100 * (after - targets).abs().max()
    saved = EditRecord.load(rec.save(tmp_path / "rec"))
    assert [f.form for f in saved.forms] == list(FORMS)
    assert all(torch.equal(a, b) for a, b in zip(saved.terms(), rec.terms()))


def test_row_edits_with_several_terms_match_the_written_weights(tiny_gptj):
    lm = tiny_gptj
    hp, inverse, _ = _setup(lm)
    reqs = [EditRequest("Brittany", PROMPT, " Male", " Female"),
            EditRequest("David", PROMPT, " Female", " Male")]
    with_forms = compute_edits(lm, reqs, hp, CTX, inverse, progress=False)
    one_key = compute_edits(lm, reqs[:1], dataclasses.replace(hp, subject_forms=()), CTX,
                            inverse, progress=False)
    records = [with_forms[0], one_key[0], with_forms[1]]  # mixed: padded with zero terms
    u, lam = stacked_terms(records)
    assert u.shape[:2] == (3, 3) and torch.equal(u[1, 1:], torch.zeros_like(u[1, 1:]))
    texts = ["Brittany. Gender:", "Name:Brittany. Gender:", "David. Gender:"]
    ids = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with row_edits(lm, 1, u, lam), torch.no_grad():
        rows = lm.model(**ids).logits
    for i, r in enumerate(records):
        with applied(lm, [r]), torch.no_grad():
            alone = lm.model(**ids).logits[i]
        assert torch.allclose(rows[i], alone, atol=1e-4)


def test_protected_update_is_exact_at_every_form_and_spares_protected_keys(tiny_gptj):
    lm = tiny_gptj
    hp, inverse, _ = _setup(lm)
    bank = build_bank(lm, 1, PROMPT, ["David", "Anna", "Daniel"], CTX, "other-names")
    (rec,) = compute_edits(lm, [EditRequest("Brittany", PROMPT, " Male", " Female")], hp, CTX,
                           inverse, progress=False)
    for settings in (ProtectSettings("hard"), ProtectSettings("null-space", threshold=0.0),
                     ProtectSettings("soft", weight=0.01)):
        (prot,) = protect_records(lm, [rec], Protection(bank, settings), inverse)
        keys = _keys(prot)
        targets = torch.stack([prot.v_star, *(f.v_star for f in prot.forms)])
        before = layer_output(lm, 1, bank.keys)
        with applied(lm, [prot]):
            at_forms, at_bank = layer_output(lm, 1, keys), layer_output(lm, 1, bank.keys)
        assert torch.allclose(at_forms, targets, atol=1e-4 * targets.abs().max())
        if settings.form != "soft":
            assert (at_bank - before).abs().max() < 1e-3 * (at_forms - targets).abs().max() + 1e-4
        assert prot.protection is not None and torch.equal(prot.delta, rec.delta)


def test_a_bank_with_forms_protects_the_other_names_where_the_edit_writes(tiny_gptj):
    lm = tiny_gptj
    hp, inverse, _ = _setup(lm)
    names = ["David", "Anna", "Daniel"]
    plain = build_bank(lm, 1, PROMPT, names, CTX, "other-names")
    bank = build_bank(lm, 1, PROMPT, names, CTX, "other-names", forms=hp.subject_forms)
    assert bank.forms == FORMS and len(bank.keys) == 3 * len(plain.keys)
    assert torch.equal(bank.keys[: len(plain.keys)], plain.keys)
    text_start = build_bank(lm, 1, "{}. Gender:", names, ["{}"], "other-names")
    assert torch.allclose(bank.keys[-len(names):], text_start.keys)
    (rec,) = compute_edits(lm, [EditRequest("Brittany", PROMPT, " Male", " Female")], hp, CTX,
                           inverse, progress=False)
    settings = ProtectSettings("null-space", threshold=0.0)
    (prot,) = protect_records(lm, [rec], Protection(bank, settings), inverse)
    (spaced_only,) = protect_records(lm, [rec], Protection(plain, settings), inverse)
    assert prot.protection["forms"] == list(FORMS)
    assert Protection(bank, settings).manifest()["forms"] == list(FORMS)
    others = bank.keys[len(plain.keys):]  # the other names in the unspaced and text-start forms
    before = layer_output(lm, 1, others)
    with applied(lm, [prot]):
        moved = (layer_output(lm, 1, others) - before).abs().max()
    with applied(lm, [spaced_only]):
        moved_spaced_only = (layer_output(lm, 1, others) - before).abs().max()
    assert moved < 1e-3 * moved_spaced_only


def test_forms_that_do_not_apply_to_a_prompt_are_skipped(tiny_gptj):
    """``{} is located in`` opens with the subject: no unspaced form; with ``{}`` as the only
    context template its text-start key is the edit's own key, so no form at all."""
    lm = tiny_gptj
    hp, inverse, _ = _setup(lm)
    reqs = [EditRequest("Brittany", "{} lives in", " Paris", " Rome"),
            EditRequest("David", PROMPT, " Female", " Male")]
    first, second = compute_edits(lm, reqs, hp, CTX, inverse, progress=False)
    assert [f.form for f in first.forms] == ["text-start"]
    assert [f.form for f in second.forms] == list(FORMS)
    (alone,) = compute_edits(lm, reqs[:1], hp, ["{}"], inverse, progress=False)
    assert alone.forms == () and alone.terms()[0].shape[0] == 1
    bank = build_bank(lm, 1, "{} lives in", ["Anna"], CTX, "other-names", forms=FORMS)
    assert bank.forms == ("text-start",)


def test_the_commands_say_when_an_edit_writes_the_subject_forms():
    from rome_edit.cli.commands_edit import update_line

    assert "subject_forms" not in update_line("paper", None, None)
    line = update_line("paper", None, "other-names", FORMS)
    assert "unspaced and text-start" in line and "rank 3" in line and "protecting" in line
