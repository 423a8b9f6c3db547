"""Closed-form least-squares polynomial approximants of an MLP under a Gaussian input model
(Belrose & Rigg 2025, "Converting MLPs into Polynomials in Closed Form", arXiv 2502.01032).
Pure maths: no model is imported here.

The MLP is ``k = σ(W_in x + b_in)`` (the key, ``d_mlp``) and ``v = W_out k + b_out`` (the value).
Model its input as ``x ~ N(μ, Σ)``.  Each pre-activation ``z_i = w_iᵀx + b_i`` is then Gaussian,
``z_i ~ N(m_i, s_i²)`` with ``m = W_in μ + b_in`` and ``s_i² = w_iᵀ Σ w_i``.

**Linear.**  The least-squares affine map of ``k`` on ``x`` is ``E[k] + Cov(k, x) Σ⁺ (x − μ)``, and
Stein's lemma gives ``Cov(σ(z_i), x) = E[σ'(z_i)] Cov(z_i, x) = E[σ'(z_i)] (Σ w_i)ᵀ``, so

    k_lin(x) = E[σ(z)] + diag(E[σ'(z)]) W_in (x − μ),      v_lin = W_out k_lin + b_out.

(Where ``Σ`` is singular — LayerNorm outputs lie on a hyperplane — this is one of the minimisers
and agrees with all of them on the support.)  Under a Gaussian *mixture* the same lemma applies
per component; :func:`fit_mixture_linear` adds the between-component covariance.

**Quadratic.**  Each ``k_i`` depends on ``x`` only through ``z_i``, so its best polynomial of
degree ≤ 2 in ``x`` is its projection onto the Hermite polynomials of degree ≤ 2 in the
standardised ``ζ_i = (z_i − m_i)/s_i``; with the second-order Stein identity
``E[f(z)((z − m)² − s²)] = s⁴ E[f''(z)]``:

    k_quad,i(x) = E[σ(z_i)] + E[σ'(z_i)](z_i − m_i) + ½ E[σ''(z_i)] ((z_i − m_i)² − s_i²).

**Gaussian moments of the activation.**  For ``z ~ N(m, s²)``, with ``r = √(1 + s²)``, Φ and φ the
standard normal CDF and density:

* erf-GELU ``σ(z) = zΦ(z)``:  ``E σ = mΦ(m/r) + s²φ(m/r)/r``;
  ``E σ' = Φ(m/r) + m φ(m/r)/r³``;
  ``E σ'' = φ(m/r)/r · (2 − m²/r⁴ − s²/r²)``  (``σ'' = (2 − z²)φ(z)``, and
  ``φ(z)N(z; m, s²) = φ(m/r)/r · N(z; m/r², s²/r²)``).
* ReLU:  ``E σ = mΦ(m/s) + sφ(m/s)``, ``E σ' = Φ(m/s)``, ``E σ'' = φ(m/s)/s``.
* Anything else (tanh-GELU, SiLU, …): Gauss–Hermite quadrature of the activation itself,
  ``E σ' = E[σ(z)(z − m)]/s²`` and ``E σ'' = E[σ(z)((z − m)² − s²)]/s⁴`` (Stein again), so only
  ``σ`` is evaluated — the model's own activation module can be passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["MLPPolynomial", "MixtureLinear", "Moments", "direction_cosines",
           "empirical_linear_fit", "fit_mixture_linear", "fit_mlp_polynomial",
           "gaussian_moments", "r_squared", "random_abs_cosine", "top_singular_directions"]

Activation = Literal["gelu_erf", "relu"] | Callable[[Tensor], Tensor]
QUADRATURE_NODES = 96


@dataclass(frozen=True)
class Moments:
    """``E σ(z)``, ``E σ'(z)``, ``E σ''(z)`` per neuron for ``z ~ N(m, s²)`` (float64)."""

    mean: Tensor
    slope: Tensor
    curvature: Tensor
    method: str


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _Phi(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def gaussian_moments(m: Tensor, s: Tensor, activation: Activation,
                     nodes: int = QUADRATURE_NODES) -> Moments:
    """The activation's first three Gaussian moments (see the module docstring)."""
    m, s = m.double(), s.double()
    if (s <= 0).any():
        raise ValueError("a pre-activation has zero variance under the Gaussian fit; the "
                         "inputs' covariance is degenerate along that neuron's weights.")
    if activation == "gelu_erf":
        r = torch.sqrt(1 + s**2)
        a = _phi(m / r) / r
        return Moments(m * _Phi(m / r) + s**2 * a, _Phi(m / r) + m * a / r**2,
                       a * (2 - m**2 / r**4 - s**2 / r**2), "closed form (erf-GELU)")
    if activation == "relu":
        return Moments(m * _Phi(m / s) + s * _phi(m / s), _Phi(m / s), _phi(m / s) / s,
                       "closed form (ReLU)")
    if not callable(activation):
        raise ValueError(f"unknown activation {activation!r}; use 'gelu_erf', 'relu' or a "
                         "callable (evaluated by Gauss-Hermite quadrature).")
    # Probabilists' Gauss-Hermite: ∫ f(ξ) e^{-ξ²/2} dξ ≈ Σ w f(ξ_i); divide by √(2π).
    xi, w = np.polynomial.hermite_e.hermegauss(nodes)
    xi_t = torch.from_numpy(xi)
    w_t = torch.from_numpy(w) / math.sqrt(2 * math.pi)
    z = m[:, None] + s[:, None] * xi_t[None, :]
    with torch.no_grad():
        f = activation(z.float()).double() if _float_only(activation) else activation(z).double()
    mean = f @ w_t
    slope = (f * xi_t) @ w_t / s
    curvature = (f * (xi_t**2 - 1)) @ w_t / s**2
    return Moments(mean, slope, curvature, f"Gauss-Hermite quadrature, {nodes} nodes")


def _float_only(activation: Callable) -> bool:
    """Modules whose parameters are float32 need float32 inputs (a plain function does not)."""
    params = list(getattr(activation, "parameters", lambda: [])())
    return bool(params) and params[0].dtype != torch.float64


@dataclass(frozen=True)
class MLPPolynomial:
    """The linear and quadratic approximants of ``x ↦ (k, v)`` under ``N(μ, Σ)``."""

    w_in: Tensor  # (d_mlp, d_in)
    b_in: Tensor  # (d_mlp,)
    w_out: Tensor  # (d_out, d_mlp)
    b_out: Tensor  # (d_out,)
    mu: Tensor  # (d_in,)
    pre_mean: Tensor  # m (d_mlp,)
    pre_std: Tensor  # s (d_mlp,)
    moments: Moments

    def _centred(self, x: Tensor) -> Tensor:
        return x.double() @ self.w_in.T + self.b_in - self.pre_mean  # z − m

    def key_linear(self, x: Tensor) -> Tensor:
        return self.moments.mean + self.moments.slope * self._centred(x)

    def key_quadratic(self, x: Tensor) -> Tensor:
        dz = self._centred(x)
        return (self.moments.mean + self.moments.slope * dz
                + 0.5 * self.moments.curvature * (dz**2 - self.pre_std**2))

    def value_linear(self, x: Tensor) -> Tensor:
        return self.key_linear(x) @ self.w_out.T + self.b_out

    def value_quadratic(self, x: Tensor) -> Tensor:
        return self.key_quadratic(x) @ self.w_out.T + self.b_out

    @property
    def key_map(self) -> Tensor:
        """The linear part ``diag(E σ') W_in``, ``(d_mlp, d_in)``."""
        return self.moments.slope[:, None] * self.w_in

    @property
    def value_map(self) -> Tensor:
        """The linear part ``W_out diag(E σ') W_in``, ``(d_out, d_in)``."""
        return self.w_out @ self.key_map


def fit_mlp_polynomial(w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None,
                       mu: Tensor, cov: Tensor, activation: Activation) -> MLPPolynomial:
    """The approximants for inputs ``N(mu, cov)`` (weights as ``y = W x + b``, any float)."""
    w_in, w_out = w_in.double(), w_out.double()
    d_mlp, d_in = w_in.shape
    if w_out.shape[1] != d_mlp or mu.shape != (d_in,) or cov.shape != (d_in, d_in):
        raise ValueError(f"shapes do not fit: W_in {tuple(w_in.shape)}, W_out "
                         f"{tuple(w_out.shape)}, μ {tuple(mu.shape)}, Σ {tuple(cov.shape)}.")
    b_in = torch.zeros(d_mlp, dtype=torch.float64) if b_in is None else b_in.double()
    b_out = (torch.zeros(w_out.shape[0], dtype=torch.float64) if b_out is None
             else b_out.double())
    mu, cov = mu.double(), cov.double()
    pre_mean = w_in @ mu + b_in
    pre_std = ((w_in @ cov) * w_in).sum(1).clamp_min(0).sqrt()
    moments = gaussian_moments(pre_mean, pre_std, activation)
    return MLPPolynomial(w_in, b_in, w_out, b_out, mu, pre_mean, pre_std, moments)


def r_squared(y: Tensor, prediction: Tensor) -> float:
    """Pooled ``R² = 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` over rows and all output coordinates."""
    y, prediction = y.double(), prediction.double()
    total = ((y - y.mean(0)) ** 2).sum()
    if not total > 0:
        raise ValueError("the targets have no variance; R² is undefined.")
    return float(1 - ((y - prediction) ** 2).sum() / total)


def empirical_linear_fit(x: Tensor, y: Tensor, rcond: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Ordinary least squares ``y ≈ A x + c`` on samples (a reference for the closed form:
    the best affine map *for these data*, not for the Gaussian)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    sol = torch.linalg.lstsq(x - mx, y - my, rcond=rcond, driver="gelsd").solution
    a = sol.T
    return a, my - a @ mx


def top_singular_directions(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(S[:k], U[:, :k]ᵀ, V[:, :k]ᵀ)``: singular values, output-side and input-side unit
    directions (rows) of ``matrix`` (its left/right singular vectors)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = min(k, len(s))
    return s[:k], u[:, :k].T, vh[:k]


def direction_cosines(vectors: Tensor, directions: dict[str, Tensor]) -> dict[str, list[float]]:
    """``|cos|`` of each row of ``vectors`` (e.g. singular directions, whose sign is arbitrary)
    with each named direction."""
    rows = vectors.double() / vectors.double().norm(dim=1, keepdim=True)
    out = {}
    for name, d in directions.items():
        d = d.double().flatten()
        if d.shape[0] != rows.shape[1]:
            raise ValueError(f"direction {name!r} has width {d.shape[0]}, the vectors "
                             f"{rows.shape[1]}; compare directions of the same space.")
        out[name] = (rows @ (d / d.norm())).abs().tolist()
    return out


def random_abs_cosine(dim: int) -> float:
    """Expected ``|cos|`` between a fixed and a uniformly random direction in ``dim``
    dimensions, ≈ √(2/(π·dim)) — the chance level of :func:`direction_cosines`."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


@dataclass(frozen=True)
class MixtureLinear:
    """The least-squares affine approximant under a Gaussian mixture ``Σ_c π_c N(μ_c, Σ_c)``:
    ``k ≈ E[k] + B (x − μ)`` with ``B = Cov(k, x) Σ⁺`` over the mixture, where
    ``Cov(k, x) = Σ_c π_c [diag(E_c σ') W_in Σ_c + (E_c k − E k)(μ_c − μ)ᵀ]`` (Stein's lemma in
    each component plus the between-component term) and ``Σ = Σ_c π_c [Σ_c + (μ_c − μ)(μ_c − μ)ᵀ]``.
    """

    key_map: Tensor  # B (d_mlp, d_in)
    key_mean: Tensor  # E[k]
    mu: Tensor
    w_out: Tensor
    b_out: Tensor

    def key_linear(self, x: Tensor) -> Tensor:
        return self.key_mean + (x.double() - self.mu) @ self.key_map.T

    def value_linear(self, x: Tensor) -> Tensor:
        return self.key_linear(x) @ self.w_out.T + self.b_out

    @property
    def value_map(self) -> Tensor:
        return self.w_out @ self.key_map


def fit_mixture_linear(w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None,
                       weights: Tensor, means: Tensor, covs: Tensor, activation: Activation,
                       rcond: float = 1e-10) -> MixtureLinear:
    """:class:`MixtureLinear` for mixture ``weights (K,)``, ``means (K, d)``, ``covs (K, d, d)``;
    one component gives :attr:`MLPPolynomial.key_map` (up to Σ's null space)."""
    weights = weights.double() / weights.double().sum()
    means, covs = means.double(), covs.double()
    parts = [fit_mlp_polynomial(w_in, b_in, w_out, b_out, means[c], covs[c], activation)
             for c in range(len(weights))]
    mu = weights @ means
    key_means = torch.stack([p.moments.mean for p in parts])  # (K, d_mlp)
    key_mean = weights @ key_means
    w = parts[0].w_in
    cross = sum(weights[c] * (parts[c].moments.slope[:, None] * (w @ covs[c])
                              + torch.outer(key_means[c] - key_mean, means[c] - mu))
                for c in range(len(weights)))
    spread = sum(weights[c] * (covs[c] + torch.outer(means[c] - mu, means[c] - mu))
                 for c in range(len(weights)))
    key_map = cross @ torch.linalg.pinv(spread, rtol=rcond, hermitian=True)
    return MixtureLinear(key_map, key_mean, mu, parts[0].w_out, parts[0].b_out)
