"""Eager vs sdpa attention on the bundled model: how far apart are the edits and the traces?

    python scripts/measure_attention.py [--n 32] [--out benchmarks/results/attention.json]

For float32 and bfloat16 (the half precision CPUs run), the same bundled model is loaded with
``attn_implementation="eager"`` and ``"sdpa"``; both record the preset's edits of ``--n``
names (δ = v* − v_orig, which the study analyses) and trace five names.  Reported: the largest
and median relative δ difference, whether every edit's success agrees, and the largest
absolute difference of any causal-trace effect.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from rome_edit.api.editor import Editor
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.request import EditRequest
from rome_edit.study.names import load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, other_gender
from rome_edit.tracing.noise import resolve_noise
from rome_edit.tracing.trace import trace

TRACED = ("Brittany", "David", "Margaret", "Robert", "Ani")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    args = parser.parse_args()
    names = load_names(split="edit")[: args.n]
    requests = [EditRequest(e.name, EDIT_PROMPT, ANSWERS[other_gender(e.gender)],
                            ANSWERS[e.gender]) for e in names]
    result = {}
    for dtype in ("float32", "bfloat16"):
        runs = {}
        for implementation in ("eager", "sdpa"):
            ed = Editor.load(dtype=dtype, attn_implementation=implementation)
            ed.hparams = replace(ed.hparams, mom2_adjustment=False)  # δ does not use C
            lm, hp, templates = ed.lm, ed.hparams, ed.context_templates
            records = compute_edits(lm, requests, hp, templates, progress=False)
            noise = resolve_noise(lm, "s3", EDIT_PROMPT, TRACED)  # the reference's 3σ
            traces = [trace(lm, EDIT_PROMPT, name, noise_std=noise, window=2) for name in TRACED]
            runs[implementation] = (records, traces)
        (ra, ta), (rb, tb) = runs["eager"], runs["sdpa"]
        rel = [((a.delta - b.delta).norm() / a.delta.norm()).item() for a, b in zip(ra, rb)]
        gap = max((x.effects[k].float() - y.effects[k].float()).abs().max().item()
                  for x, y in zip(ta, tb) for k in x.effects)
        result[dtype] = {
            "n_edits": len(rel), "max_relative_delta_difference": max(rel),
            "median_relative_delta_difference": statistics.median(rel),
            "n_traced": len(TRACED), "max_trace_effect_difference": gap,
            "max_trace_effect": max(x.effects[k].abs().max().item() for x in ta
                                    for k in x.effects),
        }
        print(dtype, json.dumps(result[dtype]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
