"""Second moments that stop when ``u = C⁻¹k`` settles, against the fixed sample count.

    python benchmarks/bench_stats_stable.py [--sweep 200] [--out FILE]
    python benchmarks/bench_stats_stable.py --trajectory 64000 --model bundled [--out FILE]

For each model, ``C`` at the edit layer is computed twice over the same corpus, without the
cache: the fixed count (the preset's ``mom2_n_samples`` documents) and ``until_stable`` (the
default rule of :mod:`rome_edit.stats.stability`: min cosine 0.999 between checks 1,000
documents apart, twice in a row; probes: the keys of 64 edit names at the edit prompt).
Reported: documents and seconds each took, and the cosine between ``u = C⁻¹k`` of the two for
the keys of all 1,000 edit names (the 64 probes and the 936 others apart).

* ``bundled``: the bundled model, edit layer 1, the bundled corpus.  A gender sweep of
  ``--sweep`` names is run with each ``C``: its metrics side by side, the largest δ difference
  (δ does not depend on ``C``: it should be 0) and the cosine of the records' ``u``.
* ``deep``: a random GPT-J of GPT-J-6B's depth at width 256 (``bench_deep.deep_model``), edit
  layer 5, the same corpus (no sweep: a random model has no facts to edit).

``--trajectory DOCS`` instead reads ``DOCS`` documents for one ``--model`` and reports every
check's cosine (at 250 documents and each doubling), never stopping: how the rule's figure
evolves, to choose ``min_cosine``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rome_edit.api.editor import Editor
from rome_edit.rome.key import keys_and_values
from rome_edit.stats.corpus import bundled_corpus
from rome_edit.stats.second_moment import compute_second_moment
from rome_edit.stats.stability import Stability, StabilityMonitor
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.sweep import run_gender_sweep
from rome_edit.study.task import EDIT_PROMPT

sys.path.insert(0, str(Path(__file__).parent))
from bench_deep import deep_model  # noqa: E402

METRICS = ("efficacy", "paraphrase", "specificity", "specificity_same_last_token",
           "specificity_random", "city_kept", "fluency_before", "fluency_after")


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def compare(lm, layer: int, n_samples: int, keys: torch.Tensor, n_probes: int,
            min_cosine: float, measure: str) -> tuple:
    corpus = bundled_corpus()
    t0 = time.perf_counter()
    full = compute_second_moment(lm, layer, corpus, n_samples, progress=False)
    full_s = time.perf_counter() - t0
    monitor = StabilityMonitor(Stability(keys[:n_probes], min_cosine=min_cosine,
                                         measure=measure))
    t0 = time.perf_counter()
    early = compute_second_moment(lm, layer, corpus, n_samples, progress=False,
                                  until_stable=monitor)
    early_s = time.perf_counter() - t0
    cos = (unit(full.inverse().solve(keys.double())) *
           unit(early.inverse().solve(keys.double()))).sum(-1)
    row = {
        "layer": layer, "fixed_documents": full.n_documents, "fixed_tokens": full.n_tokens,
        "fixed_seconds": full_s, "stable_documents": early.n_documents,
        "stable_tokens": early.n_tokens, "stable_seconds": early_s,
        "documents_saved": 1 - early.n_documents / full.n_documents,
        "seconds_saved": 1 - early_s / full_s, "stopping": early.stopping,
        "checks": [c.__dict__ for c in monitor.checks],
        "u_cosine_probes": {"min": cos[:n_probes].min().item(),
                            "mean": cos[:n_probes].mean().item()},
        "u_cosine_other_names": {"min": cos[n_probes:].min().item(),
                                 "mean": cos[n_probes:].mean().item()},
    }
    print(json.dumps({k: v for k, v in row.items() if k != "checks"}, indent=1), flush=True)
    return row, full, early


def trajectory(lm, layer: int, keys: torch.Tensor, n_documents: int, measure: str) -> dict:
    monitor = StabilityMonitor(Stability(keys, first_check=250, patience=10**9,
                                         measure=measure))
    t0 = time.perf_counter()
    compute_second_moment(lm, layer, bundled_corpus(), n_documents, progress=False,
                          until_stable=monitor)
    return {"layer": layer, "measure": measure, "seconds": time.perf_counter() - t0,
            "checks": [c.__dict__ for c in monitor.checks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=int, default=200, help="names in the bundled sweep")
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--min-cosine", type=float, default=0.999)
    parser.add_argument("--measure", choices=["key-weighted", "euclidean"],
                        default="key-weighted")
    parser.add_argument("--skip-deep", action="store_true")
    parser.add_argument("--trajectory", type=int, default=None, metavar="DOCS")
    parser.add_argument("--model", choices=["bundled", "deep"], default="bundled")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stats_stable.json"))
    args = parser.parse_args()
    ed = Editor.load()
    bundled, hp = ed.lm, ed.hparams
    names = balanced_names(load_names(split="edit"), None)
    subjects = [e.name for e in names]
    if args.trajectory:
        lm, layer = ((bundled, hp.layer) if args.model == "bundled"
                     else (deep_model("gptj", bundled.tokenizer), 5))
        keys, _ = keys_and_values(lm, layer, [EDIT_PROMPT] * args.probes, subjects[: args.probes])
        result = trajectory(lm, layer, keys, args.trajectory, args.measure)
        print(json.dumps(result, indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        return
    result = {"threads": torch.get_num_threads(), "n_samples": hp.mom2_n_samples,
              "probes": args.probes, "min_cosine": args.min_cosine,
              "measure": args.measure}
    keys, _ = keys_and_values(bundled, hp.layer, [EDIT_PROMPT] * len(subjects), subjects)
    result["bundled"], full, early = compare(bundled, hp.layer, hp.mom2_n_samples, keys,
                                             args.probes, args.min_cosine, args.measure)
    templates = ed.context_templates
    sweeps = {}
    for name, stats in (("fixed", full), ("stable", early)):
        inverse = stats.inverse().with_provenance({"model_identity": bundled.identity,
                                                        "layer": hp.layer, "d_mlp": stats.d_mlp})
        with tempfile.TemporaryDirectory() as out:
            summary = run_gender_sweep(bundled, names[: args.sweep], hp, templates, out,
                                       inverse, progress=False)
            sweeps[name] = (summary, load_file(str(Path(out) / "deltas.safetensors")))
    result["bundled"]["sweep"] = {
        "n_names": args.sweep,
        **{m: {k: sweeps[k][0].get(m) for k in sweeps} for m in METRICS},
        "max_delta_difference": (sweeps["fixed"][1]["delta"]
                                 - sweeps["stable"][1]["delta"]).abs().max().item(),
    }
    if "u" in sweeps["fixed"][1]:
        cos = (unit(sweeps["fixed"][1]["u"]) * unit(sweeps["stable"][1]["u"])).sum(-1)
        result["bundled"]["sweep"]["record_u_cosine"] = {"min": cos.min().item(),
                                                        "mean": cos.mean().item()}
    print(json.dumps(result["bundled"]["sweep"], indent=1), flush=True)
    if not args.skip_deep:
        deep = deep_model("gptj", bundled.tokenizer)
        deep_keys, _ = keys_and_values(deep, 5, [EDIT_PROMPT] * len(subjects), subjects)
        result["deep"], _, _ = compare(deep, 5, hp.mom2_n_samples, deep_keys, args.probes,
                                       args.min_cosine, args.measure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
