"""Finding the subject's tokens in a prompt.

A prompt template holds exactly one ``{}`` where the subject goes (``str.format`` rules: ``{{``
and ``}}`` are literal braces, as in the reference's templates).  The subject's tokens are those
whose character spans overlap the subject's characters, read from the fast tokenizer's offset
mapping; so a leading-space merge (``" Brittany"`` → ``ĠB``, ``ri``, …) or a merge across the
subject's edge still counts, and another occurrence of the subject elsewhere in the prompt is
never mistaken for it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


class SubjectNotFoundError(ValueError):
    """The template or subject cannot be located; the message says how to fix it."""


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int] | torch.Tensor,
           skip_special_tokens: bool = False) -> str:
    """One token sequence as text (``tokenizer.decode`` is typed ``str | list[str]`` because a
    batch decodes to a list; one sequence always decodes to a string)."""
    text = tokenizer.decode(ids if isinstance(ids, torch.Tensor) else list(ids),
                            skip_special_tokens=skip_special_tokens)
    if not isinstance(text, str):
        raise TypeError(f"decoding one sequence gave {type(text).__name__}, not str; pass a 1-D "
                        "sequence of token ids.")
    return text


@dataclass(frozen=True)
class SubjectSpan:
    """Token positions of the subject in the tokenized prompt (``end`` exclusive)."""

    prompt: str
    input_ids: tuple[int, ...]
    start: int
    end: int

    @property
    def last(self) -> int:
        """Index of the subject's last token: ROME's ``fact_token = subject_last``."""
        return self.end - 1

    @property
    def first(self) -> int:
        return self.start


def split_template(template: str) -> tuple[str, str]:
    """``(prefix, suffix)`` around the template's single ``{}``, braces unescaped."""
    if not isinstance(template, str):
        raise SubjectNotFoundError(f"template must be a string, got {type(template).__name__}.")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise SubjectNotFoundError(
            f"template {template!r} has unbalanced braces ({err}); write literal braces as "
            "'{{' and '}}'."
        ) from None
    fields = [p for p in parsed if p[1] is not None]
    if len(fields) != 1 or fields[0][1] != "" or fields[0][2] or fields[0][3]:
        raise SubjectNotFoundError(
            f"template {template!r} must contain exactly one '{{}}' where the subject goes "
            f"(found {len(fields)} fields); e.g. 'Name: {{}}. Gender:'."
        )
    cut = next(i for i, p in enumerate(parsed) if p[1] is not None)
    prefix = "".join(p[0] for p in parsed[: cut + 1])
    suffix = "".join(p[0] for p in parsed[cut + 1 :])
    return prefix, suffix


def fill(template: str, subject: str) -> str:
    prefix, suffix = split_template(template)
    return prefix + subject + suffix


def locate_subject(
    tokenizer: PreTrainedTokenizerBase, template: str, subject: str
) -> SubjectSpan:
    """Tokenize ``template`` filled with ``subject`` and return the subject's token span."""
    return locate_subjects(tokenizer, [template], [subject])[0]


def locate_subjects(
    tokenizer: PreTrainedTokenizerBase, templates: Sequence[str], subjects: Sequence[str]
) -> list[SubjectSpan]:
    """:func:`locate_subject` for many prompts, tokenized in one call where the tokenizer is
    fast (the per-call overhead is most of the cost for short prompts)."""
    if not getattr(tokenizer, "is_fast", False):
        return [_locate_slow(tokenizer, t, s) for t, s in zip(templates, subjects)]
    parts = [_filled(t, s) for t, s in zip(templates, subjects)]
    if not parts:
        return []
    enc = tokenizer([prompt for prompt, _, _ in parts], add_special_tokens=False,
                    return_offsets_mapping=True)
    spans = []
    for (prompt, lo, hi), ids, offsets in zip(parts, enc["input_ids"], enc["offset_mapping"]):
        hits = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
        spans.append(_span(prompt, ids, hits, prompt[lo:hi]))
    return spans


def _locate_slow(tokenizer: PreTrainedTokenizerBase, template: str, subject: str) -> SubjectSpan:
    """Slow tokenizers have no offsets: compare the token counts of the prefix with and
    without the subject."""
    prompt, lo, _ = _filled(template, subject)
    prefix = prompt[:lo]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    before = len(tokenizer(prefix.rstrip(" "), add_special_tokens=False)["input_ids"])
    spaced = prefix.endswith(" ")
    after = len(tokenizer(prefix.rstrip(" ") + (" " if spaced else "") + subject,
                          add_special_tokens=False)["input_ids"])
    return _span(prompt, ids, list(range(before, after)), subject)


def _filled(template: str, subject: str) -> tuple[str, int, int]:
    """The prompt and the subject's character span in it."""
    if not subject or not subject.strip():
        raise SubjectNotFoundError("the subject is empty; give the name or entity to edit.")
    prefix, suffix = split_template(template)
    return prefix + subject + suffix, len(prefix), len(prefix) + len(subject)


def _span(prompt: str, ids: Sequence[int], hits: list[int], subject: str) -> SubjectSpan:
    if not hits:
        raise SubjectNotFoundError(
            f"no token of subject {subject!r} found in prompt {prompt!r}; check the subject "
            "is spelled as it appears in the text."
        )
    return SubjectSpan(prompt, tuple(ids), hits[0], hits[-1] + 1)


def last_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, subjects: Sequence[str]
                ) -> dict[str, int]:
    """Each subject's last token in ``prompt``."""
    spans = locate_subjects(tokenizer, [prompt] * len(subjects), list(subjects))
    return {n: sp.input_ids[sp.last] for n, sp in zip(subjects, spans)}
