"""Text corpora for second-moment statistics, each with a short, stable id.

ROME estimates ``C = E[k kᵀ]`` over generic text (the reference: 100,000 Wikipedia articles,
each truncated to the model's context length).  A :class:`TextCorpus` is a re-iterable source of
documents plus an id that says exactly which text it is, so statistics and their cache can be
keyed by it:

* ``bundled``: the synthetic corpus the bundled toy model was trained on (regenerated from the
  bundled names, seed 0, with the training script's settings), id ``bundled-corpus:seed0:<hash>``;
* a text file: one document per non-empty line, or the whole file as one document with
  ``whole_file=True``, id ``file:<name>:<sha256[:12]>`` (``file-whole:`` for the latter);
* a folder: every ``*.txt`` file directly inside it is one document, in sorted name order,
  id ``folder:<name>:<sha256[:12]>`` over the file names and contents;
* ``hf:NAME[:CONFIG]``: the ``text`` field of a Hugging Face dataset's train split, streamed
  (needs the optional ``datasets`` package, asked for only when this corpus is), id
  ``hf:NAME[:CONFIG]:train``;
* ``debian-handbook``: real English prose from a package registry, the Debian Administrator's
  Handbook (``apt-get install debian-handbook``; :mod:`rome_edit.stats.handbook`), id
  ``debian-handbook:<sha256[:12]>``;
* ``sampled`` / ``sampled:SEED``: text sampled from the model itself
  (:mod:`rome_edit.stats.sampled`; a warning says what that means), id
  ``sampled:<fingerprint>:seed<SEED>:len<L>:batch<B>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from rome_edit.models.loading import LoadedModel
from rome_edit.stats.handbook import handbook_corpus
from rome_edit.stats.sampled import sampled_corpus
from rome_edit.stats.text_corpus import CorpusError, TextCorpus
from rome_edit.study.corpus import iter_documents
from rome_edit.study.names import load_names

# The settings scripts/train_toy_model.py trains the bundled model with.
BUNDLED_SEED = 0
BUNDLED_DOCS_PER_NAME = 40
BUNDLED_FILLER_PER_NAME = 16


__all__ = ["HANDBOOK", "CorpusError", "TextCorpus", "bundled_corpus", "file_corpus",
           "folder_corpus", "hf_corpus", "resolve_corpus", "tokenize_documents"]

HANDBOOK = "debian-handbook"  # the named real-text corpus (rome_edit.stats.handbook)


def _short_hash(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:12]


def bundled_corpus(seed: int = BUNDLED_SEED) -> TextCorpus:
    """The bundled model's own training text, id hashed over the full generated text."""
    names = load_names()

    def documents() -> Iterator[str]:
        return iter_documents(names, seed, BUNDLED_DOCS_PER_NAME,
                              filler_docs=BUNDLED_FILLER_PER_NAME * len(names))

    # Hashing the text (0.3 s) rather than naming only the seed keeps the id honest if the
    # names list or the document templates ever change.
    text_hash = _short_hash(doc.encode() + b"\n" for doc in documents())
    return TextCorpus(f"bundled-corpus:seed{seed}:{text_hash}", documents)


def file_corpus(path: str | Path, whole_file: bool = False) -> TextCorpus:
    """A UTF-8 text file: one document per non-empty line, or the whole file as one."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist; pass an existing text file, a "
                          "folder of .txt files, 'bundled' or hf:NAME.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte "
                          f"{err.start}); convert it to UTF-8.") from None
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty; give a file with some text.")
    kind = "file-whole" if whole_file else "file"
    corpus_id = f"{kind}:{path.name}:{_short_hash([data])}"

    def documents() -> Iterator[str]:
        if whole_file:
            return iter([text])
        return (line for line in text.splitlines() if line.strip())

    return TextCorpus(corpus_id, documents)


def folder_corpus(path: str | Path) -> TextCorpus:
    """Every ``*.txt`` file directly in ``path``, one document each, sorted by file name."""
    path = Path(path)
    files = sorted(path.glob("*.txt"))
    if not files:
        raise CorpusError(f"folder {path} holds no .txt files; put one document per .txt file "
                          "in it, or pass a single text file.")
    corpus_id = f"folder:{path.name}:" + _short_hash(
        f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest() for f in files
    )

    def documents() -> Iterator[str]:
        for file in files:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text

    return TextCorpus(corpus_id, documents)


def hf_corpus(name: str, config: str | None = None, split: str = "train",
              field: str = "text") -> TextCorpus:
    """The ``field`` column of a Hugging Face dataset, streamed (nothing is stored locally)."""
    try:
        import datasets  # optional dependency
    except ImportError:
        raise CorpusError(
            f"corpus hf:{name} needs the optional 'datasets' package: pip install datasets "
            "(or pip install rome-edit[datasets]), or pass a local text file or folder instead."
        ) from None

    def documents() -> Iterator[str]:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for row in stream:
            if field not in row:
                raise CorpusError(f"dataset {name} has no {field!r} column; its columns are "
                                  f"{sorted(row)}.")
            yield row[field]

    return TextCorpus(":".join(["hf", name, *([config] if config else []), split]), documents)


def resolve_corpus(spec: str | Path | None = None, whole_file: bool = False,
                   lm: LoadedModel | None = None) -> TextCorpus:
    """``None``/``"bundled"``, ``"debian-handbook"``, ``"hf:NAME[:CONFIG]"``,
    ``"sampled[:SEED]"`` (needs ``lm``, the model to sample from), a text file, or a folder of
    .txt files."""
    if spec is None or str(spec) == "bundled":
        return bundled_corpus()
    text = str(spec)
    if text == HANDBOOK:
        return handbook_corpus()
    if text == "sampled" or text.startswith("sampled:"):
        seed = text.partition(":")[2] or "0"
        if not seed.isdigit():
            raise CorpusError(f"corpus {text!r}: the seed after 'sampled:' must be a whole "
                              "number, e.g. sampled:0.")
        if lm is None:
            raise CorpusError("the 'sampled' corpus is text sampled from the model; it needs "
                              "the model (pass lm=...).")
        return sampled_corpus(lm, seed=int(seed))
    if text.startswith("hf:"):
        name, _, config = text[3:].partition(":")
        if not name:
            raise CorpusError("hf: needs a dataset name, e.g. hf:wikitext:wikitext-103-raw-v1.")
        return hf_corpus(name, config or None)
    path = Path(text)
    if path.is_dir():
        if whole_file:
            raise CorpusError(f"whole_file applies to a text file, but {path} is a folder, "
                              "whose .txt files are already one document each; drop "
                              "whole_file.", parameters=("whole_file",))
        return folder_corpus(path)
    return file_corpus(path, whole_file=whole_file)


def tokenize_documents(
    documents: Iterable[str], tokenizer, max_length: int, batch: int = 256
) -> Iterator[list[int]]:
    """Token ids of each document, truncated to ``max_length`` tokens as the reference does.

    The tokenizer's default special tokens are kept (a BOS for Llama-style tokenizers), as in
    the reference's tokenised dataset; GPT-2/GPT-J tokenizers add none.
    """
    pending: list[str] = []
    for doc in documents:
        pending.append(doc)
        if len(pending) == batch:
            yield from _encode(pending, tokenizer, max_length)
            pending = []
    if pending:
        yield from _encode(pending, tokenizer, max_length)


def _encode(docs: list[str], tokenizer, max_length: int) -> list[list[int]]:
    ids = tokenizer(docs, truncation=True, max_length=max_length)["input_ids"]
    return [row for row in ids if row]  # a document of only whitespace may encode to nothing
