"""What every corpus is: a re-iterable source of documents named by an id, and its error.

Kept apart from :mod:`rome_edit.stats.corpus` (which resolves a ``--corpus`` spec to one of the
corpora) so that the corpora themselves (:mod:`~rome_edit.stats.sampled`,
:mod:`~rome_edit.stats.handbook`) build on it without importing the resolver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["CorpusError", "TextCorpus"]


class CorpusError(ValueError):
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
