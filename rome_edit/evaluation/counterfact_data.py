"""Reading the field's fact-editing benchmarks: CounterFact and zsRE (ROME's eval formats).

CounterFact (Meng et al. 2022, §4.2) is a JSON list of cases::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...],
     "generation_prompts": [...], "attribute_prompts": [...]}   # the last two optional

Paraphrase, neighbourhood, attribute and generation prompts are complete texts (no ``{}``).
zsRE as MEND and ROME evaluate it (``zsre_mend_eval.json``) is a list of
``{"src", "subject", "alt", "answers", "rephrase", "loc", "loc_ans"}``; as in the reference the
edit writes ``answers[0]`` (``target="alt"`` writes MEND's alternative answer instead) into
``src`` with the subject replaced by ``{}``.  Targets get the leading space the reference adds.

Every case is checked before anything runs: a bad case raises :class:`DatasetError` naming the
file, the case and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rome_edit.rome.request import EditRequest

__all__ = ["CounterFactCase", "DatasetError", "ZsreCase", "read_dataset"]

Format = Literal["counterfact", "zsre"]


class DatasetError(ValueError):
    """A benchmark file or case that cannot be evaluated; the message names the fix."""


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact rewrite and its evaluation prompts (targets without leading space)."""

    case_id: int | str
    subject: str
    prompt: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def request(self) -> EditRequest:
        return EditRequest(self.subject, self.prompt, " " + self.target_new,
                           " " + self.target_true)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)


@dataclass(frozen=True)
class ZsreCase:
    """One zsRE question: write ``target_new`` as the answer of ``prompt`` about ``subject``;
    ``loc``/``loc_ans`` is an unrelated Natural Questions pair that must stay answered."""

    case_id: int | str
    subject: str
    prompt: str
    target_new: str
    paraphrase_prompts: tuple[str, ...]
    loc: str
    loc_ans: str

    @property
    def request(self) -> EditRequest:
        return EditRequest(self.subject, self.prompt, " " + self.target_new)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)


def read_dataset(path: str | Path, target: Literal["answers", "alt"] = "answers"
                 ) -> tuple[Format, list[CounterFactCase] | list[ZsreCase]]:
    """The format (from the first case's keys) and every case of a CounterFact or zsRE file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a CounterFact or zsRE JSON file.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); give a JSON list of cases.") \
            from None
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{path} holds no cases; give a non-empty JSON list of CounterFact "
                           "or zsRE cases.")
    first = raw[0] if isinstance(raw[0], dict) else {}
    if "requested_rewrite" in first:
        fmt: Format = "counterfact"
        cases: list[Any] = [_counterfact(path, i, c) for i, c in enumerate(raw)]
    elif "src" in first:
        fmt = "zsre"
        cases = [_zsre(path, i, c, target) for i, c in enumerate(raw)]
    else:
        raise DatasetError(f"{path} case 0 is neither CounterFact (no 'requested_rewrite') nor "
                           "zsRE (no 'src'); give cases in one of those formats.")
    seen: set[int | str] = set()
    for case in cases:
        if case.case_id in seen:
            raise DatasetError(f"{path}: case_id {case.case_id!r} appears twice; give every "
                               "case its own case_id.")
        seen.add(case.case_id)
    return fmt, cases


def _where(path: Path, index: int, case: Any) -> str:
    cid = case.get("case_id") if isinstance(case, dict) else None
    return f"{path} case {index}" + ("" if cid is None else f" (case_id {cid!r})")


def _get(case: Any, keys: tuple[str, ...], where: str) -> Any:
    value = case
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            name = "']['".join(keys[: depth + 1])
            raise DatasetError(f"{where}: missing ['{name}']; add it (see docs/counterfact.md "
                               "for the format).")
        value = value[key]
    return value


def _text(case: Any, keys: tuple[str, ...], where: str) -> str:
    value = _get(case, keys, where)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: ['{']['.join(keys)}'] must be non-empty text.")
    return value


def _texts(case: dict, key: str, where: str, required: bool = True) -> tuple[str, ...]:
    if not required and key not in case:
        return ()
    value = _get(case, (key,), where)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DatasetError(f"{where}: '{key}' must be a list of non-empty prompt texts.")
    return tuple(value)


def _template(prompt: str, where: str) -> None:
    if prompt.count("{}") != 1:
        raise DatasetError(f"{where}: the prompt {prompt!r} must hold exactly one '{{}}' where "
                           "the subject goes, e.g. 'The capital of {} is'.")


def _counterfact(path: Path, index: int, case: Any) -> CounterFactCase:
    where = _where(path, index, case)
    case_id = _get(case, ("case_id",), where)
    rw = ("requested_rewrite",)
    prompt = _text(case, (*rw, "prompt"), where)
    subject = _text(case, (*rw, "subject"), where)
    new = _text(case, (*rw, "target_new", "str"), where).strip()
    true = _text(case, (*rw, "target_true", "str"), where).strip()
    _template(prompt, where)
    if new == true:
        raise DatasetError(f"{where}: target_new and target_true are both {new!r}; an edit must "
                           "change the answer.")
    return CounterFactCase(case_id, subject, prompt, new, true,
                           _texts(case, "paraphrase_prompts", where),
                           _texts(case, "neighborhood_prompts", where),
                           _texts(case, "attribute_prompts", where, required=False),
                           _texts(case, "generation_prompts", where, required=False))


def _zsre(path: Path, index: int, case: Any, target: str) -> ZsreCase:
    where = _where(path, index, case)
    src = _text(case, ("src",), where)
    subject = _text(case, ("subject",), where)
    if subject not in src:
        raise DatasetError(f"{where}: the subject {subject!r} does not occur in src {src!r}; "
                           "give the subject exactly as it is written in the question.")
    if "{}" in src:
        raise DatasetError(f"{where}: src {src!r} already holds '{{}}'; zsRE questions are "
                           "complete texts with the subject written out.")
    if target == "answers":
        answers = _get(case, ("answers",), where)
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], str) \
                or not answers[0].strip():
            raise DatasetError(f"{where}: 'answers' must be a non-empty list of answer texts.")
        new = answers[0].strip()
    elif target == "alt":
        new = _text(case, ("alt",), where).strip()
    else:
        raise ValueError(f"zsRE target {target!r} is not 'answers' or 'alt'.")
    rephrase = _text(case, ("rephrase",), where)
    return ZsreCase(case.get("case_id", index), subject, src.replace(subject, "{}", 1), new,
                    (rephrase,), _text(case, ("loc",), where),
                    _text(case, ("loc_ans",), where).strip())
