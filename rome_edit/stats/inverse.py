"""Applying ``C⁻¹`` to keys: one factorisation of ``C`` (plus an optional ridge), many solves.

ROME's update direction is ``u = C⁻¹ k*`` (Meng et al., 2022, eq. 2); a sweep solves it for
1,000 keys against one ``C``.  :class:`InverseSecondMoment` factorises ``C`` once, in float64,
and each :meth:`~InverseSecondMoment.solve` then costs two triangular solves (``O(d²)``, the
same order as multiplying by a stored inverse).

Why a Cholesky factor rather than the explicit inverse the reference code keeps (it inverts
``C`` in the statistics dtype, float32): ``C`` is symmetric positive (semi)definite, so Cholesky
is the backward-stable, half-cost factorisation for it, and its failure is an honest signal that
``C`` is numerically singular — where an explicit inverse would silently return huge, noisy
entries.  float64 keeps the solve accurate for the condition numbers real keys have (10⁶–10⁹).
If Cholesky fails (a PSD matrix rounded to slightly indefinite), LU with pivoting is tried and a
warning suggests a ridge; an exactly singular ``C`` is a clear error.

**Ridge** (for ill-conditioned ``C``): ``C + ridge · mean(diag C) · I``.  It is *relative* to
the mean key energy ``tr(C)/d`` so that one value means the same on every model and layer,
whatever the scale of its keys (an absolute λ would not); ``ridge = 0`` (the default) is exactly
the reference.  Typical values when needed: 1e-6 to 1e-3.

**Provenance**: an :class:`InverseSecondMoment` also says where ``C`` came from (model identity,
layer, width, corpus, token count, dtype, ridge, file), the mapping every edit record stores; it
is the package's one "``C⁻¹`` with its origin" (the engine names it by the protocols of
:mod:`rome_edit.rome.solver`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rome_edit.errors import ParameterError

log = logging.getLogger(__name__)


class SingularSecondMomentError(ParameterError):
    """``C`` (plus ridge) cannot be inverted."""


def with_ridge(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """``C + ridge · mean(diag C) · I`` (float64)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}; it adds ridge·mean(diag C)·I.")
    c = matrix.double()
    if ridge == 0:
        return c
    return c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


@dataclass(frozen=True, eq=False)
class InverseSecondMoment:
    """A float64 factorisation of ``C + ridge·mean(diag C)·I`` that solves for many keys, and
    where ``C`` came from (``provenance``; empty unless given, see :meth:`with_provenance`)."""

    factor: torch.Tensor  # Cholesky L (lower) or packed LU
    pivots: torch.Tensor | None  # LU pivots; None for Cholesky
    ridge: float
    method: Literal["cholesky", "lu"]
    provenance: dict[str, Any] = field(default_factory=dict)

    def with_provenance(self, provenance: Mapping[str, Any]) -> InverseSecondMoment:
        """The same factorisation (tensors shared, not copied) with ``provenance``."""
        return dataclasses.replace(self, provenance=dict(provenance))

    @property
    def solver(self) -> InverseSecondMoment:
        """Deprecated (0.3): this object itself (it was the solver part of
        ``SecondMomentInverse``, which this class replaces); removed in 1.0."""
        warnings.warn("inverse.solver is deprecated: an InverseSecondMoment is itself the "
                      "solver; use it directly.", DeprecationWarning, stacklevel=2)
        return self

    @property
    def dim(self) -> int:
        return self.factor.shape[0]

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, ridge: float = 0.0,
                    device: torch.device | str | None = None) -> InverseSecondMoment:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"C must be square, got shape {tuple(matrix.shape)}.")
        c = with_ridge(matrix.to(device) if device is not None else matrix, ridge)
        if not torch.isfinite(c).all():
            raise SingularSecondMomentError("C has NaN/Inf entries; recompute the statistics.")
        factor, info = torch.linalg.cholesky_ex(c)
        if info.item() == 0:
            return cls(factor, None, ridge, "cholesky")
        lu, pivots, info = torch.linalg.lu_factor_ex(c)
        if info.item() != 0:
            raise SingularSecondMomentError(
                f"C (ridge {ridge}) is singular: too few tokens for width {c.shape[0]} or keys "
                "that are always zero; give a ridge (hyperparameter mom2_ridge, e.g. 1e-4) or "
                "more samples (mom2_n_samples).", parameters=("mom2_ridge", "mom2_n_samples")
            )
        log.warning("C (ridge %g) is not numerically positive definite; solving by LU. "
                    "A ridge (e.g. 1e-6) would make it well-posed.", ridge)
        return cls(lu, pivots, ridge, "lu")

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ k`` for a key ``(d,)`` or a stack of keys ``(n, d)``, in the keys' dtype."""
        if keys.shape[-1] != self.dim or keys.dim() not in (1, 2):
            raise ValueError(f"keys must be ({self.dim},) or (n, {self.dim}); got "
                             f"{tuple(keys.shape)}.")
        rhs = keys.to(self.factor.device, torch.float64).reshape(-1, self.dim).T
        if self.method == "cholesky":
            out = torch.cholesky_solve(rhs, self.factor)
        else:
            out = torch.linalg.lu_solve(self.factor, self.pivots, rhs)
        return out.T.reshape(keys.shape).to(keys.device, keys.dtype)


def solve(c, keys: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``C⁻¹ k`` for ``c`` a :class:`SecondMoment` (factor cached on it, per ridge), an
    :class:`InverseSecondMoment`, or a plain matrix (factorised on each call: for many keys
    build an :class:`InverseSecondMoment` once instead)."""
    if isinstance(c, InverseSecondMoment):
        if ridge != c.ridge:
            raise ValueError(f"this factorisation has ridge {c.ridge}, not {ridge}.")
        return c.solve(keys)
    if isinstance(c, torch.Tensor):
        return InverseSecondMoment.from_matrix(c, ridge).solve(keys)
    return c.inverse(ridge).solve(keys)
