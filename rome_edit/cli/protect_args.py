"""``--protect`` and its companions, shared by ``edit``, ``sweep`` and ``apply``.

``edit`` and ``sweep`` also honour the protection an hparams file carries (its ``"protect"``
key, written by ``rome-edit calibrate``; :mod:`rome_edit.forms.recipe`) when ``--protect`` is
not given; any ``--protect`` (``none`` included) overrides the file."""

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


def add_protect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protect", default=None, metavar="other-names|same-last-token|FILE|none",
                   help="keep the edit layer's output at other subjects' keys unchanged: every "
                        "other name, the names sharing the edited name's last token, or the "
                        "names in FILE (CSV with a 'name' column, or one per line); 'none' "
                        "protects nothing (the default, except for 'apply --persist' of a "
                        "vector: other-names); see docs/beyond-rome.md")
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
    p.add_argument("--protect-names", default=None,
                   help="names CSV that other-names / same-last-token choose from (default: "
                        "the run's names, else the bundled names)")


def file_recipe(args: argparse.Namespace, hparams: ROMEHyperParams | None
                ) -> ProtectRecipe | None:
    """The hparams file's protection, where ``--protect`` does not override it."""
    if args.protect is not None or hparams is None:
        return None
    return ProtectRecipe.from_hparams(hparams)


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
                         pool: Sequence[str], context_templates: Sequence[str],
                         hparams: ROMEHyperParams | None = None) -> Protection | None:
    """The protection the arguments ask for, else the one ``hparams`` carries (``None``
    without either, or with ``--protect none``)."""
    recipe = file_recipe(args, hparams)
    if recipe is not None:
        if args.protect_names is not None:
            pool = read_names_file(args.protect_names)
        return recipe.build(lm, layer, prompt, pool, context_templates)
    if args.protect is None or args.protect == NO_PROTECTION:
        return None
    settings = ProtectSettings(args.protect_form, args.protect_weight, args.protect_threshold)
    if args.protect in SOURCES and args.protect_names is not None:
        pool = read_names_file(args.protect_names)
    bank = build_bank(lm, layer, prompt, list(pool), context_templates, args.protect,
                      args.protect_positions)
    return Protection(bank, settings)
