"""The command line's spelling of the Python parameters that library errors name.

Library errors speak Python (``stats=``, ``mom2_ridge``, ``compute_second_moment``) and carry
those names in ``parameters`` (:mod:`rome_edit.errors`).  :func:`error_line` adds the matching
flags or commands, so a command-line user still reads what to type.  Every name a library
``raise`` passes must be a key here (tests/test_error_messages.py checks it); ``None`` marks a
parameter the command line does not offer.
"""

from __future__ import annotations

__all__ = ["FLAGS", "error_line"]

FLAGS: dict[str, str | None] = {
    # statistics
    "stats": "--stats FILE",
    "compute_second_moment": "'rome-edit stats --layer L --out FILE'",
    "corpus": "--corpus DIR",
    "whole_file": "--whole-file",
    "n_samples": "--n-samples",
    "until_stable": "--until-stable",
    "max_length": "--max-length",
    # hyperparameters, which the command line reads from a reference-format file
    "mom2_adjustment": "mom2_adjustment in the --hparams file",
    "mom2_n_samples": "mom2_n_samples in the --hparams file",
    "mom2_ridge": "mom2_ridge in the --hparams file",
    "subject_forms": "subject_forms in the --hparams file",
    # model and edit
    "model": "--model",
    "layer": "--layer",
    "templates": "--module-template PART=TEMPLATE",
    "attn_implementation": "--attn-implementation eager",
    "context_templates": "--context-templates FILE",
    "update_form": "--update",
    "requests": "--n",
    "targets": "--target",
    # tracing
    "window": "--window",
    "noise": "--noise",
    "min_effect": "--min-effect",
    # protection and saved models
    "protect": "--protect",
    "protection": "--protect other-names (or a FILE of names)",
    "other_names_protection.pool": "--protect-names",
    "ProtectSettings.form": "--protect-form",
    "ProtectSettings.threshold": "--protect-threshold",
    "persist_vector.form": "--many-form",
    "sign": "--sign -1",
    # outputs, and the commands that write the files a message asks for
    "out": "--out DIR",
    "overwrite": None,  # the command line never overwrites a checkpoint folder
    "EditRecord.save": "'rome-edit edit --out DIR'",
    "Editor.sweep": "'rome-edit sweep'",
    "save_edited": "'rome-edit apply --persist'",
    "analyze": "'rome-edit analyze'",
}


def error_line(err: BaseException) -> str:
    """The error's message, plus the command-line spelling of the parameters it names."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    flags = dict.fromkeys(f for p in getattr(err, "parameters", ()) if (f := FLAGS.get(p)))
    if flags:
        message += f" (command line: {', '.join(flags)})"
    return message
