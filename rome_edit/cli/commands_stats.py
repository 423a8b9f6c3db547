"""``rome-edit stats``: the second moment ``C = E[k kᵀ]`` at an edit layer, cached."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.distributed import data_parallel
from rome_edit.stats.cache import cached_second_moment, default_cache_dir
from rome_edit.stats.corpus import resolve_corpus
from rome_edit.stats.second_moment import STATS_DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    stats = subparsers.add_parser(
        "stats", help="compute the second moment C = E[k kᵀ] of the MLP keys at a layer",
        description="Accumulate C = E[k kᵀ] of the keys (input of the MLP output projection) at "
                    "LAYER over a corpus and write it as safetensors (tensor 'second_moment'). "
                    "Results are cached: the same request never recomputes.",
    )
    add_model_args(stats)
    stats.add_argument("--layer", type=int, required=True, help="the edit layer")
    stats.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    stats.add_argument("--corpus", default="bundled",
                       help="'bundled' (the bundled model's training text, default), a text file "
                            "(one document per line), a folder of .txt files (one document "
                            "each), or hf:NAME[:CONFIG] (needs the 'datasets' package)")
    stats.add_argument("--whole-file", action="store_true",
                       help="treat a --corpus text file as one document instead of one per line")
    stats.add_argument("--n-samples", type=int, default=100_000,
                       help="number of documents (reference mom2_n_samples; default 100000)")
    # --dtype is the model's dtype (add_model_args), so the accumulation dtype has its own name;
    # --mom2-dtype is the reference's hyperparameter name.
    stats.add_argument("--stats-dtype", "--mom2-dtype", dest="stats_dtype", default="float32",
                       choices=sorted(STATS_DTYPES),
                       help="accumulation dtype (reference mom2_dtype; default float32)")
    stats.add_argument("--batch-size", type=int, default=64, help="documents per forward pass")
    stats.add_argument("--max-length", type=int, default=None,
                       help="truncate documents to this many tokens (default: context length)")
    stats.add_argument("--cache-dir", type=Path, default=None,
                       help=f"cache folder (default $ROME_EDIT_CACHE or {default_cache_dir()})")
    stats.add_argument("--checkpoint-every", type=int, default=25, metavar="BATCHES",
                       help="save the running sum every BATCHES batches so that a killed run "
                            "resumes from there (default 25)")
    stats.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as "
                         f"{args.out / f'stats_layer{args.layer}.safetensors'}.")
    if min(args.batch_size, args.n_samples, args.checkpoint_every) < 1:
        raise ValueError("--batch-size, --n-samples and --checkpoint-every must be at least 1.")
    corpus = resolve_corpus(args.corpus, whole_file=args.whole_file)
    with data_parallel() as workers:
        lm = model_from_args(args, workers.device)
        result = cached_second_moment(
            lm, args.layer, corpus, n_samples=args.n_samples, dtype=args.stats_dtype,
            batch_size=args.batch_size, max_length=args.max_length, cache_dir=args.cache_dir,
            workers=workers, checkpoint_every=args.checkpoint_every,
        )
        if workers.is_main:
            result.stats.save(args.out)
    if not workers.is_main:
        return 0
    stats, out = result.stats, args.out
    low, high = stats.eigenvalue_range()
    cond = high / low if low > 0 else math.inf
    rows = [
        ("second moment", f"{stats.d_mlp} × {stats.d_mlp} ({stats.dtype})"),
        ("model", stats.model_identity),
        ("layer", f"{stats.layer} (input of {lm.arch.out_proj.format(stats.layer)})"),
        ("corpus", stats.corpus_id),
        ("documents", f"{stats.n_documents:,}"),
        ("tokens", f"{stats.n_tokens:,}"),
        ("eigenvalues", f"{low:.3g} .. {high:.3g}"),
        ("condition number", f"{cond:.3g}"),
        ("seconds", f"{result.seconds:.1f}"),
        ("cache", f"{'hit' if result.cache_hit else 'miss (computed)'}: {result.path}"),
        ("written to", str(out)),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if not cond < 1e10:
        print("note: C is ill-conditioned; consider a ridge when editing "
              "(C + ridge·mean(diag C)·I, e.g. 1e-6).")
    return 0
