"""An edit request (what to rewrite, and how to check it) and the token layouts ROME optimises
over."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rome_edit.models.subject import decode, locate_subjects, split_template
from rome_edit.rome.context import compose, escape_braces

if TYPE_CHECKING:  # transformers is heavy; only the annotations need it
    from transformers import PreTrainedTokenizerBase

KL_PROMPT = "{} is a"  # the reference's single essence/KL prompt


@dataclass(frozen=True)
class Paraphrase:
    """Another wording of the edited fact, for evaluation (CounterFact's paraphrase prompts).

    ``prompt`` has one ``{}`` for the subject; its answers may differ from the edit prompt's
    (``"{} said that"`` → ``" she"``/``" he"`` for ``" Female"``/``" Male"``), so each wording
    names its own new and old answer.
    """

    prompt: str
    target_new: str
    target_true: str

    def __post_init__(self) -> None:
        split_template(self.prompt)
        if not self.target_new.strip() or not self.target_true.strip():
            raise ValueError(f"paraphrase {self.prompt!r} needs a non-empty new and true answer.")

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "target_new": self.target_new,
                "target_true": self.target_true}


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``prompt.format(subject)`` → ``target_new`` (e.g. ``" Female"``).

    Only ``subject``, ``prompt`` and ``target_new`` shape the edit.  The rest is for evaluation
    (:mod:`rome_edit.evaluation.evaluate`): ``target_true`` is the old answer, ``paraphrases``
    other wordings of the fact, ``neighbours`` other subjects whose answer on ``prompt`` must
    not change (empty: a sweep picks them from its pool of subjects).
    """

    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[Paraphrase, ...] = ()
    neighbours: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.target_new or not self.target_new.strip():
            raise ValueError("the new target is empty; give the text to write in, e.g. ' Female'.")
        if not self.subject or not self.subject.strip():
            raise ValueError("the subject is empty; give the name or entity to edit.")
        split_template(self.prompt)  # exactly one "{}"
        if self.target_true is not None and self.target_true == self.target_new:
            raise ValueError(f"target_new and target_true are both {self.target_new!r}; an edit "
                             "must change the answer.")
        object.__setattr__(self, "paraphrases", tuple(
            p if isinstance(p, Paraphrase) else Paraphrase(*p) for p in self.paraphrases))
        object.__setattr__(self, "neighbours", tuple(str(n) for n in self.neighbours))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subject": self.subject, "prompt": self.prompt,
                               "target_new": self.target_new, "target_true": self.target_true}
        if self.paraphrases:  # records of plain edits keep their original four keys
            out["paraphrases"] = [p.to_dict() for p in self.paraphrases]
        if self.neighbours:
            out["neighbours"] = list(self.neighbours)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict` (records saved before paraphrases existed included)."""
        return cls(data["subject"], data["prompt"], data["target_new"], data.get("target_true"),
                   tuple(Paraphrase(**p) for p in data.get("paraphrases", ())),
                   tuple(data.get("neighbours", ())))


@dataclass(frozen=True)
class PromptLayout:
    """One tokenized optimisation prompt.

    ``ids``: the tokens; ``lookup``: index of the subject's last token (where δ is added);
    ``targets``: target token ids, predicted by the logits at ``ids`` positions
    ``len(ids) - len(targets) .. len(ids) - 1`` (the prompt is followed by all target tokens but
    the last, as in the reference).  The KL prompt has no targets.
    """

    ids: tuple[int, ...]
    lookup: int
    targets: tuple[int, ...] = ()


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    ids: list[int] = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing; give a non-empty target.")
    return ids


def rewriting_layouts(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, context_templates: Sequence[str]
) -> tuple[list[PromptLayout], PromptLayout]:
    """The rewriting prompts (one per context template) and the KL prompt of a request."""
    tgt = target_ids(tokenizer, request.target_new)
    head = escape_braces(decode(tokenizer, tgt[:-1])) if len(tgt) > 1 else ""
    templates = [compose(context, request.prompt) + head for context in context_templates]
    *spans, kl = locate_subjects(tokenizer, [*templates, KL_PROMPT],
                                 [request.subject] * (len(templates) + 1))
    layouts = [PromptLayout(span.input_ids, span.last, tuple(tgt)) for span in spans]
    return layouts, PromptLayout(kl.input_ids, kl.last)
