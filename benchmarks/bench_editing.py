"""Batched vs one-at-a-time ROME recording on the bundled model (same algorithm, same CPU).

    python benchmarks/bench_editing.py [--n 64] [--rounds 3] [--out benchmarks/results/editing.json]

Both sides use the bundled preset with the reference's 21 context templates
(``context_template_length_params [[5,10],[10,10]]``) and the same statistics;
the baseline computes each edit alone with the plain full-forward value optimisation
(``engine="simple"``), the fast side runs all names through ``engine="batched"``.  The two sides
alternate for ``--rounds`` rounds (the order swapped each round), so a slow spell of a shared
machine falls on both; the ratio is that of the per-side medians, and each round's ratio is
kept too.  Reports seconds per edit, the ratios, the agreement of the deltas and each side's
efficacy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from rome_edit.api.editor import Editor
from rome_edit.evaluation.evaluate import evaluate_edits, summarize
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.request import EditRequest
from rome_edit.study.names import load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, other_gender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/editing.json"))
    args = parser.parse_args()
    ed = Editor.load(progress=False)
    ed.hparams = replace(ed.hparams, context_template_length_params=((5, 10), (10, 10)))
    lm, hp, templates, inverse = ed.lm, ed.hparams, ed.context_templates, ed.inverse
    names = load_names(split="edit")
    names = [n for pair in zip(names[::2], names[1::2]) for n in pair][: args.n]
    requests = [EditRequest(e.name, EDIT_PROMPT, ANSWERS[other_gender(e.gender)],
                            ANSWERS[e.gender]) for e in names]

    def plain():
        return [compute_edits(lm, [r], hp, templates, inverse, engine="simple",
                              progress=False)[0] for r in requests]

    def batched():
        return compute_edits(lm, requests, hp, templates, inverse, engine="batched",
                             chunk_size=args.n, progress=False)

    seconds: dict[str, list[float]] = {"plain": [], "batched": []}
    records = {}
    for round_ in range(args.rounds):
        order = ("plain", "batched") if round_ % 2 == 0 else ("batched", "plain")
        for side in order:
            t0 = time.perf_counter()
            records[side] = plain() if side == "plain" else batched()
            seconds[side].append(time.perf_counter() - t0)
        print(f"round {round_ + 1}: plain {seconds['plain'][-1]:.1f} s, batched "
              f"{seconds['batched'][-1]:.1f} s, ratio "
              f"{seconds['plain'][-1] / seconds['batched'][-1]:.2f}", flush=True)
    t_plain, t_fast = (statistics.median(seconds[k]) for k in ("plain", "batched"))
    plain_records, fast = records["plain"], records["batched"]
    pool = [e.name for e in load_names()]
    rel = [((a.delta - b.delta).norm() / a.delta.norm()).item()
           for a, b in zip(plain_records, fast)]
    result = {
        "n_edits": len(requests), "n_context_templates": len(templates),
        "threads": torch.get_num_threads(), "layer": hp.layer, "rounds": args.rounds,
        "plain_seconds": t_plain, "batched_seconds": t_fast,
        "plain_seconds_per_edit": t_plain / len(requests),
        "batched_seconds_per_edit": t_fast / len(requests),
        "speedup": t_plain / t_fast,
        "round_plain_seconds": seconds["plain"], "round_batched_seconds": seconds["batched"],
        "round_speedups": [a / b for a, b in zip(seconds["plain"], seconds["batched"])],
        "max_relative_delta_difference": max(rel),
        "median_relative_delta_difference": sorted(rel)[len(rel) // 2],
        "plain_efficacy": summarize(evaluate_edits(lm, plain_records, pool,
                                                   progress=False))["efficacy"],
        "batched_efficacy": summarize(evaluate_edits(lm, fast, pool, progress=False))[
            "efficacy"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
