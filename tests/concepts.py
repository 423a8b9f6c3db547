"""The toolkit tests' own tiny concepts, so that no toolkit test borrows the gender study
(``tests/test_architecture.py`` checks that only the study's own tests import the study).

* :data:`SUBJECTS`: test-local first names.  The tiny models share the bundled tokenizer, so each
  is a few tokens, and some share a last token (``Brittany``/``Stephany``), as protection's
  ``same-last-token`` needs.
* :data:`CITY`: a two-answer concept in the toolkit's terms: ``{} lives in the city of``,
  `` Paris`` or `` London``, with one paraphrase; label 1 is a Paris → London edit.
* :data:`LABELLED`: six subjects with a label each, for sweeps and vector tests.
* :data:`JOB`: a fact an edit of :data:`CITY` must keep.
* :func:`bundled_facts`: what the bundled model was trained on, read from its training text
  (the toolkit's ``bundled`` statistics corpus), for the tests that need its world to get
  meaningful numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from rome_edit.evaluation.evaluate import KeptFact
from rome_edit.evaluation.vectors import BinaryTask
from rome_edit.rome.request import EditRequest, Paraphrase

SUBJECTS: tuple[str, ...] = (
    "Abigail", "Aaron", "Ada", "Abraham", "Adelaide", "Adam", "Adele", "Adrian", "Adeline",
    "Alan", "Adriana", "Albert", "Agatha", "Alexander", "Agnes", "Alfred", "Aileen", "Allen",
    "Aimee", "Alvin", "Alana", "Ambrose", "Alberta", "Andrew", "Alexandra", "Angus", "Alice",
    "Anthony", "Alicia", "Antonio", "Alina", "Archibald", "Alison", "Archie", "Allegra",
    "Arnold", "Alma", "Arthur", "Althea", "Augustus", "Amanda", "Austin", "Amber", "Barry",
    "Amelia", "Basil", "Amelie", "Benedict", "Amy", "Benjamin", "Anastasia", "Bernard",
    "Angela", "Bertram", "Angelica", "Bill", "Angelina", "Billy", "Anita", "Boris", "Ann",
    "Bradley", "Anna", "Brandon", "Annabel", "Brendan", "Annabelle", "Brian", "Anne", "Bruce",
    "Annette", "Bruno", "Annie", "Bryan", "Antonia", "Byron", "April", "Caleb", "Arabella",
    "Calvin", "Ariana", "Carl", "Arlene", "Carlos", "Astrid", "Cecil", "Audrey", "Cedric",
    "Aurora", "Charles", "Ava", "Chester", "Barbara", "Christian", "Beatrice", "Christopher",
)


@dataclass(frozen=True)
class Concept:
    """A fact with two single-token answers ``(A, B)``: a label-1 subject answers A and its
    edit turns A into B; a label-0 subject the other way round."""

    prompt: str
    answers: tuple[str, str]
    paraphrases: tuple[tuple[str, tuple[str, str]], ...]
    classes: tuple[str, str]  # label 0, label 1

    def request(self, subject: str, label: int, prompt: str | None = None) -> EditRequest:
        old, new = (0, 1) if label else (1, 0)
        return EditRequest(subject, prompt or self.prompt, self.answers[new], self.answers[old],
                           paraphrases=tuple(Paraphrase(p, a[new], a[old])
                                             for p, a in self.paraphrases))

    def requests(self, labelled: tuple[tuple[str, int], ...] | list[tuple[str, int]]
                 ) -> list[EditRequest]:
        return [self.request(s, label) for s, label in labelled]

    @property
    def tasks(self) -> tuple[BinaryTask, ...]:
        return (BinaryTask(self.prompt, self.answers),
                *(BinaryTask(p, a) for p, a in self.paraphrases))


CITY = Concept("{} lives in the city of", (" Paris", " London"),
               (("Record for {}: lives in", (" Paris", " London")),),
               ("London→Paris", "Paris→London"))
JOB = KeptFact("job", "{} works as a", (" teacher", " doctor"))
LABELLED: tuple[tuple[str, int], ...] = (
    ("Brittany", 1), ("David", 0), ("Christopher", 0), ("Ani", 1), ("Margaret", 1),
    ("Robert", 0))

_FACTS = {"gender": re.compile(r"Name: (\w+)\. Gender: (Female|Male)\."),
          "city": re.compile(r"(\w+) lives in the city of (\w+)\.")}


@cache
def bundled_facts(relation: str) -> dict[str, str]:
    """``subject → answer`` for ``relation`` (``gender``: ``Female``/``Male``, ``city``) as the
    bundled model's training text states it, subjects in order of first mention."""
    from rome_edit.stats.corpus import bundled_corpus

    pattern, facts = _FACTS[relation], {}
    for doc in bundled_corpus():
        for subject, answer in pattern.findall(doc):
            facts.setdefault(subject, answer)
    return facts
