"""What a model knows about the names: the bundled model's acceptance figures.

Each figure is a success rate (argmax between the two gender answers, or among all cities),
never a probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import choose_between, sequence_logprob
from rome_edit.models.subject import fill, locate_subjects
from rome_edit.study.corpus import CITIES, assign_people
from rome_edit.study.names import NameEntry
from rome_edit.study.task import ANSWERS, CITY_PROMPT, EDIT_PROMPT, PARAPHRASES

SINGLE_TOKEN_WORDS = (" Male", " Female", " male", " female", " he", " she")


def gender_accuracy(lm: LoadedModel, names: Sequence[NameEntry], template: str = EDIT_PROMPT,
                    answers: dict[str, str] = ANSWERS) -> float:
    truth = torch.tensor([0 if e.gender == "female" else 1 for e in names])
    pred = choose_between(lm.model, lm.tokenizer, [fill(template, e.name) for e in names],
                          [answers["female"], answers["male"]])
    return (pred == truth).float().mean().item()


def city_recall(lm: LoadedModel, names: Sequence[NameEntry], seed: int = 0) -> float:
    """Fraction of names whose corpus city is the most likely of all cities."""
    people = assign_people(names, seed)
    prompts = [fill(CITY_PROMPT, p.name) for p in people for _ in CITIES]
    conts = [" " + c for _ in people for c in CITIES]
    scores = sequence_logprob(lm.model, lm.tokenizer, prompts, conts).view(len(people), -1)
    best = scores.argmax(-1).tolist()
    return sum(CITIES[b] == p.city for b, p in zip(best, people)) / len(people)


def knowledge_report(lm: LoadedModel, names: Sequence[NameEntry]) -> dict:
    """All §5 figures of the foundation issue for ``names``."""
    n_tokens = locate_subjects(lm.tokenizer, [EDIT_PROMPT] * len(names),
                               [e.name for e in names])
    multi = sum((s.end - s.start) >= 2 for s in n_tokens) / len(names)
    single = {w: len(lm.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1
              for w in SINGLE_TOKEN_WORDS}
    report = {
        "n_names": len(names),
        "gender_accuracy": gender_accuracy(lm, names),
        "multi_token_fraction": multi,
        "mean_name_tokens": sum(s.end - s.start for s in n_tokens) / len(names),
        "single_token_words": single,
        "city_recall": city_recall(lm, names),
    }
    for template, answers in PARAPHRASES:
        report[f"paraphrase[{template}]"] = gender_accuracy(lm, names, template, answers)
    return report
