"""``rome-edit sweep`` (the gender study): edit every name to the other gender, one batch at a
time (resumable, data-parallel), and record the deltas; the editing arguments are ``edit``'s."""

from __future__ import annotations

import argparse
import json

from rome_edit.cli.commands_edit import (
    add_editing_args,
    phrasings_line,
    setup_editor,
    update_line,
)
from rome_edit.cli.protect_args import protect_label, protection_from_args
from rome_edit.distributed import data_parallel
from rome_edit.study.known import FEW_SHOT_PROMPT, known_names, prompt_template
from rome_edit.study.names import load_names
from rome_edit.study.sweep import run_gender_sweep
from rome_edit.study.task import EDIT_PROMPT

POOL = "every name of --names, else the bundled names"


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep", help="gender study: flip every name's gender, record the deltas")
    sweep.add_argument("--names", default=None, help="CSV with name,gender columns "
                       "(default: the bundled recorded-edit names)")
    sweep.add_argument("--limit", type=int, default=None, help="only the first N names")
    sweep.add_argument("--batch-size", type=int, default=64,
                       help="names per batch: one shard, one optimisation chunk (default 64; "
                            "GPT-J-6B in float16 on a 24 GB GPU: 8, see docs/scaling.md)")
    sweep.add_argument("--prompt", default=EDIT_PROMPT,
                       help="edit prompt with '{}' for the name (default: %(default)r; "
                            "'few-shot' for the known-only filter's prompt)")
    sweep.add_argument("--known-only", action="store_true",
                       help="edit only names the model gets right on --known-prompt (argmax "
                            "of ' Male'/' Female'), applied before --limit, and draw the "
                            "neighbours (and protected names) from the known names too; "
                            "recorded as 'selection' in sweep.json and summary.json")
    sweep.add_argument("--known-prompt", default=FEW_SHOT_PROMPT,
                       help="prompt of the known-only filter (default: two examples, then "
                            "the edit prompt: %(default)r)")
    add_editing_args(sweep, POOL)
    sweep.set_defaults(func=run_sweep_cmd)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    prompt, known_prompt = prompt_template(args.prompt), prompt_template(args.known_prompt)
    names = load_names(args.names, None if args.names else "edit")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} leaves no names; give a positive number.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    neighbours = load_names(args.names) if args.names else load_names()
    with data_parallel() as workers:
        ed = setup_editor(args, workers, prompt=prompt, subjects=[e.name for e in names])
        lm, hp, templates, inverse = ed.lm, ed.hparams, ed.context_templates, ed.inverse
        selection = None
        if args.known_only:
            known = known_names(lm, names, known_prompt, limit=args.limit)
            names, selection = list(known.names), known.to_json()
            if workers.is_main:
                print(f"known-only: {known.n_right} of {known.n_tested} names right on "
                      f"{known_prompt!r} (female {known.accuracy_female:.1%}, male "
                      f"{known.accuracy_male:.1%})", flush=True)
            if not names:
                raise ValueError("the model gets no name right on the known-only prompt; "
                                 "drop --known-only or give another --known-prompt.")
            # Counted as well as edited: a neighbour the model answers wrongly "keeps" or
            # "loses" an answer that is not its fact.
            pool = known_names(lm, neighbours, known_prompt)
            neighbours = list(pool.names)
            selection["neighbours"] = {"n_tested": pool.n_tested, "n_known": len(neighbours)}
            if workers.is_main:
                print(f"known-only neighbours: {len(neighbours)} of {pool.n_tested} names",
                      flush=True)
        if args.limit is not None:
            names = names[: args.limit]
        if workers.is_main:
            print(update_line(hp.update_form, args.update, protect_label(args, hp),
                              hp.subject_forms), flush=True)
            if hp.fit_phrasings:
                print(phrasings_line(hp.fit_phrasings), flush=True)
        protection = protection_from_args(args, lm, hp.layer, prompt,
                                          [e.name for e in neighbours], templates, hp)
        summary = run_gender_sweep(lm, names, hp, templates, args.out, inverse, args.batch_size,
                                   neighbour_names=neighbours, prompt=prompt, workers=workers,
                                   protection=protection, selection=selection)
    if not workers.is_main:
        return 0
    shown = {k: summary[k] for k in ("n_edits", "layer", "efficacy", "paraphrase", "specificity",
                                     "specificity_same_last_token", "specificity_random",
                                     "city_kept", "fluency_before", "fluency_after",
                                     "seconds", "seconds_per_edit")}
    print(json.dumps(shown, indent=1))
    print(f"wrote {args.out}/deltas.safetensors, records.jsonl, summary.json")
    return 0
