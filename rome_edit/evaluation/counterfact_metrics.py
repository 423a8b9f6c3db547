"""ROME's CounterFact and zsRE metrics of one model state on one case, and a generation check.

Probabilities are CounterFact's (Meng et al. 2022, §4.2): ``P[o] = exp(mean log p)`` over the
target's tokens after the prompt and a space, teacher-forced.  Per case (means over the case's
prompts, as the reference's summary):

* ``efficacy_score`` ES = [P[new] > P[true]] on the rewrite prompt; ``efficacy_magnitude``
  EM = P[new] − P[true];
* ``paraphrase_score``/``_magnitude`` PS/PM: the same over the paraphrase prompts;
* ``neighborhood_score``/``_magnitude`` NS/NM: [P[true] > P[new]] and P[true] − P[new] over
  the neighbourhood prompts (other subjects whose answer is ``target_true``);
* ``attribute_score``: [P[new] > P[true]] over attribute prompts (subjects whose answer is
  ``target_new``), when the case has them;
* ``generation_entropy``: ROME's fluency, :func:`~rome_edit.evaluation.evaluate.ngram_entropy`
  of the prompt plus greedy continuation of each generation prompt.

zsRE (ROME's Table 1): ``efficacy_accuracy``, ``paraphrase_accuracy``,
``specificity_accuracy`` are the fractions of target tokens that are the model's argmax when
the target is teacher-forced (for specificity: the Natural Questions answer ``loc_ans`` after
``loc + "?"``).

Teacher-forced scores overstate success (Yang et al. 2025, arXiv 2502.11177), so both formats
also report ``generated_efficacy``/``generated_paraphrase``: the greedy continuation of the
prompt starts with ``target_new`` (whole words: "Rome" does not match "Romeo").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rome_edit.evaluation.counterfact_data import CounterFactCase, ZsreCase
from rome_edit.evaluation.evaluate import ngram_entropy
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id, right_pad, sequence_logprob

__all__ = ["COUNTERFACT_METRICS", "ZSRE_METRICS", "greedy_batch", "measure_counterfact",
           "measure_zsre", "starts_with_target", "token_hits"]

COUNTERFACT_METRICS = ("efficacy_score", "efficacy_magnitude", "paraphrase_score",
                       "paraphrase_magnitude", "neighborhood_score", "neighborhood_magnitude",
                       "attribute_score", "generation_entropy", "generated_efficacy",
                       "generated_paraphrase")
ZSRE_METRICS = ("efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy",
                "generated_efficacy", "generated_paraphrase")

Metrics = dict[str, float | None]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _probabilities(lm: LoadedModel, prompts: Sequence[str], new: str, true: str
                   ) -> tuple[list[float], list[float]]:
    """CounterFact's P[new] and P[true] after each prompt (exp of mean token log-prob)."""
    if not prompts:
        return [], []
    n = len(prompts)
    lp = sequence_logprob(lm.model, lm.tokenizer, [*prompts, *prompts],
                          [" " + new] * n + [" " + true] * n).exp().tolist()
    return lp[:n], lp[n:]


def starts_with_target(continuation: str, target: str) -> bool:
    """Whether ``continuation`` begins with ``target`` as whole words (spaces ignored)."""
    text, want = continuation.lstrip(), target.strip()
    return text.startswith(want) and (len(text) == len(want) or not text[len(want)].isalnum())


@torch.no_grad()
def greedy_batch(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of several prompts in one left-padded ``generate`` call (the
    attention mask hides the padding; positions come from the mask), without the prompts."""
    if not prompts:
        return []
    device = next(lm.model.parameters()).device
    encoded = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width, pad = max(map(len, encoded)), pad_id(lm.tokenizer)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    out = lm.model.generate(  # type: ignore[operator]  # nn.Module attribute typing
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad)
    return [str(lm.tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out]


def _generated(lm: LoadedModel, prompts: Sequence[str], target: str) -> list[float]:
    # enough tokens for the target and the character after it (the whole-word check)
    n = len(lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 1
    return [float(starts_with_target(c, target)) for c in greedy_batch(lm, prompts, n)]


def measure_counterfact(lm: LoadedModel, case: CounterFactCase, generation_tokens: int = 50
                        ) -> tuple[Metrics, list[str]]:
    """The CounterFact metrics of the model as it is now, and its generations."""
    new, true = case.target_new, case.target_true
    groups = {"efficacy": [case.rewrite_prompt], "paraphrase": list(case.paraphrase_prompts),
              "neighborhood": list(case.neighborhood_prompts),
              "attribute": list(case.attribute_prompts)}
    flat = [p for prompts in groups.values() for p in prompts]
    p_new, p_true = _probabilities(lm, flat, new, true)
    out: Metrics = {}
    start = 0
    for name, prompts in groups.items():
        pn, pt = p_new[start : start + len(prompts)], p_true[start : start + len(prompts)]
        start += len(prompts)
        if name == "neighborhood":  # the old answer must still win
            out["neighborhood_score"] = _mean([float(t > n) for n, t in zip(pn, pt)])
            out["neighborhood_magnitude"] = _mean([t - n for n, t in zip(pn, pt)])
            continue
        out[f"{name}_score"] = _mean([float(n > t) for n, t in zip(pn, pt)])
        if name != "attribute":
            out[f"{name}_magnitude"] = _mean([n - t for n, t in zip(pn, pt)])
    texts = [p + c for p, c in zip(case.generation_prompts,
                                   greedy_batch(lm, case.generation_prompts, generation_tokens))]
    out["generation_entropy"] = ngram_entropy(texts) if texts else None
    hits = _generated(lm, [case.rewrite_prompt, *case.paraphrase_prompts], new)
    out["generated_efficacy"], out["generated_paraphrase"] = hits[0], _mean(hits[1:])
    return {k: out[k] for k in COUNTERFACT_METRICS}, texts


@torch.no_grad()
def token_hits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
               prompts: Sequence[str], continuations: Sequence[str]) -> list[list[bool]]:
    """For each prompt: whether each token of its continuation (tokenized alone, as the
    reference's zsRE evaluation) is the model's argmax given the prompt and the continuation's
    earlier tokens (teacher forcing)."""
    device = next(model.parameters()).device
    heads = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tails = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if any(not t for t in tails):
        raise ValueError("an answer tokenizes to nothing; give non-empty answers.")
    ids, mask = right_pad([h + t for h, t in zip(heads, tails)], pad_id(tokenizer), device)
    best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu()
    return [[int(best[row, len(h) - 1 + i]) == tok for i, tok in enumerate(t)]
            for row, (h, t) in enumerate(zip(heads, tails))]


def measure_zsre(lm: LoadedModel, case: ZsreCase) -> Metrics:
    """ROME's zsRE token accuracies and the generation check, for the model as it is now."""
    prompts = [case.rewrite_prompt, *case.paraphrase_prompts, case.loc + "?"]
    answers = [" " + case.target_new] * (1 + len(case.paraphrase_prompts)) + \
        [" " + case.loc_ans]
    hits = token_hits(lm.model, lm.tokenizer, prompts, answers)
    para = [h for row in hits[1:-1] for h in row]
    gen = _generated(lm, [case.rewrite_prompt, *case.paraphrase_prompts], case.target_new)
    return {"efficacy_accuracy": _mean([float(h) for h in hits[0]]),
            "paraphrase_accuracy": _mean([float(h) for h in para]),
            "specificity_accuracy": _mean([float(h) for h in hits[-1]]),
            "generated_efficacy": gen[0], "generated_paraphrase": _mean(gen[1:])}
