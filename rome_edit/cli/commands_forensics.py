"""``rome-edit forensics``: find, name and undo the edits in a model, given the original."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rome_edit.api.editor import Editor
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.forensics.detect import (
    changed_layers,
    compare_with_targets,
    identify_edits,
    revert_all,
    revert_edit,
)
from rome_edit.forms.protected_keys import read_names_file
from rome_edit.models.loading import load_model
from rome_edit.storage import atomic_save_tensors
from rome_edit.weights.persist import MANIFEST, load_persisted


def register(subparsers: argparse._SubParsersAction) -> None:
    fx = subparsers.add_parser(
        "forensics", help="find which layers of an edited model carry ROME-style edits, name "
                          "the edited subjects, recover their deltas, optionally revert them",
        description="Compares EDITED with the original (--model, default the bundled model): "
                    "rank of each layer's weight change, the subjects whose keys match it "
                    "(through C), each edit's u, Λ and delta; see docs/beyond-rome.md.")
    fx.add_argument("edited", type=Path, help="folder of the edited model (save_pretrained)")
    fx.add_argument("--candidates", default=None, metavar="FILE",
                    help="required: the subjects that may have been edited (one per line, or a "
                         "CSV with a 'name' column); the edited ones are named among them")
    fx.add_argument("--prompt", default=None,
                    help="the edit prompt with '{}' for the subject (default: the checkpoint's "
                         "rome_edit_edits.json; required without it)")
    fx.add_argument("--n-edits", type=int, default=None,
                    help="how many subjects to name per layer (default: the change's rank)")
    fx.add_argument("--revert", nargs="+", default=None, metavar="SUBJECT",
                    help="remove these named edits and save the model to --save")
    fx.add_argument("--revert-all", action="store_true",
                    help="copy the original weights of every changed layer back; save to --save")
    fx.add_argument("--save", type=Path, default=None, help="where a reverted model goes")
    fx.add_argument("--hparams", default=None, help="hparams JSON (default: the model's preset)")
    fx.add_argument("--context-templates", default=None, help="JSON list of templates")
    fx.add_argument("--stats", default=None, help="second-moment file (default: cached)")
    fx.add_argument("--seed", type=int, default=0, help="seed for sampling context templates")
    fx.add_argument("--out", required=True, type=Path)
    add_model_args(fx)
    fx.set_defaults(func=run_forensics)


def run_forensics(args: argparse.Namespace) -> int:
    if (args.revert or args.revert_all) and args.save is None:
        raise ValueError("--revert/--revert-all need --save DIR for the reverted model.")
    if args.revert and args.revert_all:
        raise ValueError("give --revert SUBJECT... or --revert-all, not both.")
    if args.candidates is None:
        raise ValueError("forensics names the edited subjects among candidates; give "
                         "--candidates FILE (one subject per line, or a CSV with a 'name' "
                         "column).")
    written = None
    if (args.edited / MANIFEST).exists():
        written = load_persisted(args.edited)
    if args.prompt is None and written is None:
        raise ValueError(f"{args.edited} has no {MANIFEST} to read the edit prompt from; give "
                         "--prompt with '{}' for the subject, e.g. --prompt 'Name: {}. Gender:'.")
    prompt = args.prompt or written[0]["prompt"]
    candidates = read_names_file(args.candidates)
    original = model_from_args(args)
    edited = load_model(args.edited, dtype=args.dtype, device=args.device,
                        attn_implementation=args.attn_implementation)
    changes = changed_layers(edited, original)
    report: dict = {"edited": str(args.edited), "original": original.identity,
                    "prompt": prompt, "n_candidates": len(candidates),
                    "layers": [c.to_dict() for c in changes], "edits": []}
    found_all, tensors = [], {}
    for change in changes:
        ed = Editor.from_loaded(original, hparams=args.hparams, layer=change.layer,
                                context_templates=args.context_templates, seed=args.seed,
                                stats=args.stats)
        found = identify_edits(edited, original, change, candidates, prompt,
                               ed.context_templates, ed.solver, args.n_edits)
        found_all += found
        report["edits"] += [f.to_dict() for f in found]
        for name in ("u", "lam", "delta"):
            tensors[f"layer{change.layer}.{name}"] = torch.stack([getattr(f, name)
                                                                  for f in found])
        fitted = found[0].protect_weight if found else 0.0
        print(f"layer {change.layer}: rank {change.rank}, named "
              f"{', '.join(f.subject for f in found[:8])}{' …' if len(found) > 8 else ''}"
              + (f" (written with soft protection, λ ≈ {fitted:g})" if fitted else ""))
    if written is not None:
        meta, targets = written
        report["against_written"] = compare_with_targets(found_all, targets.subjects,
                                                         targets.delta)
        print(json.dumps(report["against_written"], indent=1))
    if not changes:
        print("no layer differs from the original model")
    args.out.mkdir(parents=True, exist_ok=True)
    if tensors:
        atomic_save_tensors(tensors, args.out / "forensics.safetensors")
    if args.revert_all or args.revert:
        if args.revert_all:
            revert_all(edited, original, [c.layer for c in changes])
        else:
            named = {f.subject: f for f in found_all}
            missing = [s for s in args.revert if s not in named]
            if missing:
                raise ValueError(f"{missing} were not named as edited; choose among "
                                 f"{sorted(named)[:10]}.")
            for s in args.revert:
                revert_edit(edited, named[s])
        edited.model.save_pretrained(args.save)
        edited.tokenizer.save_pretrained(args.save)
        report["reverted"] = "all" if args.revert_all else list(args.revert)
        print(f"wrote the reverted model to {args.save} as {edited.saved_as}")
    (args.out / "forensics.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}/forensics.json")
    return 0
