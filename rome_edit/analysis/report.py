"""The model-free half of the delta study, for any labelled :class:`DeltaSet` (Xodarap 2023,
then Roger 2022 and Belrose et al. 2023): classifier with a shuffled-label control, the bounded
box vector (scaled and saved), candidate concept directions, their cosines and an erasure check,
and two plots.

The model-facing half (applying the directions to held-out subjects) is
:func:`rome_edit.api.analyze.analyze`, which calls :func:`analyze_deltas` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rome_edit.analysis.box_vector import make_concept_vector
from rome_edit.analysis.classifier import ClassifierResult, train_classifier
from rome_edit.analysis.concept_vector import ConceptVector, ScaleSpec, save_concept_vector
from rome_edit.analysis.deltas import DeltaSet
from rome_edit.analysis.directions import (
    ConceptDirections,
    candidate_directions,
    cosine_table,
    directions_table,
    erasure_check,
)
from rome_edit.analysis.plots import plot_delta_projection, plot_weight_histogram

VECTOR_FILE = "concept_vector.safetensors"


@dataclass(frozen=True)
class DeltaAnalysis:
    """Everything :func:`analyze_deltas` found; ``result`` is its JSON-ready summary."""

    deltas: DeltaSet
    classifier: ClassifierResult
    vector: ConceptVector
    directions: ConceptDirections
    table: list[dict]  # one row per direction: cosine with the box vector, erasure
    plots: list[Path]
    result: dict


def analyze_deltas(ds: DeltaSet, out_dir: str | Path, *, seed: int = 0,
                   scale: ScaleSpec = "mean-norm", vector_file: str = VECTOR_FILE
                   ) -> DeltaAnalysis:
    """Fit and save everything that needs only the deltas; write the vector and two plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = ds.deltas, ds.labels
    clf = train_classifier(x, y, seed=seed, classes=ds.classes)
    vector = make_concept_vector(x, clf, scale, **ds.provenance)
    vector_path = save_concept_vector(vector, out / vector_file)
    dirs = candidate_directions(x, y, seed=seed, model_identity=ds.model_identity, layer=ds.layer,
                                classes=ds.classes)
    cosines = cosine_table(dirs.as_dict())
    erasure = erasure_check(x, y, dirs, seed=seed)
    table = directions_table(dirs, erasure)
    plots = [
        plot_delta_projection(x, y, dirs["classifier"], out / "deltas_projection.png",
                              classes=ds.classes, layer=ds.layer),
        plot_weight_histogram(clf.weights, out / "classifier_weights.png"),
    ]
    result = {
        "model_identity": ds.model_identity, "layer": ds.layer, "classes": list(ds.classes),
        "deltas": {"n": ds.n, "width": ds.width, "mean_norm": ds.mean_norm,
                   "class_counts": list(ds.class_counts)},
        "classifier": clf.to_json(),
        "vector": {"norm": vector.norm, "raw_norm": vector.raw_norm,
                   "scale_mode": vector.scale_mode, "scale": vector.scale,
                   "file": vector_path.name},
        "cosines": cosines.to_json(), "erasure": [r.to_json() for r in erasure],
    }
    return DeltaAnalysis(ds, clf, vector, dirs, table, plots, result)
