"""``rome-edit calibrate`` (on the gender study's edits): measure a grid of hyperparameters on a
model, write the chosen file.

Edits a balanced sample of names to the other gender for every candidate (see
:mod:`rome_edit.calibration`), prints the table, and writes ``--out`` (reference-format hparams,
usable with ``--hparams`` everywhere) plus a report folder (table as JSON and markdown, the
per-layer figure).  Every argument is checked before the model is loaded, so a bad one leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

from rome_edit.calibration import CalibrationGrid, ChoiceRule, calibrate, write_report
from rome_edit.calibration.frontier import form_label
from rome_edit.calibration.grid import (
    DEFAULT_BAND,
    DEFAULT_CLAMPS,
    DEFAULT_PROTECT_TOP,
    DEFAULT_PROTECT_WEIGHTS,
    DEFAULT_STEPS,
    protections_for,
)
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.rome.context import load_context_templates
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest
from rome_edit.stats.stability import Stability
from rome_edit.study.known import FEW_SHOT_PROMPT, known_names, prompt_template
from rome_edit.study.names import NameEntry, load_names
from rome_edit.study.task import ANSWERS, CITY_FACT, EDIT_PROMPT, gender_request, other_gender

DEFAULT_N = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="gender study: measure layers/clamps/steps on a sample of name → other "
                          "gender edits, write hparams")
    add_model_args(p)
    p.add_argument("--out", required=True, type=Path, help="hparams JSON to write")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for the table and figure (default: OUT's name + '-report')")
    p.add_argument("--prompt", default=EDIT_PROMPT,
                   help="edit prompt with '{}' for the name, or 'few-shot' for the known-only "
                        "filter's prompt (default: %(default)r)")
    p.add_argument("--known-only", action="store_true",
                   help="sample, and count as neighbours, only names the model gets right on "
                        "--known-prompt (as 'sweep --known-only'; the model is loaded before "
                        "the sample is drawn)")
    p.add_argument("--known-prompt", default=FEW_SHOT_PROMPT,
                   help="prompt of the known-only filter (default: two examples, then "
                        "'Name: {}. Gender:')")
    p.add_argument("--answers", nargs=2, metavar=("FEMALE", "MALE"), default=None,
                   help="answers of female and male names on --prompt (default for the "
                        "default prompt: ' Female' ' Male'; required for other prompts)")
    p.add_argument("--names", type=Path, default=None,
                   help="names CSV (name,gender[,split]); default: the bundled list's 'edit' "
                        "split; every name of the file serves as a neighbour")
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help="edits per candidate, half female and half male (default %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to measure (default: the traced layer ± --band)")
    p.add_argument("--band", type=int, default=DEFAULT_BAND,
                   help="layers each side of the traced one (default %(default)s)")
    p.add_argument("--clamps", type=float, nargs="+", default=list(DEFAULT_CLAMPS),
                   help="clamp_norm_factor values (default %(default)s)")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS),
                   help="v_num_grad_steps values (default %(default)s)")
    p.add_argument("--loss-layers", type=int, nargs="+", default=[-1],
                   help="v_loss_layer values, negative from the end (default: -1, the last)")
    p.add_argument("--protect-top", type=int, default=DEFAULT_PROTECT_TOP,
                   help="protected updates are measured on this many of each layer's most "
                        "effective plain candidates (default %(default)s; 0: plain ROME only)")
    p.add_argument("--protect-weights", type=float, nargs="+",
                   default=list(DEFAULT_PROTECT_WEIGHTS),
                   help="soft-protection weights tried for other-names (default %(default)s; "
                        "same-last-token is tried with auto, i.e. hard constraints)")
    p.add_argument("--min-specificity-random", type=float, default=0.99,
                   help="rule: random-name specificity floor (default %(default)s)")
    p.add_argument("--fluency-tolerance", type=float, default=0.05,
                   help="rule: allowed relative fluency drop (default %(default)s)")
    p.add_argument("--base", default=None,
                   help="hparams JSON whose other values the grid keeps (default: the preset, "
                        "or the no-preset defaults)")
    p.add_argument("--corpus", default=None,
                   help="statistics corpus: bundled, debian-handbook, sampled[:SEED], a folder or "
                        "file, hf:NAME "
                        "(default: the base hparams' mom2_dataset)")
    p.add_argument("--context-templates", default=None,
                   help="JSON list of templates with '{}' (default: sampled from the model)")
    p.add_argument("--n-fluency", type=int, default=4,
                   help="edits per candidate whose generations measure fluency (default "
                        "%(default)s)")
    p.add_argument("--until-stable", action="store_true",
                   help="compute each layer's C only until u = C⁻¹k settles (checks and "
                        "probes as 'rome-edit stats --until-stable' by default); the hparams' "
                        "mom2_n_samples is the cap")
    p.add_argument("--min-cosine", type=float, default=0.999,
                   help="with --until-stable: stability threshold (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the name sample and the context templates")
    p.set_defaults(func=run_calibrate)


def balanced_sample(entries: list[NameEntry], n: int, seed: int) -> list[NameEntry]:
    """``n`` names, ⌈n/2⌉ female and ⌊n/2⌋ male, drawn with ``seed``, alternating genders."""
    rng = random.Random(seed)
    groups = {g: [e for e in entries if e.gender == g] for g in ("female", "male")}
    want = {"female": (n + 1) // 2, "male": n // 2}
    for g, group in groups.items():
        if len(group) < want[g]:
            raise ValueError(f"--n {n} needs {want[g]} {g} names but the names file has "
                             f"{len(group)}; lower --n or add names.")
    picked = {g: rng.sample(group, want[g]) for g, group in groups.items()}
    out = []
    for i in range(max(want.values())):
        out += [picked[g][i] for g in ("female", "male") if i < want[g]]
    return out


def requests_for(entries: list[NameEntry], prompt: str,
                 answers: dict[str, str]) -> list[EditRequest]:
    """Each name → the other gender on ``prompt`` (the study's requests, with its paraphrases),
    answered with ``answers`` on that prompt."""
    return [replace(gender_request(e, prompt), target_new=answers[other_gender(e.gender)],
                    target_true=answers[e.gender]) for e in entries]


def _checked(args: argparse.Namespace) -> tuple[CalibrationGrid, ChoiceRule, dict[str, str]]:
    if args.out.is_dir() or args.out.suffix != ".json":
        raise ValueError(f"--out {args.out} must be a .json file path (the hparams to write); "
                         "give a file name such as hparams.json.")
    report = args.report or args.out.with_name(args.out.stem + "-report")
    if report.exists() and not report.is_dir():
        raise ValueError(f"--report {report} is a file; give a folder.")
    if args.n < 2:
        raise ValueError(f"--n must be ≥ 2, one female and one male name (got {args.n}).")
    if args.n_fluency < 0:
        raise ValueError(f"--n-fluency must be ≥ 0 (got {args.n_fluency}).")
    if args.until_stable:
        Stability(min_cosine=args.min_cosine)  # refuses a bad value before the model loads
    args.prompt, args.known_prompt = prompt_template(args.prompt), \
        prompt_template(args.known_prompt)
    if args.answers is None and args.prompt not in (EDIT_PROMPT, FEW_SHOT_PROMPT):
        raise ValueError(f"for prompt {args.prompt!r} give the answers of female and male names, "
                         f"e.g. --answers ' she' ' he' (the defaults suit only {EDIT_PROMPT!r}).")
    female, male = args.answers or (ANSWERS["female"], ANSWERS["male"])
    if female == male:
        raise ValueError(f"--answers gives {female!r} twice; the two answers must differ.")
    grid = CalibrationGrid(band=args.band, clamps=tuple(args.clamps), steps=tuple(args.steps),
                           loss_layers=tuple(args.loss_layers),
                           layers=tuple(args.layers) if args.layers else None,
                           protections=protections_for(tuple(args.protect_weights)),
                           protect_top=args.protect_top)
    rule = ChoiceRule(min_specificity_random=args.min_specificity_random,
                      fluency_tolerance=args.fluency_tolerance)
    return grid, rule, {"female": female, "male": male}


def run_calibrate(args: argparse.Namespace) -> int:
    grid, rule, answers = _checked(args)
    report = args.report or args.out.with_name(args.out.stem + "-report")
    names = load_names(args.names, None if args.names else "edit")
    everyone = load_names(args.names) if args.names else load_names()
    pool = [e.name for e in everyone]
    if not args.known_only:  # refuse a sample the list cannot give before loading
        sample = balanced_sample(names, args.n, args.seed)
    base = ROMEHyperParams.load(args.base) if args.base else None
    templates = load_context_templates(args.context_templates) if args.context_templates \
        else None
    lm = model_from_args(args)
    if args.known_only:  # edited and counted (as neighbours and protected names): known names
        known = known_names(lm, everyone, args.known_prompt)
        print(f"known-only: {known.n_right} of {known.n_tested} names right on "
              f"{args.known_prompt!r} (female {known.accuracy_female:.1%}, male "
              f"{known.accuracy_male:.1%})", flush=True)
        pool = [e.name for e in known.names]
        kept = set(pool)
        sample = balanced_sample([e for e in names if e.name in kept], args.n, args.seed)
    requests = requests_for(sample, args.prompt, answers)
    print(f"calibrating {lm.name} on {len(requests)} edits of {args.prompt!r} "
          f"(clamps {list(grid.clamps)}, steps {list(grid.steps)}, "
          f"loss layers {list(grid.loss_layers)})")
    result = calibrate(lm, requests, neighbour_pool=pool, kept=[CITY_FACT], grid=grid, rule=rule,
                       base=base, context_templates=templates, corpus=args.corpus,
                       n_fluency=args.n_fluency, seed=args.seed,
                       until_stable=Stability(min_cosine=args.min_cosine)
                       if args.until_stable else None)
    paths = write_report(result, args.out, report)
    print(f"traced layer {result.traced_layer}; per layer (best efficacy / best "
          "allowed by the rule / trace MLP effect):")
    for p in result.per_layer():
        allowed = "–" if p["best_eligible_efficacy"] is None else \
            f"{p['best_eligible_efficacy']:.3f}"
        effect = "–" if p["trace_mlp_effect"] is None else f"{p['trace_mlp_effect']:+.4f}"
        print(f"  layer {p['layer']}: {p['best_efficacy']:.3f} / {allowed} / {effect}")
    protected = sum(r.get("protect_source") is not None for r in result.rows)
    print(f"update: {len(result.rows) - protected} candidates with ROME's plain rank-one update "
          f"({result.base.update_form} form), {protected} with a protected update (the same "
          "edits sparing other names' keys; --protect-top, --protect-weights)")
    print(("" if result.choice.rule_met else "WARNING: ") + result.choice.tradeoff)
    c = result.chosen
    print(f"chosen: layer {c['layer']}, clamp {c['clamp_norm_factor']:g}, steps "
          f"{c['v_num_grad_steps']}, loss layer {c['v_loss_layer']}, update {form_label(c)}: "
          f"efficacy {c['efficacy']:.3f}, paraphrase {_fmt(c.get('paraphrase'))}, specificity "
          f"random {_fmt(c.get('specificity_random'))}, same last token "
          f"{_fmt(c.get('specificity_same_last_token'))}, city kept {_fmt(c.get('city_kept'))}, "
          f"fluency {_fmt(c['fluency_after'])} (unedited {_fmt(result.fluency_before)})")
    if c.get("protect_source") is not None:
        print(f"the protection is written into {paths['hparams']} (key \"protect\"); edit and "
              "sweep use it unless --protect is given")
    print(f"{len(result.rows)} candidates in {result.seconds:.0f} s; wrote {paths['hparams']} "
          f"and {report}/ (calibration.md, calibration.json, calibration_layers.png, "
          "calibration_frontier.png)")
    return 0


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
