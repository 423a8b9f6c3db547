"""Edit forensics: find ROME-family edits in a model's weights, name them, and undo them.

Given the edited and the original model (docs/method.md, "Edit forensics"; Youssef et al. 2025,
arXiv 2505.20819):

1. **Where.** For every layer, ``ΔW = W_edited − W_orig`` of the MLP output projection; its
   numerical rank counts the singular values above both ``rtol × σ₁`` and the float rounding
   floor of the stored weights.  A ROME edit has rank one; N edits at one layer rank ``≤ N``.
2. **What.** A rank-one ``ΔW = σ a bᵀ`` gives ``u ∝ b`` and ``Λ ∝ σ a``.  Paper form:
   ``u = C⁻¹k*``, so ``C u ∝ k*`` names the subject among candidates (cosine of ``C u`` with
   each candidate's ``k*``).  For many edits the row space ``span(u_i)`` replaces ``u``:
   ``C · rowspace(ΔW) = span(k_i)`` for sequential paper-form edits and for MEMIT's closed form
   (``(λC + KKᵀ) u ∈ span(K)``), so each candidate's score is the cosine between its key and
   that subspace, and the top ``rank`` candidates are named.  Protected keys (hard/null-space
   forms) lie in that subspace too but their output does not move: candidates whose output
   change ``‖ΔW k‖`` is below 1e-3 of the largest are not named.  Soft protection
   (:mod:`~rome_edit.forms.protect`) writes ``u_i ∝ (C + λ K_pᵀK_p)⁻¹k_i`` instead, so
   ``(C + λ K_pᵀK_p) · rowspace = span(k_i)``: with the candidates standing in for the
   protected keys, each hypothesis ``λ`` of :data:`PROTECT_WEIGHTS` (0: no soft protection)
   predicts a subspace, and the one whose ``rank`` best candidates fit it best (highest mean
   cosine) is used — the true ``λ`` fits them to within rounding, a wrong one does not.
3. **The delta.** With the subject's ``k*`` and the original ``v_orig`` (bare prompt's value),
   the written target is ``v* = W_edited k* + b`` and the recovered delta ``v* − v_orig``.
4. **Undo.** One named edit: ``W ← W − Λ_i u_iᵀ`` with ``Λ_i = ΔW k_i`` and ``u_i`` the dual
   basis of the named keys in ``rowspace(ΔW)`` (``u_iᵀk_j = δ_ij``), so ``ΔW = Σ Λ_i u_iᵀ``
   exactly, whatever form wrote the edits, and removing one term restores that subject's
   output and leaves the other edited keys' outputs as they are.  For one rank-one edit this
   is the SVD's ``u``, ``Λ`` scaled to ``uᵀk* = 1``.  All edits at once: the original rows
   are copied back, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rome_edit.forms.protect import second_moment_matrix
from rome_edit.models.architectures import get_module, out_proj_weight
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.key import key_stars, keys_and_values
from rome_edit.rome.solver import Solver
from rome_edit.weights.write import copy_layers, subtract_rank_one

__all__ = ["LayerChange", "RecoveredEdit", "changed_layers", "compare_with_targets",
           "identify_edits", "revert_all", "revert_edit"]

FLOAT32_EPS = torch.finfo(torch.float32).eps
MOVED_FRACTION = 1e-3  # candidates whose output moves less than this × the most are unedited
# Soft-protection weights tried as hypotheses (0: paper form / MEMIT's closed form).
PROTECT_WEIGHTS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class LayerChange:
    """One layer's output projection change: its rank and leading singular values."""

    layer: int
    module: str
    rank: int
    singular_values: tuple[float, ...]  # the leading ones (at most 16)
    frobenius: float
    noise_floor: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "module": self.module, "rank": self.rank,
                "singular_values": list(self.singular_values), "frobenius": self.frobenius,
                "noise_floor": self.noise_floor}


@dataclass(frozen=True, eq=False)
class RecoveredEdit:
    """A named edit: subject, how sure (cosine of its key with ``A · rowspace``, ``A = C +
    λ K_pᵀK_p`` for the soft-protection weight ``protect_weight`` that fitted best), and the
    recovered ``u``, ``Λ`` (``uᵀk* = 1``) and delta."""

    layer: int
    subject: str
    score: float
    u: torch.Tensor
    lam: torch.Tensor
    delta: torch.Tensor
    protect_weight: float = 0.0

    def to_dict(self) -> dict:
        return {"layer": self.layer, "subject": self.subject, "score": self.score,
                "protect_weight": self.protect_weight, "delta_norm": float(self.delta.norm())}


def _as_matrix(lm: LoadedModel, layer: int) -> torch.Tensor:
    """The output projection as ``(d_model, d_mlp)``, float64."""
    w = out_proj_weight(lm.model, lm.arch, layer).detach().double().cpu()
    return w.T if lm.arch.out_proj_transposed else w


def weight_change(edited: LoadedModel, original: LoadedModel, layer: int) -> torch.Tensor:
    return _as_matrix(edited, layer) - _as_matrix(original, layer)


def changed_layers(edited: LoadedModel, original: LoadedModel, rtol: float = 1e-5
                   ) -> list[LayerChange]:
    """Layers whose output projection differs, with the numerical rank of the change."""
    if edited.n_layers != original.n_layers:
        raise ValueError("the two models have different numbers of layers; compare an edited "
                         "model with the model it was edited from.")
    out = []
    for layer in range(edited.n_layers):
        we, wo = _as_matrix(edited, layer), _as_matrix(original, layer)
        if we.shape != wo.shape:
            raise ValueError(f"layer {layer} has shape {tuple(we.shape)} vs {tuple(wo.shape)}; "
                             "these are not the same model.")
        dw = we - wo
        if not dw.any():
            continue
        sv = torch.linalg.svdvals(dw)
        scale = torch.maximum(we.abs().max(), wo.abs().max()).item()
        noise = 4 * FLOAT32_EPS * scale * (math.sqrt(dw.shape[0]) + math.sqrt(dw.shape[1]))
        rank = int((sv > max(noise, rtol * sv[0].item())).sum())
        if rank == 0:
            continue
        out.append(LayerChange(layer, edited.arch.out_proj.format(layer), rank,
                               tuple(sv[:16].tolist()), dw.norm().item(), noise))
    return out


def subspace_scores(rowspace: torch.Tensor, c: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine of each key (rows) with ``C · rowspace(ΔW)`` (``rowspace``: d_mlp × rank,
    orthonormal); 1 for the keys of paper-form and closed-form edits."""
    basis, _ = torch.linalg.qr(c @ rowspace)  # d_mlp × rank, orthonormal
    k = keys.double()
    return ((k @ basis).norm(dim=1) / k.norm(dim=1)).float()


def identify_edits(
    edited: LoadedModel, original: LoadedModel, change: LayerChange,
    candidates: Sequence[str], prompt: str, context_templates: Sequence[str],
    solver: Solver | None = None, n_edits: int | None = None,
    protect_weights: Sequence[float] = PROTECT_WEIGHTS,
) -> list[RecoveredEdit]:
    """Name the ``n_edits`` (default: the change's rank) subjects at ``change.layer`` among
    ``candidates`` and recover each one's ``u``, ``Λ`` and delta (``protect_weights``: the
    soft-protection hypotheses tried, see the module docstring)."""
    if not candidates:
        raise ValueError("give candidate subjects to match the edits against.")
    layer = change.layer
    n = change.rank if n_edits is None else n_edits
    if not 1 <= n <= len(candidates):
        raise ValueError(f"cannot name {n} edits among {len(candidates)} candidates.")
    dw = weight_change(edited, original, layer)
    d_mlp = dw.shape[1]
    c = second_moment_matrix(solver, d_mlp)
    keys = key_stars(original, layer, [prompt] * len(candidates), list(candidates),
                     context_templates)
    rank = min(change.rank, *dw.shape)
    _, _, vh = torch.linalg.svd(dw, full_matrices=False)
    # Protected keys also lie in C·rowspace (their constraints shaped u) but do not move.
    moved = (keys.double() @ dw.T).norm(dim=1)
    gate = moved >= MOVED_FRACTION * moved.max()
    gram = keys.double().T @ keys.double()
    fits = []
    for weight in dict.fromkeys([0.0, *protect_weights]):
        scores = subspace_scores(vh[:rank].T, c + weight * gram, keys)
        scores = torch.where(gate, scores, torch.zeros_like(scores))
        fits.append((torch.sort(scores, descending=True).values[:n].mean().item(), weight,
                     scores))
    _, weight, scores = max(fits, key=lambda f: f[0])
    top = torch.argsort(scores, descending=True)[:n]
    k_top = keys[top].double()
    # The dual basis of the named keys inside rowspace(ΔW): u_iᵀk_j = δ_ij, so that
    # ΔW = Σ_i (ΔW k_i) u_iᵀ exactly and removing one term restores only that key's output.
    u = (vh[:rank].T @ torch.linalg.pinv(k_top @ vh[:rank].T)).T  # (n, d_mlp)
    lam = dw @ k_top.T  # (d_model, n): Λ_i = ΔW k_i
    _, v_orig = keys_and_values(original, layer, [prompt] * n,
                                [candidates[i] for i in top.tolist()])
    w_e = _as_matrix(edited, layer)
    bias = _bias(edited, layer)
    written = k_top @ w_e.T + bias  # v* = W_edited k* + b
    return [RecoveredEdit(layer, candidates[j], float(scores[j]), u[i].float(),
                          lam[:, i].float(), (written[i] - v_orig[i].double()).float(), weight)
            for i, j in enumerate(top.tolist())]


def _bias(lm: LoadedModel, layer: int) -> torch.Tensor:
    b = getattr(get_module(lm.model, lm.arch.out_proj.format(layer)), "bias", None)
    return torch.zeros(1, dtype=torch.float64) if b is None else b.detach().double().cpu()


def revert_edit(lm: LoadedModel, edit: RecoveredEdit) -> None:
    """``W ← W − Λ uᵀ`` for one recovered edit (float32 arithmetic, like writing it;
    :func:`rome_edit.weights.write.subtract_rank_one`)."""
    subtract_rank_one(lm, edit.layer, edit.u, edit.lam)


def revert_all(edited: LoadedModel, original: LoadedModel, layers: Sequence[int]) -> None:
    """Copy the original output projections of ``layers`` back (bit-identical;
    :func:`rome_edit.weights.write.copy_layers`)."""
    copy_layers(edited, original, layers)



def compare_with_targets(found: Sequence[RecoveredEdit], subjects: Sequence[str],
                         deltas: torch.Tensor) -> dict:
    """How well ``found`` matches what was written (e.g. a checkpoint's
    ``rome_edit_edits.safetensors``): subjects named correctly, and the cosine and relative
    norm of each correctly named edit's recovered delta with the recorded one."""
    truth = {s: d for s, d in zip(subjects, deltas)}
    hits = [f for f in found if f.subject in truth]
    cos = torch.tensor([torch.nn.functional.cosine_similarity(
        f.delta.double(), truth[f.subject].double(), dim=0).item() for f in hits])
    ratio = torch.tensor([(f.delta.norm() / truth[f.subject].norm()).item() for f in hits])

    def stats(x: torch.Tensor) -> dict | None:
        if not len(x):
            return None
        return {"mean": x.mean().item(), "median": x.median().item(), "min": x.min().item()}

    return {"n_written": len(subjects), "n_named": len(found), "n_named_correctly": len(hits),
            "precision": len(hits) / max(1, len(found)),
            "recall": len(hits) / max(1, len(subjects)),
            "delta_cosine": stats(cos), "delta_norm_ratio": stats(ratio)}
