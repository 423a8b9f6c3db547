"""Rank-1 Relaxed Linear Adversarial Concept Erasure (R-LACE; Ravfogel et al. 2022, 2201.12091).

R-LACE solves the minimax game ``max_P min_θ L(θ; X P, y)`` over orthogonal projections ``P`` that
remove a rank-k subspace (the paper's Eq. 2) and logistic classifiers ``θ``.  For rank 1 we
parametrise ``P = I − u uᵀ`` with ``‖u‖ = 1`` directly instead of the paper's Fantope relaxation,
and play the game as gradient ascent on the value ``V(u) = min_θ L(θ; X P_u)``: the classifier is
re-fitted (warm-started L-BFGS, small L2 penalty so the minimiser is unique) before every
projection step, and by Danskin's theorem ``∇V(u) = ∂_u L(θ*(u); X P_u)``.  Each step moves ``u``
along the tangent of the sphere with a decaying step and renormalises; the best ``u`` seen is kept.
This is our own small implementation (the original code breaks on scikit-learn ≥ 1.3).

What to expect: a linear probe can do no better than the constant predictor exactly when the
class-conditional means are equal (the linear-guardedness characterisation of Belrose et al.
2023, arXiv 2306.03819, §3).  An orthogonal rank-1 projection equalises the two means of a binary
concept only if ``u ∝ μ₁ − μ₀``, and any other ``u`` leaves a probe gradient at ``w = 0``, so the
global maximiser of ``V`` is the mean-difference direction of the rows it is fitted on.  Rank-1
R-LACE is therefore an adversarial route to the mean difference; the tests check it lands there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RLACEResult:
    """The rank-1 direction and the classifier's minimal loss before and after removing it."""

    direction: Tensor  # (d,) float64, unit norm
    loss_before: float  # min_θ L on the original data (nats)
    loss_after: float  # min_θ L on the projected data; log 2 ≈ 0.693 means nothing is left
    accuracy_after: float  # training accuracy of that best classifier after projection
    n_steps: int
    seed: int


def _penalised_loss(x1: Tensor, y: Tensor, theta: Tensor, l2: float) -> Tensor:
    """Mean BCE of the logistic probe ``[w, b]`` on ``x1 = [x, 1]`` plus ``l2‖w‖²``."""
    return F.binary_cross_entropy_with_logits(x1 @ theta, y) + l2 * theta[:-1].pow(2).sum()


def _fit_probe(x1: Tensor, y: Tensor, theta: Tensor, l2: float, max_iter: int = 20) -> Tensor:
    """Damped Newton fit of the L2-penalised logistic probe, warm-started at ``theta``.

    Exact inner solutions matter: Danskin's gradient is only the gradient of ``V`` at ``θ*``.
    """
    n, k = x1.shape
    ridge = torch.full((k,), 2 * l2, dtype=x1.dtype)
    ridge[-1] = 1e-10  # the bias is not penalised; a tiny ridge keeps H invertible
    loss = _penalised_loss(x1, y, theta, l2)
    for _ in range(max_iter):
        p = torch.sigmoid(x1 @ theta)
        grad = x1.T @ (p - y) / n + ridge * theta
        if float(grad.abs().max()) < 1e-10:
            break
        hess = (x1.T * (p * (1 - p))) @ x1 / n + torch.diag(ridge)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking: Newton can overshoot from a far warm start
            candidate = theta - t * step
            new_loss = _penalised_loss(x1, y, candidate, l2)
            if new_loss <= loss:
                break
            t /= 2
        else:
            break
        theta, loss = candidate, new_loss
    return theta


def project_out(x: Tensor, u: Tensor) -> Tensor:
    """Rows of ``x`` with their component along the unit vector ``u`` removed: ``x (I − u uᵀ)``,
    in ``u``'s dtype (the erasure check applies it to float32 deltas with float64 directions)."""
    x = x.to(u.dtype)
    return x - torch.outer(x @ u, u)


def rlace_rank1(x: Tensor, y: Tensor, *, seed: int = 0, n_steps: int = 100, step_size: float = 0.3,
                l2: float = 1e-3) -> RLACEResult:
    """Find the unit ``u`` whose projection ``I − u uᵀ`` most raises a logistic probe's loss.

    ``x`` (n, d) are the points, ``y`` (n,) binary labels.  The data are centred and divided by
    one global scale, so the average coordinate has unit variance: an isotropic change that keeps
    every direction's meaning and makes ``l2`` (the probe's penalty) mean the same at any scale.
    The game is played in the span of the centred data (an orthonormal basis from one SVD), which
    is exact for directions in that span and keeps the Newton systems small when d > n.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}.")
    xc = x.detach().to(torch.float64).cpu()
    xc = xc - xc.mean(dim=0)
    xc = xc / (xc.pow(2).sum(dim=1).mean() / xc.shape[1]).sqrt().clamp_min(1e-30)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    basis = vh[s > s[0] * 1e-10]  # (r, d) orthonormal rows spanning the data
    xs = xc @ basis.T  # (n, r): the same points in span coordinates
    yf = y.detach().to(torch.float64).cpu()
    n, r = xs.shape
    ones = torch.ones(n, 1, dtype=torch.float64)

    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(r, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    theta = _fit_probe(torch.cat([xs, ones], 1), yf, torch.zeros(r + 1, dtype=torch.float64), l2)
    loss_before = float(F.binary_cross_entropy_with_logits(torch.cat([xs, ones], 1) @ theta, yf))

    best_u, best_value, steps_done = u, -math.inf, 0
    for step in range(n_steps):
        steps_done = step + 1
        xp1 = torch.cat([project_out(xs, u), ones], 1)
        theta = _fit_probe(xp1, yf, theta, l2)
        value = float(F.binary_cross_entropy_with_logits(xp1 @ theta, yf))
        if value > best_value:
            best_value, best_u = value, u.clone()
        # Danskin: ∂/∂u of mean BCE(w·(x − (x·u)u) + b) at fixed θ*, in closed form.
        w = theta[:-1]
        resid = (torch.sigmoid(xp1 @ theta) - yf) / n
        grad = -((u @ w) * (xs.T @ resid) + (resid @ (xs @ u)) * w)
        tangent = grad - (grad @ u) * u  # ascent on the sphere: drop the radial part
        t_norm = float(tangent.norm())
        if t_norm < 1e-12:
            break
        eta = step_size * 0.5 * (1 + math.cos(math.pi * step / n_steps))  # cosine decay
        u = u + eta * tangent / t_norm
        u = u / u.norm()

    xp1 = torch.cat([project_out(xs, best_u), ones], 1)
    theta = _fit_probe(xp1, yf, theta, l2, max_iter=50)
    logits = xp1 @ theta
    acc = float(((logits > 0).to(torch.float64) == yf).to(torch.float64).mean())
    direction = best_u @ basis
    result = RLACEResult(direction / direction.norm(), loss_before,
                         float(F.binary_cross_entropy_with_logits(logits, yf)), acc, steps_done,
                         seed)
    log.info("RLACE rank 1: probe loss %.3f → %.3f nats (train accuracy after %.3f)",
             result.loss_before, result.loss_after, result.accuracy_after)
    return result
