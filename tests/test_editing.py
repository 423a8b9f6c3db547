"""ROME editor properties on tiny random models, checked against ground truth."""

import dataclasses
import json

import pytest
import torch

from rome_edit.forms.sequential import edit_sequentially
from rome_edit.models.architectures import get_module, out_proj_weight
from rome_edit.rome.compute import SecondMomentInverse, compute_edits
from rome_edit.rome.context import compose, load_context_templates, sample_context_templates
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import key_star, keys_and_values
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.rome.value_batched import optimise_values
from rome_edit.rome.value_reference import optimise_value
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.weights.write import applied, apply_records

CTX = ["{}", "The weather was cold. {}", "A {{brace}} here. {}", "Record. {}"]
REQS = [EditRequest("Brittany", "Name: {}. Gender:", " Male", " Female"),
        EditRequest("David", "Name: {}. Gender:", " Female", " Male"),
        EditRequest("Christopher", "Name: {}. Gender:", " Female", " Male")]


def hp_for(lm, **kw):
    base = dict(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=6,
                clamp_norm_factor=4.0, mom2_adjustment=False)
    return ROMEHyperParams(**{**base, **kw})


def random_inverse(lm, layer=1, seed=0):
    d_mlp = out_proj_weight(lm.model, lm.arch, layer).shape[1 - int(lm.arch.out_proj_transposed)]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_mlp, d_mlp, generator=g)
    c = a @ a.T / d_mlp + torch.eye(d_mlp)
    c = (c + c.T) / 2  # a float32 a·aᵀ is not bitwise symmetric on every kernel (docs/numerics.md)
    prov = {"model_identity": lm.identity, "layer": layer, "d_mlp": d_mlp}
    return InverseSecondMoment.from_matrix(c).with_provenance(prov), c


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama", "gpt_neox"])
def test_batched_equals_one_at_a_time(tokenizer, family):
    from conftest import make_tiny

    lm = make_tiny(family, tokenizer)
    hp = hp_for(lm)
    fast = optimise_values(lm, REQS, hp, CTX, progress=False)
    for req, f in zip(REQS, fast):
        ref = optimise_value(lm, req, hp, CTX)
        assert len(ref.losses) == len(f.losses)
        # Rounding: two float32 orders of the same forward pass and Adam steps; 1e-5 ≈ 80 ε32
        # (no closed bound through the optimiser; measured ≤ 1.7e-6 on both kernel paths).
        assert (f.v_init - ref.v_init).norm() / ref.v_init.norm() < 1e-5
        rel = (f.delta - ref.delta).norm() / ref.delta.norm()
        assert rel < 1e-5, rel
        # k* read from the δ = 0 pass equals the key computed on its own
        k_star = key_star(lm, 1, req.prompt, req.subject, CTX)
        assert (f.k_star - k_star).norm() / k_star.norm() < 1e-5


@pytest.mark.parametrize("family", ["gptj", "llama"])
@pytest.mark.parametrize("clamp", [4.0, 0.05])
def test_shared_loop_equals_the_reference_loop(tokenizer, family, clamp):
    """Both engines run value_loop's Adam/KL/clamp; a literal torch.optim.Adam transcription of
    the reference (tests/reference_value.py) is the independent ground truth."""
    from conftest import make_tiny
    from reference_value import reference_value

    lm = make_tiny(family, tokenizer)
    hp = hp_for(lm, clamp_norm_factor=clamp)
    fast = optimise_values(lm, REQS, hp, CTX, progress=False)
    for req, f in zip(REQS, fast):
        v_init, delta, losses = reference_value(lm, req, hp, CTX)
        plain = optimise_value(lm, req, hp, CTX)
        for ours in (plain, f):
            assert len(ours.losses) == len(losses)
            # Rounding, as in test_batched_equals_one_at_a_time (measured ≤ 1.7e-6 of 1e-5).
            assert torch.allclose(torch.tensor(ours.losses), torch.tensor(losses), rtol=1e-5)
            assert (ours.v_init - v_init).norm() / v_init.norm() < 1e-5
            assert (ours.delta - delta).norm() / delta.norm() < 1e-5


def test_early_stop_threshold_is_a_parameter(tiny_gptj):
    """A threshold above every loss stops at the first evaluation; ``early_stop_loss=0`` holds
    every request to the full step count (the loss is never negative; benchmarks use it)."""
    hp = hp_for(tiny_gptj, v_num_grad_steps=12)
    for kw in ({}, {"early_stop_loss": 0.0}):
        assert all(len(r.losses) == 12
                   for r in optimise_values(tiny_gptj, REQS, hp, CTX, progress=False, **kw))
    at_once = optimise_values(tiny_gptj, REQS, hp, CTX, progress=False, early_stop_loss=1e9)
    assert all(len(r.losses) == 1 and r.delta.abs().max() == 0 for r in at_once)
    assert len(optimise_value(tiny_gptj, REQS[0], hp, CTX, early_stop_loss=1e9).losses) == 1
    assert len(optimise_value(tiny_gptj, REQS[0], hp, CTX, early_stop_loss=0.0).losses) == 12


def test_early_stop_and_clamp(tiny_gptj):
    lm = tiny_gptj
    hp = hp_for(lm, v_num_grad_steps=40, clamp_norm_factor=0.5, v_lr=2.0)
    for res in optimise_values(lm, REQS, hp, CTX, progress=False):
        assert res.delta.norm() <= 0.5 * res.v_init.norm() * (1 + 1e-5)
    easy = hp_for(lm, v_num_grad_steps=60, clamp_norm_factor=50, v_lr=1.0, v_weight_decay=0.0,
                  kl_factor=0.0)
    fast = optimise_values(lm, REQS[:2], easy, CTX, progress=False)
    for req, res in zip(REQS[:2], fast):
        ref = optimise_value(lm, req, easy, CTX)
        assert len(res.losses) == len(ref.losses)
        if len(res.losses) < 60:  # stopped early: the last loss is below the threshold
            assert res.losses[-1] < 0.05


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_paper_update_maps_k_star_to_v_star(tokenizer, family):
    from conftest import make_tiny

    lm = make_tiny(family, tokenizer)
    inverse, _ = random_inverse(lm)
    hp = hp_for(lm, mom2_adjustment=True)
    (rec,) = compute_edits(lm, REQS[:1], hp, CTX, inverse, progress=False)
    module = get_module(lm.model, lm.arch.out_proj.format(1))
    with applied(lm, [rec]):
        out = module(rec.k_star[None])[0]
    torch.testing.assert_close(out, rec.v_star, rtol=1e-5, atol=1e-5)


def test_reference_update_maps_bare_key_to_v_star(tiny_gptj):
    lm = tiny_gptj
    inverse, _ = random_inverse(lm)
    hp = hp_for(lm, mom2_adjustment=True, update_form="rome-reference")
    (rec,) = compute_edits(lm, REQS[:1], hp, CTX, inverse, progress=False)
    k_bare, _ = keys_and_values(lm, 1, [REQS[0].prompt], [REQS[0].subject])
    module = get_module(lm.model, lm.arch.out_proj.format(1))
    assert abs(rec.u.norm().item() - 1) < 1e-6  # the reference normalises u
    with applied(lm, [rec]):
        out = module(k_bare)[0]
        # the bare prompt's key now yields v*, as the reference intends
        torch.testing.assert_close(out, rec.v_star, rtol=1e-5, atol=1e-5)
    # ... and u is C⁻¹k* up to scale
    _, c = random_inverse(lm)
    c = c.double()
    direction = torch.linalg.solve(c, rec.k_star.double())
    # Rounding: u comes from a float32 Cholesky factor of C, so its direction is off by about
    # √d·ε32·κ(C) normwise (κ ≈ 5 here: bound ≈ 7e-6).  Compared as unit vectors in float64; a
    # float32 cosine cannot resolve this (1 - cos ≈ ½‖δ‖² ≈ 1e-11; the old `cos > 1 - 1e-5`
    # let the direction be off by 4.5e-3).
    bound = c.shape[0] ** 0.5 * torch.finfo(torch.float32).eps * torch.linalg.cond(c).item()
    u = rec.u.double()
    assert (u / u.norm() - direction / direction.norm()).norm() < bound


def test_revert_is_bit_identical_after_100_cycles(tiny_gptj):
    lm = tiny_gptj
    records = compute_edits(lm, REQS, hp_for(lm), CTX, progress=False)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for i in range(100):
        with applied(lm, records[i % 3 : i % 3 + 1]):
            pass
    with pytest.raises(RuntimeError):
        with applied(lm, records):
            assert not torch.equal(out_proj_weight(lm.model, lm.arch, 1), before[
                lm.arch.out_proj.format(1) + ".weight"])
            raise RuntimeError("body fails")
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_record_round_trip_and_reapply(tiny_gptj, tmp_path):
    lm = tiny_gptj
    (rec,) = compute_edits(lm, REQS[:1], hp_for(lm), CTX, progress=False)
    rec.save(tmp_path / "r")
    loaded = EditRecord.load(tmp_path / "r")
    for name in ("k_star", "v_orig", "v_star", "delta", "u", "lam"):
        assert torch.equal(getattr(rec, name), getattr(loaded, name))
    assert loaded.request == rec.request and loaded.hparams == rec.hparams
    torch.testing.assert_close(loaded.delta, loaded.v_star - loaded.v_orig)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "record.safetensors").write_bytes(b"\x80\x04not safetensors")
    (tmp_path / "bad" / "record.json").write_text(json.dumps(rec.metadata()))
    with pytest.raises(ValueError, match="safetensors"):
        EditRecord.load(tmp_path / "bad")


def test_edit_changes_prediction_and_sequential(tiny_gptj):
    lm = tiny_gptj
    hp = hp_for(lm, v_num_grad_steps=25, clamp_norm_factor=20)
    w0 = out_proj_weight(lm.model, lm.arch, 1).clone()
    records = edit_sequentially(lm, REQS[:2], hp, CTX)
    assert not torch.equal(out_proj_weight(lm.model, lm.arch, 1), w0)
    assert records[1].losses[-1] < records[1].losses[0]
    with torch.no_grad():
        out_proj_weight(lm.model, lm.arch, 1).copy_(w0)


def test_hparams_round_trip_and_reference_file(tmp_path):
    hp = ROMEHyperParams.preset("gpt-j-6b")
    assert hp.layers == (5,) and hp.v_lr == 0.5 and hp.clamp_norm_factor == 4
    assert hp.n_context_templates == 21
    hp.save(tmp_path / "h.json")
    assert ROMEHyperParams.load(tmp_path / "h.json") == hp
    data = json.loads((tmp_path / "h.json").read_text())
    assert set(data) >= {"layers", "v_num_grad_steps", "mom2_n_samples", "rewrite_module_tmp"}
    with pytest.raises(ValueError, match="exactly one layer"):
        ROMEHyperParams(layers=(1, 2))
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ROMEHyperParams.load(tmp_path / "x.json")


def test_context_templates_sampled_escaped_and_loaded(tiny_gptj, tmp_path):
    ctx = sample_context_templates(tiny_gptj, ((3, 2), (5, 2)), seed=1)
    assert ctx[0] == "{}" and len(ctx) == 5
    assert ctx == sample_context_templates(tiny_gptj, ((3, 2), (5, 2)), seed=1)
    assert compose("A {{x}}. {}", "Name: {}.") == "A {{x}}. Name: {}."
    (tmp_path / "c.json").write_text(json.dumps(["{}", "no placeholder"]))
    with pytest.raises(ValueError, match="exactly one"):
        load_context_templates(tmp_path / "c.json")


@pytest.mark.parametrize("make_bad, match", [
    (lambda: EditRequest("Ani", "Name: {}.", ""), "target is empty"),
    (lambda: EditRequest("Ani", "Name: Ani.", " Male"), "exactly one"),
])
def test_bad_requests(make_bad, match):
    with pytest.raises(ValueError, match=match):
        make_bad()


def test_bad_inputs_leave_weights_untouched(tiny_gptj):
    lm = tiny_gptj
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    inverse, _ = random_inverse(lm, layer=1)
    with pytest.raises(ValueError, match="out of range"):
        compute_edits(lm, REQS[:1], hp_for(lm, layers=(9,)), CTX, progress=False)
    with pytest.raises(ValueError, match="layer 1 but the edit is at layer 2"):
        compute_edits(lm, REQS[:1], hp_for(lm, layers=(2,), mom2_adjustment=True), CTX, inverse)
    other = inverse.with_provenance({**inverse.provenance, "model_identity": "x@1"})
    with pytest.raises(ValueError, match="second moment C was made on x@1"):
        compute_edits(lm, REQS[:1], hp_for(lm, mom2_adjustment=True), CTX, other)
    with pytest.raises(ValueError, match="no second-moment"):
        compute_edits(lm, REQS[:1], hp_for(lm, mom2_adjustment=True), CTX, None)
    nan_c = torch.eye(128)
    nan_c[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        InverseSecondMoment.from_matrix(nan_c)
    (rec,) = compute_edits(lm, REQS[:1], hp_for(lm), CTX, progress=False)
    bad = EditRecord(**{**rec.__dict__, "model_identity": "other@123"})
    with pytest.raises(ValueError, match="was made on"):
        apply_records(lm, [rec, bad])  # the good record must not be applied either
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batched_evaluation_equals_real_weight_edits(tiny_gptj):
    from concepts import CITY, JOB

    from rome_edit.evaluation.evaluate import evaluate_edits

    lm = tiny_gptj
    names = [("Brittany", 1), ("David", 0), ("Christopher", 0), ("Margaret", 1), ("Robert", 0),
             ("Stephany", 1)]
    records = compute_edits(lm, CITY.requests(names[:3]),
                            hp_for(lm, v_num_grad_steps=10, clamp_norm_factor=10),
                            CTX, progress=False)
    pool = [s for s, _ in names]
    batched = evaluate_edits(lm, records, pool, [JOB], n_same_last=2, n_random=2,
                             progress=False)
    assert all(s.paraphrase is not None and "job" in s.kept for s in batched)
    for rec, score in zip(records, batched):
        # one edit at a time, written into the weights
        (alone,) = evaluate_edits(lm, [rec], pool, [JOB], n_same_last=2, n_random=2,
                                  chunk=1, progress=False)
        with applied(lm, [rec]):
            from rome_edit.models.scoring import next_token_logprobs
            lp = next_token_logprobs(lm.model, lm.tokenizer,
                                     [CITY.prompt.format(rec.request.subject)])[0]
        new_id = lm.tokenizer(rec.request.target_new, add_special_tokens=False)["input_ids"][0]
        assert abs(score.p_new_after - lp[new_id].exp().item()) < 1e-4
        # batch composition changes float rounding (seen: 5e-7 relative on some releases)
        for field in dataclasses.fields(score):
            mine, theirs = getattr(score, field.name), getattr(alone, field.name)
            assert mine == (pytest.approx(theirs, rel=1e-5, abs=1e-7)
                            if isinstance(mine, float) else theirs), field.name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_edit_matches_float32(tokenizer, dtype):
    """δ is optimised in float32 on a half-precision model; the update is cast back."""
    from conftest import make_tiny

    from rome_edit.models.loading import wrap_model

    lm32 = make_tiny("gptj", tokenizer)
    half = make_tiny("gptj", tokenizer)
    lm16 = wrap_model(half.model.to(dtype), tokenizer, "tiny-half")
    hp = hp_for(lm32, v_num_grad_steps=10, clamp_norm_factor=10)
    r32 = compute_edits(lm32, REQS, hp, CTX, progress=False)
    r16 = compute_edits(lm16, REQS, hp, CTX, progress=False)
    for a, b in zip(r32, r16):
        assert b.delta.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.delta, b.delta, dim=0) > 0.98
    before = out_proj_weight(lm16.model, lm16.arch, 1).clone()
    with applied(lm16, r16[:1]):
        assert out_proj_weight(lm16.model, lm16.arch, 1).dtype == dtype
    assert torch.equal(out_proj_weight(lm16.model, lm16.arch, 1), before)


def test_deprecated_names_warn_and_forward(monkeypatch):
    """Pre-0.3 spellings keep working: SecondMomentInverse(solver, provenance) is the solver
    with its provenance, ``.solver`` is the object itself, optimize_value(s) call the British
    spellings; each warns."""
    c = torch.eye(4) * 2
    solver = InverseSecondMoment.from_matrix(c)
    with pytest.warns(DeprecationWarning, match="with_provenance"):
        old = SecondMomentInverse(solver, {"layer": 1})
    assert isinstance(old, InverseSecondMoment) and old.provenance == {"layer": 1}
    assert old.factor is solver.factor and solver.provenance == {}  # shared, not mutated
    with pytest.warns(DeprecationWarning, match="itself the solver"):
        assert old.solver is old
    with pytest.raises(TypeError, match="InverseSecondMoment"), pytest.warns(DeprecationWarning):
        SecondMomentInverse(object(), {})  # type: ignore[arg-type]
    import rome_edit.rome.value_batched as vb
    import rome_edit.rome.value_reference as vr

    monkeypatch.setattr(vr, "optimise_value", lambda *a, **k: ("one", a, k))
    monkeypatch.setattr(vb, "optimise_values", lambda *a, **k: ("many", a, k))
    with pytest.warns(DeprecationWarning, match="optimise_value"):
        assert vr.optimize_value(1, x=2) == ("one", (1,), {"x": 2})
    with pytest.warns(DeprecationWarning, match="optimise_values"):
        assert vb.optimize_values(1, x=2) == ("many", (1,), {"x": 2})
