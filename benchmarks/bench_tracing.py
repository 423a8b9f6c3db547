"""Plain vs fast causal tracing for ``rome-edit locate`` (issue 3: target ≥ 5× faster).

    python benchmarks/bench_tracing.py --n 100 [--model DIR] [--out FILE]

Runs :func:`rome_edit.tracing.average.locate` over the first ``n`` bundled names (alternating
female/male, prompt ``Name: {}. Gender:``) once with ``method="plain"`` (one forward pass per
restored cell) and once with ``method="fast"``, checks that both give the same averaged grids
to 1e-5 (and the same kept/skipped cases), and prints and writes the timings and their ratio
as JSON.  Model loading is outside the timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from rome_edit.models.loading import load_model
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.task import gender_cases
from rome_edit.tracing.average import DEFAULT_MIN_EFFECT, locate

TEMPLATE = "Name: {}. Gender:"
TOLERANCE = 1e-5


def run(args: argparse.Namespace) -> dict:
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    entries = gender_cases(balanced_names(load_names(split="edit"), args.n))
    timings, results = {}, {}
    for method in ("fast", "plain"):
        started = time.perf_counter()
        results[method] = locate(lm, TEMPLATE, entries, method=method,
                                 min_effect=args.min_effect, progress=args.progress)
        timings[method] = time.perf_counter() - started
        print(f"{method:>5}: {timings[method]:8.2f} s", file=sys.stderr)
    fast, plain = results["fast"], results["plain"]
    max_diff = max(
        torch.nan_to_num((fast.effects[k] - plain.effects[k]).abs()).max().item()
        for k in fast.effects
    )
    same_cases = (fast.n_cases, fast.skipped) == (plain.n_cases, plain.skipped)
    return {
        "benchmark": "locate: plain vs fast causal tracing",
        "model": lm.identity, "dtype": args.dtype, "device": str(lm.device),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "processor": platform.processor(), "n_names": len(entries),
        "n_cases": fast.n_cases, "n_skipped": fast.n_skipped,
        "plain_seconds": timings["plain"], "fast_seconds": timings["fast"],
        "ratio": timings["plain"] / timings["fast"],
        "max_abs_difference": max_diff, "tolerance": TOLERANCE,
        "agree": bool(max_diff <= TOLERANCE and same_cases),
        "recommended_layer": {"fast": fast.recommended_layer, "plain": plain.recommended_layer},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="names to trace (default 100)")
    parser.add_argument("--model", default=None, help="model directory (default: bundled)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_tracing.json"))
    parser.add_argument("--min-effect", type=float, default=DEFAULT_MIN_EFFECT,
                        help="locate's threshold (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0 if record["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
