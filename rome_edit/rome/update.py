"""ROME step 3: the rank-one update of the MLP output projection, ``W ← W + Λ uᵀ``.

Two documented forms (``ROMEHyperParams.update_form``):

* ``paper`` (Meng et al. 2022, Eq. 2): ``u = C⁻¹k*``, ``Λ = (v* − v(k*)) / (uᵀk*)`` where
  ``v(k*) = W k* + b`` is the layer's current output for ``k*``.  Afterwards the layer maps
  ``k*`` to ``v*`` exactly.
* ``rome-reference`` (the reference code): ``u = C⁻¹k* / ‖C⁻¹k*‖`` and
  ``Λ = (v* − v(s)) / (k(s)·u)`` with ``k(s)``, ``v(s)`` the bare prompt's key and value, so the
  layer maps ``k(s)`` — not ``k*`` — to ``v*`` (the mismatch r-ROME, Gupta et al. 2024, blamed
  for collapse under sequential edits).

Without ``mom2_adjustment`` ``C`` is the identity.  Weights stored transposed (GPT-2's Conv1D)
receive ``u Λᵀ``.  The update is computed in float32 and cast to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rome_edit.errors import ParameterError
from rome_edit.rome.hparams import UpdateForm


@dataclass(frozen=True)
class RankOneUpdate:
    u: torch.Tensor  # (d_mlp,) left vector
    lam: torch.Tensor  # (d_model,) Λ

    def matrix(self, transposed: bool) -> torch.Tensor:
        """``Λ uᵀ`` shaped like the stored weight."""
        outer = torch.outer(self.lam, self.u)
        return outer.T if transposed else outer


def rank_one_update(
    form: UpdateForm,
    c_inv_k_star: torch.Tensor,
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    value_of_k_star: torch.Tensor | None = None,
    k_bare: torch.Tensor | None = None,
    v_bare: torch.Tensor | None = None,
) -> RankOneUpdate:
    """Build ``(u, Λ)`` for one edit; all vectors float32.

    ``value_of_k_star`` (paper form) is the unedited layer's output for ``k*``; ``k_bare`` and
    ``v_bare`` (reference form) are the bare prompt's key and value.
    """
    if form == "paper":
        if value_of_k_star is None:
            raise ValueError("the paper form needs the layer's current output for k*.")
        u = c_inv_k_star
        lam = (v_star - value_of_k_star) / torch.dot(u, k_star)
    elif form == "rome-reference":
        if k_bare is None or v_bare is None:
            raise ValueError("the rome-reference form needs the bare prompt's key and value.")
        u = c_inv_k_star / c_inv_k_star.norm()
        lam = (v_star - v_bare) / torch.dot(k_bare, u)
    else:
        raise ValueError(f"unknown update form {form!r}; use 'paper' or 'rome-reference'.")
    if not (torch.isfinite(u).all() and torch.isfinite(lam).all()):
        raise ParameterError("the update is not finite (uᵀk* ≈ 0?); check the second-moment "
                             "statistics or give a ridge (hyperparameter mom2_ridge).",
                             parameters=("mom2_ridge",))
    return RankOneUpdate(u, lam)
