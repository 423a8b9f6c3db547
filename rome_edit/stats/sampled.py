"""A corpus of text sampled from the model itself, for models with no corpus at hand.

ROME's ``C = E[k kᵀ]`` should be estimated on text like what the model reads in use (the
reference: Wikipedia).  When no such text is available offline, the model's own samples are the
one source that always exists: ancestral sampling (temperature 1, no top-k) from the start-of-
text token approximates the model's *training distribution as the model learned it*.  What that
means, and why a warning is logged when it is used:

* keys of inputs the model rarely generates (unusual spellings, other languages, long-range
  structure beyond ``length`` tokens) are under-represented, so ``C`` is less well conditioned
  in those directions and edits may spill more onto such inputs;
* a small or badly trained model samples repetitive text, which narrows ``C`` further;
* the text depends on the weights, the seed and (through float rounding) the device, so it is
  identified by the model's fingerprint, the seed and the length, and cached like any corpus.

Prefer real text when it exists: ``--corpus debian-handbook`` (:mod:`rome_edit.stats.handbook`)
or a folder of text files (``--corpus DIR``).

Cost: each text is ``length − 1`` forward steps of the *whole* model, batched (``batch`` texts
at once) with the KV cache, so a step processes one new token per text.  On a CPU the steps are
matrix products (84% of a step's time on SmolLM2-135M); a preallocated static cache instead of
the growing one measured no faster there.  The statistics pass on the same text then runs the
blocks up to the edit layer only.  Sampling is therefore several times dearer per token than the
statistics on real text (docs/statistics.md has the figures).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from rome_edit.models.compat import cache_kwargs, output_cache
from rome_edit.models.loading import LoadedModel
from rome_edit.stats.text_corpus import CorpusError, TextCorpus

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_LENGTH = 64  # tokens per sampled document, start token included
DEFAULT_SAMPLE_BATCH = 128
EMPTY_BATCHES_ALLOWED = 3
SAMPLED_WARNING = (
    "second-moment statistics on text sampled from the model itself (corpus 'sampled'): "
    "they reflect what the model generates, not real text, so inputs it rarely produces are "
    "under-represented in C; for real text pass corpus='debian-handbook' (apt-get install "
    "debian-handbook) or corpus='DIR', a folder of .txt files (command line: --corpus)."
)


@torch.no_grad()
def _sample_batch(lm: LoadedModel, start: int, n: int, length: int,
                  generator: torch.Generator) -> list[str]:
    """``n`` texts of ``length`` tokens (the start token included), ancestral sampling."""
    ids = torch.full((n, 1), start, dtype=torch.long, device=lm.device)
    past = None
    for _ in range(length - 1):
        out = lm.model(input_ids=ids if past is None else ids[:, -1:], use_cache=True,
                       **cache_kwargs(lm.model, past))
        past = output_cache(out)
        probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).to(lm.device)
        ids = torch.cat([ids, nxt], dim=1)
    return [lm.tokenizer.decode(row, skip_special_tokens=True) for row in ids[:, 1:]]


def sampled_corpus(lm: LoadedModel, seed: int = 0, length: int = DEFAULT_SAMPLE_LENGTH,
                   batch: int = DEFAULT_SAMPLE_BATCH) -> TextCorpus:
    """An endless, re-iterable stream of texts sampled from ``lm`` (the statistics pass takes
    the first ``n_samples``); the same seed gives the same texts on the same device.  Call
    ``corpus.prepare(n)`` before a statistics pass: sampling runs the model, which must not
    happen inside that pass's hooks (:func:`rome_edit.assembly.session.inverse_for` does);
    from then on the corpus is the texts sampled so far (at least ``n``).

    Id: ``sampled:<model fingerprint>:seed<seed>:len<length>:batch<batch>``.
    """
    tok = lm.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise CorpusError("the tokenizer has neither a BOS nor an EOS token to sample from; "
                          "pass a real text corpus (corpus='DIR', a folder of .txt files) "
                          "instead of 'sampled'.", parameters=("corpus",))
    if length < 2 or batch < 1:
        raise CorpusError(f"sampled corpus needs length ≥ 2 and batch ≥ 1 (got {length}, "
                          f"{batch}).")
    log.warning(SAMPLED_WARNING)

    # Texts are sampled once, in order, and kept: statistics of several layers (calibration)
    # re-read the same corpus, and one generator consumed in batches gives the same texts
    # however many passes ask for them.
    texts: list[str] = []
    prepared: list[int] = []  # the counts prepare() was called with
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def more() -> None:
        for _ in range(EMPTY_BATCHES_ALLOWED):
            before = len(texts)
            texts.extend(t for t in _sample_batch(lm, start, batch, length, generator)
                         if t.strip())
            if len(texts) > before:
                return
        raise CorpusError(f"the model sampled only empty text in {EMPTY_BATCHES_ALLOWED} "
                          "batches; pass a real text corpus (corpus='DIR', a folder of .txt "
                          "files) instead of 'sampled'.", parameters=("corpus",))

    def prepare(n: int) -> None:
        prepared.append(n)
        bar = tqdm(total=n, initial=min(n, len(texts)), unit="text",
                   desc=f"sampling {length}-token texts from the model for C",
                   disable=n <= len(texts))
        while len(texts) < n:
            have = len(texts)
            more()
            bar.update(min(n, len(texts)) - have)
        bar.close()

    def documents() -> Iterator[str]:
        if prepared:  # fixed at what prepare() sampled: a pass must not sample inside hooks
            yield from list(texts)
            return
        index = 0
        while True:
            if index >= len(texts):
                more()
            yield texts[index]
            index += 1

    # The batch shapes the random draws, so it is part of what names the text.
    return TextCorpus(f"sampled:{lm.fingerprint}:seed{seed}:len{length}:batch{batch}",
                      documents, prepare)
