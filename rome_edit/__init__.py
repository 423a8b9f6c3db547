"""rome-edit: locate and edit facts in language models with ROME, and study the edits as vectors.

The Python API in a few names (imported on first use, so ``import rome_edit`` stays cheap)::

    import rome_edit

    ed = rome_edit.Editor.load()                 # the bundled toy GPT-J, its preset
    with ed.edit("Ani", "Name: {}. Gender:", " Male", " Female"):
        print(ed.generate("Name: Ani. Gender:"))  # reverted after the block

    ed.sweep(requests, "sweep/", labels=labels, classes=("male→female", "female→male"))
    ds = rome_edit.DeltaSet.from_sweep("sweep/")
    vector = ds.box_vector()                     # also ds.probe(), ds.directions()
    with vector.applied(ed, "Ani", scale=2.0):
        print(ed.generate("Name: Ani. Gender:"))

``rome_edit.__version__`` (also ``rome-edit --version``) names the release.

Rooms (data flows one way; docs/architecture.md): ``models`` → ``tracing`` → ``stats`` →
``rome`` (the engine) → ``weights`` → ``forms`` → ``evaluation``, beside them ``inspection``,
``linearisation``, ``forensics``, ``assembly``, ``calibration``; ``analysis`` imports no model;
``api`` joins them; the gender study (``study``) and the CLI (``cli``) sit on top.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rome_edit._moved import install as _install_moved_paths
from rome_edit._version import __version__ as __version__  # one line: import stays cheap

_install_moved_paths()  # pre-0.3 module paths (rome_edit.editing.*) import, with a warning

# public name → module that defines it
_EXPORTS = {
    "Editor": "rome_edit.api.editor",
    "Applied": "rome_edit.api.editor",
    "EditRequest": "rome_edit.rome.request",
    "Paraphrase": "rome_edit.rome.request",
    "FitPhrasing": "rome_edit.rome.request",
    "EditRecord": "rome_edit.rome.record",
    "KeptFact": "rome_edit.evaluation.evaluate",
    "ROMEHyperParams": "rome_edit.rome.hparams",
    "DeltaSet": "rome_edit.analysis.deltas",
    "ConceptVector": "rome_edit.analysis.concept_vector",
    "load_concept_vector": "rome_edit.analysis.concept_vector",
    "save_concept_vector": "rome_edit.analysis.concept_vector",
    "BinaryTask": "rome_edit.evaluation.vectors",
    "VectorApplier": "rome_edit.evaluation.vectors",
    "AnalysisSettings": "rome_edit.api.analyze",
    "HeldOut": "rome_edit.api.analyze",
    "analyze": "rome_edit.api.analyze",
    "load_model": "rome_edit.models.loading",
}

__all__ = [
    "AnalysisSettings",
    "Applied",
    "BinaryTask",
    "ConceptVector",
    "DeltaSet",
    "EditRecord",
    "EditRequest",
    "Editor",
    "FitPhrasing",
    "HeldOut",
    "KeptFact",
    "Paraphrase",
    "ROMEHyperParams",
    "VectorApplier",
    "analyze",
    "load_concept_vector",
    "load_model",
    "save_concept_vector",
]

if TYPE_CHECKING:
    from rome_edit.analysis.concept_vector import (
        ConceptVector,
        load_concept_vector,
        save_concept_vector,
    )
    from rome_edit.analysis.deltas import DeltaSet
    from rome_edit.api.analyze import AnalysisSettings, HeldOut, analyze
    from rome_edit.api.editor import Applied, Editor
    from rome_edit.evaluation.evaluate import KeptFact
    from rome_edit.evaluation.vectors import BinaryTask, VectorApplier
    from rome_edit.models.loading import load_model
    from rome_edit.rome.hparams import ROMEHyperParams
    from rome_edit.rome.record import EditRecord
    from rome_edit.rome.request import EditRequest, FitPhrasing, Paraphrase


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rome_edit' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
