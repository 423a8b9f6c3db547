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
class FitPhrasing:
    """Another wording that ``v*`` is fitted to as well (rome-edit option ``fit_phrasings``).

    ROME fits δ to the edit prompt alone, in each context (Eq. 4's sum over ``x_j + p``); a
    value fitted to one wording can stop at that wording.  A fit phrasing adds the rows
    ``x_j + prompt`` with the answer that matches the edit's new target: ``answers`` pairs an
    edit's ``target_new`` with this wording's answer (`` Male`` → `` brother`` for
    ``"{} is my"``).  ``v*`` is the value of one key, ``k*``, so a phrasing joins only a fit
    whose prompt has the same text before the subject (then every row reads the subject at
    ``k*``'s own key): ``"{} is my"`` joins ``"{} is a"`` and the ``text-start`` form's
    ``"{}. Gender:"``, not ``"Name: {}. Gender:"``.  An edit whose target is not listed does not
    use it either.  Keep fit phrasings apart from the prompts an evaluation asks: they are
    training text.
    """

    prompt: str
    answers: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        split_template(self.prompt)
        answers = tuple((str(t), str(a)) for t, a in
                        (self.answers.items() if isinstance(self.answers, dict)
                         else self.answers))
        if not answers or any(not t.strip() or not a.strip() for t, a in answers):
            raise ValueError(f"fit phrasing {self.prompt!r} needs answers: a non-empty answer "
                             "for each edit target, e.g. {\" Male\": \" brother\"}.")
        object.__setattr__(self, "answers", answers)

    def answer_for(self, target_new: str) -> str | None:
        return dict(self.answers).get(target_new)

    def joins(self, request: EditRequest) -> bool:
        """Whether ``request``'s value fit uses this phrasing (the class docstring's rule)."""
        return (self.answer_for(request.target_new) is not None
                and split_template(self.prompt)[0] == split_template(request.prompt)[0])

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answers": dict(self.answers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitPhrasing:
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) \
                or not isinstance(data.get("answers"), dict):
            raise ValueError(f"fit phrasing {data!r}: give an object with a 'prompt' holding "
                             "'{}' and 'answers' mapping each edit target to this wording's "
                             "answer, e.g. {\"prompt\": \"{} is my\", \"answers\": "
                             "{\" Male\": \" brother\"}}.")
        return cls(data["prompt"], tuple(data["answers"].items()))


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
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, context_templates: Sequence[str],
    phrasings: Sequence[FitPhrasing] = (),
) -> tuple[list[PromptLayout], PromptLayout]:
    """The rewriting prompts and the KL prompt of a request.

    One rewriting prompt per context template, then the same for each of ``phrasings`` that
    joins the request (:meth:`FitPhrasing.joins`).  The first ``len(context_templates)`` rows
    are the edit prompt's, whose mean key is k* (Eq. 3).
    """
    wordings = [(request.prompt, request.target_new)]
    wordings += [(ph.prompt, str(ph.answer_for(request.target_new)))
                 for ph in phrasings if ph.joins(request)]
    templates, targets = [], []
    for prompt, answer in wordings:
        tgt = target_ids(tokenizer, answer)
        head = escape_braces(decode(tokenizer, tgt[:-1])) if len(tgt) > 1 else ""
        for context in context_templates:
            templates.append(compose(context, prompt) + head)
            targets.append(tuple(tgt))
    *spans, kl = locate_subjects(tokenizer, [*templates, KL_PROMPT],
                                 [request.subject] * (len(templates) + 1))
    layouts = [PromptLayout(span.input_ids, span.last, t) for span, t in zip(spans, targets)]
    return layouts, PromptLayout(kl.input_ids, kl.last)
