"""Applying delta-space vectors to unseen names: the batched rank-one hook is a real edit."""

import pytest
import torch
from concepts import CITY

from rome_edit.evaluation.vectors import VectorApplier, random_directions
from rome_edit.weights.write import add_rank_one, preserved

NAMES = [("Brittany", 1), ("David", 0), ("Margaret", 1), ("Robert", 0)]
CTX = ["{}", "The weather was cold. {}"]


@pytest.fixture
def applier(tiny_gptj):
    return VectorApplier(tiny_gptj, 1, [s for s, _ in NAMES], [label for _, label in NAMES],
                         CITY.tasks, CTX, inverse=None)


def test_weights_mode_equals_real_rank_one_edits(tiny_gptj, applier):
    vec = random_directions(applier.v_orig.shape[1], 3.0, [0])[0]
    hooked = applier.answer_logits(vec, "weights")
    u, lam = applier.update_for(vec)
    for i in range(len(NAMES)):
        with preserved(tiny_gptj, [1]):
            add_rank_one(tiny_gptj, 1, u[i], lam[i])
            real = applier.answer_logits(None)
        torch.testing.assert_close(hooked[i], real[i], rtol=1e-4, atol=1e-4)


def test_plus_then_minus_restores_prediction(tiny_gptj, applier):
    base = applier.answer_logits(None)
    vec = random_directions(applier.v_orig.shape[1], 5.0, [1])[0]
    u_plus, lam_plus = applier.update_for(vec)
    u_minus, lam_minus = applier.update_for(-vec)
    with preserved(tiny_gptj, [1]):
        add_rank_one(tiny_gptj, 1, u_plus[0], lam_plus[0])
        assert not torch.allclose(applier.answer_logits(None), base)
        add_rank_one(tiny_gptj, 1, u_minus[0], lam_minus[0])
        torch.testing.assert_close(applier.answer_logits(None), base, rtol=1e-4, atol=1e-4)
    for mode in ("weights", "activations"):
        assert torch.equal(applier.predict_b(vec * 0, mode), applier.predict_b(None))


def test_paper_form_writes_v_star_at_k_star(tiny_gptj):
    applier = VectorApplier(tiny_gptj, 1, [s for s, _ in NAMES], [1, 0, 1, 0], CITY.tasks,
                            CTX, inverse=None, update_form="paper")
    vec = random_directions(applier.v_orig.shape[1], 2.0, [2])[0]
    u, lam = applier.update_for(vec)
    from rome_edit.models.architectures import get_module
    module = get_module(tiny_gptj.model, tiny_gptj.arch.out_proj.format(1))
    with preserved(tiny_gptj, [1]):
        add_rank_one(tiny_gptj, 1, u[0], lam[0])
        out = module(applier.k_star[:1])[0]
    torch.testing.assert_close(out, applier.v_orig[0] + vec, rtol=1e-4, atol=1e-4)


def test_zero_vector_changes_nothing_and_bad_width(applier):
    base = applier.answer_logits(None)
    for mode in ("weights", "activations"):
        torch.testing.assert_close(applier.answer_logits(torch.zeros(base.new_zeros(
            applier.v_orig.shape[1]).shape), mode), base, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="wide"):
        applier.answer_logits(torch.zeros(7))
    table = applier.flip_table(torch.zeros(applier.v_orig.shape[1]))
    assert table.n_label1 == 2 and table.n_label0 == 2
