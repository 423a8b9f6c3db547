"""Scoring a model that holds many gender edits at once, against the unedited model.

Where :func:`rome_edit.evaluation.evaluate.evaluate_edits` scores each edit as if applied alone,
this scores one final model (N edits written together, or a saved checkpoint loaded fresh):

* ``efficacy`` — success rate over the edited names: the target gender's answer beats the other
  on the state's prompt (``Name: {}. Gender:`` unless another was given, e.g. the few-shot
  prompt of :mod:`rome_edit.study.known`);
* ``paraphrase`` — the same over the pronoun and record paraphrases;
* ``specificity`` — over the names *not* edited: the predicted gender is unchanged; split into
  ``specificity_same_last_token`` (unedited names whose last token is some edited name's last
  token, the names faithful ROME spills over to) and ``specificity_random`` (the rest);
* ``city_kept`` — over the edited names: the most likely city (among the corpus cities' first
  tokens after ``{} lives in the city of``) is unchanged;
* ``fluency_before`` / ``fluency_after`` — ROME's n-gram entropy (bits) of greedy 30-token
  generations of the edit prompt for the first ``n_generate`` edited names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from rome_edit.evaluation.evaluate import ngram_entropy
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import choose_between, generate, next_token_logprobs
from rome_edit.models.subject import fill, locate_subjects
from rome_edit.study.corpus import CITIES
from rome_edit.study.task import ANSWERS, CITY_PROMPT, EDIT_PROMPT, PARAPHRASES

FLUENCY_TOKENS = 30

__all__ = ["ModelState", "ModelScore", "model_state", "score_model"]


@dataclass(frozen=True)
class ModelState:
    """What a model predicts for a list of names: gender on the edit prompt and paraphrases
    (``"female"``/``"male"``), best city token, and prompt + greedy generation for a few."""

    names: tuple[str, ...]
    gender: tuple[str, ...]
    paraphrase_gender: tuple[tuple[str, ...], ...]  # per paraphrase, per name
    city: tuple[int, ...]
    generations: tuple[str, ...]
    prompt: str = EDIT_PROMPT  # the gender question asked (paraphrases are fixed)


def _genders(lm: LoadedModel, template: str, answers: Mapping[str, str],
             names: Sequence[str]) -> tuple[str, ...]:
    pick = choose_between(lm.model, lm.tokenizer, [fill(template, n) for n in names],
                          [answers["female"], answers["male"]])
    return tuple("female" if i == 0 else "male" for i in pick.tolist())


@torch.no_grad()
def model_state(lm: LoadedModel, names: Sequence[str], generate_for: Sequence[str] = (),
                prompt: str = EDIT_PROMPT) -> ModelState:
    """What ``lm`` answers for ``names``: gender on ``prompt`` and on the paraphrases, city,
    and greedy generations of ``prompt`` for ``generate_for``."""
    firsts = torch.tensor(sorted({lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][0]
                                  for c in CITIES}))
    lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(CITY_PROMPT, n) for n in names])
    city = firsts[lp[:, firsts].argmax(-1)].tolist()
    gens = tuple(fill(prompt, n) + generate(lm.model, lm.tokenizer, fill(prompt, n),
                                            FLUENCY_TOKENS) for n in generate_for)
    return ModelState(tuple(names), _genders(lm, prompt, ANSWERS, names),
                      tuple(_genders(lm, p, a, names) for p, a in PARAPHRASES), tuple(city),
                      gens, prompt)


@dataclass(frozen=True)
class ModelScore:
    n_edited: int
    n_unedited: int
    efficacy: float
    paraphrase: float
    specificity: float | None
    specificity_same_last_token: float | None
    specificity_random: float | None
    city_kept: float
    fluency_before: float | None
    fluency_after: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def score_model(lm: LoadedModel, before: ModelState, after: ModelState,
                targets: Mapping[str, str]) -> ModelScore:
    """Score ``after`` (the edited model's state) against ``before`` on the same names.

    ``targets`` maps each edited name to the gender it should now have (``"female"``/
    ``"male"``; for a vector that must keep some names, their own gender)."""
    if before.names != after.names:
        raise ValueError("the two states cover different names; compute both on one list.")
    if before.prompt != after.prompt:
        raise ValueError("the two states asked different prompts; compute both with one.")
    missing = sorted(set(targets) - set(before.names))
    if missing:
        raise ValueError(f"edited names {missing[:5]} are not among the scored names.")
    index = {n: i for i, n in enumerate(before.names)}
    edited = [index[n] for n in targets]
    rest = [i for i in range(len(before.names)) if before.names[i] not in targets]
    spans = locate_subjects(lm.tokenizer, [before.prompt] * len(before.names), list(before.names))
    last = [sp.input_ids[sp.last] for sp in spans]
    edited_last = {last[i] for i in edited}
    kept = {i: after.gender[i] == before.gender[i] for i in rest}
    para = [after.paraphrase_gender[p][i] == targets[before.names[i]]
            for p in range(len(PARAPHRASES)) for i in edited]
    k = len(after.generations)
    return ModelScore(
        n_edited=len(edited), n_unedited=len(rest),
        efficacy=_rate([after.gender[i] == targets[before.names[i]] for i in edited]) or 0.0,
        paraphrase=_rate(para) or 0.0,
        specificity=_rate(list(kept.values())),
        specificity_same_last_token=_rate([v for i, v in kept.items() if last[i] in edited_last]),
        specificity_random=_rate([v for i, v in kept.items() if last[i] not in edited_last]),
        city_kept=_rate([after.city[i] == before.city[i] for i in edited]) or 0.0,
        fluency_before=ngram_entropy(before.generations[:k]) if k else None,
        fluency_after=ngram_entropy(after.generations) if k else None,
    )
