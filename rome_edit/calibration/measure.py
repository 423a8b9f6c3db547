"""Measuring one candidate: its edits scored exactly as a sweep scores them, plus fluency.

Every candidate of the grid, plain or protected, goes through :func:`measure`, so the table's
rows differ only in what the grid changes.  Protected candidates reuse the plain candidate's
records (same ``k*``, ``v*``, delta) with the protected direction ``u``
(:func:`rome_edit.forms.protected_keys.protect_records`); the keys of the protected names are
computed once per layer (:class:`LayerBanks`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from rome_edit.calibration.choose import counterfact_score
from rome_edit.calibration.grid import Candidate
from rome_edit.evaluation.evaluate import KeptFact, evaluate_edits, ngram_entropy, summarize
from rome_edit.forms.protect import Solver
from rome_edit.forms.protected_keys import (
    ProtectedKeyBank,
    Protection,
    build_bank,
    protect_records,
)
from rome_edit.forms.recipe import ProtectRecipe
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import generate
from rome_edit.rome.record import EditRecord
from rome_edit.weights.write import applied

__all__ = ["FLUENCY_TOKENS", "LayerBanks", "fluency", "measure", "protected_records"]

FLUENCY_TOKENS = 30  # as the sweep's sampled fluency


def fluency(lm: LoadedModel, texts: Sequence[str],
            records: Sequence[EditRecord] | None = None) -> list[float]:
    """n-gram entropy of greedy generations of each text (edited by its record if given)."""
    out = []
    for i, text in enumerate(texts):
        if records is None:
            completion = generate(lm.model, lm.tokenizer, text, FLUENCY_TOKENS)
        else:
            with applied(lm, [records[i]]):
                completion = generate(lm.model, lm.tokenizer, text, FLUENCY_TOKENS)
        out.append(ngram_entropy([text + completion]))
    return out


def measure(lm: LoadedModel, candidate: Candidate, records: Sequence[EditRecord],
            texts: Sequence[str], fluency_before: float | None, *,
            neighbour_pool: Sequence[str], kept: Sequence[KeptFact], n_same_last: int,
            n_random: int, started: float, extra: dict | None = None) -> dict:
    """The table row of ``candidate`` whose edits are ``records`` (timed from ``started``)."""
    summary = summarize(evaluate_edits(lm, records, neighbour_pool, kept,
                                       n_same_last=n_same_last, n_random=n_random,
                                       progress=False))
    after = fluency(lm, texts, records)
    row = {**candidate.to_dict(),
           **{k: v for k, v in summary.items() if k not in ("fluency_before", "fluency_after")},
           "fluency_before": fluency_before,
           "fluency_after": sum(after) / len(after) if after else None,
           "mean_delta_over_v_orig": sum(float(r.delta.norm() / r.v_orig.norm())
                                         for r in records) / len(records),
           "mean_steps_used": sum(len(r.losses) for r in records) / len(records),
           **(extra or {}),
           "seconds": time.perf_counter() - started}
    row["score"] = counterfact_score(row["efficacy"] or 0.0, row.get("paraphrase") or 0.0,
                                     row.get("specificity") or 0.0)
    return row


@dataclass
class LayerBanks:
    """Protected keys of one layer, computed once for every recipe (the sources share keys)."""

    lm: LoadedModel
    layer: int
    prompt: str
    names: Sequence[str]
    templates: Sequence[str]
    forms: Sequence[str] = ()  # the edits' subject_forms: their keys are protected too
    seconds: float = 0.0  # spent computing keys
    _banks: dict[str, ProtectedKeyBank] = field(default_factory=dict)

    def protection(self, recipe: ProtectRecipe) -> Protection:
        bank = self._banks.get(recipe.positions)
        if bank is None:
            t0 = time.perf_counter()
            bank = build_bank(self.lm, self.layer, self.prompt, self.names, self.templates,
                              "other-names", recipe.positions, self.forms)
            self._banks[recipe.positions] = bank
            self.seconds += time.perf_counter() - t0
        return Protection(replace(bank, source=recipe.source), recipe.settings)


def protected_records(banks: LayerBanks, recipe: ProtectRecipe,
                      records: Sequence[EditRecord], solver: Solver | None) -> list[EditRecord]:
    """``records`` with ``recipe``'s protected direction (same deltas)."""
    return protect_records(banks.lm, records, banks.protection(recipe), solver)
