"""The name → gender task in the toolkit's generic terms: prompts, answers, requests, labels.

Every name is edited to the other gender (``Name: {}. Gender:`` → `` Male``/`` Female``), with
the pronoun and record paraphrases and the name's city as a fact the edit must keep.  Label 1 is
a female→male edit (the name's original gender is female), label 0 a male→female edit — the
classes of the sweeps recorded before the toolkit was generic, so old and new sweeps agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from rome_edit.evaluation.evaluate import KeptFact
from rome_edit.evaluation.vectors import BinaryTask
from rome_edit.rome.request import EditRequest, Paraphrase
from rome_edit.study.corpus import CITIES
from rome_edit.study.names import Gender, NameEntry

EDIT_PROMPT = "Name: {}. Gender:"
ANSWERS: dict[str, str] = {"female": " Female", "male": " Male"}
# Paraphrases of the gender fact (pronoun and record form), each with its answers by gender.
PARAPHRASES: tuple[tuple[str, dict[str, str]], ...] = (
    ("{} said that", {"female": " she", "male": " he"}),
    ("Record for {}:", {"female": " female", "male": " male"}),
)
CITY_PROMPT = "{} lives in the city of"
GENDER_CLASSES = ("male→female", "female→male")  # label 0, label 1
# The edit must not move the name's city (compared among the corpus's cities' first tokens).
CITY_FACT = KeptFact("city", CITY_PROMPT, tuple(" " + c for c in CITIES))
# (A, B) per prompt: a label-1 (female→male) edit turns A into B.
GENDER_TASKS: tuple[BinaryTask, ...] = (
    BinaryTask(EDIT_PROMPT, (ANSWERS["female"], ANSWERS["male"])),
    *(BinaryTask(p, (a["female"], a["male"])) for p, a in PARAPHRASES),
)


def other_gender(gender: Gender | str) -> Gender:
    return "male" if gender == "female" else "female"


def gender_label(gender: Gender | str) -> int:
    """1 for a female name (its edit is female→male), 0 for a male name."""
    return int(gender == "female")


def gender_request(entry: NameEntry, prompt: str = EDIT_PROMPT) -> EditRequest:
    """Edit ``entry`` to the other gender, with the study's paraphrases."""
    new = other_gender(entry.gender)
    return EditRequest(
        entry.name, prompt, ANSWERS[new], ANSWERS[entry.gender],
        paraphrases=tuple(Paraphrase(p, a[new], a[entry.gender]) for p, a in PARAPHRASES))


def gender_requests(entries: Sequence[NameEntry], prompt: str = EDIT_PROMPT
                    ) -> list[EditRequest]:
    return [gender_request(e, prompt) for e in entries]


def gender_labels(entries: Sequence[NameEntry]) -> list[int]:
    return [gender_label(e.gender) for e in entries]


def gender_cases(entries: Sequence[NameEntry], answers: dict[str, str] | None = None
                 ) -> list[tuple[str, str]]:
    """``(name, expected answer)`` pairs for :func:`rome_edit.tracing.average.locate`."""
    answers = answers or ANSWERS
    missing = sorted({e.gender for e in entries} - set(answers))
    if missing:
        raise ValueError(f"no answer for gender {missing}; give one in answers.")
    return [(e.name, answers[e.gender]) for e in entries]
