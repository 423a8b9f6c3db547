"""The gender-vector study's analysis: the generic :func:`rome_edit.api.analyze.analyze` on a
gender sweep, with held-out names, the study's file name for the vector and its results in the
study's words (``flip_f_to_m`` for label-1 flips, ``keep_m`` for label-0 keeps, …).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rome_edit.api.analyze import AnalysisSettings, HeldOut, analyze
from rome_edit.api.analyze import completions as generic_completions
from rome_edit.evaluation.vectors import BinaryTask, VectorApplier
from rome_edit.models.loading import LoadedModel
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.study.names import NameEntry
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, GENDER_TASKS, gender_labels

VECTOR_FILE = "gender_vector.safetensors"
# Generic (label 1 = female→male) keys → the study's names.
GENDER_KEYS = {
    "flip_label1": "flip_f_to_m", "keep_label0": "keep_m", "flip_label0": "flip_m_to_f",
    "keep_label1": "keep_f", "paraphrase_flip_label1": "paraphrase_flip_f_to_m",
    "paraphrase_flip_label0": "paraphrase_flip_m_to_f", "n_label1": "n_female",
    "n_label0": "n_male",
}


def in_gender_terms(value):
    """``value`` (nested dicts/lists) with generic flip-table keys renamed to the study's."""
    if isinstance(value, dict):
        return {GENDER_KEYS.get(k, k): in_gender_terms(v) for k, v in value.items()}
    if isinstance(value, list):
        return [in_gender_terms(v) for v in value]
    return value


def gender_tasks(prompt: str = EDIT_PROMPT) -> tuple[BinaryTask, ...]:
    """The study's tasks with ``prompt`` (the sweep's edit prompt) first, then the
    paraphrases."""
    return (BinaryTask(prompt, (ANSWERS["female"], ANSWERS["male"])), *GENDER_TASKS[1:])


def heldout_set(names: Sequence[NameEntry], prompt: str = EDIT_PROMPT) -> HeldOut:
    """Held-out names as the generic analysis's subjects, labels and tasks (on ``prompt``)."""
    return HeldOut(tuple(e.name for e in names), tuple(gender_labels(names)),
                   gender_tasks(prompt))


def gender_applier(lm: LoadedModel, layer: int, names: Sequence[NameEntry],
                   context_templates: Sequence[str], inverse: InverseSecondMoment | None,
                   prompt: str = EDIT_PROMPT) -> VectorApplier:
    """A :class:`VectorApplier` over ``names`` on the gender ``prompt`` and its paraphrases."""
    return VectorApplier(lm, layer, [e.name for e in names], gender_labels(names),
                         gender_tasks(prompt), context_templates, inverse)


def completions(lm: LoadedModel, applier: VectorApplier, vector: torch.Tensor,
                names: Sequence[str], max_new_tokens: int = 16) -> list[dict]:
    """Generic completions with each row's ``name`` and ``gender``."""
    rows = generic_completions(lm, applier, vector, names, max_new_tokens)
    return [{"name": r.pop("subject"), "gender": "female" if r.pop("label") else "male", **r}
            for r in rows]


def analyze_gender(
    sweep_dir: str | Path,
    out_dir: str | Path,
    lm: LoadedModel | None = None,
    heldout: Sequence[NameEntry] = (),
    context_templates: Sequence[str] = ("{}",),
    inverse: InverseSecondMoment | None = None,
    settings: AnalysisSettings | None = None,
    prompt: str = EDIT_PROMPT,
) -> dict:
    """The study on ``sweep_dir``: ``analysis.json``, ``gender_vector.safetensors``, plots;
    held-out flips are measured on ``prompt`` (the sweep's edit prompt) and the paraphrases."""
    result = analyze(sweep_dir, out_dir, lm, heldout_set(heldout, prompt) if heldout else None,
                     context_templates, inverse, settings or AnalysisSettings(),
                     vector_file=VECTOR_FILE)
    for row in result.get("completions", []):
        row["name"] = row.pop("subject")
        row["gender"] = "female" if row.pop("label") else "male"
    result = in_gender_terms(result)
    (Path(out_dir) / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
