"""``rome-edit eval``: ROME on a CounterFact or zsRE file, with the papers' metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from rome_edit.cli.commands_edit import add_run_args, setup_editor
from rome_edit.forms.recipe import ProtectRecipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="edit each case of a CounterFact/zsRE file alone; ES/PS/NS, S, entropy")
    p.add_argument("--dataset", required=True, type=Path,
                   help="CounterFact or zsRE JSON file (format told by its keys; see "
                        "docs/counterfact.md)")
    p.add_argument("--out", required=True, type=Path, help="JSON file for cases and summary")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--generation-tokens", type=int, default=50,
                   help="new tokens per generation prompt for the entropy (default 50)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="cases whose edits are computed together (each still applied alone; "
                        "faster, same results; default 1)")
    p.add_argument("--zsre-target", choices=["answers", "alt"], default="answers",
                   help="zsRE answer to write: answers[0] (ROME's choice) or MEND's alt")
    add_run_args(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from rome_edit.evaluation.counterfact import evaluate_benchmark, format_table
    from rome_edit.evaluation.counterfact_data import read_dataset

    # Everything the user can get wrong is checked before the model loads; nothing is written
    # until every case has been evaluated.
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be at least 1.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1.")
    if args.generation_tokens < 1:
        raise ValueError(f"--generation-tokens {args.generation_tokens} must be at least 1.")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"--out: the folder {args.out.parent} does not exist; create "
                                "it or choose another path.")
    fmt, cases = read_dataset(args.dataset, args.zsre_target)
    cases = cases[: args.limit]
    ed = setup_editor(args)
    recipe = ProtectRecipe.from_hparams(ed.hparams)
    if recipe is not None:  # e.g. SmolLM2's preset: its pool is the gender study's names
        print(f"note: the hparams protect {recipe.label()}; eval does not (a case's facts have "
              "no pool of other subjects here): each case is ROME's plain update")
    result = evaluate_benchmark(ed, fmt, cases, args.generation_tokens,
                                args.batch_size)
    result.write(args.out, {"dataset": str(args.dataset), "model": ed.lm.name,
                            "hparams": ed.hparams.to_dict(),
                            "context_templates": list(ed.context_templates)})
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0
