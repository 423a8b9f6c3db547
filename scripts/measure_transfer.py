"""How a sweep's gender vector transfers to held-out names, and what it depends on.

    python scripts/measure_transfer.py --model smollm2-135m-gguf \
        --sweep vectors/smollm2-sweep-one-key \
        [--extra-sweep DIR ...] --out docs/real-model/transfer.json

Issue 22 asks, where the vector transfers weakly on a real model, to find out why rather than
stop at the number: the scale, the vector's construction (the box optimum's sign corner
against the early-stopped optimisation of the source, the classifier's standardised against
raw delta space, the mean difference), and the edit layer or templates of the sweep
(``--extra-sweep``: sweeps of the same model with another layer or other templates, each
analysed the same way at its own layer).  For each direction and each scale (a multiple of the
sweep's mean ‖δ‖) the held-out names the model knows on the sweep's prompt get
``v_orig ± s·d`` written at their key (:class:`rome_edit.VectorApplier`), and ``--random``
random directions of the same norm are the control; every row carries the verdicts of
:mod:`rome_edit.analysis.flip_verdict`.  The mean ‖v_orig‖ of those names is recorded too: a
write much larger than the value it replaces erases the name, and the model then answers with
its default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_edit import DeltaSet, Editor  # noqa: E402
from rome_edit.analysis.box_vector import optimise_box_vector  # noqa: E402
from rome_edit.analysis.classifier import train_classifier  # noqa: E402
from rome_edit.analysis.flip_verdict import best_informative_scale, judge_table  # noqa: E402
from rome_edit.evaluation.vectors import random_directions  # noqa: E402
from rome_edit.study.experiment import gender_applier  # noqa: E402
from rome_edit.study.known import known_names  # noqa: E402
from rome_edit.study.names import balanced_names, load_names  # noqa: E402

SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
FLIPS = ("flip_label1", "flip_label0")


def directions(ds: DeltaSet, seed: int) -> dict[str, torch.Tensor]:
    """Unit directions towards label 1 (female → male edits), built five ways."""
    clf = ds.probe(seed=seed)  # per-coordinate standardised (the library's default)
    raw = train_classifier(ds.deltas, ds.labels, seed=seed, standardize="none",
                           classes=ds.classes)
    ones = ds.labels == 1
    found = {
        "box (sign corner, standardised probe)": optimise_box_vector(clf.probe).vector,
        "box (probability objective, stops early)":
            optimise_box_vector(clf.probe, objective="probability").vector,
        "box (sign corner, raw-space probe)": optimise_box_vector(raw.probe).vector,
        "classifier weights": clf.weights,
        "mean difference": ds.deltas[ones].double().mean(0) - ds.deltas[~ones].double().mean(0),
    }
    return {k: (v.double() / v.double().norm()).float() for k, v in found.items()}


def measure(ed: Editor, sweep: Path, n_heldout: int, scales: tuple[float, ...], n_random: int,
            seed: int) -> dict:
    """Every direction of ``sweep`` at every scale on the known held-out names."""
    lm = ed.lm
    summary = json.loads((sweep / "summary.json").read_text())
    prompt = summary["prompt"]
    ds = DeltaSet.from_sweep(sweep)
    known = known_names(lm, load_names(split="heldout"), prompt)
    heldout = balanced_names(list(known.names), n_heldout)
    t0 = time.perf_counter()
    applier = gender_applier(lm, ds.layer, heldout, ed.context_templates, ed.inverse, prompt)
    v_orig = float(applier.v_orig.norm(dim=1).mean())
    controls = {}
    for s in scales:
        tables = [applier.flip_table(r).to_dict() for r in
                  random_directions(ds.width, s * ds.mean_norm, range(1000, 1000 + n_random))]
        controls[s] = {k: statistics.fmean(t[k] for t in tables) for k in FLIPS}
    rows = []
    for name, d in directions(ds, seed).items():
        tables = [applier.flip_table(d * s * ds.mean_norm).to_dict() for s in scales]
        for s, t in zip(scales, tables, strict=True):
            verdicts = {v.key: v.verdict for v in judge_table(t, controls[s])}
            rows.append({"direction": name, "scale": s, "norm": s * ds.mean_norm,
                         **{k: t[k] for k in (*FLIPS, "keep_label0", "keep_label1")},
                         **{f"control_{k}": controls[s][k] for k in FLIPS},
                         **{f"verdict_{k}": verdicts[k] for k in FLIPS}})
        best = best_informative_scale(scales, tables, [controls[s] for s in scales])
        rows.append({"direction": name, "best_informative_scale": best})
        print(f"{sweep.name} {name}: best informative scale "
              f"{best['scale'] if best else None}", flush=True)
    return {"sweep": str(sweep), "layer": ds.layer, "prompt": prompt,
            "n_deltas": ds.n, "mean_delta_norm": ds.mean_norm,
            "heldout": {"n": len(heldout), "n_female": int(applier.label1.sum()),
                        "known": known.to_json(), "mean_v_orig_norm": v_orig,
                        "baseline_accuracy": applier.baseline_accuracy()},
            "controls": {str(s): c for s, c in controls.items()}, "rows": rows,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--sweep", type=Path, default=Path("vectors/smollm2-sweep"))
    parser.add_argument("--extra-sweep", type=Path, nargs="*", default=[])
    parser.add_argument("--n-heldout", type=int, default=60)
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = []
    for sweep in [args.sweep, *args.extra_sweep]:
        ed = Editor.from_sweep(sweep, args.model, progress=False)
        results.append(measure(ed, sweep, args.n_heldout, tuple(args.scales), args.random,
                               args.seed))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": ed.lm.identity, "results": results},
                                       indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
