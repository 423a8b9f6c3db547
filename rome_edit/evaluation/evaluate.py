"""Evaluating edits with CounterFact's conventions, named unambiguously.

For each edit request (applied alone, then reverted bit-identically):

* ``efficacy`` — success: ``target_new`` beats ``target_true`` on the edit prompt.
* ``paraphrase`` — success rate over the request's paraphrases (each wording with its own new
  and old answer, e.g. ``"{} said that"`` → she/he): the new answer beats the old one.  ``None``
  when the request has none.
* ``specificity`` — success rate over neighbour subjects (some sharing the edited subject's
  last token, the rest random): on the edit prompt, the neighbour's choice between
  ``target_true`` and ``target_new`` is the same as before the edit (CounterFact scores "the
  true target still beats the new one"; comparing with the unedited model instead also counts
  neighbours the model got wrong to begin with, which a gender or city swap has).
* ``<name>_kept`` for each :class:`KeptFact` — another fact about the edited subject (its city,
  say) is unchanged: the most likely of the fact's candidates is the same before and after.
* ``fluency`` — n-gram entropy of greedy generations (ROME's measure: the mean of
  ``2/3·H₂`` and ``4/3·H₃``, base-2 entropies of word bi- and tri-gram frequencies).

Answers are compared by their first token's next-token probability: exact for one-token answers
(the bundled model's gender and city answers) and the first-token reading of CounterFact's
``exp(−mean NLL)`` for longer ones.  Two answers that share a first token are refused.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rome_edit.models.architectures import check_layer
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import generate, next_token_logprobs
from rome_edit.models.subject import fill, last_tokens
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.weights.write import applied, row_edits, stacked_terms


@dataclass(frozen=True)
class KeptFact:
    """A fact about each edited subject that an edit must leave alone.

    ``prompt`` has one ``{}``; ``candidates`` are the possible answers (compared by first
    token, duplicates of a first token counted once); the metric is ``f"{name}_kept"``.
    """

    name: str
    prompt: str
    candidates: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"fact name {self.name!r} must be an identifier such as 'city'.")
        if len(self.candidates) < 2:
            raise ValueError(f"fact {self.name!r} needs at least two candidate answers.")


@dataclass(frozen=True)
class EditScore:
    """One edit's success rates (CounterFact conventions) and probabilities of its answers."""

    subject: str
    efficacy: bool
    paraphrase: float | None  # None: the request has no paraphrases
    specificity: float | None  # over all neighbours; None: no neighbours
    specificity_same_last_token: float | None  # neighbours ending in the same token
    specificity_random: float | None
    p_new_before: float  # probability of the new answer's first token on the edit prompt
    p_new_after: float
    p_old_after: float
    kept: dict[str, bool] = field(default_factory=dict)  # KeptFact name → unchanged

    def to_dict(self) -> dict[str, Any]:
        """Flat: each kept fact becomes ``<name>_kept`` (e.g. ``city_kept``)."""
        out = asdict(self)
        out.update({f"{k}_kept": v for k, v in out.pop("kept").items()})
        return out


def first_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {text!r} tokenizes to nothing; give a non-empty answer.")
    return ids[0]


def _answer_ids(tokenizer: PreTrainedTokenizerBase, new: str, true: str | None, where: str
                ) -> tuple[int, int]:
    if true is None:
        raise ValueError(f"{where}: evaluating an edit needs its target_true (the old answer); "
                         "give it in the EditRequest.")
    a, b = first_token(tokenizer, new), first_token(tokenizer, true)
    if a == b:
        raise ValueError(f"{where}: answers {new!r} and {true!r} start with the same token, so "
                         "they cannot be told apart; choose answers that differ in the first "
                         "token.")
    return a, b


def neighbours(subject: str, pool: Sequence[str], last: dict[str, int],
               n_same_last: int = 5, n_random: int = 5, seed: int = 0
               ) -> tuple[list[str], list[str]]:
    """Other subjects of ``pool``: up to ``n_same_last`` ending in the same token (``last``:
    subject → last token, see :func:`last_tokens`), and ``n_random`` others, chosen with a
    per-subject seed."""
    others = [n for n in pool if n != subject]
    rng = random.Random(f"{seed}:{subject}")
    same = [n for n in others if last[n] == last[subject]]
    rng.shuffle(same)
    picked = same[:n_same_last]
    rest = [n for n in others if n not in picked]
    return picked, rng.sample(rest, min(n_random, len(rest)))


def _fact_ids(tokenizer: PreTrainedTokenizerBase, fact: KeptFact) -> torch.Tensor:
    return torch.tensor(sorted({first_token(tokenizer, c) for c in fact.candidates}))


def _split_neighbours(lm: LoadedModel, requests: Sequence[EditRequest], pool: Sequence[str],
                      n_same_last: int, n_random: int) -> dict[int, tuple[list[str], list[str]]]:
    """Per request: (same-last-token neighbours, random neighbours)."""
    out: dict[int, tuple[list[str], list[str]]] = {}
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        if r.neighbours:
            out[i] = ([], list(r.neighbours))
        else:
            by_prompt.setdefault(r.prompt, []).append(i)
    for prompt, idx in by_prompt.items():
        subjects = list(dict.fromkeys([*pool, *(requests[i].subject for i in idx)]))
        last = last_tokens(lm.tokenizer, prompt, subjects)
        for i in idx:
            out[i] = neighbours(requests[i].subject, pool, last, n_same_last, n_random)
    return out


def evaluate_edits(
    lm: LoadedModel, records: Sequence[EditRecord], neighbour_pool: Sequence[str] = (),
    kept: Sequence[KeptFact] = (), n_same_last: int = 5, n_random: int = 5, chunk: int = 32,
    progress: bool = True,
) -> list[EditScore]:
    """Score each edit as if applied alone.

    Neighbours come from each request's own ``neighbours``, else from ``neighbour_pool``
    (default: the edited subjects).  Every edit is a rank-one change of one layer, so a chunk
    of edits is scored in one batch with :func:`~rome_edit.weights.write.row_edits` (each row
    sees only its own edit — the same function as writing that edit into the weights; a test
    compares the two).
    """
    requests = [r.request for r in records]
    ids = [_answer_ids(lm.tokenizer, q.target_new, q.target_true, f"edit of {q.subject!r}")
           for q in requests]
    para_ids = [[_answer_ids(lm.tokenizer, p.target_new, p.target_true,
                             f"paraphrase {p.prompt!r} of {q.subject!r}") for p in q.paraphrases]
                for q in requests]
    pool = list(dict.fromkeys(neighbour_pool or [q.subject for q in requests]))
    split = _split_neighbours(lm, requests, pool, n_same_last, n_random)
    near = {i: same + rand for i, (same, rand) in split.items()}
    fact_ids = [_fact_ids(lm.tokenizer, f) for f in kept]
    # Before the edit: neighbours' logprobs on the edit prompt, each fact's best candidate.
    texts = sorted({fill(q.prompt, n) for i, q in enumerate(requests) for n in near[i]}
                   | {fill(q.prompt, q.subject) for q in requests})
    base = dict(zip(texts, next_token_logprobs(lm.model, lm.tokenizer, texts)))
    fact_before = []
    for fact, fids in zip(kept, fact_ids):
        lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(fact.prompt, q.subject)
                                                          for q in requests])
        fact_before.append(fids[lp[:, fids].argmax(-1)].tolist())
    scores: list[EditScore] = []
    bar = tqdm(total=len(records), desc="evaluate", unit="edit", disable=not progress)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        for layer in {r.layer for r in part}:
            check_layer(lm.model, lm.arch, layer)
        if len({r.layer for r in part}) != 1:
            raise ValueError("records of one evaluation chunk must share a layer.")
        prompts, owner = [], []
        for j, r in enumerate(part):
            q, i = r.request, start + j
            texts_j = ([fill(q.prompt, q.subject)] + [fill(p.prompt, q.subject)
                                                      for p in q.paraphrases]
                       + [fill(q.prompt, n) for n in near[i]]
                       + [fill(f.prompt, q.subject) for f in kept])
            prompts += texts_j
            owner += [j] * len(texts_j)
        u, lam = stacked_terms(part)
        idx = torch.tensor(owner)
        with row_edits(lm, part[0].layer, u[idx], lam[idx]):
            lp = next_token_logprobs(lm.model, lm.tokenizer, prompts, len(prompts))
        offset = 0
        for j, r in enumerate(part):
            q, i = r.request, start + j
            n_rows = 1 + len(q.paraphrases) + len(near[i]) + len(kept)
            rows = lp[offset : offset + n_rows]
            offset += n_rows
            new_id, old_id = ids[i]
            wins = [bool(row[a] > row[b]) for row, (a, b) in
                    zip(rows, [ids[i], *para_ids[i]])]
            nb = rows[1 + len(q.paraphrases) : 1 + len(q.paraphrases) + len(near[i])]
            kept_nb = [bool((after[new_id] > after[old_id]) ==
                            (base[fill(q.prompt, n)][new_id] > base[fill(q.prompt, n)][old_id]))
                       for after, n in zip(nb, near[i])]
            fact_rows = rows[n_rows - len(kept) :]
            facts = {f.name: int(fids[row[fids].argmax()]) == before[i]
                     for f, fids, row, before in zip(kept, fact_ids, fact_rows, fact_before)}
            n_same = len(split[i][0])
            scores.append(EditScore(
                subject=q.subject, efficacy=wins[0],
                paraphrase=_mean(wins[1:]), specificity=_mean(kept_nb),
                specificity_same_last_token=_mean(kept_nb[:n_same]),
                specificity_random=_mean(kept_nb[n_same:]),
                p_new_before=math.exp(base[fill(q.prompt, q.subject)][new_id].item()),
                p_new_after=math.exp(rows[0, new_id].item()),
                p_old_after=math.exp(rows[0, old_id].item()),
                kept=facts,
            ))
        bar.update(len(part))
    bar.close()
    return scores


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


SUMMARY_KEYS = ("efficacy", "paraphrase", "specificity", "specificity_same_last_token",
                "specificity_random", "p_new_before", "p_new_after", "fluency_before",
                "fluency_after")


def summarize(scores: Sequence[EditScore | dict[str, Any]]) -> dict[str, float | None]:
    """Mean of each metric (success rates, ``<fact>_kept`` included; ``mean_p_*`` are
    probabilities; ``fluency_*`` are n-gram entropies in bits, over the rows that have them),
    skipping ``None``."""
    rows = [s if isinstance(s, dict) else s.to_dict() for s in scores]
    facts = sorted({k for r in rows for k in r if k.endswith("_kept")})
    keys = (*SUMMARY_KEYS, *facts)
    out = {k: _mean_of([None if r.get(k) is None else float(r[k]) for r in rows]) for k in keys}
    out["mean_p_new_before"] = out.pop("p_new_before")
    out["mean_p_new_after"] = out.pop("p_new_after")
    return out


def _mean_of(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def ngram_entropy(texts: Sequence[str]) -> float:
    """ROME's fluency: mean over texts of mean(2/3·H₂, 4/3·H₃) over whitespace words (bits)."""
    values = []
    for text in texts:
        words = text.split()
        parts = []
        for n, weight in ((2, 2 / 3), (3, 4 / 3)):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            total = sum(grams.values())
            h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
            parts.append(weight * h)
        values.append(sum(parts) / len(parts))
    return sum(values) / max(1, len(values))


def generations(lm: LoadedModel, record: EditRecord, prompt: str | None = None,
                max_new_tokens: int = 20) -> dict[str, str]:
    """Greedy completions of the edit prompt before and after the edit (source-document style)."""
    text = fill(prompt or record.request.prompt, record.request.subject)
    before = generate(lm.model, lm.tokenizer, text, max_new_tokens)
    with applied(lm, [record]):
        after = generate(lm.model, lm.tokenizer, text, max_new_tokens)
    return {"prompt": text, "before": before, "after": after}


def edit_fluency(lm: LoadedModel, record: EditRecord, max_new_tokens: int = 30
                 ) -> dict[str, str | float]:
    """Greedy generations of the edit prompt before/after ``record`` (the source document's
    ``Name: Ani. Gender: …``) and their n-gram entropy in bits (ROME's fluency)."""
    g = generations(lm, record, max_new_tokens=max_new_tokens)
    return {"generation_before": g["before"], "generation_after": g["after"],
            "fluency_before": ngram_entropy([g["prompt"] + g["before"]]),
            "fluency_after": ngram_entropy([g["prompt"] + g["after"]])}
