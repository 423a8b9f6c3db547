"""The gender study's ``rome-edit analyze`` (classifier and gender vector on a sweep's deltas),
``rome-edit apply`` (the vector on names, or written into a saved model) and ``rome-edit demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rome_edit.analysis.concept_vector import load_concept_vector
from rome_edit.api.analyze import AnalysisSettings
from rome_edit.api.editor import Editor
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.cli.protect_args import add_protect_args, protection_from_args
from rome_edit.evaluation.vectors import VectorApplier
from rome_edit.forms.many import DEFAULT_MOM2_WEIGHT, MANY_FORMS, write_edits
from rome_edit.models.identity import check_same_model
from rome_edit.study.demo import run_demo
from rome_edit.study.edited_model import model_state
from rome_edit.study.experiment import (
    analyze_gender,
    completions,
    gender_applier,
    gender_tasks,
    in_gender_terms,
)
from rome_edit.study.known import known_names, prompt_template
from rome_edit.study.names import load_names
from rome_edit.study.persisted import (
    choose_persist_form,
    default_scale,
    persist_vector,
    score_persisted,
    without_pool,
)
from rome_edit.study.task import EDIT_PROMPT, gender_labels
from rome_edit.weights.persist import load_targets, save_edited

POOL = "the bundled names; 'apply --persist' of a vector protects other-names by default"


def register(subparsers: argparse._SubParsersAction) -> None:
    an = subparsers.add_parser("analyze", help="gender study: classifier, gender vector and "
                               "direction comparison on a sweep's deltas")
    an.add_argument("sweep_dir", type=Path)
    an.add_argument("--out", required=True, type=Path)
    an.add_argument("--scale", default="mean-norm",
                    help="'raw', 'mean-norm' or a multiple of the mean delta norm")
    an.add_argument("--heldout", default=None,
                    help="names CSV to apply the vector to (default: bundled held-out names)")
    an.add_argument("--known-only", action="store_true",
                    help="apply the vector only to held-out names the model gets right on the "
                         "sweep's edit prompt (recorded as 'heldout_selection'); flips are "
                         "measured on that prompt")
    an.add_argument("--no-model", action="store_true",
                    help="only the delta-space analysis (no flip rates)")
    _context_args(an)
    add_model_args(an)
    an.set_defaults(func=run_analyze)

    ap = subparsers.add_parser("apply", help="gender study: apply a vector to names (weights or "
                               "activations), or write it (or N records) into a saved model "
                               "(--persist)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", type=Path, help="vector file from 'rome-edit analyze'")
    src.add_argument("--records", nargs="+", type=Path, metavar="DIR",
                     help="with --persist: sweep folders and/or record folders whose edits are "
                          "written together")
    ap.add_argument("--names", default=None,
                    help="names CSV (default: the bundled held-out names)")
    ap.add_argument("--scale", type=float, default=None,
                    help="multiply the stored vector (default: the best scale 'analyze' "
                         "documented beside it in analysis.json, else 1)")
    ap.add_argument("--sign", type=int, choices=[1, -1], default=1)
    ap.add_argument("--prompt", default=EDIT_PROMPT,
                    help="gender prompt with '{}' for the name, where keys are read, the write "
                         "is fitted and flips are counted (default: 'Name: {}. Gender:'; "
                         "'few-shot' for the known-only filter's prompt, as the SmolLM2 sweep "
                         "used)")
    ap.add_argument("--known-only", action="store_true",
                    help="apply to the names the model gets right on --prompt only")
    ap.add_argument("--mode", choices=["weights", "activations"], default="weights")
    ap.add_argument("--layer", type=int, default=None, help="default: the vector's layer")
    ap.add_argument("--persist", action="store_true",
                    help="write the edits for all names into the weights at once and save a "
                         "standard checkpoint to --out (save_pretrained + rome_edit_edits.json)")
    ap.add_argument("--many-form", choices=[*MANY_FORMS, "fitted"], default=None,
                    help="with --persist: ROME's paper-form rank-one update, one name after "
                         "another (the reference form: --many-form sequential), MEMIT's "
                         "single-layer least-squares update, or a write fitted to every name's "
                         "measured answer, protecting other names unless --protect says "
                         "otherwise. Default: fitted for a --vector (it kept 99.8%% of other "
                         "names against 72.4%% for sequential, docs/beyond-rome.md; minutes to "
                         "write), sequential for --records or --protect none; the form used "
                         "and why is printed")
    ap.add_argument("--mom2-weight", type=float, default=DEFAULT_MOM2_WEIGHT,
                    help=f"with --many-form batched: λ_C, the weight of the statistics C (a "
                         f"mean over tokens) against the edits (default {DEFAULT_MOM2_WEIGHT:g})")
    add_protect_args(ap, POOL)
    ap.add_argument("--out", required=True, type=Path)
    _context_args(ap)
    add_model_args(ap)
    ap.set_defaults(func=run_apply)

    demo = subparsers.add_parser("demo", help="gender study: the whole experiment on the bundled "
                                 "model")
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


def _editor(lm, layer: int, args: argparse.Namespace) -> Editor:
    """The editor the sweep used at ``layer``: same presets, template seed and statistics."""
    return Editor.from_loaded(lm, hparams=args.hparams, layer=layer,
                              context_templates=args.context_templates, seed=args.seed,
                              stats=args.stats)


def run_analyze(args: argparse.Namespace) -> int:
    settings = AnalysisSettings(seed=args.seed, scale=args.scale)
    if args.no_model:
        result = analyze_gender(args.sweep_dir, args.out, settings=settings)
    else:
        lm = model_from_args(args)
        summary = json.loads((args.sweep_dir / "summary.json").read_text())
        ed = _editor(lm, int(summary["layer"]), args)
        templates, inverse = ed.context_templates, ed.inverse
        heldout = load_names(args.heldout) if args.heldout else load_names(split="heldout")
        prompt = summary.get("prompt") or EDIT_PROMPT
        if args.known_only:
            known = known_names(lm, heldout, prompt)
            heldout = list(known.names)
            print(f"known-only: {len(heldout)} of {known.n_tested} held-out names right on "
                  f"{prompt!r} (female {known.accuracy_female:.1%}, male "
                  f"{known.accuracy_male:.1%})")
            if not heldout:
                raise ValueError("the model gets no held-out name right on the sweep's "
                                 "prompt; drop --known-only.")
        result = analyze_gender(args.sweep_dir, args.out, lm, heldout, templates, inverse,
                                settings, prompt)
        if args.known_only:
            result["heldout_selection"] = known.to_json()
            (args.out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
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
    if args.records is not None and not args.persist:
        raise ValueError("--records writes edits into a saved model; add --persist.")
    if args.persist and args.mode != "weights":
        raise ValueError("--persist writes weights; drop --mode activations.")
    if args.persist and args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} is not empty; give a new --out directory for the "
                         "checkpoint.")
    prompt = prompt_template(args.prompt)
    choice = None
    if args.persist:  # refused before the model loads where the flags contradict
        choice = choose_persist_form(args.many_form, args.protect, args.records is not None)
    elif args.many_form is not None:
        raise ValueError("--many-form chooses how --persist writes; add --persist or drop it.")
    lm = model_from_args(args)
    if args.records is not None:
        return _persist_records(lm, args, choice)
    gv = load_concept_vector(args.vector, expected_width=lm.model.config.hidden_size)
    check_same_model(lm, gv.model_identity, str(args.vector),
                     "pass --model for the model the vector came from.")
    layer = args.layer if args.layer is not None else gv.layer
    names = load_names(args.names) if args.names else load_names(split="heldout")
    if args.known_only:
        known = known_names(lm, names, prompt)
        names = list(known.names)
        print(f"known-only: {len(names)} of {known.n_tested} names right on {prompt!r}")
        if not names:
            raise ValueError("the model gets none of these names right on the prompt; drop "
                             "--known-only.")
    scale, why = ((args.scale, "--scale") if args.scale is not None
                  else default_scale(args.vector, gv))
    print(f"scale {scale:.4g} ({why})")
    ed = _editor(lm, layer, args)
    templates, inverse, solver = ed.context_templates, ed.inverse, ed.solver
    if choice is not None:
        args.protect = choice.protect or "none"
    protection = protection_from_args(args, lm, layer, prompt,
                                      [e.name for e in load_names()], templates)
    vector = gv.vector.float() * scale * args.sign
    if choice is not None:
        if choice.form == "fitted" and (protection is None or not set(
                protection.bank.subjects) - {e.name for e in names}):
            choice, protection = without_pool(choice), None
        print(choice.line())
        return _persist_vector(lm, args, names, vector, layer, templates, solver, protection,
                               scale, choice.form, prompt)
    if protection is None:
        applier = gender_applier(lm, layer, names, templates, inverse, prompt)
    else:
        applier = VectorApplier(lm, layer, [e.name for e in names], gender_labels(names),
                                gender_tasks(prompt), templates, inverse, "paper", protection)
    table = in_gender_terms(applier.flip_table(vector, args.mode).to_dict())
    rows = applier.predict_b(vector, args.mode)[:, 0].tolist()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"vector": str(args.vector), "scale": scale, "sign": args.sign, "prompt": prompt,
              "mode": args.mode, "layer": layer, "table": table,
              "protection": None if protection is None else protection.manifest(),
              "predictions": [{"name": e.name, "gender": e.gender,
                               "predicted_after": "male" if m else "female"}
                              for e, m in zip(names, rows)]}
    if args.mode == "weights":
        result["completions"] = completions(lm, applier, vector, [e.name for e in names[:4]])
        for c in result["completions"]:
            print(f"[{c['vector']}] {c['prompt']}{c['before']}\n     -> {c['prompt']}{c['after']}")
    (args.out / "apply.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(table, indent=1))
    print(f"wrote {args.out}/apply.json")
    return 0


def _persist_vector(lm, args, names, vector, layer, templates, solver, protection, scale,
                    form: str, prompt: str) -> int:
    everyone = load_names()
    pool = list(dict.fromkeys([e.name for e in everyone] + [e.name for e in names]))
    before = model_state(lm, pool, prompt=prompt)
    described = {"vector": str(args.vector), "scale": scale, "sign": args.sign}
    persist_vector(lm, [e.name for e in names], vector, layer, templates, args.out, solver,
                   form, protection, args.mom2_weight, described, prompt=prompt, sign=args.sign)
    score = score_persisted(args.out, before, names, args.sign, args.attn_implementation)
    (args.out / "apply.json").write_text(json.dumps({**described, "fresh_load": score},
                                                    indent=1) + "\n")
    print(json.dumps(score, indent=1))
    print(f"wrote the edited model to {args.out} as {lm.saved_as} "
          "(AutoModelForCausalLM.from_pretrained loads it); what was written: "
          "rome_edit_edits.json, measured on a fresh load: apply.json")
    return 0


def _persist_records(lm, args, choice) -> int:
    print(choice.line())
    targets = load_targets(args.records, lm)
    ed = _editor(lm, targets.layer, args)
    templates, solver = ed.context_templates, ed.solver
    protection = protection_from_args(args, lm, targets.layer, targets.prompt,
                                      [e.name for e in load_names()], templates)
    base = lm.identity
    result = write_edits(lm, targets, choice.form, solver, protection, args.mom2_weight)
    save_edited(lm, args.out, targets, base,
                {**result.to_dict(), "records": [str(p) for p in args.records]})
    print(json.dumps(result.to_dict(), indent=1))
    print(f"wrote the edited model ({len(targets.subjects)} edits) to {args.out} as "
          f"{lm.saved_as}")
    return 0


def run_demo_cmd(args: argparse.Namespace) -> int:
    print("update: the sweep is ROME's rank-one update, paper form, no protection (the default, "
          "as in the paper); the vector is tested one name at a time in memory, no model is "
          "saved", flush=True)
    report = run_demo(args.out, quick=args.quick, model=args.model, seed=args.seed)
    keys = ("model", "trace", "sweep", "classifier", "vector", "control", "seconds")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    print(f"wrote {args.out}/report.md and report.json")
    return 0
