"""Writing edits into a model: persistently, or inside a context that reverts bit-identically.

Reverting keeps a copy of only the edited matrices (one ``d_model × d_mlp`` matrix per edited
layer), never of the whole model, and restores them with ``copy_`` — so the weights after exit are
the same bits as before entry, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    if not (torch.isfinite(record.u).all() and torch.isfinite(record.lam).all()):
        raise ValueError("record contains NaN/Inf; recompute the edit.")


@torch.no_grad()
def add_rank_one(lm: LoadedModel, layer: int, u: torch.Tensor, lam: torch.Tensor) -> None:
    """``W ← W + Λ uᵀ`` (computed in float32, cast to the weight's dtype)."""
    weight = out_proj_weight(lm.model, lm.arch, layer)
    outer = torch.outer(lam.float(), u.float()).to(weight.device)
    if lm.arch.out_proj_transposed:
        outer = outer.T
    weight.copy_((weight.float() + outer).to(weight.dtype))


def apply_records(lm: LoadedModel, records: Sequence[EditRecord],
                  strict_identity: bool = True) -> None:
    """Write every record's update into the model (persistent; see :func:`applied`)."""
    for record in records:  # validate all first, so a bad record changes nothing
        check_record(lm, record, strict_identity)
    for record in records:
        add_rank_one(lm, record.layer, record.u, record.lam)


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
    saved = {layer: out_proj_weight(lm.model, lm.arch, layer).detach().clone()
             for layer in layers}
    try:
        yield lm
    finally:
        with torch.no_grad():
            for layer, original in saved.items():
                out_proj_weight(lm.model, lm.arch, layer).copy_(original)


@contextmanager
def row_edits(lm: LoadedModel, layer: int, u_rows: torch.Tensor,
              lam_rows: torch.Tensor) -> Iterator[None]:
    """Let batch row ``r`` see the layer edited by its own ``Λ_r u_rᵀ``, all in one pass.

    ``(W + Λ_r u_rᵀ) k = W k + Λ_r (u_rᵀ k)``, so adding ``Λ_r (u_rᵀ k)`` to the output
    projection's output at every position of row ``r`` is that edit's forward function; many
    edits are evaluated in one batch with no weight written (exact up to float rounding).
    """
    dev = edit_device(lm.model, lm.arch, layer)  # where that layer's keys are computed
    u_dev = u_rows.float().to(dev)
    lam_dev = lam_rows.float().to(dev)

    def add(keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        coeff = (keys.float() * u_dev[:, None, :]).sum(-1)
        return hidden + (coeff[..., None] * lam_dev[:, None, :]).to(hidden.dtype)

    with edit_from_input(lm.model, {lm.arch.out_proj.format(layer): add}):
        yield
