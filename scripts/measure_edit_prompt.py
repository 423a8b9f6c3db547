"""Should the gender edit's prompt carry the few-shot prefix? (docs/real-model.md)

Edits the same known names twice — once on the plain prompt ``Name: {}. Gender:``, once on the
few-shot prompt (:data:`rome_edit.study.known.FEW_SHOT_PROMPT`) — and scores every edit on both
prompts and on the paraphrases, with the model's preset (layer, statistics, templates).  Also
reports how much the prefix moves the subject's key ``k*`` (cosine) at the edit layer.

    python scripts/measure_edit_prompt.py --model smollm2-135m-gguf --n 24 --out runs/prompt.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rome_edit import Editor
from rome_edit.models.scoring import choose_between
from rome_edit.models.subject import fill
from rome_edit.rome.compute import compute_edits
from rome_edit.study.known import FEW_SHOT_PROMPT, known_names
from rome_edit.study.names import load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, PARAPHRASES, gender_requests
from rome_edit.weights.write import applied

PROMPTS = {"plain": EDIT_PROMPT, "few-shot": FEW_SHOT_PROMPT}


def balanced(entries, n):
    f = [e for e in entries if e.gender == "female"][: n // 2]
    m = [e for e in entries if e.gender == "male"][: n - len(f)]
    return f + m


def success(lm, names, new_genders, template, answers):
    """Fraction of ``names`` whose argmax between the answers is their new gender."""
    pred = choose_between(lm.model, lm.tokenizer, [fill(template, n) for n in names],
                          [answers["female"], answers["male"]]).tolist()
    return sum((p == 1) == (g == "male") for p, g in zip(pred, new_genders)) / len(names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ed = Editor.load(model=args.model)
    lm, hp = ed.lm, ed.hparams
    known = known_names(lm, load_names(split="edit")[:200]).names
    entries = balanced(list(known), args.n)
    result: dict = {"model": lm.identity, "layer": hp.layer, "n": len(entries), "edits": {}}
    keys = {}
    for label, prompt in PROMPTS.items():
        t0 = time.perf_counter()
        records = compute_edits(lm, gender_requests(entries, prompt), hp, ed.context_templates,
                                ed.inverse, progress=False)
        keys[label] = torch.stack([r.k_star for r in records])
        scores: dict[str, list[float]] = {}
        for record, entry in zip(records, entries):
            new = "male" if entry.gender == "female" else "female"
            with applied(lm, [record]):
                row = {f"efficacy[{k}]": success(lm, [entry.name], [new], p, ANSWERS)
                       for k, p in PROMPTS.items()}
                for template, answers in PARAPHRASES:
                    row[f"paraphrase[{template}]"] = success(lm, [entry.name], [new], template,
                                                              answers)
            for k, v in row.items():
                scores.setdefault(k, []).append(v)
        result["edits"][label] = {
            "prompt": prompt, "seconds_per_edit": (time.perf_counter() - t0) / len(entries),
            "mean_delta_norm": float(torch.stack([r.delta.norm() for r in records]).mean()),
            **{k: sum(v) / len(v) for k, v in scores.items()}}
    cos = torch.nn.functional.cosine_similarity(keys["plain"], keys["few-shot"], dim=-1)
    result["k_star_cosine_plain_vs_few_shot"] = {"mean": float(cos.mean()),
                                                 "min": float(cos.min())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
