"""Pre-0.3 module paths keep importing (with a DeprecationWarning) as the modules that now hold
their code."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from rome_edit._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    new = importlib.import_module(f"rome_edit.{MOVED[old]}")
    sys.modules.pop(f"rome_edit.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"rome_edit.{old} moved to rome_edit.{MOVED[old]}"):
        module = importlib.import_module(f"rome_edit.{old}")
    assert module is new


def test_old_from_imports_still_work():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from rome_edit.editing.apply import preserved
        from rome_edit.editing.rome import compute_edits
    from rome_edit.rome.compute import compute_edits as now
    from rome_edit.weights.write import preserved as preserved_now
    assert compute_edits is now and preserved is preserved_now


def test_unknown_old_path_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("rome_edit.editing.no_such_module")
