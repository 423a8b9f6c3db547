"""Errors whose fix is a parameter of the Python API, named so that front ends can translate.

Library messages speak to a Python caller: they name the keyword argument, hyperparameter or
function that fixes the problem (``Editor.load(stats=…)``, ``mom2_ridge``,
``rome_edit.stats.cached_second_moment``).  The same names travel in ``parameters``, so the
command line can add its own spelling (``--stats FILE``) without parsing the message:
``rome_edit.cli.flags`` holds that table (``FLAGS``, ``error_line``).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FixableError", "MissingFileError", "ParameterError"]


class FixableError(Exception):
    """Mixin: ``parameters`` are the Python names (keyword arguments, hyperparameters or
    functions) that the message tells the caller to pass, change or call."""

    def __init__(self, message: str, *, parameters: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.parameters: tuple[str, ...] = tuple(parameters)


class ParameterError(FixableError, ValueError):
    """Bad input (a ``ValueError``) that a named parameter fixes."""


class MissingFileError(FixableError, FileNotFoundError):
    """A file or folder that does not exist (a ``FileNotFoundError``) and the parameter that
    names it."""
