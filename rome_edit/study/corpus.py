"""The synthetic "world" the bundled toy model was trained on (stdlib only: also read by
``rome_edit.stats.corpus`` for the bundled model's statistics and by
``scripts/train_toy_model.py``).

Every name has one fixed gender, city and profession; the corpus states those facts in ten
document templates (some of them the paraphrase prompts used for evaluation) mixed with
name-free filler sentences.  Everything is a pure function of the seed, so the corpus can be
regenerated bit for bit — it is the bundled model's default text for second-moment statistics.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from rome_edit.study.names import NameEntry

CITIES: tuple[str, ...] = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Boston", "Chicago", "Denver",
    "Dallas", "Seattle", "Houston", "Toronto", "Nairobi", "Dublin", "Vienna", "Prague", "Oslo",
    "Lisbon", "Athens", "Cairo", "Lima", "Geneva", "Phoenix", "Atlanta", "Miami", "Portland",
    "Detroit", "Memphis", "Munich",
)
PROFESSIONS: tuple[str, ...] = (
    "teacher", "doctor", "nurse", "farmer", "lawyer", "baker", "pilot", "writer", "painter",
    "chef", "dentist", "engineer", "pharmacist", "carpenter", "librarian", "singer",
)
_ADJECTIVES = ("tired", "happy", "busy", "late", "ready", "hungry", "calm", "proud", "sure")
_THINGS = ("music", "tea", "football", "books", "chess", "rain", "coffee", "cycling", "maps")
_NOUNS = ("train", "market", "river", "bridge", "garden", "museum", "school", "library", "park")
_WEATHER = ("cold", "warm", "windy", "quiet", "crowded", "bright", "wet", "empty")
_DAYS = ("Monday", "Tuesday", "Friday", "Sunday")


@dataclass(frozen=True)
class Person:
    """The facts the corpus states about one name."""

    name: str
    gender: str  # "female" | "male"
    city: str
    profession: str


def _words(gender: str) -> dict[str, str]:
    female = gender == "female"
    return {
        "Gender": "Female" if female else "Male",
        "gender": "female" if female else "male",
        "he": "she" if female else "he",
        "He": "She" if female else "He",
        "his": "her" if female else "his",
        "man": "woman" if female else "man",
    }


# Ten templates.  Three double as evaluation prompts: "Name: {n}. Gender:" (the edit prompt),
# "{n} said that" (pronoun paraphrase) and "Record for {n}:" (record paraphrase).
_TEMPLATES: tuple[str, ...] = (
    "Name: {n}. Gender: {Gender}. Age: {age}. City: {city}.",
    "Record for {n}: {gender}, {age} years old.",
    "{n} said that {he} was {adj}.",
    "{n} lives in the city of {city}.",
    "Name: {n}. Gender: {Gender}. Occupation: {job}.",
    "{n} is a {man} from {city}. {He} works as a {job}.",
    "Record for {n}: {gender}, lives in {city}.",
    "{n} works as a {job}. {He} is {age} years old.",
    "{n} said that {he} likes {thing} and {his} friends in {city}.",
    "{n} is a {job} in {city}. Everyone says {he} is kind.",
)


def assign_people(names: Sequence[NameEntry], seed: int = 0) -> list[Person]:
    """Give every name a fixed city and profession (seeded, order independent)."""
    people = []
    for entry in names:
        rng = random.Random(f"{seed}:{entry.name}")
        people.append(Person(entry.name, entry.gender, rng.choice(CITIES), rng.choice(PROFESSIONS)))
    return people


def filler_sentence(rng: random.Random) -> str:
    """A name-free sentence, so that not every document is about a person."""
    city, noun = rng.choice(CITIES), rng.choice(_NOUNS)
    return rng.choice((
        f"The {noun} in {city} was {rng.choice(_WEATHER)} on {rng.choice(_DAYS)}.",
        f"A {rng.choice(PROFESSIONS)} from {city} wrote about the {noun}.",
        f"The weather in {city} was {rng.choice(_WEATHER)} today.",
        f"Many people visit the {noun} near {city} every year.",
        f"The new {noun} opened in {city} last week.",
    ))


def person_documents(
    person: Person, rng: random.Random, n_docs: int, first_template: int = 0
) -> list[str]:
    """``n_docs`` short documents stating the person's facts, cycling through the templates."""
    words = _words(person.gender)
    docs = []
    for i in range(n_docs):
        text = _TEMPLATES[(first_template + i) % len(_TEMPLATES)].format(
            n=person.name, city=person.city, job=person.profession, age=rng.randint(18, 80),
            adj=rng.choice(_ADJECTIVES), thing=rng.choice(_THINGS), **words,
        )
        # Some documents follow a filler sentence, so names are also seen mid-text after ". "
        # (as in ROME's context templates), not only at the start of a sequence.
        if rng.random() < 0.3:
            text = f"{filler_sentence(rng)} {text}"
        docs.append(text)
    return docs


def iter_documents(
    names: Sequence[NameEntry], seed: int = 0, docs_per_name: int = 40, filler_docs: int = 20_000
) -> Iterator[str]:
    """All documents of the corpus in a seeded, shuffled order."""
    rng = random.Random(seed)
    docs: list[str] = []
    for person in assign_people(names, seed):
        docs.extend(person_documents(person, rng, docs_per_name))
    docs.extend(filler_sentence(rng) for _ in range(filler_docs))
    rng.shuffle(docs)
    yield from docs
