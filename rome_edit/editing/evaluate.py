"""Evaluating name → gender edits with CounterFact's conventions, named unambiguously.

For each edit (applied alone, then reverted bit-identically):

* ``efficacy`` — success: the new gender's token beats the old one on ``Name: {}. Gender:``.
* ``paraphrase`` — success rate over the paraphrase prompts (pronoun ``{} said that`` → she/he,
  ``Record for {}:`` → female/male): the new gender's answer beats the old one.
* ``specificity`` — success rate over neighbour names (some sharing the edited name's last
  token, the rest random): each neighbour's predicted gender is unchanged by the edit.
* ``city_kept`` — the edited name's most likely city after ``"{} lives in the city of"`` is
  unchanged (compared by the city's first token, among the corpus's cities' first tokens):
  the edit did not overwrite a different fact.
* ``fluency`` — n-gram entropy of greedy generations (ROME's measure: the mean of
  ``2/3·H₂`` and ``4/3·H₃``, base-2 entropies of word bi- and tri-gram frequencies).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from rome_edit.data.corpus import CITIES
from rome_edit.data.gender_task import ANSWERS, CITY_PROMPT, EDIT_PROMPT, PARAPHRASES
from rome_edit.data.names import NameEntry
from rome_edit.editing.apply import applied, row_edits
from rome_edit.editing.record import EditRecord
from rome_edit.models.architectures import check_layer
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import (
    generate,
    next_token_logprobs,
    single_token_id,
)
from rome_edit.models.subject import fill, locate_subjects


@dataclass(frozen=True)
class NameEditScore:
    subject: str
    gender: str  # the name's gender before the edit
    efficacy: bool
    paraphrase: float
    specificity: float  # over all neighbours
    specificity_same_last_token: float | None  # neighbours ending in the same token
    specificity_random: float | None
    city_kept: bool
    p_new_before: float  # probability of the new answer token on the edit prompt
    p_new_after: float
    p_old_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def last_tokens(tokenizer, names: Sequence[str]) -> dict[str, int]:
    """Each name's last token in ``"Name: {}. Gender:"``."""
    spans = locate_subjects(tokenizer, [EDIT_PROMPT] * len(names), names)
    return {n: sp.input_ids[sp.last] for n, sp in zip(names, spans)}


def neighbours(subject: str, names: Sequence[NameEntry], last: dict[str, int],
               n_same_last: int = 5, n_random: int = 5, seed: int = 0
               ) -> tuple[list[str], list[str]]:
    """Other names: up to ``n_same_last`` ending in the same token (``last``: name → last
    token, see :func:`last_tokens`), and ``n_random`` others, chosen with a per-name seed."""
    others = [e.name for e in names if e.name != subject]
    rng = random.Random(f"{seed}:{subject}")
    same = [n for n in others if last[n] == last[subject]]
    rng.shuffle(same)
    picked = same[:n_same_last]
    rest = [n for n in others if n not in picked]
    return picked, rng.sample(rest, min(n_random, len(rest)))


def _gender_prediction(lm: LoadedModel, subjects: Sequence[str]) -> list[str]:
    lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(EDIT_PROMPT, s) for s in subjects])
    return _genders(lm, lp)


def _genders(lm: LoadedModel, lp: torch.Tensor) -> list[str]:
    ids = [single_token_id(lm.tokenizer, ANSWERS[g]) for g in ("female", "male")]
    return ["female" if a > b else "male" for a, b in lp[:, ids].tolist()]


def _city_first_tokens(lm: LoadedModel) -> torch.Tensor:
    return torch.tensor(sorted({lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][0]
                                for c in CITIES}))


def _best_city(lm: LoadedModel, subjects: Sequence[str]) -> list[int]:
    """The most likely city-initial token after ``"{} lives in the city of"``."""
    lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(CITY_PROMPT, s) for s in subjects])
    firsts = _city_first_tokens(lm)
    return firsts[lp[:, firsts].argmax(-1)].tolist()


def evaluate_edits(
    lm: LoadedModel, records: Sequence[EditRecord], names: Sequence[NameEntry],
    n_same_last: int = 5, n_random: int = 5, chunk: int = 32, progress: bool = True,
) -> list[NameEditScore]:
    """Score each name edit as if applied alone.

    Every edit is a rank-one change of one layer, so a chunk of edits is scored in one batch
    with :func:`~rome_edit.editing.apply.row_edits` (each row sees only its own edit — the same
    function as writing that edit into the weights; a test compares the two).
    """
    genders = {e.name: e.gender for e in names}
    subjects = [r.request.subject for r in records]
    last = last_tokens(lm.tokenizer, [e.name for e in names] + subjects)
    split = {s: neighbours(s, names, last, n_same_last, n_random) for s in subjects}
    near = {s: same + rand for s, (same, rand) in split.items()}
    involved = sorted({*subjects, *(n for v in near.values() for n in v)})
    before = dict(zip(involved, _gender_prediction(lm, involved)))
    city_before = dict(zip(subjects, _best_city(lm, subjects)))
    edit_lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(EDIT_PROMPT, s) for s in subjects])
    scores: list[NameEditScore] = []
    bar = tqdm(total=len(records), desc="evaluate", unit="edit", disable=not progress)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        for layer in {r.layer for r in part}:
            check_layer(lm.model, lm.arch, layer)
        if len({r.layer for r in part}) != 1:
            raise ValueError("records of one evaluation chunk must share a layer.")
        prompts, owner = [], []
        for j, r in enumerate(part):
            s = r.request.subject
            rows = ([fill(EDIT_PROMPT, s)] + [fill(p, s) for p, _ in PARAPHRASES]
                    + [fill(EDIT_PROMPT, n) for n in near[s]])
            prompts += rows
            owner += [j] * len(rows)
        city_row = len(prompts)
        prompts += [fill(CITY_PROMPT, r.request.subject) for r in part]
        owner += list(range(len(part)))
        u = torch.stack([r.u for r in part])
        lam = torch.stack([r.lam for r in part])
        idx = torch.tensor(owner)
        with row_edits(lm, part[0].layer, u[idx], lam[idx]):
            lp = next_token_logprobs(lm.model, lm.tokenizer, prompts, len(prompts))
        firsts = _city_first_tokens(lm)
        city = firsts[lp[city_row:, firsts].argmax(-1)].tolist()
        offset = 0
        for j, r in enumerate(part):
            i = start + j
            s = r.request.subject
            n_rows = 1 + len(PARAPHRASES) + len(near[s])
            rows = lp[offset : offset + n_rows]
            offset += n_rows
            old = genders.get(s) or ("male" if r.request.target_new == ANSWERS["female"]
                                     else "female")
            new = "male" if old == "female" else "female"
            wins = []
            for row, ans in zip(rows, [ANSWERS] + [a for _, a in PARAPHRASES]):
                wins.append(bool(row[single_token_id(lm.tokenizer, ans[new])] >
                                 row[single_token_id(lm.tokenizer, ans[old])]))
            after_nb = _genders(lm, rows[1 + len(PARAPHRASES):])
            kept = [a == before[n] for a, n in zip(after_nb, near[s])]
            new_id = single_token_id(lm.tokenizer, ANSWERS[new])
            old_id = single_token_id(lm.tokenizer, ANSWERS[old])
            scores.append(NameEditScore(
                subject=s, gender=old, efficacy=wins[0],
                paraphrase=sum(wins[1:]) / len(PARAPHRASES),
                specificity=sum(kept) / max(1, len(kept)),
                specificity_same_last_token=_mean(kept[: len(split[s][0])]),
                specificity_random=_mean(kept[len(split[s][0]) :]),
                city_kept=city[j] == city_before[s],
                p_new_before=math.exp(edit_lp[i, new_id].item()),
                p_new_after=math.exp(rows[0, new_id].item()),
                p_old_after=math.exp(rows[0, old_id].item()),
            ))
        bar.update(len(part))
    bar.close()
    return scores


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(scores: Sequence[NameEditScore | dict]) -> dict[str, float | None]:
    """Mean of each metric (success rates; ``mean_p_*`` are probabilities; ``fluency_*`` are
    n-gram entropies in bits, over the rows that have them), skipping ``None``."""
    rows = [s if isinstance(s, dict) else s.to_dict() for s in scores]
    keys = ("efficacy", "paraphrase", "specificity", "specificity_same_last_token",
            "specificity_random", "city_kept", "p_new_before", "p_new_after",
            "fluency_before", "fluency_after")
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


def edit_fluency(lm: LoadedModel, record: EditRecord, max_new_tokens: int = 30) -> dict:
    """Greedy generations of the edit prompt before/after ``record`` (the source document's
    ``Name: Ani. Gender: …``) and their n-gram entropy in bits (ROME's fluency)."""
    g = generations(lm, record, max_new_tokens=max_new_tokens)
    return {"generation_before": g["before"], "generation_after": g["after"],
            "fluency_before": ngram_entropy([g["prompt"] + g["before"]]),
            "fluency_after": ngram_entropy([g["prompt"] + g["after"]])}
