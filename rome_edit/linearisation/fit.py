"""Fitting and scoring the closed-form MLP approximants on recorded activations (Belrose & Rigg
2025, arXiv 2502.01032).

Pure maths on tensors: the inputs ``x``, keys ``k`` and values ``v`` of one MLP (recorded by
:mod:`rome_edit.linearisation.io`) and its weights.  Documents are split at random into a fitting
part — whose inputs give ``μ, Σ`` (or a Gaussian mixture) — and a held-out part, on whose tokens
the approximants of :mod:`rome_edit.linearisation.polynomial` are scored by R².  The ordinary
least-squares linear fit on the fitting tokens is scored too, as the data's own best linear map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rome_edit.linearisation.polynomial import (
    Activation,
    MixtureLinear,
    MLPPolynomial,
    empirical_linear_fit,
    fit_mixture_linear,
    fit_mlp_polynomial,
    r_squared,
)

__all__ = ["Linearization", "fit_linearization", "split_documents"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Linearization:
    """The Gaussian-fit approximants of one layer's MLP and their held-out R²."""

    layer: int
    polynomial: MLPPolynomial
    moments_method: str
    activation: str
    n_fit_tokens: int
    n_heldout_tokens: int
    r2: dict[str, float]  # key/value × linear, quadratic, linear_ols[, linear_mixture]
    mixture: MixtureLinear | None = None
    components: int = 1

    def to_json(self) -> dict:
        return {"layer": self.layer, "activation": self.activation,
                "moments": self.moments_method, "n_fit_tokens": self.n_fit_tokens,
                "n_heldout_tokens": self.n_heldout_tokens, "mixture_components": self.components,
                "r2": self.r2}


def split_documents(doc: Tensor, heldout_fraction: float, seed: int) -> Tensor:
    """Boolean mask of held-out tokens: a seeded random ``heldout_fraction`` of the documents."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    n_docs = int(doc.max()) + 1
    order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(heldout_fraction * n_docs))
    if n_held >= n_docs:
        raise ValueError(f"{n_docs} documents cannot be split into fitting and held-out parts; "
                         "pass more texts.")
    return torch.isin(doc, order[:n_held])


def fit_linearization(
    x: Tensor, k: Tensor, v: Tensor, doc: Tensor, *, w_in: Tensor, b_in: Tensor | None,
    w_out: Tensor, b_out: Tensor | None, activation: Activation, layer: int,
    activation_name: str, heldout_fraction: float = 0.3, seed: int = 0, components: int = 1,
) -> Linearization:
    """Fit ``N(μ, Σ)`` to the inputs of the fitting documents, build the closed-form linear and
    quadratic approximants, and score them on the held-out documents' tokens (R² pooled over
    coordinates).  ``components > 1`` also fits a Gaussian mixture (scikit-learn, full
    covariances, seeded) and scores its closed-form linear approximant (``*_linear_mixture``).
    """
    if components < 1:
        raise ValueError(f"components must be at least 1, got {components}.")
    held = split_documents(doc, heldout_fraction, seed)
    xf = x[~held].double()
    mu, cov = xf.mean(0), torch.cov(xf.T)
    poly = fit_mlp_polynomial(w_in, b_in, w_out, b_out, mu, cov, activation)
    xh, kh, vh = x[held], k[held], v[held]
    r2 = {"key_linear": r_squared(kh, poly.key_linear(xh)),
          "key_quadratic": r_squared(kh, poly.key_quadratic(xh)),
          "value_linear": r_squared(vh, poly.value_linear(xh)),
          "value_quadratic": r_squared(vh, poly.value_quadratic(xh))}
    for name, target in (("key", k), ("value", v)):
        a, c = empirical_linear_fit(xf, target[~held])
        r2[f"{name}_linear_ols"] = r_squared(target[held], xh.double() @ a.T + c)
    mixture = None
    if components > 1:
        weights, means, covs = _fit_mixture(xf, components, seed)
        mixture = fit_mixture_linear(w_in, b_in, w_out, b_out, weights, means, covs, activation)
        r2["key_linear_mixture"] = r_squared(kh, mixture.key_linear(xh))
        r2["value_linear_mixture"] = r_squared(vh, mixture.value_linear(xh))
    log.info("layer %d MLP approximants: %s", layer, r2)
    return Linearization(layer, poly, poly.moments.method, activation_name,
                         int((~held).sum()), int(held.sum()), r2, mixture, components)


def _fit_mixture(x: Tensor, components: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means and full covariances of a seeded Gaussian mixture fit.  The ridge
    (1e-4 × the mean variance) keeps components regular on LayerNorm's hyperplane."""
    from sklearn.mixture import GaussianMixture

    if len(x) < 2 * components:
        raise ValueError(f"{len(x)} fitting tokens are too few for {components} mixture "
                         "components; pass more documents or fewer components.")
    ridge = 1e-4 * float(x.var(0).mean())
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=ridge,
                          random_state=seed).fit(x.numpy())
    return (torch.from_numpy(gmm.weights_), torch.from_numpy(gmm.means_),
            torch.from_numpy(gmm.covariances_))
