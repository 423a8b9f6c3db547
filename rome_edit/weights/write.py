"""Writing edits into a model: persistently, or inside a context that reverts bit-identically.

This is the one module that writes an MLP output projection ``W_out`` (besides
:mod:`rome_edit.weights.persist`, which saves a model): every edit form, vector write, revert and
forensic undo goes through its primitives —

* :func:`add_rank_one` / :func:`subtract_rank_one` (``W ← W ± Λ uᵀ``) and :func:`add_update`
  (``W ← W + ΔW``), each computed in float32 and cast to the weight's dtype;
* :func:`snapshot` / :func:`restore`, and :func:`preserved` built on them: a copy of only the
  edited matrices (one ``d_model × d_mlp`` matrix per edited layer), never of the whole model,
  restored with ``copy_`` — so the weights after exit are the same bits as before entry, also
  when the body raises;
* :func:`copy_layers`: a layer's ``W_out`` copied from another model (undoing every edit of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from rome_edit.models.architectures import (
    check_editable,
    check_layer,
    edit_device,
    out_proj_weight,
)
from rome_edit.models.hooks import edit_from_input
from rome_edit.models.identity import check_same_model
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.record import EditRecord


def check_record(lm: LoadedModel, record: EditRecord, strict_identity: bool = True) -> None:
    """Refuse a record made for another model or of the wrong width (changes nothing)."""
    check_layer(lm.model, lm.arch, record.layer)
    check_editable(lm.model, lm.arch, record.layer)
    weight = out_proj_weight(lm.model, lm.arch, record.layer)
    d_model, d_mlp = (weight.shape[::-1] if lm.arch.out_proj_transposed else weight.shape)
    if record.u.shape != (d_mlp,) or record.lam.shape != (d_model,):
        raise ValueError(
            f"record for {record.request.subject!r} has widths u={tuple(record.u.shape)}, "
            f"Λ={tuple(record.lam.shape)} but layer {record.layer} needs ({d_mlp},), "
            f"({d_model},); it was made for another model."
        )
    if strict_identity:
        check_same_model(lm, record.model_identity, "the record",
                         "load the model the record was made on (or pass "
                         "strict_identity=False deliberately).")
    u, lam = record.terms()
    if u.shape[1:] != (d_mlp,) or lam.shape[1:] != (d_model,):
        raise ValueError(f"record for {record.request.subject!r} has a subject form of widths "
                         f"u={tuple(u.shape[1:])}, Λ={tuple(lam.shape[1:])} but layer "
                         f"{record.layer} needs ({d_mlp},), ({d_model},); it was made for "
                         "another model.")
    if not (torch.isfinite(u).all() and torch.isfinite(lam).all()):
        raise ValueError("record contains NaN/Inf; recompute the edit.")


@torch.no_grad()
def _add_to_weight(lm: LoadedModel, layer: int, change: torch.Tensor, sign: int) -> None:
    """``W ← W ± change`` for ``change`` in ``(d_model, d_mlp)`` orientation (float32
    arithmetic, cast to the weight's dtype)."""
    weight = out_proj_weight(lm.model, lm.arch, layer)
    change = change.float().to(weight.device)
    if lm.arch.out_proj_transposed:
        change = change.T
    updated = weight.float() + change if sign > 0 else weight.float() - change
    weight.copy_(updated.to(weight.dtype))


@torch.no_grad()
def add_rank_one(lm: LoadedModel, layer: int, u: torch.Tensor, lam: torch.Tensor) -> None:
    """``W ← W + Λ uᵀ`` (computed in float32, cast to the weight's dtype)."""
    _add_to_weight(lm, layer, torch.outer(lam.float(), u.float()), +1)


@torch.no_grad()
def subtract_rank_one(lm: LoadedModel, layer: int, u: torch.Tensor, lam: torch.Tensor) -> None:
    """``W ← W − Λ uᵀ`` (float32 arithmetic, like writing it): undoes :func:`add_rank_one` up
    to one rounding of the sum (for the exact bits, :func:`restore` a :func:`snapshot`)."""
    _add_to_weight(lm, layer, torch.outer(lam.float(), u.float()), -1)


@torch.no_grad()
def add_record(lm: LoadedModel, record: EditRecord) -> None:
    """``W ← W + Σ_t Λ_t u_tᵀ``: a record's update, every subject form's term included
    (:meth:`EditRecord.terms`; one term for a one-key edit, written as :func:`add_rank_one`)."""
    u, lam = record.terms()
    _add_to_weight(lm, record.layer, lam.float().T @ u.float(), +1)


@torch.no_grad()
def add_update(lm: LoadedModel, layer: int, delta_w: torch.Tensor) -> None:
    """``W ← W + ΔW`` for a full update ``ΔW`` of shape ``(d_model, d_mlp)`` (any rank; e.g. the
    batched many-edit solve), in float32, cast to the weight's dtype."""
    _add_to_weight(lm, layer, delta_w, +1)


def snapshot(lm: LoadedModel, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """A copy of the given layers' output projections (what :func:`restore` writes back)."""
    return {layer: out_proj_weight(lm.model, lm.arch, layer).detach().clone()
            for layer in layers}


@torch.no_grad()
def restore(lm: LoadedModel, saved: Mapping[int, torch.Tensor]) -> None:
    """Write a :func:`snapshot` back: the same bits as when it was taken."""
    for layer, original in saved.items():
        out_proj_weight(lm.model, lm.arch, layer).copy_(original)


@torch.no_grad()
def copy_layers(target: LoadedModel, source: LoadedModel, layers: Iterable[int]) -> None:
    """Copy ``source``'s output projections of ``layers`` into ``target`` (bit-identical; e.g.
    undoing every edit of an edited model from the original)."""
    for layer in layers:
        out_proj_weight(target.model, target.arch, layer).copy_(
            out_proj_weight(source.model, source.arch, layer))


def apply_records(lm: LoadedModel, records: Sequence[EditRecord],
                  strict_identity: bool = True) -> None:
    """Write every record's update into the model (persistent; see :func:`applied`)."""
    for record in records:  # validate all first, so a bad record changes nothing
        check_record(lm, record, strict_identity)
    for record in records:
        add_record(lm, record)


@contextmanager
def applied(lm: LoadedModel, records: Sequence[EditRecord],
            strict_identity: bool = True) -> Iterator[LoadedModel]:
    """Apply ``records`` for the duration of the block, then restore the exact original bits."""
    for record in records:
        check_record(lm, record, strict_identity)
    with preserved(lm, sorted({r.layer for r in records})):
        apply_records(lm, records, strict_identity)
        yield lm


@contextmanager
def preserved(lm: LoadedModel, layers: Sequence[int]) -> Iterator[LoadedModel]:
    """Restore the given layers' output projections on exit, whatever the block wrote."""
    saved = snapshot(lm, layers)
    try:
        yield lm
    finally:
        restore(lm, saved)


def stacked_terms(records: Sequence[EditRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every record's :meth:`~EditRecord.terms` as ``(rows, T, ·)`` for :func:`row_edits`, padded
    with zero terms to the most any record has; ``(rows, ·)`` when each has one term."""
    terms = [r.terms() for r in records]
    most = max(len(u) for u, _ in terms)
    if most == 1:
        return torch.stack([u[0] for u, _ in terms]), torch.stack([lam[0] for _, lam in terms])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(most - len(t), t.shape[1])])

    return (torch.stack([pad(u) for u, _ in terms]), torch.stack([pad(lam) for _, lam in terms]))


@contextmanager
def row_edits(lm: LoadedModel, layer: int, u_rows: torch.Tensor,
              lam_rows: torch.Tensor) -> Iterator[None]:
    """Let batch row ``r`` see the layer edited by its own ``Λ_r u_rᵀ``, all in one pass.

    ``(W + Λ_r u_rᵀ) k = W k + Λ_r (u_rᵀ k)``, so adding ``Λ_r (u_rᵀ k)`` to the output
    projection's output at every position of row ``r`` is that edit's forward function; many
    edits are evaluated in one batch with no weight written (exact up to float rounding).
    ``u_rows``/``lam_rows`` may also be ``(rows, T, ·)``: row ``r``'s edit is then
    ``Σ_t Λ_rt u_rtᵀ`` (a record with subject forms, :meth:`EditRecord.terms`).
    """
    dev = edit_device(lm.model, lm.arch, layer)  # where that layer's keys are computed
    u_dev = u_rows.float().to(dev)
    lam_dev = lam_rows.float().to(dev)
    if u_dev.dim() == 2:
        u_dev, lam_dev = u_dev[:, None], lam_dev[:, None]

    def add(keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        coeff = torch.einsum("rpd,rtd->rpt", keys.float(), u_dev)
        return hidden + torch.einsum("rpt,rtm->rpm", coeff, lam_dev).to(hidden.dtype)

    with edit_from_input(lm.model, {lm.arch.out_proj.format(layer): add}):
        yield
