"""``rome-edit``: one subcommand per stage; each stage's module adds its own parser.  The
generic toolkit's commands come from :mod:`rome_edit.cli`, the gender study's from
:mod:`rome_edit.study.commands` (registered after them, named in the help's epilog).

Errors the user can fix (bad names, templates, files, layers) print one line and exit 2, with
the flags for the Python parameters a library error names (:mod:`rome_edit.cli.flags`);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import import_module

from rome_edit._version import __version__
from rome_edit.cli.flags import error_line

# Each module (in rome_edit.cli) exposes ``register(subparsers)``; order is the order of the help
# text. They are imported when the parser is built, not with this module, so that
# ``rome-edit --version`` answers without importing torch (a fraction of a second, not seconds).
COMMAND_MODULES = ["commands_model", "commands_trace", "commands_stats", "commands_edit",
                   "commands_forensics", "commands_lens", "commands_linearize", "commands_eval"]

VERSION = f"rome-edit {__version__}"


# Commands that split their work over data-parallel processes (rome_edit.distributed).
PARALLEL_COMMANDS = ("sweep", "stats")


class UserError(Exception):
    """Raised by commands for problems in what the user asked for."""


def build_parser() -> argparse.ArgumentParser:
    from rome_edit.study.commands import STUDY_COMMANDS, register_study

    parser = argparse.ArgumentParser(
        prog="rome-edit", description="Locate and edit facts in language models with ROME.",
        epilog=f"The gender study (names edited to the other gender, the gender vector): "
               f"{', '.join(STUDY_COMMANDS)}.  Every other command is the generic toolkit's: "
               "subjects, prompts and targets you name.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=VERSION)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(f"rome_edit.cli.{name}").register(subparsers)
    register_study(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # --version is answered before build_parser imports the commands (and torch); exact spelling
    # only, since the full parser's --verbose shares the prefix --ver.
    version_only = argparse.ArgumentParser(prog="rome-edit", add_help=False, allow_abbrev=False)
    version_only.add_argument("--version", action="version", version=VERSION)
    version_only.parse_known_args(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # transformers' per-tensor "Loading weights" bar is noise next to rome-edit's own output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from rome_edit.distributed import launched_in_parallel  # imports torch

    try:
        if launched_in_parallel() and args.command not in PARALLEL_COMMANDS:
            raise UserError(f"'{args.command}' runs in one process; launch only "
                            f"{' and '.join(PARALLEL_COMMANDS)} with several processes.")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, OSError, UserError) as err:
        if args.debug:
            raise
        print(f"rome-edit {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
