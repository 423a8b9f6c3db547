"""The name → gender task: prompts and answer tokens shared by tracing, editing and analysis."""

from __future__ import annotations

from rome_edit.data.names import Gender

EDIT_PROMPT = "Name: {}. Gender:"
ANSWERS: dict[str, str] = {"female": " Female", "male": " Male"}
# Paraphrases of the gender fact (pronoun and record form), each with its answers by gender.
PARAPHRASES: tuple[tuple[str, dict[str, str]], ...] = (
    ("{} said that", {"female": " she", "male": " he"}),
    ("Record for {}:", {"female": " female", "male": " male"}),
)
CITY_PROMPT = "{} lives in the city of"


def other_gender(gender: Gender | str) -> Gender:
    return "male" if gender == "female" else "female"


def gender_of_answer(answer: str) -> Gender:
    for gender, text in ANSWERS.items():
        if text == answer:
            return gender  # type: ignore[return-value]
    raise ValueError(f"{answer!r} is not a gender answer; use one of {list(ANSWERS.values())}.")
