"""``rome-edit stats``: the second moment ``C = E[k kᵀ]`` at an edit layer, cached."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.distributed import data_parallel
from rome_edit.rome.key import keys_and_values
from rome_edit.stats.cache import cached_second_moment, default_cache_dir
from rome_edit.stats.corpus import resolve_corpus
from rome_edit.stats.second_moment import STATS_DTYPES
from rome_edit.stats.stability import Stability


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
                            "each), debian-handbook (real English prose: apt-get install "
                            "debian-handbook; docs/statistics.md), sampled[:SEED] (text sampled "
                            "from the model itself; see docs/statistics.md), or "
                            "hf:NAME[:CONFIG] (needs the 'datasets' package)")
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
    stable = stats.add_argument_group(
        "stopping early", "with --until-stable the pass stops once the edit directions "
        "u = C⁻¹k of probe keys has at least --min-cosine with its value at half the documents "
        "(checks at --first-check documents and every doubling); --n-samples is then the most "
        "it reads")
    stable.add_argument("--until-stable", action="store_true",
                        help="stop when u = C⁻¹k of the probe keys no longer changes")
    stable.add_argument("--min-cosine", type=float, default=0.999,
                        help="stable when every probe's u has at least this cosine with the "
                             "previous check's (default 0.999)")
    stable.add_argument("--first-check", type=int, default=1000, metavar="DOCS",
                        help="documents at the first check; later checks at every doubling "
                             "(default 1000)")
    stable.add_argument("--stability-measure", choices=["key-weighted", "euclidean"],
                        default="key-weighted",
                        help="cosine in the keys' inner product uᵀCu (how alike the edits "
                             "respond to the corpus keys; default) or the plain one")
    stable.add_argument("--patience", type=int, default=1,
                        help="consecutive stable checks needed (default 1)")
    stable.add_argument("--probe-subjects", type=Path, default=None, metavar="FILE",
                        help="subjects whose keys are the probes, one per line (default: 64 "
                             "token keys of the corpus's first batch)")
    stable.add_argument("--probe-prompt", default="{}",
                        help="prompt with {} for the subject, to read the probe keys in "
                             "(default '{}': the subject alone)")
    stats.set_defaults(func=run_stats)


def stability_from_args(args: argparse.Namespace, lm) -> Stability | None:
    """The --until-stable rule, with the probe subjects' keys at the layer if given."""
    if not args.until_stable:
        return None
    probes = None
    if args.probe_subjects is not None:
        if not args.probe_subjects.is_file():
            raise FileNotFoundError(f"--probe-subjects {args.probe_subjects} does not exist; "
                                    "give a text file with one subject per line.")
        subjects = [line.strip() for line in args.probe_subjects.read_text().splitlines()
                    if line.strip()]
        if not subjects:
            raise ValueError(f"--probe-subjects {args.probe_subjects} lists no subject; give "
                             "one per line.")
        if "{}" not in args.probe_prompt:
            raise ValueError(f"--probe-prompt {args.probe_prompt!r} has no {{}} for the "
                             "subject; e.g. 'Name: {}. Gender:'.")
        probes, _ = keys_and_values(lm, args.layer, [args.probe_prompt] * len(subjects),
                                    subjects)
    return Stability(probes, min_cosine=args.min_cosine, first_check=args.first_check,
                     measure=args.stability_measure,
                     patience=args.patience)


def run_stats(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as "
                         f"{args.out / f'stats_layer{args.layer}.safetensors'}.")
    if min(args.batch_size, args.n_samples, args.checkpoint_every) < 1:
        raise ValueError("--batch-size, --n-samples and --checkpoint-every must be at least 1.")
    if args.until_stable and not (0 < args.min_cosine <= 1 and args.first_check >= 1
                                  and args.patience >= 1):
        raise ValueError("--min-cosine must be in (0, 1], --first-check and --patience at "
                         "least 1.")
    with data_parallel() as workers:
        lm = model_from_args(args, workers.device)
        corpus = resolve_corpus(args.corpus, whole_file=args.whole_file, lm=lm)
        result = cached_second_moment(
            lm, args.layer, corpus, n_samples=args.n_samples, dtype=args.stats_dtype,
            batch_size=args.batch_size, max_length=args.max_length, cache_dir=args.cache_dir,
            workers=workers, checkpoint_every=args.checkpoint_every,
            until_stable=stability_from_args(args, lm),
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
        *([("stopping", stats.stopping)] if stats.stopping else []),
        *[("check", f"{c.n_documents:,} documents: min cos(u) "
                    + ("—" if c.min_cosine is None else f"{c.min_cosine:.6f}"))
          for c in result.checks],
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
