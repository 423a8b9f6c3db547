"""Evaluating name → gender edits with CounterFact's conventions, named unambiguously.

For each edit (applied alone, then reverted bit-identically):

* ``efficacy`` — success: the new gender's token beats the old one on ``Name: {}. Gender:``.
* ``paraphrase`` — success rate over the paraphrase prompts (pronoun ``{} said that`` → she/he,
  ``Record for {}:`` → female/male): the new gender's answer beats the old one.
* ``specificity`` — success rate over neighbour names (some sharing the edited name's last
  token, the rest random): each neighbour's predicted gender is unchanged by the edit.
* ``city_kept`` — the edited name's most likely city (among the corpus's cities, by mean token
  log-probability) is unchanged: the edit did not overwrite a different fact.
* ``fluency`` — n-gram entropy of greedy generations (ROME's measure: the mean of
  ``2/3·H₂`` and ``4/3·H₃``, base-2 entropies of word bi- and tri-gram frequencies).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from rome_edit.data.corpus import CITIES
from rome_edit.data.gender_task import ANSWERS, CITY_PROMPT, EDIT_PROMPT, PARAPHRASES
from rome_edit.data.names import NameEntry
from rome_edit.editing.apply import applied
from rome_edit.editing.record import EditRecord
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import (
    generate,
    next_token_logprobs,
    sequence_logprob,
    single_token_id,
)
from rome_edit.models.subject import fill


@dataclass(frozen=True)
class NameEditScore:
    subject: str
    gender: str  # the name's gender before the edit
    efficacy: bool
    paraphrase: float
    specificity: float
    city_kept: bool
    p_new_before: float  # probability of the new answer token on the edit prompt
    p_new_after: float
    p_old_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def neighbours(subject: str, names: Sequence[NameEntry], tokenizer, n_same_last: int = 5,
               n_random: int = 5, seed: int = 0) -> list[str]:
    """Other names: up to ``n_same_last`` ending in the same token, then random ones."""
    def last_token(name: str) -> int:
        return tokenizer(" " + name, add_special_tokens=False)["input_ids"][-1]

    target = last_token(subject)
    others = [e.name for e in names if e.name != subject]
    rng = random.Random(f"{seed}:{subject}")
    same = [n for n in others if last_token(n) == target]
    rng.shuffle(same)
    picked = same[:n_same_last]
    rest = [n for n in others if n not in picked]
    return picked + rng.sample(rest, min(n_random, len(rest)))


def _gender_prediction(lm: LoadedModel, subjects: Sequence[str]) -> list[str]:
    ids = [single_token_id(lm.tokenizer, ANSWERS[g]) for g in ("female", "male")]
    lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(EDIT_PROMPT, s) for s in subjects])
    return ["female" if a > b else "male" for a, b in lp[:, ids].tolist()]


def _best_city(lm: LoadedModel, subjects: Sequence[str]) -> list[str]:
    prompts = [fill(CITY_PROMPT, s) for s in subjects for _ in CITIES]
    scores = sequence_logprob(lm.model, lm.tokenizer, prompts, [" " + c for c in CITIES] *
                              len(subjects)).view(len(subjects), len(CITIES))
    return [CITIES[i] for i in scores.argmax(-1).tolist()]


def evaluate_edits(
    lm: LoadedModel, records: Sequence[EditRecord], names: Sequence[NameEntry],
    n_same_last: int = 5, n_random: int = 5, progress: bool = True,
) -> list[NameEditScore]:
    """Score each name edit (applied alone); the weights are restored after each."""
    genders = {e.name: e.gender for e in names}
    subjects = [r.request.subject for r in records]
    near = {s: neighbours(s, names, lm.tokenizer, n_same_last, n_random) for s in subjects}
    involved = sorted({*subjects, *(n for v in near.values() for n in v)})
    before = dict(zip(involved, _gender_prediction(lm, involved)))
    city_before = dict(zip(subjects, _best_city(lm, subjects)))
    edit_lp = next_token_logprobs(lm.model, lm.tokenizer, [fill(EDIT_PROMPT, s) for s in subjects])
    scores = []
    for i, record in enumerate(tqdm(records, desc="evaluate", unit="edit", disable=not progress)):
        s = record.request.subject
        old = genders.get(s) or ("male" if record.request.target_new == ANSWERS["female"]
                                 else "female")
        new = "male" if old == "female" else "female"
        prompts = [fill(EDIT_PROMPT, s)] + [fill(p, s) for p, _ in PARAPHRASES]
        answers = [ANSWERS] + [a for _, a in PARAPHRASES]
        with applied(lm, [record]):
            lp = next_token_logprobs(lm.model, lm.tokenizer, prompts)
            after_nb = _gender_prediction(lm, near[s])
            city_after = _best_city(lm, [s])[0]
        wins = []
        for row, ans in zip(lp, answers):
            wins.append(row[single_token_id(lm.tokenizer, ans[new])] >
                        row[single_token_id(lm.tokenizer, ans[old])])
        new_id = single_token_id(lm.tokenizer, ANSWERS[new])
        old_id = single_token_id(lm.tokenizer, ANSWERS[old])
        scores.append(NameEditScore(
            subject=s, gender=old, efficacy=bool(wins[0]),
            paraphrase=float(sum(bool(w) for w in wins[1:]) / len(PARAPHRASES)),
            specificity=float(sum(a == before[n] for a, n in zip(after_nb, near[s]))
                              / max(1, len(near[s]))),
            city_kept=city_after == city_before[s],
            p_new_before=math.exp(edit_lp[i, new_id].item()),
            p_new_after=math.exp(lp[0, new_id].item()), p_old_after=math.exp(lp[0, old_id].item()),
        ))
    return scores


def summarize(scores: Sequence[NameEditScore]) -> dict[str, float]:
    """Mean of each metric; every key says whether it is a success rate or a probability."""
    n = max(1, len(scores))
    return {
        "efficacy": sum(s.efficacy for s in scores) / n,
        "paraphrase": sum(s.paraphrase for s in scores) / n,
        "specificity": sum(s.specificity for s in scores) / n,
        "city_kept": sum(s.city_kept for s in scores) / n,
        "mean_p_new_before": sum(s.p_new_before for s in scores) / n,
        "mean_p_new_after": sum(s.p_new_after for s in scores) / n,
    }


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


def fluency(lm: LoadedModel, records: Sequence[EditRecord], max_new_tokens: int = 30
            ) -> dict[str, float]:
    """n-gram entropy of generations before and after each edit (small samples suffice)."""
    before, after = [], []
    for r in records:
        g = generations(lm, r, max_new_tokens=max_new_tokens)
        before.append(g["prompt"] + g["before"])
        after.append(g["prompt"] + g["after"])
    return {"before": ngram_entropy(before), "after": ngram_entropy(after)}


