"""``--protect`` and its companions, shared by ``edit`` and the gender study's ``sweep`` and
``apply``.

``--protect other-names`` / ``same-last-token`` choose from a pool of subjects: the
``--protect-names`` file, else the pool the command supplies (the study's commands supply their
names); a generic command supplies none, so there the file is required.  ``edit`` and ``sweep``
also honour the protection an hparams file carries (its ``"protect"`` key, written by
``rome-edit calibrate``; :mod:`rome_edit.forms.recipe`) when ``--protect`` is not given; any
``--protect`` (``none`` included) overrides the file."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rome_edit.forms.protect import PROTECT_FORMS, ProtectSettings
from rome_edit.forms.protected_keys import (
    POSITIONS,
    SOURCES,
    Protection,
    build_bank,
    read_names_file,
)
from rome_edit.forms.recipe import HPARAMS_KEY, ProtectRecipe
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.hparams import ROMEHyperParams

_DEFAULT = ProtectSettings()
NO_PROTECTION = "none"


def add_protect_args(p: argparse.ArgumentParser, pool: str | None = None) -> None:
    """The ``--protect`` arguments; ``pool`` describes, for the help, the subjects the command
    supplies to ``other-names``/``same-last-token`` (``None``: it supplies none)."""
    p.add_argument("--protect", default=None, metavar="other-names|same-last-token|FILE|none",
                   help="keep the edit layer's output at other subjects' keys unchanged: every "
                        "other subject of the pool (--protect-names), the pool's subjects "
                        "sharing the edited subject's last token, or the subjects in FILE (CSV "
                        "with a 'name' column, or one per line); 'none' protects nothing (the "
                        "default); see docs/beyond-rome.md")
    p.add_argument("--protect-form", choices=PROTECT_FORMS, default=_DEFAULT.form,
                   help="hard constraints, soft penalty, AlphaEdit null space, or auto (hard "
                        "while the protected keys are at most a quarter of the key width, soft "
                        "beyond; default)")
    p.add_argument("--protect-weight", type=float, default=_DEFAULT.weight,
                   help=f"soft form: each protected key weighs this many average corpus tokens "
                        f"(default {_DEFAULT.weight:g})")
    p.add_argument("--protect-threshold", type=float, default=_DEFAULT.threshold,
                   help=f"null-space form: eigenvalues below this fraction of the largest span "
                        f"the null space (default {_DEFAULT.threshold:g}, AlphaEdit's)")
    p.add_argument("--protect-positions", choices=POSITIONS, default="last",
                   help="protect each protected subject's key at its last token (default), or "
                        "also the key at every token of its prompt (for many edits in one "
                        "model; auto then picks the soft form)")
    p.add_argument("--protect-names", default=None, metavar="FILE",
                   help="the pool other-names / same-last-token choose from: one subject per "
                        "line, or a CSV with a 'name' column ("
                        + (f"default: {pool})" if pool else "required with those two)"))


def check_protect_pool(args: argparse.Namespace, pool: Sequence[str] | None) -> None:
    """Refuse ``--protect other-names``/``same-last-token`` with no pool to choose from (checked
    before any model loads)."""
    if args.protect in SOURCES and args.protect_names is None and not pool:
        raise ValueError(f"--protect {args.protect} chooses among a pool of subjects, and this "
                         "command has none; give --protect-names FILE (one subject per line, or "
                         "a CSV with a 'name' column), or --protect FILE to protect exactly the "
                         "subjects in FILE.")


def file_recipe(args: argparse.Namespace, hparams: ROMEHyperParams | None
                ) -> ProtectRecipe | None:
    """The hparams file's protection, where ``--protect`` does not override it."""
    if args.protect is not None or hparams is None:
        return None
    return ProtectRecipe.from_hparams(hparams)


def skip_pool_protection(args: argparse.Namespace, hparams: ROMEHyperParams,
                         preset: str | None) -> str | None:
    """A command without a pool of subjects (``edit``) cannot apply a *preset's* protection
    that chooses among one (e.g. SmolLM2's: every other name of the study).  Then the edit is
    the plain one, and this returns the sentence that says so (``args.protect`` is set to
    ``none``); ``None`` when nothing is skipped.  A protection in a file the user gave with
    ``--hparams`` is not skipped: :func:`protection_from_args` refuses it without a pool."""
    recipe = file_recipe(args, hparams)
    if preset is None or recipe is None or args.protect_names is not None:
        return None
    args.protect = NO_PROTECTION
    return (f"note: the {preset} preset protects {recipe.label()}, which chooses among a pool of "
            "subjects that this command does not have; this edit is unprotected "
            "(--protect-names FILE applies the preset's protection)")


def protect_label(args: argparse.Namespace, hparams: ROMEHyperParams | None = None
                  ) -> str | None:
    """What the command protects and who asked, for its ``update:`` line (``None``: nothing)."""
    recipe = file_recipe(args, hparams)
    if recipe is not None:
        return f"{recipe.label()} (the hparams file's {HPARAMS_KEY!r})"
    if args.protect is None or args.protect == NO_PROTECTION:
        return None
    return f"{args.protect} (--protect)"


def protection_from_args(args: argparse.Namespace, lm: LoadedModel, layer: int, prompt: str,
                         pool: Sequence[str] | None, context_templates: Sequence[str],
                         hparams: ROMEHyperParams | None = None) -> Protection | None:
    """The protection the arguments ask for, else the one ``hparams`` carries (``None``
    without either, or with ``--protect none``); ``pool``: the command's own subjects for
    other-names/same-last-token (``None``: none, ``--protect-names`` is then required)."""
    recipe = file_recipe(args, hparams)
    forms = hparams.subject_forms if hparams is not None else ()
    if recipe is not None:
        if args.protect_names is not None:
            pool = read_names_file(args.protect_names)
        if not pool:
            raise ValueError(f"the hparams file protects {recipe.label()}, which chooses among "
                             "a pool of subjects, and this command has none; give "
                             "--protect-names FILE (one subject per line), or --protect none.")
        return recipe.build(lm, layer, prompt, pool, context_templates, forms)
    if args.protect is None or args.protect == NO_PROTECTION:
        return None
    check_protect_pool(args, pool)
    settings = ProtectSettings(args.protect_form, args.protect_weight, args.protect_threshold)
    if args.protect in SOURCES and args.protect_names is not None:
        pool = read_names_file(args.protect_names)
    bank = build_bank(lm, layer, prompt, list(pool or ()), context_templates, args.protect,
                      args.protect_positions, forms)
    return Protection(bank, settings)
