"""Evaluating ROME on a CounterFact or zsRE file: each case edited alone, measured, reverted.

For every case the metrics of :mod:`rome_edit.evaluation.counterfact_metrics` are measured
before the edit (``pre``) and with it (``post``); the edit is computed by the editor
(:meth:`rome_edit.Editor.compute`: its hyperparameters, context templates and ``C⁻¹``),
written with :func:`rome_edit.weights.write.applied` and reverted bit-identically before the
next case, so every case sees the unedited model.  The summary is the mean of each metric over the
cases (``None`` values skipped), and for CounterFact the score S = harmonic mean of ES, PS and
NS (Meng et al. 2022, Table 4).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from rome_edit.evaluation.counterfact_data import CounterFactCase, ZsreCase
from rome_edit.evaluation.counterfact_metrics import (
    COUNTERFACT_METRICS,
    ZSRE_METRICS,
    measure_counterfact,
    measure_zsre,
)
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.storage import atomic_write_text
from rome_edit.weights.write import applied

__all__ = ["BenchmarkResult", "CaseResult", "RequestEditor", "evaluate_benchmark",
           "format_table", "harmonic_mean", "summarize_cases"]

log = logging.getLogger(__name__)

LABELS = {"efficacy_score": "ES  efficacy score", "efficacy_magnitude": "EM  efficacy magnitude",
          "paraphrase_score": "PS  paraphrase score",
          "paraphrase_magnitude": "PM  paraphrase magnitude",
          "neighborhood_score": "NS  neighborhood score",
          "neighborhood_magnitude": "NM  neighborhood magnitude",
          "score": "S   harmonic mean of ES, PS, NS", "attribute_score": "    attribute score",
          "generation_entropy": "GE  generation entropy (bits)",
          "efficacy_accuracy": "    efficacy accuracy", "paraphrase_accuracy":
          "    paraphrase accuracy", "specificity_accuracy": "    specificity accuracy",
          "generated_efficacy": "    generated efficacy (greedy)",
          "generated_paraphrase": "    generated paraphrase (greedy)",
          "seconds": "    seconds per case", "edit_seconds": "    seconds per edit"}


class RequestEditor(Protocol):
    """What the evaluation needs of an editor (:class:`rome_edit.Editor` is one): its model
    and the edits of requests against the current weights, nothing written."""

    lm: LoadedModel

    def compute(self, requests: Sequence[EditRequest]) -> list[EditRecord]: ...


@dataclass(frozen=True)
class CaseResult:
    """One case: its metrics before and with the edit, generations, and time taken."""

    case_id: int | str
    subject: str
    target_new: str
    target_true: str | None
    pre: dict[str, float | None]
    post: dict[str, float | None]
    generations_pre: tuple[str, ...]
    generations_post: tuple[str, ...]
    edit_seconds: float  # computing the edit (ROME's key, value and update; batch share)
    seconds: float  # the whole case: measurements before and after, edit, revert


@dataclass(frozen=True)
class BenchmarkResult:
    """Every case's result and the means (``summary["pre"|"post"][metric]``)."""

    format: str
    cases: tuple[CaseResult, ...]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "summary": self.summary,
                "cases": [asdict(c) for c in self.cases]}

    def write(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """JSON with ``extra`` (model, hyperparameters, …) first; written to a temporary file
        and renamed, so an interrupted run leaves no partial file."""
        atomic_write_text(path, json.dumps({**(extra or {}), **self.to_dict()}, indent=1) + "\n")


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean (0 when any value is 0); ``None`` when a value is missing."""
    present = [v for v in values if v is not None]
    if not values or len(present) < len(values):
        return None
    if any(v == 0 for v in present):
        return 0.0
    return len(present) / sum(1 / v for v in present)


def _means(rows: Sequence[dict[str, float | None]], keys: Sequence[str]
           ) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = math.fsum(values) / len(values) if values else None  # type: ignore[arg-type]
    return out


def summarize_cases(fmt: str, cases: Sequence[CaseResult]) -> dict[str, Any]:
    keys = COUNTERFACT_METRICS if fmt == "counterfact" else ZSRE_METRICS
    summary: dict[str, Any] = {"n_cases": len(cases)}
    for state in ("pre", "post"):
        means = _means([getattr(c, state) for c in cases], keys)
        if fmt == "counterfact":
            means["score"] = harmonic_mean([means["efficacy_score"], means["paraphrase_score"],
                                            means["neighborhood_score"]])
        summary[state] = means
    summary["seconds"] = math.fsum(c.seconds for c in cases) / max(1, len(cases))
    summary["edit_seconds"] = math.fsum(c.edit_seconds for c in cases) / max(1, len(cases))
    return summary


def _measure(editor: RequestEditor, case: CounterFactCase | ZsreCase, generation_tokens: int
             ) -> tuple[dict[str, float | None], tuple[str, ...]]:
    if isinstance(case, CounterFactCase):
        metrics, texts = measure_counterfact(editor.lm, case, generation_tokens)
        return metrics, tuple(texts)
    return measure_zsre(editor.lm, case), ()


def evaluate_benchmark(editor: RequestEditor, fmt: str,
                       cases: Sequence[CounterFactCase | ZsreCase], generation_tokens: int = 50,
                       batch_size: int = 1, progress: bool = True) -> BenchmarkResult:
    """Edit each case alone with ``editor`` (ROME; e.g. :class:`rome_edit.Editor`), measure
    before and with the edit, revert.

    ``batch_size`` cases have their edits computed together (ROME's batched value
    optimisation; each edit is still computed against the unedited weights and applied alone,
    so results match ``batch_size=1``); a case's ``edit_seconds`` is its batch's share.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1.")
    results = []
    bar = tqdm(total=len(cases), desc=f"evaluate {fmt}", unit="case", disable=not progress)
    for first in range(0, len(cases), batch_size):
        batch = cases[first : first + batch_size]
        start = time.perf_counter()
        measured = [_measure(editor, case, generation_tokens) for case in batch]
        computed = time.perf_counter()
        records = editor.compute([case.request for case in batch])
        share = (time.perf_counter() - computed) / len(batch)
        pre_share = (computed - start) / len(batch)
        for case, record, (pre, gen_pre) in zip(batch, records, measured):
            began = time.perf_counter()
            with applied(editor.lm, [record]):
                post, gen_post = _measure(editor, case, generation_tokens)
            seconds = pre_share + share + time.perf_counter() - began
            results.append(CaseResult(case.case_id, case.subject, case.target_new,
                                      getattr(case, "target_true", None), pre, post, gen_pre,
                                      gen_post, share, seconds))
            log.info("case %s: %s", case.case_id, post)
            bar.update(1)
    bar.close()
    return BenchmarkResult(fmt, tuple(results), summarize_cases(fmt, results))


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if key in ("generation_entropy", "seconds", "edit_seconds") \
        else f"{100 * value:.1f}"


def format_table(result: BenchmarkResult) -> str:
    """The summary as a text table: scores and magnitudes in percent, entropy in bits."""
    s = result.summary
    keys = list(s["post"])
    width = max(len(LABELS.get(k, k)) for k in keys) + 2
    lines = [f"{result.format}: {s['n_cases']} cases (each edited alone, then reverted)",
             f"{'metric':<{width}}{'pre':>8}{'post':>8}"]
    lines += [f"{LABELS.get(k, k):<{width}}{_cell(k, s['pre'][k]):>8}{_cell(k, s['post'][k]):>8}"
              for k in keys]
    lines += [f"{LABELS[k]:<{width}}{'':>8}{_cell(k, s[k]):>8}" for k in ("edit_seconds",
                                                                          "seconds")]
    return "\n".join(lines)
