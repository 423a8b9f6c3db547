"""Module paths from before 0.3 (the rooms redesign), kept importable with a DeprecationWarning.

0.3 split the flat ``rome_edit.editing`` package (and a few modules of ``tracing``, ``stats``,
``analysis`` and ``api``) into rooms named after their jobs (docs/architecture.md).  Code
written against the old paths keeps working: importing ``rome_edit.editing.rome`` warns and
returns the module that now holds that code (``rome_edit.rome.compute``), the very same module
object, so ``isinstance`` checks and monkeypatching behave as before.  The aliases will be
removed in 1.0.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

# old module (under rome_edit.) → where its code lives now
MOVED = {
    "editing.request": "rome.request",
    "editing.context": "rome.context",
    "editing.hparams": "rome.hparams",
    "editing.key": "rome.key",
    "editing.value_loop": "rome.value_loop",
    "editing.value": "rome.value_reference",
    "editing.value_batched": "rome.value_batched",
    "editing.prefix_pass": "rome.prefix_pass",
    "editing.suffix_step": "rome.suffix_step",
    "editing.update": "rome.update",
    "editing.record": "rome.record",
    "editing.rome": "rome.compute",
    "editing.apply": "weights.write",
    "editing.persist": "weights.persist",
    "editing.protect": "forms.protect",
    "editing.protected_keys": "forms.protected_keys",
    "editing.many": "forms.many",
    "editing.fitted_write": "forms.fitted_write",
    "editing.evaluate": "evaluation.evaluate",
    "editing.sweep": "evaluation.sweep",
    "editing.vector_edit": "evaluation.vectors",
    "editing.forensics": "forensics.detect",
    "editing.session": "assembly.session",
    "editing.memory": "assembly.memory",
    "tracing.lens": "inspection.lens",
    "tracing.lens_plots": "inspection.lens_plots",
    "tracing.neurons": "inspection.neurons",
    "tracing.neuron_plots": "inspection.neuron_plots",
    "analysis.neuron_overlap": "inspection.neuron_overlap",
    "stats.mlp_io": "linearisation.io",
    "analysis.mlp_polynomial": "linearisation.polynomial",
    "analysis.mlp_linearization": "linearisation.fit",
    "api.linearize": "linearisation.run",
}
OLD_PACKAGES = {"editing"}  # packages that exist only as aliases now

__all__ = ["MOVED", "install"]


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str | None) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if self.new is None:  # a removed package: an empty namespace its aliases live under
            module = types.ModuleType(spec.name, "Deprecated alias package (see rome_edit._moved).")
            module.__path__ = []
            return module
        warnings.warn(f"{spec.name} moved to {self.new} in rome-edit 0.3; import it from there "
                      "(the old path will be removed in 1.0).", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module was imported under its new name."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("rome_edit.")
        if not fullname.startswith("rome_edit.") or (old not in MOVED and old not in OLD_PACKAGES):
            return None
        new = f"rome_edit.{MOVED[old]}" if old in MOVED else None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new),
                                              is_package=new is None)


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
