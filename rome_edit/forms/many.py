"""Many edits in one model: N targets ``k_i ↦ v*_i`` written into one layer, persistently.

Two forms (docs/method.md, "Many edits at one layer"):

* ``sequential`` — ROME's paper form one edit after another (Meng et al. 2022, Eq. 2): edit
  ``i`` writes ``r_i u_iᵀ`` with ``u_i = C⁻¹k_i / (k_iᵀC⁻¹k_i)`` and ``r_i = v*_i − (W k_i + b)``
  solved against the weights *as already edited*, so edit ``i`` lands exactly and later edits
  disturb it by ``r_j (u_jᵀ k_i)``.  (``v*_i`` is the recorded target, not re-optimised on the
  edited model.)  With protection, edit ``i`` also protects every earlier edit's key.
* ``batched`` — MEMIT's single-layer closed form (Meng et al. 2022b, Eq. 14) with the statistics
  as the preserved term: ``ΔW = R Kᵀ (λ_C C + K Kᵀ)⁻¹`` for keys ``K = [k_1 … k_n]`` and
  residuals ``R = [r_1 … r_n]`` against the unedited weights, the minimiser of
  ``‖ΔW K − R‖² + λ_C tr(ΔW C ΔWᵀ)``.  ``λ_C`` (``mom2_weight``) is in units of ``C``, a mean
  over corpus tokens; as ``λ_C → 0`` and ``n = 1`` it is ROME's paper form.  Protection adds
  ``λ λ_C K_pK_pᵀ`` to the bracket (soft: each protected key weighs ``λ`` average tokens, as in
  :mod:`~rome_edit.forms.protect`), or restricts ``ΔW`` to the null space ``Q`` of the
  protected keys (hard: their exact complement; null-space: AlphaEdit's threshold):
  ``ΔW = R KᵀQ (Qᵀ(λ_C C + KKᵀ)Q)⁻¹ Qᵀ``.

The recorded delta of each edit, ``v* − v_orig``, is the same whatever the form.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from rome_edit.forms.protect import (
    ProtectSettings,
    _c_inv,
    null_space_basis,
    protected_direction,
    second_moment_matrix,
)
from rome_edit.forms.protected_keys import (
    ProtectedKeyBank,
    Protection,
    subject_last_tokens,
)
from rome_edit.models.architectures import check_editable, check_layer, out_proj_weight
from rome_edit.models.layers import layer_output
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.key import key_stars, keys_and_values
from rome_edit.rome.solver import Solver
from rome_edit.weights.targets import EditTargets
from rome_edit.weights.write import add_rank_one, add_update

log = logging.getLogger(__name__)
ManyForm = Literal["sequential", "batched"]
MANY_FORMS: tuple[str, ...] = ("sequential", "batched")
DEFAULT_MOM2_WEIGHT = 100.0

__all__ = ["DEFAULT_MOM2_WEIGHT", "MANY_FORMS", "ManyEditResult", "ManyForm",
           "batched_delta", "vector_targets", "write_edits"]



def vector_targets(lm: LoadedModel, layer: int, subjects: Sequence[str], vector: torch.Tensor,
                   context_templates: Sequence[str], prompt: str) -> EditTargets:
    """One vector for N names (Xodarap 2023's test, persistently): ``v*_i = v_orig,i + vector`` at
    each name's ``k*``, ``v_orig`` the bare prompt's value at the subject's last token."""
    subjects = list(subjects)
    if vector.ndim != 1:
        raise ValueError(f"the vector must be 1-D, got shape {tuple(vector.shape)}.")
    k_star = key_stars(lm, layer, [prompt] * len(subjects), subjects, context_templates)
    _, v_orig = keys_and_values(lm, layer, [prompt] * len(subjects), subjects)
    if vector.shape[0] != v_orig.shape[1]:
        raise ValueError(f"the vector is {vector.shape[0]} wide but layer {layer}'s values are "
                         f"{v_orig.shape[1]}; use a vector made on this model.")
    return EditTargets(layer, prompt, tuple(subjects), k_star, v_orig + vector.float(), v_orig)


def batched_delta(keys: torch.Tensor, residuals: torch.Tensor, c: torch.Tensor,
                  mom2_weight: float, protected: torch.Tensor | None = None,
                  settings: ProtectSettings | None = None) -> torch.Tensor:
    """``ΔW = R Kᵀ (λ_C C + K Kᵀ)⁻¹`` (``(d_model, d_mlp)``, float64); keys and residuals are
    rows.  ``protected`` rows add the soft term or restrict ``ΔW`` to their null space."""
    settings = settings or ProtectSettings()
    if mom2_weight < 0:
        raise ValueError(f"mom2_weight must be >= 0, got {mom2_weight}.")
    k, r = keys.double(), residuals.double()
    a = mom2_weight * c.double() + k.T @ k
    q = None
    if protected is not None and len(protected):
        form = settings.resolve(len(protected), k.shape[1])
        p = protected.double()
        if form == "soft":
            a = a + settings.weight * mom2_weight * (p.T @ p)
        else:
            q = null_space_basis(p, 0.0 if form == "hard" else settings.threshold, k.shape[1])
    a = (a + a.T) / 2
    if q is None:
        return torch.linalg.solve(a, k.T @ r).T
    return (q @ torch.linalg.solve(q.T @ a @ q, q.T @ (k.T @ r))).T


@dataclass(frozen=True)
class ManyEditResult:
    """What :func:`write_edits` wrote (for the checkpoint's JSON)."""

    form: str
    layer: int
    n_edits: int
    mom2_weight: float | None
    protection: dict | None
    delta_w_norm: float  # Frobenius norm of the layer's change
    seconds: float

    def to_dict(self) -> dict:
        return {"form": self.form, "layer": self.layer, "n_edits": self.n_edits,
                "mom2_weight": self.mom2_weight, "protection": self.protection,
                "delta_w_norm": self.delta_w_norm, "seconds": self.seconds}


def _protected_rows(lm: LoadedModel, targets: EditTargets, bank: ProtectedKeyBank
                    ) -> torch.Tensor:
    """Bank rows protected for the whole set: any edited subject's set, minus edited names."""
    if bank.layer != targets.layer or bank.prompt != targets.prompt:
        raise ValueError("protected keys were computed for another layer or prompt than the "
                         "edits; build them for the edits' layer and prompt.")
    toks = subject_last_tokens(lm, targets.prompt, targets.subjects)
    rows: set[int] = set()
    for s, t in zip(targets.subjects, toks):
        rows.update(bank.select(s, t, exclude=targets.subjects).tolist())
    return torch.tensor(sorted(rows), dtype=torch.long)


@torch.no_grad()
def write_edits(lm: LoadedModel, targets: EditTargets, form: ManyForm = "sequential",
                solver: Solver | None = None, protection: Protection | None = None,
                mom2_weight: float = DEFAULT_MOM2_WEIGHT, progress: bool = True
                ) -> ManyEditResult:
    """Write all ``targets`` into the model's edit layer (persistent; wrap in
    :func:`~rome_edit.weights.write.preserved` to undo).  ``solver`` applies ``C⁻¹`` (``None``:
    ``C = I``); ``protection`` protects other subjects' keys, never those being edited (see
    the module docstring)."""
    bank = protection.bank if protection is not None else None
    settings = protection.effective if protection is not None else ProtectSettings()
    if form not in MANY_FORMS:
        raise ValueError(f"unknown form {form!r}; use one of {list(MANY_FORMS)}.")
    layer = targets.layer
    check_layer(lm.model, lm.arch, layer)
    check_editable(lm.model, lm.arch, layer)
    t0 = time.perf_counter()
    weight = out_proj_weight(lm.model, lm.arch, layer)
    before = weight.detach().float().clone()
    d = targets.k_star.shape[1]
    rows = _protected_rows(lm, targets, bank) if bank is not None else None
    protected = bank.keys[rows] if bank is not None else torch.zeros(0, d)
    if form == "batched":
        residual = targets.v_star - layer_output(lm, layer, targets.k_star)
        c = second_moment_matrix(solver, d)
        delta_w = batched_delta(targets.k_star, residual, c, mom2_weight, protected, settings)
        add_update(lm, layer, delta_w)
    else:
        _write_sequential(lm, targets, solver, protected if bank is not None else None,
                          settings, progress)
    change = (weight.detach().float() - before).norm().item()
    prot = None
    if bank is not None:
        m = len(rows) + (len(targets.subjects) - 1 if form == "sequential" else 0)
        prot = {"source": bank.source, "n_keys": len(rows), "form": settings.resolve(m, d),
                "requested_form": protection.settings.form, "weight": settings.weight,
                "threshold": settings.threshold, "positions": bank.positions,
                "protects_earlier_edits": form == "sequential"}
    return ManyEditResult(form, layer, len(targets.subjects),
                          mom2_weight if form == "batched" else None, prot, change,
                          time.perf_counter() - t0)


def _write_sequential(lm: LoadedModel, targets: EditTargets, solver: Solver | None,
                      protected: torch.Tensor | None, settings: ProtectSettings,
                      progress: bool) -> None:
    """One paper-form edit after another; with ``protected`` keys (and every earlier edit's
    key) kept by the chosen form.  Soft protection keeps ``H = (C + λ Σ k_j k_jᵀ)⁻¹`` and adds
    each written key by Sherman–Morrison (``O(d²)`` per edit)."""
    layer, n = targets.layer, len(targets.subjects)
    d = targets.k_star.shape[1]
    keys = targets.k_star.double()
    form = None if protected is None else settings.resolve(len(protected) + n - 1, d)
    h = None
    if form == "soft":
        c = second_moment_matrix(solver, d)
        p = protected.double()
        h = torch.linalg.inv(c + settings.weight * (p.T @ p))
    c_full = second_moment_matrix(solver, d) if form == "null-space" else None
    for i in tqdm(range(n), desc="write edits", unit="edit", disable=not progress):
        k = keys[i]
        if form is None:
            u = _c_inv(solver, k[None])[0]
        elif form == "soft":
            u = h @ k
            hk = u
            h = h - settings.weight * torch.outer(hk, hk) / (1 + settings.weight * (k @ hk))
        else:
            kept = torch.cat([protected.double(), keys[:i]])
            u = protected_direction(k, kept, ProtectSettings(form, settings.weight,
                                                             settings.threshold),
                                    solver, c_full).double()
        u = u / (u @ k)
        r = targets.v_star[i] - layer_output(lm, layer, targets.k_star[i][None])[0]
        add_rank_one(lm, layer, u.float(), r)
