"""The source's bounded "gender vector" (Xodarap 2023) for any labelled deltas: the
box-constrained optimisation.

Xodarap 2023: "I use optimization tools to identify a vector which maximizes the probability of
being classified as a 'female to male' δ, subject to the constraint that each component must be
in the range [-1, 1]."  For a generic :class:`~rome_edit.analysis.deltas.DeltaSet` "female to
male" is label 1 (the classifier's positive class).  We solve it with L-BFGS-B and an analytic
gradient, in one of two forms:

- ``objective="logit"`` (default): maximise ``w·g + b``.  σ is strictly increasing, so this has
  the same maximiser as the probability, but it does not saturate: in float64 ``σ(z)`` rounds to
  1 once ``z > 37``, and a probability objective then stops as soon as the classifier is sure,
  with most coordinates still inside the box.
- ``objective="probability"``: minimise ``−σ(w·g + b)`` (gradient ``−σ(z)σ(−z) w``) literally, as
  the source describes.  It stops where the probability saturates, so its result depends on the
  optimiser's path; this is plausibly why the feasibility run's ‖g‖ ≈ 13 is below
  ``√256 = 16``, the norm of a vector at the corners of the box.

For a linear classifier the optimum is known in closed form: ``g = sign(w)`` (each coordinate
raises the logit by ``|w_i|`` at its bound).  The optimiser is kept because it is the source's
method (and the check that it lands on ``sign(w)`` validates the pipeline); the tests confirm it.
An L2 penalty on ``g`` is deliberately not offered: for a linear classifier it only interpolates
between ``sign(w)`` and the weight direction ``w/‖w‖``, which ``directions.py`` already compares
as its own candidate.

The result is scaled and wrapped as a :class:`~rome_edit.analysis.concept_vector.ConceptVector`
(see there for the scale modes and the file format).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit
from torch import Tensor

from rome_edit.analysis.classifier import ClassifierResult, LinearProbe
from rome_edit.analysis.concept_vector import (
    ConceptVector,
    ConceptVectorError,
    ScaleSpec,
    resolve_scale,
)
from rome_edit.analysis.errors import DEFAULT_CLASSES

log = logging.getLogger(__name__)

BoxObjective = Literal["logit", "probability"]

@dataclass(frozen=True, eq=False)
class BoxOptimum:
    """The L-BFGS-B solution of ``max σ(w·g + b)`` s.t. ``−bound ≤ g_i ≤ bound``."""

    vector: Tensor  # (d,) float64
    probability: float
    logit: float
    n_iterations: int
    converged: bool
    message: str
    fraction_at_bounds: float


def optimise_box_vector(probe: LinearProbe, *, bound: float = 1.0,
                        objective: BoxObjective = "logit", max_iter: int = 1000) -> BoxOptimum:
    """Maximise the classifier's probability of label 1 over the box ``[−bound, bound]^d``."""
    if not bound > 0:
        raise ConceptVectorError(f"bound must be positive, got {bound}.")
    if objective not in ("logit", "probability"):
        raise ConceptVectorError(f"objective {objective!r} is not 'logit' or 'probability'.")
    w = probe.weights.detach().to(torch.float64).cpu().numpy()
    b = float(probe.bias)
    if not np.isfinite(w).all() or not np.isfinite(b):
        raise ConceptVectorError("the classifier has non-finite weights; retrain it.")

    # The logit's maximiser is unchanged by a positive rescaling; dividing by max |w_i| makes the
    # gradient O(1), so L-BFGS-B's absolute tolerances mean the same for any classifier scale.
    w_unit = w / max(float(np.abs(w).max()), np.finfo(float).tiny)

    def negative_logit(g: np.ndarray) -> tuple[float, np.ndarray]:
        return -float(w_unit @ g), -w_unit

    def negative_probability(g: np.ndarray) -> tuple[float, np.ndarray]:
        z = float(w @ g + b)
        return -float(expit(z)), -expit(z) * expit(-z) * w

    fun = negative_logit if objective == "logit" else negative_probability
    res = minimize(fun, np.zeros_like(w), jac=True, method="L-BFGS-B",
                   bounds=[(-bound, bound)] * len(w),
                   options={"maxiter": max_iter, "gtol": 1e-12})
    g = np.clip(res.x, -bound, bound)
    at_bounds = float(np.mean(np.isclose(np.abs(g), bound, rtol=0, atol=1e-9 * bound)))
    prob = float(expit(w @ g + b))
    log.info("box vector (%s objective): p(label 1)=%.6f, %.1f%% of coordinates at the bounds, "
             "%d iterations", objective, prob, 100 * at_bounds, res.nit)
    return BoxOptimum(torch.from_numpy(g.copy()), prob, float(w @ g + b), int(res.nit),
                      bool(res.success), str(res.message), at_bounds)


def make_concept_vector(x: Tensor, classifier: ClassifierResult,
                        scale: ScaleSpec = "mean-norm", *, model_identity: str, layer: int,
                        classes: tuple[str, str] = DEFAULT_CLASSES, prompt: str | None = None,
                        bound: float = 1.0, objective: BoxObjective = "logit") -> ConceptVector:
    """Optimise the box vector for ``classifier`` and scale it against the mean norm of the
    deltas ``x`` ``(n, d)``; ``model_identity``, ``layer``, ``classes`` and ``prompt`` are the
    deltas' provenance, stored in the vector (``DeltaSet.box_vector()`` passes its own)."""
    width = x.shape[1]
    if classifier.weights.numel() != width:
        raise ConceptVectorError(f"classifier width {classifier.weights.numel()} does not match "
                                 f"the deltas' width {width}; train it on these deltas.")
    mean_norm = float(x.norm(dim=1).mean())
    opt = optimise_box_vector(classifier.probe, bound=bound, objective=objective)
    raw_norm = float(opt.vector.norm())
    mode, multiplier = resolve_scale(scale, raw_norm, mean_norm)
    return ConceptVector(opt.vector * multiplier, mode, multiplier, raw_norm, model_identity,
                         layer, classifier.test_accuracy, mean_norm, classes, prompt)
