"""``rome-edit analyze``, ``rome-edit apply`` and ``rome-edit demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rome_edit.analysis.apply_vector import VectorApplier
from rome_edit.analysis.demo import run_demo
from rome_edit.analysis.experiment import AnalysisSettings, analyze, completions
from rome_edit.analysis.gender_vector import load_gender_vector
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.data.names import load_names
from rome_edit.editing.session import context_templates_for, default_hparams, inverse_for
from rome_edit.models.identity import check_same_model


def register(subparsers: argparse._SubParsersAction) -> None:
    an = subparsers.add_parser("analyze", help="classifier, gender vector and direction "
                               "comparison on a sweep's deltas")
    an.add_argument("sweep_dir", type=Path)
    an.add_argument("--out", required=True, type=Path)
    an.add_argument("--scale", default="mean-norm",
                    help="'raw', 'mean-norm' or a multiple of the mean delta norm")
    an.add_argument("--heldout", default=None,
                    help="names CSV to apply the vector to (default: bundled held-out names)")
    an.add_argument("--no-model", action="store_true",
                    help="only the delta-space analysis (no flip rates)")
    _context_args(an)
    add_model_args(an)
    an.set_defaults(func=run_analyze)

    ap = subparsers.add_parser("apply", help="apply a vector to names (weights or activations)")
    ap.add_argument("--vector", required=True, type=Path)
    ap.add_argument("--names", default=None,
                    help="names CSV (default: the bundled held-out names)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the stored vector")
    ap.add_argument("--sign", type=int, choices=[1, -1], default=1)
    ap.add_argument("--mode", choices=["weights", "activations"], default="weights")
    ap.add_argument("--layer", type=int, default=None, help="default: the vector's layer")
    ap.add_argument("--out", required=True, type=Path)
    _context_args(ap)
    add_model_args(ap)
    ap.set_defaults(func=run_apply)

    demo = subparsers.add_parser("demo", help="the whole experiment on the bundled model")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--quick", action="store_true", help="a small subset (< 1 minute)")
    demo.add_argument("--model", default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo_cmd)


def _context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hparams", default=None, help="hparams JSON (default: the model's preset)")
    p.add_argument("--context-templates", default=None, help="JSON list of templates")
    p.add_argument("--stats", default=None, help="second-moment file (default: cached)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling context templates")


def _editing_context(lm, layer: int, args: argparse.Namespace):
    """The context templates and C⁻¹ the sweep used (same presets, seed and cache)."""
    hp = default_hparams(lm, args.hparams, layer=layer)
    return (context_templates_for(lm, hp, args.context_templates, seed=args.seed),
            inverse_for(lm, hp, args.stats))


def run_analyze(args: argparse.Namespace) -> int:
    settings = AnalysisSettings(seed=args.seed, scale=args.scale)
    if args.no_model:
        result = analyze(args.sweep_dir, args.out, settings=settings)
    else:
        lm = model_from_args(args)
        summary = json.loads((args.sweep_dir / "summary.json").read_text())
        templates, inverse = _editing_context(lm, int(summary["layer"]), args)
        heldout = load_names(args.heldout) if args.heldout else load_names(split="heldout")
        result = analyze(args.sweep_dir, args.out, lm, heldout, templates, inverse, settings)
    c = result["classifier"]
    print(f"classifier test accuracy {c['test_accuracy']:.3f} "
          f"(shuffled labels {c['shuffled_test_accuracy']:.3f})")
    print(f"gender vector |g| = {result['vector']['norm']:.2f} -> {result['vector']['file']}")
    if "vector_weights" in result:
        v, k = result["vector_weights"], result["control_weights"]
        print(f"held-out: F->M {v['flip_f_to_m']:.2f}  M->F {v['flip_m_to_f']:.2f}  keep M "
              f"{v['keep_m']:.2f}  keep F {v['keep_f']:.2f}  (random: F->M "
              f"{k['flip_f_to_m']['mean']:.2f}, M->F {k['flip_m_to_f']['mean']:.2f})")
    print(f"wrote {args.out}/analysis.json")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    gv = load_gender_vector(args.vector, expected_width=lm.model.config.hidden_size)
    check_same_model(lm, gv.model_identity, str(args.vector),
                     "pass --model for the model the vector came from.")
    layer = args.layer if args.layer is not None else gv.layer
    names = load_names(args.names) if args.names else load_names(split="heldout")
    templates, inverse = _editing_context(lm, layer, args)
    applier = VectorApplier(lm, layer, names, templates, inverse)
    vector = gv.vector.float() * args.scale * args.sign
    table = applier.flip_table(vector, args.mode)
    rows = applier.predict_male(vector, args.mode)[:, 0].tolist()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"vector": str(args.vector), "scale": args.scale, "sign": args.sign,
              "mode": args.mode, "layer": layer, "table": table.to_dict(),
              "predictions": [{"name": e.name, "gender": e.gender,
                               "predicted_after": "male" if m else "female"}
                              for e, m in zip(names, rows)]}
    if args.mode == "weights":
        result["completions"] = completions(lm, applier, vector, [e.name for e in names[:4]])
        for c in result["completions"]:
            print(f"[{c['vector']}] {c['prompt']}{c['before']}\n     -> {c['prompt']}{c['after']}")
    (args.out / "apply.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(table.to_dict(), indent=1))
    print(f"wrote {args.out}/apply.json")
    return 0


def run_demo_cmd(args: argparse.Namespace) -> int:
    report = run_demo(args.out, quick=args.quick, model=args.model, seed=args.seed)
    keys = ("model", "trace", "sweep", "classifier", "vector", "control", "seconds")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    print(f"wrote {args.out}/report.md and report.json")
    return 0
