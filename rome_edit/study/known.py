"""Which names a model knows: the study counts and edits only those.

A flip rate on a name the model already gets wrong measures nothing: a female name the model
calls Male "flips to Male" without any vector.  On a real model this matters — SmolLM2-135M
answers `` Male`` for about 43% of female names on the plain prompt ``Name: {}. Gender:``
(docs/real-model.md).  The filter therefore asks on a prompt that states the task with two
examples (:data:`FEW_SHOT_PROMPT`), where that model is right on about 90% of names, and keeps a
name when the argmax between the two answers is its own gender.

Whether the *edit* prompt carries the prefix too is a separate choice (``rome-edit sweep
--prompt``): the subject's key is read at its last token, and the prefix changes what the
layers before the edit layer see there.  The study edits on the few-shot prompt so that the
filter, the edit and the held-out test ask the same question; the two prompts' edits have not
been compared yet (docs/real-model.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import choose_between
from rome_edit.models.subject import fill
from rome_edit.study.names import NameEntry
from rome_edit.study.task import ANSWERS, EDIT_PROMPT

__all__ = ["FEW_SHOT_PREFIX", "FEW_SHOT_PROMPT", "KnownNames", "known_names", "prompt_template"]

# Two examples, one per answer, so the model is told the task and both answers; the names are
# the commonest of each gender (they are excluded from the filtered names: on them the prefix
# answers for the model).
FEW_SHOT_PREFIX = "Name: John. Gender: Male\nName: Mary. Gender: Female\n"
FEW_SHOT_PROMPT = FEW_SHOT_PREFIX + EDIT_PROMPT
_PREFIX_NAMES = frozenset({"John", "Mary"})


def prompt_template(text: str) -> str:
    """A gender prompt as given to ``sweep``/``apply``: a template with one '{}', or
    ``few-shot`` for :data:`FEW_SHOT_PROMPT`."""
    template = FEW_SHOT_PROMPT if text == "few-shot" else text
    if template.count("{}") != 1:
        raise ValueError(f"prompt {text!r} needs exactly one '{{}}' where the name goes "
                         "(or give 'few-shot').")
    return template


@dataclass(frozen=True)
class KnownNames:
    """The names a model answers correctly on ``prompt`` and the filter's figures."""

    names: tuple[NameEntry, ...]
    prompt: str
    n_tested: int
    n_right: int  # of the names tested (``names`` may stop at a limit)
    accuracy_female: float
    accuracy_male: float

    @property
    def accuracy(self) -> float:
        return self.n_right / self.n_tested if self.n_tested else 0.0

    def to_json(self) -> dict:
        """What a sweep's manifest and summary record as its ``selection``."""
        return {"filter": "known-only", "prompt": self.prompt, "n_tested": self.n_tested,
                "n_right": self.n_right,
                "n_known": len(self.names), "accuracy": self.accuracy,
                "accuracy_female": self.accuracy_female, "accuracy_male": self.accuracy_male}


def known_names(lm: LoadedModel, names: Sequence[NameEntry], prompt: str = FEW_SHOT_PROMPT,
                answers: dict[str, str] = ANSWERS, limit: int | None = None,
                chunk: int = 64) -> KnownNames:
    """``names`` whose gender ``lm`` gets right on ``prompt`` (argmax of the two ``answers``),
    in their original order; names used as examples in ``prompt`` are left out.  With
    ``limit``, names are tested ``chunk`` at a time until ``limit`` are known (the figures then
    cover the names tested), since scoring every name of a long list costs minutes on a CPU."""
    pool = [e for e in names
            if not (e.name in _PREFIX_NAMES and prompt.startswith(FEW_SHOT_PREFIX))]
    if not pool:
        raise ValueError("no names to test for the known-only filter; give a names list.")
    tested: list[NameEntry] = []
    right: list[bool] = []
    for start in range(0, len(pool), chunk if limit is not None else len(pool)):
        part = pool[start: start + (chunk if limit is not None else len(pool))]
        truth = torch.tensor([0 if e.gender == "female" else 1 for e in part])
        pred = choose_between(lm.model, lm.tokenizer, [fill(prompt, e.name) for e in part],
                              [answers["female"], answers["male"]])
        tested += part
        right += (pred == truth).tolist()
        if limit is not None and sum(right) >= limit:
            break

    def rate(gender: str) -> float:
        hits = [r for r, e in zip(right, tested) if e.gender == gender]
        return sum(hits) / len(hits) if hits else float("nan")

    kept = tuple(e for r, e in zip(right, tested) if r)[:limit]
    return KnownNames(kept, prompt, len(tested), sum(right), rate("female"), rate("male"))
