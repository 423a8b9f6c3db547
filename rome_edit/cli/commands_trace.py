"""``rome-edit trace``: the causal trace of one prompt (the gender study's averaged ``locate``
builds on the argument and output helpers here).

It writes ``DIR/trace.json`` and PNG heatmaps.  Everything is validated before ``DIR`` is
created, so a bad argument leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.forms.protected_keys import read_names_file
from rome_edit.tracing.core import KINDS, as_template, check_kinds, check_window
from rome_edit.tracing.noise import DEFAULT_NOISE, NoiseSpec, resolve_noise
from rome_edit.tracing.plots import plot_trace
from rome_edit.tracing.trace import DEFAULT_SAMPLES, DEFAULT_SEED, trace


def add_trace_args(parser: argparse.ArgumentParser) -> None:
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
    one.add_argument("--noise-subjects", type=Path, default=None, metavar="FILE",
                     help="subjects (one per line, or a CSV with a 'name' column) whose "
                          "embeddings, with --subject's, calibrate a relative --noise "
                          "(default: --subject alone)")
    add_trace_args(one)
    one.set_defaults(func=run_trace)


def check_trace_args(args: argparse.Namespace) -> None:
    NoiseSpec.parse(args.noise)
    check_kinds(args.kinds)
    if args.samples < 1:
        raise ValueError(f"--samples must be ≥ 1 (got {args.samples}).")
    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch must be ≥ 1 (got {args.max_batch}).")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory.")


def write_trace(out: Path, record: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trace.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def run_trace(args: argparse.Namespace) -> int:
    check_trace_args(args)
    template = as_template(args.prompt, args.subject)  # fails early if the subject is absent
    if args.noise_subjects is not None and not args.noise_subjects.is_file():
        raise FileNotFoundError(f"--noise-subjects {args.noise_subjects}: no such file; give a "
                                "file of subjects (one per line, or a CSV with a 'name' column) "
                                "or leave it out to calibrate on --subject alone.")
    subjects = [*(read_names_file(args.noise_subjects) if args.noise_subjects else []),
                args.subject]
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
    path = write_trace(args.out, record)
    pngs = plot_trace(result, args.out)
    print(f"{result.prompt!r} → {result.answer!r}: p_clean {result.p_clean:.4f}, "
          f"p_corrupt {result.p_corrupt:.4f} (noise std {noise_std:.4g}, window {window})")
    for kind, grid in result.effects.items():
        token, layer = divmod(int(grid.argmax()), grid.shape[1])
        print(f"  strongest {kind:<6} effect {grid.max().item():+.4f} at token "
              f"{token} {result.tokens[token]!r}, layer {layer}")
    print(f"wrote {path} and {len(pngs)} figures in {seconds:.1f}s")
    return 0
