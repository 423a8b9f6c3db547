"""How much of a ROME edit reaches other names: the key overlap behind specificity.

    python scripts/measure_spillover.py [--n 200] [--layers 1 2 3] [--out vectors/spillover.json]

The paper-form update ``W ← W + Λ uᵀ`` with ``u = C⁻¹k*`` and ``Λ = (v* − W k*)/(uᵀk*)``
(Meng et al. 2022, Eq. 2) changes the layer's output for *any* key ``k`` by ``r·(v* − W k*)``
with ``r = uᵀk / uᵀk*``.  So a neighbour name whose key has ``r ≈ 1`` receives the whole edit,
whatever v* is; no choice of δ can spare it.  For each edited name this script measures ``r``
on the evaluation prompt of its neighbours (the sweep's own choice: names ending in the same
token, and random names) at each layer, with the bundled preset's context templates and
second moment.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from rome_edit.api.editor import Editor
from rome_edit.evaluation.evaluate import neighbours
from rome_edit.models.loading import load_model
from rome_edit.models.subject import last_tokens
from rome_edit.rome.key import key_stars, keys_and_values
from rome_edit.study.names import load_names
from rome_edit.study.task import EDIT_PROMPT


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "share_above_0.5": sum(v > 0.5 for v in values) / len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="edited names")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("vectors/spillover.json"))
    args = parser.parse_args()
    lm = load_model()
    names = load_names()
    edited = [e.name for e in load_names(split="edit")[: args.n]]
    pool = [e.name for e in names]
    last = last_tokens(lm.tokenizer, EDIT_PROMPT, pool)
    split = {s: neighbours(s, pool, last) for s in edited}
    result = {"n_edited": len(edited), "prompt": EDIT_PROMPT, "layers": {}}
    for layer in args.layers:
        ed = Editor.from_loaded(lm, layer=layer, progress=False)
        ed.hparams = replace(ed.hparams, v_loss_layer=max(ed.hparams.v_loss_layer, layer))
        templates, solver = ed.context_templates, ed.solver
        k_star = key_stars(lm, layer, [EDIT_PROMPT] * len(edited), edited, templates)
        u = solver.solve(k_star).float()
        scale = (u * k_star).sum(-1)
        ratios: dict[str, list[float]] = {"self": [], "same_last_token": [], "random": []}
        k_self, _ = keys_and_values(lm, layer, [EDIT_PROMPT] * len(edited), edited)
        ratios["self"] = ((u * k_self).sum(-1) / scale).tolist()
        for kind, index in (("same_last_token", 0), ("random", 1)):
            owner = [i for i, s in enumerate(edited) for _ in split[s][index]]
            others = [n for s in edited for n in split[s][index]]
            k_other, _ = keys_and_values(lm, layer, [EDIT_PROMPT] * len(others), others)
            idx = torch.tensor(owner)
            ratios[kind] = ((u[idx] * k_other).sum(-1) / scale[idx]).tolist()
        result["layers"][str(layer)] = {k: _summary(v) for k, v in ratios.items()}
        print(f"layer {layer}: " + ", ".join(
            f"{k} median r {s['median']:.2f} (r > 0.5: {s['share_above_0.5']:.0%}, n={s['n']})"
            for k, s in result["layers"][str(layer)].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
