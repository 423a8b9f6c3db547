"""``rome-edit sweep`` (the gender study): edit every name to the other gender, one batch at a
time (resumable, data-parallel), and record the deltas; the editing arguments are ``edit``'s."""

from __future__ import annotations

import argparse
import json

from rome_edit.cli.commands_edit import add_editing_args, setup_editor, update_line
from rome_edit.cli.protect_args import protect_label, protection_from_args
from rome_edit.distributed import data_parallel
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
    add_editing_args(sweep, POOL)
    sweep.set_defaults(func=run_sweep_cmd)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    names = load_names(args.names, None if args.names else "edit")
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit {args.limit} leaves no names; give a positive number.")
        names = names[: args.limit]
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    neighbours = load_names(args.names) if args.names else load_names()
    with data_parallel() as workers:
        ed = setup_editor(args, workers, prompt=EDIT_PROMPT, subjects=[e.name for e in names])
        lm, hp, templates, inverse = ed.lm, ed.hparams, ed.context_templates, ed.inverse
        if workers.is_main:
            print(update_line(hp.update_form, args.update, protect_label(args, hp)), flush=True)
        protection = protection_from_args(args, lm, hp.layer, EDIT_PROMPT,
                                          [e.name for e in neighbours], templates, hp)
        summary = run_gender_sweep(lm, names, hp, templates, args.out, inverse, args.batch_size,
                                   neighbour_names=neighbours, workers=workers,
                                   protection=protection)
    if not workers.is_main:
        return 0
    shown = {k: summary[k] for k in ("n_edits", "layer", "efficacy", "paraphrase", "specificity",
                                     "specificity_same_last_token", "specificity_random",
                                     "city_kept", "fluency_before", "fluency_after",
                                     "seconds", "seconds_per_edit")}
    print(json.dumps(shown, indent=1))
    print(f"wrote {args.out}/deltas.safetensors, records.jsonl, summary.json")
    return 0
