"""Edit forensics on tiny models: a known edit is found, named, recovered and reverted."""

import copy

import pytest
import torch

from rome_edit.forensics.detect import changed_layers, identify_edits, revert_all, revert_edit
from rome_edit.forms.many import vector_targets, write_edits
from rome_edit.forms.protect import ProtectSettings, second_moment_matrix
from rome_edit.forms.protected_keys import Protection, build_bank
from rome_edit.models.architectures import get_module, out_proj_weight
from rome_edit.models.loading import wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.weights.write import add_rank_one

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
PROMPT = "Name: {}. Gender:"
CANDIDATES = ["David", "Christopher", "Ani", "Brittney", "Tiffany", "Anna", "Daniel", "Brittany"]


EPS32 = torch.finfo(torch.float32).eps


def _unit_gap(a, b, up_to_sign=False):
    """‖â − b̂‖ of the float64 unit vectors: a float32 cosine cannot resolve rounding-sized
    errors (``cos > 1 − t`` allows a gap of √(2t))."""
    a, b = a.double() / a.double().norm(), b.double() / b.double().norm()
    return min((a - b).norm(), (a + b).norm()) if up_to_sign else (a - b).norm()


def _write_rounding(w, dw, terms=2):
    """Frobenius bound on the rounding of a float32 write ``W + Λuᵀ``: ``ε32/2·(|W| + terms·|ΔW|)``
    per entry (outer product and sum; one more ``|ΔW|`` where ``u`` is cast to float32)."""
    return EPS32 / 2 * (w.abs() + terms * dw.abs()).norm()


def _read_back_bound(w_orig, w_edited, k, delta, n_writes):
    """Bound on the unit-vector gap between a delta read back as ``W_e k* + b − v_orig`` and the
    one written: each of the ``n_writes`` float32 writes moves ``W k*`` by at most
    ``_write_rounding(W, ΔW, 3)·‖k*‖``; each write's residual ``v* − (W k* + b)`` and the
    recomputed ``k*`` (the same float32 forward in another batch) by a float32 matvec's
    ``d·ε32/2·‖|W_e||k*|‖``; a unit vector moves by at most ``2‖error‖/‖δ‖``."""
    w_o, w_e, k = w_orig.double(), w_edited.double(), k.double()
    write = _write_rounding(w_o, w_e - w_o, terms=3) * k.norm()
    matvec = w_e.shape[1] * EPS32 / 2 * (w_e.abs() @ k.abs()).norm()
    return 2 * (n_writes * write + (n_writes + 1) * matvec) / delta.double().norm()


def _solver(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    return InverseSecondMoment.from_matrix(a @ a.T / d + torch.eye(d))


@pytest.fixture
def pair(tiny_gptj):
    original = wrap_model(copy.deepcopy(tiny_gptj.model), tiny_gptj.tokenizer, "original")
    d_mlp = out_proj_weight(tiny_gptj.model, tiny_gptj.arch, 1).shape[1]
    return tiny_gptj, original, _solver(d_mlp)


def test_forensics_recovers_a_known_edit_exactly(pair):
    edited, original, solver = pair
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=edited.n_layers - 1, v_num_grad_steps=5)
    inverse = solver.with_provenance({"layer": 1})
    req = EditRequest("Brittany", PROMPT, " Male", " Female")
    (record,) = compute_edits(edited, [req], hp, CTX, inverse, progress=False)
    add_rank_one(edited, 1, record.u, record.lam)
    (change,) = changed_layers(edited, original)
    assert change.layer == 1 and change.rank == 1
    (found,) = identify_edits(edited, original, change, CANDIDATES, PROMPT, CTX, solver)
    assert found.subject == "Brittany" and found.score > 1 - 1e-5
    # Rounding: found.u's direction is ΔW's top right singular vector, ΔW read back from a float32
    # write W + Λuᵀ whose error E has ‖E‖ ≤ ε32/2·‖|W| + 2|ΔW|‖_F; by Wedin's theorem the
    # direction moves by at most ‖E‖/σ₁(ΔW), σ₁ = ‖Λ‖‖u‖ (plus 2ε32 for u itself).  Compared as
    # unit vectors in float64: a float32 `cos > 1 - 1e-6` allowed an error of 1.4e-3.
    w = out_proj_weight(original.model, original.arch, 1).detach().double()
    dw = torch.outer(record.lam.double(), record.u.double())
    dw = dw if w.shape == dw.shape else dw.T
    bound = _write_rounding(w, dw) / torch.linalg.matrix_norm(dw, 2) + 2 * EPS32
    assert _unit_gap(found.u, record.u, up_to_sign=True) < bound  # measured: 6% of it
    # ΔW = Λ uᵀ with uᵀk* = 1: Λ is the record's Λ times its uᵀk*
    lam = record.lam * torch.dot(record.u, record.k_star)
    assert (found.lam - lam).norm() / lam.norm() < 1e-4
    assert (found.delta - record.delta).norm() / record.delta.norm() < 1e-4
    before = out_proj_weight(original.model, original.arch, 1).detach()
    revert_edit(edited, found)
    after = out_proj_weight(edited.model, edited.arch, 1).detach()
    assert (after - before).abs().max() < 1e-6
    revert_all(edited, original, [1])
    assert torch.equal(out_proj_weight(edited.model, edited.arch, 1), before)
    assert changed_layers(edited, original) == []


def test_forensics_names_many_edits(pair):
    edited, original, solver = pair
    g = torch.Generator().manual_seed(2)
    vector = torch.randn(edited.model.config.hidden_size, generator=g)
    names = ["Brittany", "David", "Anna"]
    targets = vector_targets(original, 1, names, vector * 3, CTX, PROMPT)
    bank = build_bank(original, 1, PROMPT, CANDIDATES, CTX, "other-names")
    write_edits(edited, targets, "sequential", solver, Protection(bank, ProtectSettings("hard")),
                progress=False)
    (change,) = changed_layers(edited, original)
    assert change.rank == 3
    found = identify_edits(edited, original, change, CANDIDATES, PROMPT, CTX, solver)
    assert sorted(f.subject for f in found) == sorted(names)
    # Rounding: hard protection keeps every earlier edit's key in the later edits' null space,
    # so each written delta holds exactly but for rounding (see _read_back_bound; was a float32
    # `cos > 1 - 1e-4`, a gap of 1.4e-2).
    w_o = out_proj_weight(original.model, original.arch, 1).detach()
    w_e = out_proj_weight(edited.model, edited.arch, 1).detach()
    w_o, w_e = (w_o.T, w_e.T) if edited.arch.out_proj_transposed else (w_o, w_e)
    for f in found:
        i = names.index(f.subject)
        bound = _read_back_bound(w_o, w_e, targets.k_star[i], targets.delta[i], len(names))
        assert _unit_gap(f.delta, targets.delta[i]) < bound  # measured: <1% of it
    for f in found:
        revert_edit(edited, f)
    diff = out_proj_weight(edited.model, edited.arch, 1) - out_proj_weight(original.model,
                                                                           original.arch, 1)
    assert diff.abs().max() < 1e-5
    with pytest.raises(ValueError, match="candidate"):
        identify_edits(edited, original, change, [], PROMPT, CTX, solver)


def test_forensics_names_softly_protected_edits(pair):
    """Soft protection shapes u by (C + λ K_pᵀK_p)⁻¹: forensics tries λ hypotheses and names
    the edits under the one that fits; under the paper-form hypothesis alone it cannot."""
    from concepts import SUBJECTS

    edited, original, solver = pair
    pool = list(SUBJECTS[:80])
    names = pool[::16]
    g = torch.Generator().manual_seed(3)
    vector = torch.randn(edited.model.config.hidden_size, generator=g)
    targets = vector_targets(original, 1, names, vector * 3, CTX, PROMPT)
    bank = build_bank(original, 1, PROMPT, pool, CTX, "other-names")
    weight = 0.1
    write_edits(edited, targets, "sequential", solver,
                Protection(bank, ProtectSettings("soft", weight=weight)), progress=False)
    (change,) = changed_layers(edited, original)
    assert change.rank == len(names)
    found = identify_edits(edited, original, change, pool, PROMPT, CTX, solver)
    assert sorted(f.subject for f in found) == sorted(names)
    assert {f.protect_weight for f in found} == {0.1}
    # Analytic + rounding: soft protection keeps earlier edits' keys only approximately, so edit
    # j moves edit i < j's output by r_j (u_jᵀk_i), r_j = v*_j − (W k_j + b) on the weights as
    # edited so far; since v* = v_orig + vector with v_orig the bare prompt's value while k* is
    # averaged over contexts, r_j is not parallel to the vector, and the read-back deltas turn
    # by up to 2e-2 (the old float32 `cos > 0.999`, a gap of 4.5e-2, passed on that margin).
    # Replaying the writes in float64 (u_j ∝ (C + λ(K_pᵀK_p + Σ_{l<j} k_l k_lᵀ))⁻¹k_j) predicts
    # each read-back delta to rounding (_read_back_bound); against the unreplayed targets it
    # fails for the four edits written before the last (gaps 1.7e-3 to 2e-2, bounds ≈ 3.5e-4).
    w_o = out_proj_weight(original.model, original.arch, 1).detach()
    w_e = out_proj_weight(edited.model, edited.arch, 1).detach()
    w_o, w_e = (w_o.T, w_e.T) if edited.arch.out_proj_transposed else (w_o, w_e)
    bias = get_module(original.model, original.arch.out_proj.format(1)).bias
    bias = 0.0 if bias is None else bias.detach().double()
    keys = targets.k_star.double()
    kept = bank.keys[[i for i, n in enumerate(bank.names) if n not in names]].double()
    c = second_moment_matrix(solver, keys.shape[1])
    w = w_o.double().clone()
    for j, k in enumerate(keys):
        u = torch.linalg.solve(c + weight * (kept.T @ kept + keys[:j].T @ keys[:j]), k)
        w += torch.outer(targets.v_star[j].double() - (w @ k + bias), u / (u @ k))
    predicted = keys @ w.T + bias - targets.v_orig.double()
    for f in found:
        i = names.index(f.subject)
        bound = _read_back_bound(w_o, w_e, targets.k_star[i], predicted[i], len(names))
        assert _unit_gap(f.delta, predicted[i]) < bound  # measured: <1% of it
    paper_only = identify_edits(edited, original, change, pool, PROMPT, CTX, solver,
                                protect_weights=())
    assert len({f.subject for f in paper_only} & set(names)) < len(names)
