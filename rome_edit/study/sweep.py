"""The gender sweep: every name edited to the other gender through the generic
:func:`rome_edit.evaluation.sweep.run_sweep`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rome_edit.distributed import SINGLE, Workers
from rome_edit.evaluation.sweep import run_sweep
from rome_edit.forms.protected_keys import Protection
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.study.names import NameEntry
from rome_edit.study.task import (
    CITY_FACT,
    EDIT_PROMPT,
    GENDER_CLASSES,
    gender_labels,
    gender_requests,
)


def run_gender_sweep(
    lm: LoadedModel, names: Sequence[NameEntry], hp: ROMEHyperParams,
    context_templates: Sequence[str], out_dir: str | Path,
    inverse: InverseSecondMoment | None = None, batch_size: int = 64,
    neighbour_names: Sequence[NameEntry] | None = None, prompt: str = EDIT_PROMPT,
    progress: bool = True, workers: Workers = SINGLE, fluency_per_batch: int = 2,
    protection: Protection | None = None, selection: dict | None = None,
) -> dict:
    """Flip every name's gender and record the deltas, labelled 1 for female→male edits;
    neighbours for specificity come from ``neighbour_names`` (default: ``names``), and each
    name's city must stay.  Rows also keep the name's original ``gender``; ``selection``
    records how the names were chosen (:meth:`rome_edit.study.known.KnownNames.to_json`)."""
    pool = [e.name for e in (neighbour_names or names)]
    return run_sweep(lm, gender_requests(names, prompt), hp, context_templates, out_dir,
                     inverse, batch_size, labels=gender_labels(names), classes=GENDER_CLASSES,
                     extra=[{"gender": e.gender} for e in names], neighbour_pool=pool,
                     kept=[CITY_FACT], progress=progress, workers=workers,
                     fluency_per_batch=fluency_per_batch, protection=protection,
                     selection=selection)
