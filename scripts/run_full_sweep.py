"""Record the full sweep on the bundled model into ``vectors/bundled-sweep``.

    python scripts/run_full_sweep.py [--out vectors/bundled-sweep] [--keep-shards]

Flips all 1,000 recorded-edit names at the bundled preset's layer (the layer ``rome-edit
locate`` recommends), with the preset's hyperparameters, seeded context templates and cached
second-moment statistics; then analyses the deltas (``analysis/`` beside the sweep, including
``gender_vector.safetensors``).  Interrupted runs resume.  The per-batch shards are removed once
the merged store is written unless ``--keep-shards`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rome_edit.api.editor import Editor
from rome_edit.study.experiment import analyze_gender as analyze
from rome_edit.study.names import load_names
from rome_edit.study.sweep import run_gender_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("vectors/bundled-sweep"))
    parser.add_argument("--keep-shards", action="store_true")
    args = parser.parse_args()
    ed = Editor.load(seed=0)
    lm, hp, templates, inverse = ed.lm, ed.hparams, ed.context_templates, ed.inverse
    names = load_names()
    summary = run_gender_sweep(lm, [e for e in names if e.split == "edit"], hp, templates,
                               args.out, inverse, neighbour_names=names)
    if not args.keep_shards:
        shutil.rmtree(args.out / "shards", ignore_errors=True)
    analysis = analyze(args.out, args.out / "analysis", lm,
                       [e for e in names if e.split == "heldout"], templates, inverse)
    print(json.dumps({k: summary[k] for k in ("n_edits", "layer", "efficacy", "paraphrase",
                                              "specificity", "specificity_same_last_token",
                                              "specificity_random", "city_kept",
                                              "fluency_before", "fluency_after",
                                              "seconds_per_edit")}, indent=1))
    print(json.dumps({"classifier": analysis["classifier"]["test_accuracy"],
                      "vector": analysis["vector_weights"]}, indent=1))


if __name__ == "__main__":
    main()
