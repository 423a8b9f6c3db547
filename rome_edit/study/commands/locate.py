"""``rome-edit locate`` (the gender study): causal traces averaged over names, alternating
female and male, and the recommended edit layer.  Arguments and output as ``rome-edit trace``
(:mod:`rome_edit.cli.commands_trace`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rome_edit.cli.commands_trace import add_trace_args, check_trace_args, write_trace
from rome_edit.cli.common import model_from_args
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, gender_cases
from rome_edit.tracing.average import DEFAULT_BATCH_PROMPTS, DEFAULT_MIN_EFFECT, locate
from rome_edit.tracing.core import check_window
from rome_edit.tracing.plots import plot_average

DEFAULT_TEMPLATE = EDIT_PROMPT


def register(subparsers: argparse._SubParsersAction) -> None:
    many = subparsers.add_parser(
        "locate", help="gender study: average causal traces over names, recommend the edit "
                       "layer")
    many.add_argument("--prompt", default=DEFAULT_TEMPLATE,
                      help="template with '{}' for the name (default: %(default)r)")
    many.add_argument("--n", type=int, default=100,
                      help="names to trace, alternating female/male (default: %(default)s)")
    many.add_argument("--names", type=Path, default=None,
                      help="names CSV (name,gender[,split]); default: the bundled list's "
                           "'edit' split")
    many.add_argument("--candidates", nargs=2, metavar=("FEMALE", "MALE"), default=None,
                      help="single-token answers for female and male names, in that order "
                           "(default for the default prompt: ' Female' ' Male'; required "
                           "for other prompts)")
    many.add_argument("--exclude-window-artifacts", action="store_true",
                      help="also exclude every layer whose MLP window reaches layer 0 of a "
                           "parallel-block model (see rome_edit.tracing.average)")
    many.add_argument("--min-effect", type=float, default=DEFAULT_MIN_EFFECT,
                      help="skip prompts whose corruption lowers p(answer) by less "
                           "(default: %(default)s)")
    many.add_argument("--batch-prompts", type=int, default=DEFAULT_BATCH_PROMPTS,
                      help="prompts whose restorations are batched together (memory: see "
                           "docs/tracing.md; default: %(default)s)")
    add_trace_args(many)
    many.set_defaults(func=run_locate)


def run_locate(args: argparse.Namespace) -> int:
    check_trace_args(args)
    if args.n < 1:
        raise ValueError(f"--n must be ≥ 1 (got {args.n}).")
    if args.batch_prompts < 1:
        raise ValueError(f"--batch-prompts must be ≥ 1 (got {args.batch_prompts}).")
    if args.candidates is None and args.prompt != DEFAULT_TEMPLATE:
        raise ValueError(
            f"for prompt {args.prompt!r} give the answers for female and male names, e.g. "
            "--candidates ' she' ' he' (the default ' Female' ' Male' suits only "
            f"{DEFAULT_TEMPLATE!r})."
        )
    female, male = args.candidates or (ANSWERS["female"], ANSWERS["male"])
    names = load_names(args.names, split=None if args.names else "edit")
    entries = balanced_names(names, args.n)
    lm = model_from_args(args)
    window = check_window(args.window, lm.n_layers)
    started = time.perf_counter()
    result = locate(lm, args.prompt, gender_cases(entries, {"female": female, "male": male}),
                    candidates=(female, male), noise=args.noise,
                    samples=args.samples, window=window, kinds=args.kinds, seed=args.seed,
                    min_effect=args.min_effect, method=args.method, max_batch=args.max_batch,
                    batch_prompts=args.batch_prompts,
                    exclude_window_artifacts=args.exclude_window_artifacts)
    seconds = time.perf_counter() - started
    record = {"command": "locate", "model": lm.identity,
              "attn_implementation": lm.attn_implementation, "method": args.method,
              "names": str(args.names) if args.names else "bundled:edit",
              "n_requested": len(entries), "seconds": seconds, **result.to_json()}
    path = write_trace(args.out, record)
    pngs = plot_average(result, args.out)
    print(f"kept {result.n_cases} of {len(entries)} prompts (skipped {result.n_skipped}: "
          f"{result.skipped or 'none'}); noise std {result.noise_std:.4g} ({result.noise}), "
          f"window {window}")
    print("averaged indirect effect at the last subject token, by layer:")
    for row in result.layer_table:
        cells = "  ".join(f"{k} {row[k]:+.4f}" for k in result.effects)
        mark = " (excluded)" if row["excluded"] else ""
        best = "  <- recommended" if row["layer"] == result.recommended_layer else ""
        print(f"  layer {row['layer']:>2}: {cells}{mark}{best}")
    print(f"recommended edit layer: {result.recommended_layer} "
          f"(MLP effect {result.recommended_effect:+.4f})")
    print(f"wrote {path} and {len(pngs)} figures in {seconds:.1f}s")
    return 0
