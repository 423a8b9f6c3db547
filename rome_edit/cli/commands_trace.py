"""``rome-edit trace`` (one prompt) and ``rome-edit locate`` (averaged; recommends the layer).

Both write ``DIR/trace.json`` and PNG heatmaps.  Everything is validated before ``DIR`` is
created, so a bad argument leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, gender_cases
from rome_edit.tracing.average import DEFAULT_BATCH_PROMPTS, DEFAULT_MIN_EFFECT, locate
from rome_edit.tracing.core import KINDS, as_template, check_kinds, check_window
from rome_edit.tracing.noise import DEFAULT_NOISE, NoiseSpec, resolve_noise
from rome_edit.tracing.plots import plot_average, plot_trace
from rome_edit.tracing.trace import DEFAULT_SAMPLES, DEFAULT_SEED, trace

DEFAULT_TEMPLATE = EDIT_PROMPT


def _add_trace_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--noise", default=DEFAULT_NOISE,
                        help="noise std: a multiple of the subject-embedding std such as '3x' "
                             "(or 's3'), or an absolute number (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="noised copies per prompt (default: %(default)s)")
    parser.add_argument("--window", type=int, default=None,
                        help="MLP/attention layers restored together (default: 10 scaled to "
                             "the model's depth, 10 of 28 on GPT-J)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="states to restore (default: all three)")
    parser.add_argument("--method", choices=["fast", "plain"], default="fast",
                        help="'plain' runs one forward pass per cell (slow reference)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="rows per forward pass (default: sized to free memory)")


def register(subparsers: argparse._SubParsersAction) -> None:
    one = subparsers.add_parser("trace", help="causal trace of one prompt")
    one.add_argument("--prompt", required=True,
                     help="prompt with '{}' where the subject goes, e.g. 'Name: {}. Gender:'")
    one.add_argument("--subject", required=True, help="the subject, e.g. Brittany")
    one.add_argument("--answer", default=None,
                     help="answer token to trace, e.g. ' Female' (default: the model's top "
                          "prediction)")
    one.add_argument("--names", type=Path, default=None,
                     help="names CSV whose subjects calibrate a relative --noise "
                          "(default: the bundled list)")
    _add_trace_args(one)
    one.set_defaults(func=run_trace)

    many = subparsers.add_parser(
        "locate", help="average causal traces over names and recommend the edit layer")
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
    _add_trace_args(many)
    many.set_defaults(func=run_locate)


def _check_common(args: argparse.Namespace) -> None:
    NoiseSpec.parse(args.noise)
    check_kinds(args.kinds)
    if args.samples < 1:
        raise ValueError(f"--samples must be ≥ 1 (got {args.samples}).")
    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch must be ≥ 1 (got {args.max_batch}).")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory.")


def _write(out: Path, record: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trace.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def run_trace(args: argparse.Namespace) -> int:
    _check_common(args)
    template = as_template(args.prompt, args.subject)  # fails early if the subject is absent
    subjects = [e.name for e in load_names(args.names)] + [args.subject]
    lm = model_from_args(args)
    window = check_window(args.window, lm.n_layers)
    started = time.perf_counter()
    noise_std = resolve_noise(lm, args.noise, template, subjects)
    result = trace(lm, template, args.subject, args.answer, noise_std=noise_std,
                   samples=args.samples, window=window, kinds=args.kinds, seed=args.seed,
                   method=args.method, max_batch=args.max_batch)
    seconds = time.perf_counter() - started
    record = {"command": "trace", "model": lm.identity,
              "attn_implementation": lm.attn_implementation, "method": args.method,
              "noise": str(NoiseSpec.parse(args.noise)), "n_cases": 1, "n_skipped": 0,
              "seconds": seconds, **result.to_json()}
    path = _write(args.out, record)
    pngs = plot_trace(result, args.out)
    print(f"{result.prompt!r} → {result.answer!r}: p_clean {result.p_clean:.4f}, "
          f"p_corrupt {result.p_corrupt:.4f} (noise std {noise_std:.4g}, window {window})")
    for kind, grid in result.effects.items():
        token, layer = divmod(int(grid.argmax()), grid.shape[1])
        print(f"  strongest {kind:<6} effect {grid.max().item():+.4f} at token "
              f"{token} {result.tokens[token]!r}, layer {layer}")
    print(f"wrote {path} and {len(pngs)} figures in {seconds:.1f}s")
    return 0


def run_locate(args: argparse.Namespace) -> int:
    _check_common(args)
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
    path = _write(args.out, record)
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
