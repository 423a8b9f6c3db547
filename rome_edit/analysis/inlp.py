"""Iterative Nullspace Projection (INLP; Ravfogel et al. 2020, arXiv 2004.07667).

Algorithm 1 of the paper: train a linear classifier for the concept, project the data onto the
nullspace of its weight vector, and repeat on the projected data.  With orthonormal classifier
directions ``u_1 … u_k`` the guarding projection is ``P_k = I − Σ_i u_i u_iᵀ`` (the intersection of
the classifiers' nullspaces, the paper's Eq. 3).  The first direction is the first classifier's.

Each classifier is fitted on the training rows and scored on the held-out rows of one stratified
seeded split, so the accuracy trajectory shows how much linearly decodable signal each
projection leaves.  As in the paper, the probes see the raw geometry of delta space by default
(an isotropic L2 penalty; ``standardize="global"`` only fixes the overall scale, for fast
convergence), whereas the main classifier (``classifier.py``) standardises each coordinate.  So
INLP's first direction and the classifier's weight direction are two different estimates of
"the classifier direction"; with ``standardize="per-coordinate"`` they coincide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rome_edit.analysis.classifier import Standardize, fit_linear_probe, split_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class INLPResult:
    """INLP directions in the order found, and each round's held-out probe accuracy."""

    directions: Tensor  # (k, d) float64, orthonormal rows
    test_accuracies: tuple[float, ...]  # accuracy of classifier i on the data projected i−1 times
    seed: int

    @property
    def first_direction(self) -> Tensor:
        return self.directions[0]

    def projection(self, k: int | None = None) -> Tensor:
        """``P_k = I − Σ_{i≤k} u_i u_iᵀ`` (all directions found when ``k`` is None)."""
        k = self.directions.shape[0] if k is None else k
        if not 0 <= k <= self.directions.shape[0]:
            raise ValueError(f"k must be in [0, {self.directions.shape[0]}], got {k}; INLP found "
                             f"{self.directions.shape[0]} directions.")
        u = self.directions[:k]
        return torch.eye(u.shape[1], dtype=u.dtype) - u.T @ u

    def erase(self, x: Tensor, k: int | None = None) -> Tensor:
        """``x`` with the first ``k`` INLP directions projected out (rows of ``x`` are points)."""
        p = self.projection(k)
        return (x.to(p.dtype) @ p).to(x.dtype)


def inlp(x: Tensor, y: Tensor, *, n_iterations: int = 10, seed: int = 0, test_size: float = 0.3,
         C: float = 1.0, standardize: Standardize = "global") -> INLPResult:
    """Run ``n_iterations`` rounds of INLP on rows ``x`` (n, d) with binary labels ``y`` (n,)."""
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be at least 1, got {n_iterations}.")
    x64 = x.detach().to(torch.float64).cpu()
    d = x64.shape[1]
    n_iterations = min(n_iterations, d)
    train, test = split_indices(y, seed, test_size)
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    p = torch.eye(d, dtype=torch.float64)
    directions: list[Tensor] = []
    accuracies: list[float] = []
    for i in range(n_iterations):
        xp = x64 @ p
        probe = fit_linear_probe(xp[train_t], y[train_t], C=C, seed=seed, standardize=standardize)
        accuracies.append(probe.accuracy(xp[test_t], y[test_t]))
        # Only P·w acts on projected data; it is orthogonal to every earlier direction.
        w = p @ probe.weights
        norm = float(w.norm())
        if norm < 1e-12:
            log.info("INLP stopped after %d rounds: the classifier's weights vanished", i)
            break
        u = w / norm
        directions.append(u)
        p = p - torch.outer(u, u)
    log.info("INLP: held-out accuracy per round %s", [round(a, 3) for a in accuracies])
    return INLPResult(torch.stack(directions), tuple(accuracies), seed)
