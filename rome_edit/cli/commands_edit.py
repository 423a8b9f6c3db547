"""``rome-edit edit``: one ROME edit of a subject on a prompt to a new target.

The editing arguments, the editor set-up and the update line are shared with the gender study's
``sweep``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rome_edit.api.editor import Editor
from rome_edit.assembly.session import preset_name
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.cli.protect_args import (
    add_protect_args,
    check_protect_pool,
    protect_label,
    protection_from_args,
    skip_pool_protection,
)
from rome_edit.distributed import SINGLE, Workers
from rome_edit.evaluation.evaluate import generations
from rome_edit.forms.protected_keys import protect_records
from rome_edit.models.scoring import next_token_logprobs
from rome_edit.models.subject import fill
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.request import EditRequest, FitPhrasing
from rome_edit.weights.write import applied


def add_editing_args(p: argparse.ArgumentParser, protect_pool: str | None = None) -> None:
    """Model, hparams, statistics, update and ``--protect`` arguments and ``--out DIR``
    (``protect_pool``: what ``--protect other-names`` protects without ``--protect-names``, for
    the help)."""
    add_run_args(p)
    add_protect_args(p, protect_pool)
    p.add_argument("--out", required=True, type=Path)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """What :func:`setup_editor` reads: model, layer, hparams, templates, statistics, update."""
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None,
                   help="edit layer (default: the hparams' layer; the bundled preset uses the "
                        "layer 'rome-edit locate' recommends)")
    p.add_argument("--hparams", default=None, help="reference-format hparams JSON")
    p.add_argument("--context-templates", default=None,
                   help="JSON list of templates with '{}' (default: sampled from the model)")
    p.add_argument("--stats", default=None, help="second-moment file from 'rome-edit stats'")
    p.add_argument("--corpus", default=None,
                   help="corpus for statistics when --stats is not given (default: hparams)")
    p.add_argument("--update", choices=["paper", "rome-reference"], default=None,
                   help="update form (default: the hparams' update_form, 'paper')")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling context templates")


def register(subparsers: argparse._SubParsersAction) -> None:
    edit = subparsers.add_parser("edit", help="one ROME edit; prints before/after, saves record")
    edit.add_argument("--subject", required=True)
    edit.add_argument("--prompt", required=True, help="template with '{}' for the subject")
    edit.add_argument("--target", required=True, help="new target, e.g. ' Female'")
    add_editing_args(edit)
    edit.set_defaults(func=run_edit)


def setup_editor(args, workers: Workers = SINGLE, prompt: str | None = None,
                 subjects: Sequence[str] = ()):
    """The :class:`Editor` the arguments describe, its templates and ``C⁻¹`` resolved now (in
    this order, on every data-parallel process); ``prompt``/``subjects`` are traced for the
    edit layer of a model without a preset."""
    ed = Editor.from_loaded(model_from_args(args, workers.device), hparams=args.hparams,
                            layer=args.layer, update_form=args.update, prompt=prompt,
                            subjects=subjects, context_templates=args.context_templates,
                            seed=args.seed, stats=args.stats, corpus=args.corpus,
                            workers=workers)
    _ = ed.context_templates, ed.inverse  # templates (broadcast) first, as every process must
    return ed


def update_line(update_form: str, asked_update: str | None, protect: str | None,
                subject_forms: Sequence[str] = ()) -> str:
    """The one line ``edit``/``sweep`` print: which update they write and why.  Single edits
    and sweeps keep ROME's paper-form rank-one update by default (parity with Meng et al.
    2022), where ``apply --persist`` defaults to a protected form; ``subject_forms`` (from the
    hparams) make it one term per spelling of the subject."""
    protected = protect is not None
    forms = (f", also at the subject's {' and '.join(subject_forms)} form(s) (the hparams' "
             f"subject_forms: rank {1 + len(subject_forms)}, exact at each key)"
             if subject_forms else "")
    if asked_update is None and update_form == "paper" and not protected and not forms:
        return ("update: ROME's rank-one update, paper form, no protection (the default, as in "
                "the paper; --protect other-names spares other names' keys, "
                "docs/beyond-rome.md)")
    why = "--update" if asked_update is not None else "the hparams' update_form"
    return (f"update: ROME's rank-one update, {update_form} form ({why}){forms}, "
            + (f"protecting {protect}" if protected else "no protection"))


def phrasings_line(phrasings: Sequence[FitPhrasing]) -> str | None:
    """The line ``edit``/``sweep`` print when the hparams fit ``v*`` to other wordings too."""
    if not phrasings:
        return None
    listed = ", ".join(repr(p.prompt) for p in phrasings)
    return (f"value: v* also fitted to {listed} (the hparams' fit_phrasings), in each fit that "
            "reads the subject at the same key")


def run_edit(args: argparse.Namespace) -> int:
    request = EditRequest(args.subject, args.prompt, args.target)
    check_protect_pool(args, None)  # before the model loads
    ed = setup_editor(args, prompt=args.prompt, subjects=[args.subject])
    lm, hp, templates, inverse = ed.lm, ed.hparams, ed.context_templates, ed.inverse
    skipped = skip_pool_protection(args, hp, None if args.hparams else preset_name(lm))
    if skipped:
        print(skipped)
    print(update_line(hp.update_form, args.update, protect_label(args, hp),
                      hp.subject_forms))
    if hp.fit_phrasings:
        print(phrasings_line(hp.fit_phrasings))
    target_id = lm.tokenizer(args.target, add_special_tokens=False)["input_ids"][0]
    text = fill(args.prompt, args.subject)
    p_before = next_token_logprobs(lm.model, lm.tokenizer, [text])[0, target_id].exp().item()
    (record,) = compute_edits(lm, [request], hp, templates, inverse, progress=False)
    protection = protection_from_args(args, lm, hp.layer, args.prompt, None, templates, hp)
    if protection is not None:
        (record,) = protect_records(lm, [record], protection, ed.solver)
    gens = generations(lm, record)
    with applied(lm, [record]):
        p_after = next_token_logprobs(lm.model, lm.tokenizer, [text])[0, target_id].exp().item()
    probs = {"target_first_token": {"before": p_before, "after": p_after}}
    record = replace(record, probs=probs)
    record.save(args.out)
    print(f"edit: {text!r} -> {args.target!r} at layer {hp.layer} ({hp.update_form} update)")
    if record.protection is not None:
        p = record.protection
        print(f"protected {p['n_keys']} keys ({p['source']}, {p['form']} form)")
    print(f"p({args.target!r}) before {p_before:.4f}  after {p_after:.4f}")
    print(f"|delta| {record.delta.norm():.2f}  |v_orig| {record.v_orig.norm():.2f}  "
          f"steps {len(record.losses)}  final loss {record.losses[-1]:.4f}")
    print(f"[before] {gens['prompt']}{gens['before']}")
    print(f"[after]  {gens['prompt']}{gens['after']}")
    print(f"record written to {args.out}/record.safetensors + record.json")
    return 0
