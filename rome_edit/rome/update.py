"""ROME step 3: the rank-one update of the MLP output projection, ``W ← W + Λ uᵀ``.

Two documented forms (``ROMEHyperParams.update_form``):

* ``paper`` (Meng et al. 2022, Eq. 2): ``u = C⁻¹k*``, ``Λ = (v* − v(k*)) / (uᵀk*)`` where
  ``v(k*) = W k* + b`` is the layer's current output for ``k*``.  Afterwards the layer maps
  ``k*`` to ``v*`` exactly.
* ``rome-reference`` (the reference code): ``u = C⁻¹k* / ‖C⁻¹k*‖`` and
  ``Λ = (v* − v(s)) / (k(s)·u)`` with ``k(s)``, ``v(s)`` the bare prompt's key and value, so the
  layer maps ``k(s)`` — not ``k*`` — to ``v*`` (the mismatch r-ROME, Gupta et al. 2024, blamed
  for collapse under sequential edits).

With ``subject_forms`` (:mod:`rome_edit.rome.context`) the edit is written at several keys at
once — Eq. 2 with several keys, the ``ΔW`` of least ``tr(ΔW C ΔWᵀ)`` with ``ΔW k_f = r_f =
v*_f − (W k_f + b)`` for every form: ``ΔW = Σ_f r_f u_fᵀ`` with ``u_fᵀ k_g = [f = g]``
(:func:`combine_forms`).  With ``ũ_f = P k_f`` the one-key direction of the update's metric
``P`` (``C⁻¹`` for the paper form; a protected form's own for protected updates),
``U = (Ũ Kᵀ)⁻¹ Ũ`` (:func:`joint_directions`), whatever scale each ``ũ_f`` had.

Without ``mom2_adjustment`` ``C`` is the identity.  Weights stored transposed (GPT-2's Conv1D)
receive ``u Λᵀ``.  The update is computed in float32 and cast to the weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from rome_edit.errors import ParameterError
from rome_edit.models.layers import layer_output
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.hparams import UpdateForm
from rome_edit.rome.record import EditRecord, FormWrite


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


def joint_directions(directions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rows ``u_f`` with ``u_fᵀ k_g = [f = g]`` in the span of the one-key ``directions``.

    ``directions`` and ``keys`` are ``(F, d_mlp)``: row ``f`` of ``directions`` is any multiple
    of ``P k_f``.  Returns ``(Ũ Kᵀ)⁻¹ Ũ`` (float32, computed in float64).  A near-singular
    ``Ũ Kᵀ`` (two forms with the same key) is refused.
    """
    u = directions.double()
    gram = u @ keys.double().T
    cond = torch.linalg.cond(gram).item()
    if not math.isfinite(cond) or cond > 1e10:
        raise ParameterError(f"the subject forms' keys are nearly the same (condition {cond:.1e})"
                             "; drop the form that repeats another from subject_forms.",
                             parameters=("subject_forms",))
    return torch.linalg.solve(gram, u).float()


def combine_forms(lm: LoadedModel, record: EditRecord, forms: Sequence[FormWrite],
                  directions: torch.Tensor) -> EditRecord:
    """``record`` written at its own key and at each form's: rank-one terms ``r_f u_fᵀ`` with
    ``u_fᵀ k_g = [f = g]`` (:func:`joint_directions` of ``directions``,
    one row per key, the record's first) and ``r_f = v*_f − (W k_f + b)`` against the current
    weights.  Paper-form records only; ``forms``' own ``u``/``lam`` are replaced."""
    keys = torch.stack([record.k_star, *(f.k_star for f in forms)]).float()
    u = joint_directions(directions, keys)
    residuals = torch.stack([record.v_star, *(f.v_star for f in forms)]).float() \
        - layer_output(lm, record.layer, keys)
    writes = tuple(replace(f, u=u[i + 1], lam=residuals[i + 1]) for i, f in enumerate(forms))
    return replace(record, u=u[0], lam=residuals[0], forms=writes)
