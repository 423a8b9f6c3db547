"""What a corpus is: a re-iterable source of documents with an id that names its exact text.

Kept apart from the corpus resolvers (``corpus.py``) so that the corpora that need a model
(``sampled.py``) and the resolver that dispatches to them both build on it without importing
each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rome_edit.errors import ParameterError

__all__ = ["CorpusError", "TextCorpus"]


class CorpusError(ParameterError):
    """A corpus that cannot be read; the message says what to fix."""


@dataclass(frozen=True)
class TextCorpus:
    """A re-iterable source of documents and the id that names its exact text."""

    corpus_id: str
    documents: Callable[[], Iterator[str]]
    # Materialise the first n documents now: a corpus that runs the model to make its text
    # (``sampled``) must do so before the statistics pass installs its hooks.
    prepare: Callable[[int], None] | None = None

    def __iter__(self) -> Iterator[str]:
        return self.documents()
