"""The gender study's ``rome-edit`` commands, kept apart from the generic ones in
:mod:`rome_edit.cli`: ``locate`` (averaged traces over names), ``calibrate`` (hparams measured
on name → other-gender edits), ``sweep`` (every name flipped, deltas recorded), ``analyze``,
``apply`` (the gender vector) and ``demo``.  :mod:`rome_edit.cli.main` registers them after the
generic commands; each module exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
from importlib import import_module

__all__ = ["STUDY_COMMANDS", "register_study"]

# module → the commands it registers, in the order of the help text
_MODULES = {"locate": ("locate",), "calibrate": ("calibrate",), "sweep": ("sweep",),
            "vectors": ("analyze", "apply", "demo")}
STUDY_COMMANDS: tuple[str, ...] = tuple(c for cs in _MODULES.values() for c in cs)


def register_study(subparsers: argparse._SubParsersAction) -> None:
    """Add the study's commands to ``rome-edit``'s subcommands."""
    for name in _MODULES:
        import_module(f"rome_edit.study.commands.{name}").register(subparsers)
