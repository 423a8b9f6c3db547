"""A vector written for many subjects, fitted to each subject's measured answer (tiny model)."""

import pytest
import torch

from rome_edit.forms.fitted_write import (
    FitSettings,
    _interval,
    _threshold,
    fit_vector_write,
    write_fitted,
)
from rome_edit.models.scoring import choose_between
from rome_edit.models.subject import fill
from rome_edit.weights.write import preserved

PROMPT = "Name: {}. Gender:"
ANSWERS = (" Female", " Male")


def test_thresholds_and_intervals_from_a_curve():
    grid = torch.linspace(-2, 2, 9, dtype=torch.float64)  # -2 -1.5 ... 2
    curve = torch.tensor([3, 2, 1, -1, -1, -1, 1, 2, 3], dtype=torch.float64)
    assert _threshold(curve, grid, 1) == 1.0  # answer 1 (margin > 0) from t = 1 on
    assert _threshold(curve, grid, 0) is None  # answer 0 does not hold at the grid's end
    assert _interval(curve, grid) == (-0.5, 0.5)  # the answer at 0 holds on [-0.5, 0.5]
    flat = torch.ones(9, dtype=torch.float64)
    assert _interval(flat, grid) == (-float("inf"), float("inf"))


def _answers(lm, names):
    picks = choose_between(lm.model, lm.tokenizer, [fill(PROMPT, n) for n in names],
                           list(ANSWERS))
    return picks.tolist()


def test_fitted_write_gives_the_edited_answers_and_keeps_the_protected():
    """On the bundled model with the stored gender vector (a tiny random model's answers do not
    move): three female names edited towards male, twelve others protected."""
    from pathlib import Path

    from concepts import bundled_facts

    from rome_edit.analysis.concept_vector import load_concept_vector
    from rome_edit.models.loading import load_model

    lm = load_model()
    root = Path(__file__).resolve().parents[1]
    gv = load_concept_vector(root / "vectors/bundled-sweep/analysis/gender_vector.safetensors")
    vector = gv.vector.float() * 2 * gv.mean_delta_norm / gv.vector.norm()
    facts = bundled_facts("gender")  # the bundled model's training text: subject → answer
    females = [s for s, answer in facts.items() if answer == "Female"]
    edited, protected = females[:3], list(facts)[40:52]
    settings = FitSettings(span=4.0, points=41)
    before = dict(zip(edited + protected, _answers(lm, edited + protected)))
    assert all(before[n] == 0 for n in edited)  # they answer " Female" now
    fit = fit_vector_write(lm, gv.layer, PROMPT, vector, edited, [1] * 3, protected, ANSWERS,
                           None, settings)
    assert fit.predicted_reached == 1.0 and fit.predicted_kept == 1.0
    with preserved(lm, [gv.layer]):
        write_fitted(lm, fit, vector)
        after = dict(zip(edited + protected, _answers(lm, edited + protected)))
    assert all(after[n] == 1 for n in edited if n not in fit.unreachable)
    assert len(fit.unreachable) < 3
    assert all(after[n] == before[n] for n in protected)
    # preserved() restored the weights
    assert _answers(lm, edited + protected) == [before[n] for n in edited + protected]
    with pytest.raises(ValueError, match="one target"):
        fit_vector_write(lm, gv.layer, PROMPT, vector, edited, [], protected, ANSWERS)
