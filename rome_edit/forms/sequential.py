"""Several ROME edits made one after another, each computed on the model the previous ones changed.

This is how sequential-editing studies apply ROME (and what the reference does for a list of
requests): edit ``i``'s key, value and update are computed against the weights with edits
``1 … i−1`` already written.  A sweep, by contrast, computes every edit against the original
weights (:func:`rome_edit.rome.compute.compute_edits`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rome_edit.models.loading import LoadedModel
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.rome.solver import SolverWithProvenance
from rome_edit.weights.write import add_record

__all__ = ["edit_sequentially"]


def edit_sequentially(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    inverse: SolverWithProvenance | None = None,
) -> list[EditRecord]:
    """Compute and apply one edit after another (persistently); returns the records in order."""
    records = []
    for req in requests:
        (record,) = compute_edits(lm, [req], hp, context_templates, inverse, progress=False)
        add_record(lm, record)
        records.append(record)
    return records
