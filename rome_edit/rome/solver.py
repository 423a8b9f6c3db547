"""What the engine needs of ``C⁻¹``: the :class:`Solver` protocol, defined once for the package.

ROME's update direction is ``u = C⁻¹ k*`` (Meng et al. 2022, eq. 2).  The engine (``rome``) and
the editing forms (``forms``) only apply ``C⁻¹`` to keys; a record also stores where ``C`` came
from.  The one implementation is :class:`rome_edit.stats.inverse.InverseSecondMoment` (a
factorisation of ``C`` plus its ``provenance``); it lives in the statistics room, which the
engine does not import, so the engine names it by these protocols.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import torch

__all__ = ["SecondMomentInverse", "Solver", "SolverWithProvenance"]


class Solver(Protocol):
    """Anything that applies ``C⁻¹`` to a key ``(d,)`` or rows of keys ``(n, d)``
    (e.g. ``InverseSecondMoment``)."""

    def solve(self, keys: torch.Tensor) -> torch.Tensor: ...


class SolverWithProvenance(Solver, Protocol):
    """``C⁻¹`` together with where ``C`` came from (model identity, layer, width, corpus, …:
    the mapping every record stores); ``InverseSecondMoment`` is one."""

    @property
    def provenance(self) -> Mapping[str, Any]: ...


def SecondMomentInverse(solver: Solver, provenance: Mapping[str, Any]  # noqa: N802
                        ) -> SolverWithProvenance:
    """Deprecated (0.3): ``InverseSecondMoment`` carries its provenance itself, so write
    ``inverse.with_provenance(provenance)``.  Returns that; removed in 1.0."""
    warnings.warn("SecondMomentInverse(solver, provenance) is deprecated; use "
                  "solver.with_provenance(provenance) (InverseSecondMoment holds both).",
                  DeprecationWarning, stacklevel=2)
    with_provenance = getattr(solver, "with_provenance", None)
    if with_provenance is None:
        raise TypeError(f"{type(solver).__name__} has no with_provenance(); pass an "
                        "InverseSecondMoment (rome_edit.stats.InverseSecondMoment.from_matrix(C)).")
    result: SolverWithProvenance = with_provenance(provenance)
    return result
