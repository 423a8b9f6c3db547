"""Edit forensics on tiny models: a known edit is found, named, recovered and reverted."""

import copy

import pytest
import torch

from rome_edit.editing.apply import add_rank_one
from rome_edit.editing.forensics import changed_layers, identify_edits, revert_all, revert_edit
from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.many import vector_targets, write_edits
from rome_edit.editing.protect import ProtectSettings
from rome_edit.editing.protected_keys import Protection, build_bank
from rome_edit.editing.request import EditRequest
from rome_edit.editing.rome import SecondMomentInverse, compute_edits
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.loading import wrap_model
from rome_edit.stats.inverse import InverseSecondMoment

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
PROMPT = "Name: {}. Gender:"
CANDIDATES = ["David", "Christopher", "Ani", "Brittney", "Tiffany", "Anna", "Daniel", "Brittany"]


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
    inverse = SecondMomentInverse(solver, {"layer": 1})
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
    eps32 = torch.finfo(torch.float32).eps
    sigma1 = torch.linalg.matrix_norm(dw, 2)
    bound = eps32 / 2 * (w.abs() + 2 * dw.abs()).norm() / sigma1 + 2 * eps32
    a, b = found.u.double(), record.u.double()
    a, b = a / a.norm(), b / b.norm()
    assert min((a - b).norm(), (a + b).norm()) < bound  # measured: 6% of it
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
    by_name = dict(zip(names, targets.delta))
    for f in found:
        cos = torch.nn.functional.cosine_similarity(f.delta, by_name[f.subject], dim=0)
        assert cos > 1 - 1e-4
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
    from rome_edit.study.names import load_names

    edited, original, solver = pair
    pool = [e.name for e in load_names()[:80]]
    names = pool[::16]
    g = torch.Generator().manual_seed(3)
    vector = torch.randn(edited.model.config.hidden_size, generator=g)
    targets = vector_targets(original, 1, names, vector * 3, CTX, PROMPT)
    bank = build_bank(original, 1, PROMPT, pool, CTX, "other-names")
    write_edits(edited, targets, "sequential", solver,
                Protection(bank, ProtectSettings("soft", weight=0.1)), progress=False)
    (change,) = changed_layers(edited, original)
    assert change.rank == len(names)
    found = identify_edits(edited, original, change, pool, PROMPT, CTX, solver)
    assert sorted(f.subject for f in found) == sorted(names)
    assert {f.protect_weight for f in found} == {0.1}
    by_name = dict(zip(names, targets.delta))
    for f in found:
        assert torch.nn.functional.cosine_similarity(f.delta, by_name[f.subject], dim=0) > 0.999
    paper_only = identify_edits(edited, original, change, pool, PROMPT, CTX, solver,
                                protect_weights=())
    assert len({f.subject for f in paper_only} & set(names)) < len(names)
