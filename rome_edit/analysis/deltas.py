"""Recorded value changes ``δ = v* − v_orig`` of ROME edits, with a binary label per edit.

docs/method.md, "The gender-vector experiment": every name is edited to the other gender and the
optimised value change ``δ`` at the edit layer is recorded.  A :class:`DeltaSet` holds such rows
with any binary concept label (``classes`` names label 0 and label 1: the gender study's are
``("male→female", "female→male")``, a city swap's could be ``("London→Paris", "Paris→London")``),
plus the model identity and layer they came from, so that deltas of different models or layers
are never mixed by accident.

A sweep directory (:func:`rome_edit.evaluation.sweep.run_sweep`) holds ``deltas.safetensors``
(tensor ``"delta"``, one row per edit), ``records.jsonl`` (one JSON object per row, in the same
order, with at least ``subject`` and ``label``) and ``summary.json`` (with ``model_identity``,
``layer`` and ``classes``).  Sweeps recorded before labels were generic have ``gender`` instead
of ``label`` and load with the gender study's classes.  Nothing is unpickled: tensors come from
safetensors and records from JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from rome_edit.analysis.box_vector import make_concept_vector
from rome_edit.analysis.classifier import ClassifierResult, train_classifier
from rome_edit.analysis.concept_vector import ConceptVector, ScaleSpec
from rome_edit.analysis.directions import ConceptDirections, candidate_directions
from rome_edit.analysis.errors import DEFAULT_CLASSES, DeltaSetError, require_both_classes
from rome_edit.storage import read_tensor_entry

log = logging.getLogger(__name__)

DELTAS_FILE = "deltas.safetensors"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
DELTA_TENSOR = "delta"
# Sweeps written before labels were generic recorded the original gender instead of a label.
LEGACY_GENDERS = ("female", "male")
LEGACY_CLASSES = ("male→female", "female→male")
# DeltaSetError and DEFAULT_CLASSES live in errors.py (the estimators raise and use them);
# they stay importable from here.
__all__ = ["DEFAULT_CLASSES", "DeltaSet", "DeltaSetError", "concat", "load_delta_set"]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality
class DeltaSet:
    """``n`` recorded deltas ``δ = v* − v_orig`` from one model and one edit layer.

    ``deltas``: ``(n, d_model)`` float32; ``labels``: ``(n,)`` int64 in {0, 1} (other floating
    or integer dtypes are converted; both are kept on the CPU).  ``classes`` names label 0 and
    label 1 (e.g. ``("male→female", "female→male")``); ``subjects`` names the edited subject of
    each row; ``prompt`` (optional) is the edit prompt the deltas were recorded on
    (where a vector learnt from them is written).  Directions learnt from a DeltaSet point from
    label 0 towards label 1.
    """

    deltas: Tensor
    labels: Tensor
    subjects: tuple[str, ...]
    model_identity: str
    layer: int
    classes: tuple[str, str] = DEFAULT_CLASSES
    prompt: str | None = None

    def __post_init__(self) -> None:
        d, y = self.deltas, self.labels
        if not isinstance(d, Tensor) or d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise DeltaSetError(
                f"deltas must be a non-empty 2-D tensor (n_edits, width), got {shape}; "
                "stack one row per edit."
            )
        if not d.is_floating_point():
            raise DeltaSetError(f"deltas must be floating point, got {d.dtype}; use .float().")
        bad = ~torch.isfinite(d).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise DeltaSetError(
                f"{int(bad.sum())} delta rows contain NaN or inf (first rows {rows}); "
                "re-run those edits or drop the rows before analysing."
            )
        if not isinstance(y, Tensor) or y.shape != (d.shape[0],):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise DeltaSetError(
                f"labels must be a 1-D tensor with one entry per delta row ({d.shape[0]}), got "
                f"{shape}; give one 0/1 label per row."
            )
        if y.is_floating_point() or y.is_complex() or not bool(((y == 0) | (y == 1)).all()):
            raise DeltaSetError(
                f"labels must be integers in {{0, 1}} (0 = {self.classes[0]!r}, 1 = "
                f"{self.classes[1]!r}), got values {sorted(set(y.flatten().tolist()))[:6]} of "
                f"dtype {y.dtype}."
            )
        if (len(self.classes) != 2 or not all(isinstance(c, str) and c for c in self.classes)
                or self.classes[0] == self.classes[1]):
            raise DeltaSetError(f"classes must be two different names (label 0, label 1), got "
                                f"{self.classes!r}.")
        if len(self.subjects) != d.shape[0]:
            raise DeltaSetError(
                f"{len(self.subjects)} subjects for {d.shape[0]} delta rows; give one subject "
                "per row, in row order."
            )
        if not isinstance(self.model_identity, str) or not self.model_identity:
            raise DeltaSetError("model_identity must be a non-empty string (LoadedModel.identity).")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise DeltaSetError(f"layer must be a non-negative int, got {self.layer!r}.")
        # Canonical dtypes, so later maths and comparisons are predictable.
        object.__setattr__(self, "deltas", d.detach().to(torch.float32).cpu().contiguous())
        object.__setattr__(self, "labels", y.detach().to(torch.int64).cpu().contiguous())
        object.__setattr__(self, "subjects", tuple(str(s) for s in self.subjects))
        object.__setattr__(self, "classes", tuple(self.classes))

    @classmethod
    def from_sweep(cls, sweep_dir: str | Path,
                   labels: Sequence[int] | Mapping[str, int] | None = None) -> DeltaSet:
        """Load a sweep directory; ``labels`` (per row, or subject → label) replaces the
        recorded ones (see :func:`load_delta_set`)."""
        return load_delta_set(sweep_dir, labels)

    def probe(self, *, seed: int = 0, test_size: float = 0.3, C: float = 1.0) -> ClassifierResult:
        """The logistic-regression classifier of label 1 vs label 0 on a seeded stratified
        split, with its shuffled-label control (:func:`~rome_edit.analysis.classifier.\
train_classifier` on these rows)."""
        return train_classifier(self.deltas, self.labels, seed=seed, test_size=test_size, C=C,
                                classes=self.classes)

    def box_vector(self, scale: ScaleSpec = "mean-norm", *, seed: int = 0,
                   classifier: ClassifierResult | None = None) -> ConceptVector:
        """The source's bounded vector (every component in [−1, 1], maximising the probe's
        probability of label 1), scaled (``"raw"``, ``"mean-norm"`` or a multiple of the mean
        ‖δ‖) — ready for ``vector.applied(editor, subject)``."""
        return make_concept_vector(self.deltas, classifier or self.probe(seed=seed), scale,
                                   **self.provenance)

    def directions(self, *, seed: int = 0, **options: Any) -> ConceptDirections:
        """Every candidate concept direction (box, classifier, mean difference, INLP, R-LACE,
        LEACE) as unit vectors towards label 1 (:func:`~rome_edit.analysis.directions.\
candidate_directions`; ``options`` go to it)."""
        return candidate_directions(self.deltas, self.labels, seed=seed,
                                    model_identity=self.model_identity, layer=self.layer,
                                    classes=self.classes, **options)

    def direction_vector(self, direction: Tensor, scale: float = 1.0, *,
                         test_accuracy: float = float("nan")) -> ConceptVector:
        """Any direction (e.g. ``ds.directions()["leace"]``) as a :class:`ConceptVector` of norm
        ``scale`` × the mean ‖δ‖, for applying it like the box vector.

        ``direction``: ``(d_model,)`` (any shape with ``d_model`` elements is flattened; cast to
        float32)."""
        d = torch.as_tensor(direction, dtype=torch.float32).flatten()
        if d.numel() != self.width or not bool(d.norm() > 0):
            raise DeltaSetError(f"direction must be a non-zero vector of width {self.width}.")
        raw_norm = float(d.norm())
        multiplier = float(scale) * self.mean_norm / raw_norm
        return ConceptVector(d * multiplier, "multiple", multiplier, raw_norm,
                             self.model_identity, self.layer, test_accuracy, self.mean_norm,
                             self.classes, self.prompt)

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the rows come from (``model_identity``, ``layer``, ``classes``, ``prompt``): the
        keywords the estimators store in what they return (e.g. ``make_concept_vector``)."""
        return {"model_identity": self.model_identity, "layer": self.layer,
                "classes": self.classes, "prompt": self.prompt}

    @property
    def n(self) -> int:
        return self.deltas.shape[0]

    @property
    def width(self) -> int:
        return self.deltas.shape[1]

    @property
    def class_counts(self) -> tuple[int, int]:
        """(number of label-0 rows, number of label-1 rows)."""
        n_1 = int(self.labels.sum())
        return self.n - n_1, n_1

    @property
    def mean_norm(self) -> float:
        """Mean Euclidean norm of the deltas (the reference scale for a concept vector)."""
        return float(self.deltas.norm(dim=1).mean())

    def require_both_classes(self, min_per_class: int = 2) -> None:
        """Raise unless each label has at least ``min_per_class`` rows."""
        require_both_classes(self.labels, min_per_class, self.classes)

    def subset(self, index: Tensor | Sequence[int]) -> DeltaSet:
        """The rows at ``index``, same model and layer.

        ``index``: ``(k,)`` integer row indices, or an ``(n,)`` bool mask."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        rows = idx.tolist()
        return DeltaSet(self.deltas[idx], self.labels[idx], tuple(self.subjects[i] for i in rows),
                        self.model_identity, self.layer, self.classes, self.prompt)


def concat(sets: Sequence[DeltaSet]) -> DeltaSet:
    """Stack delta sets of the same model, layer and width; refuse to mix anything else."""
    if not sets:
        raise DeltaSetError("concat needs at least one DeltaSet.")
    first = sets[0]
    for i, other in enumerate(sets[1:], start=1):
        if other.model_identity != first.model_identity:
            raise DeltaSetError(
                f"cannot mix deltas of different models: set 0 is {first.model_identity!r}, set "
                f"{i} is {other.model_identity!r}; analyse each model's sweep separately."
            )
        if other.layer != first.layer:
            raise DeltaSetError(
                f"cannot mix deltas of different layers: set 0 is layer {first.layer}, set {i} is "
                f"layer {other.layer}; analyse each layer's sweep separately."
            )
        if other.classes != first.classes:
            raise DeltaSetError(f"cannot mix labels {first.classes} and {other.classes} (set "
                                f"{i}); concatenate sweeps of the same concept.")
        if other.width != first.width:
            raise DeltaSetError(
                f"cannot mix deltas of width {first.width} and {other.width} (set {i}); they "
                "cannot come from the same layer of the same model."
            )
    return DeltaSet(
        torch.cat([s.deltas for s in sets]), torch.cat([s.labels for s in sets]),
        tuple(subject for s in sets for subject in s.subjects), first.model_identity, first.layer,
        first.classes, first.prompt if all(s.prompt == first.prompt for s in sets) else None,
    )


def _legacy_label(gender: str) -> int:
    """Label of a row recorded with ``gender`` only: 1 when the original gender is female
    (a female→male edit), else 0."""
    g = str(gender).strip().lower()
    if g not in LEGACY_GENDERS:
        raise DeltaSetError(f"gender {gender!r} is not 'female' or 'male'.")
    return int(g == "female")


def _row_label(path: Path, line_no: int, row: dict[str, Any]) -> int | None:
    if "label" in row:
        y = row["label"]
        if isinstance(y, bool) or y not in (0, 1):
            raise DeltaSetError(f"{path}:{line_no}: label {y!r} is not 0 or 1.")
        return int(y)
    if "gender" not in row:
        return None
    try:
        y = _legacy_label(row["gender"])
    except DeltaSetError as err:
        raise DeltaSetError(f"{path}:{line_no}: {err} Use the subject's original gender.") \
            from err
    target = str(row.get("target", "")).strip().lower()
    if target == str(row["gender"]).strip().lower():
        raise DeltaSetError(f"{path}:{line_no}: target {row['target']!r} equals the original "
                            "gender; the sweep must edit each name to the other gender.")
    return y


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[int | None]]:
    records, labels = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DeltaSetError(f"{path}:{line_no}: not valid JSON ({err.msg}); fix or "
                                "re-run the sweep.") from err
        if not isinstance(row, dict):
            raise DeltaSetError(f"{path}:{line_no}: expected a JSON object per line.")
        if "subject" not in row:
            raise DeltaSetError(f"{path}:{line_no}: missing key 'subject'; each record names "
                                "its edited subject.")
        labels.append(_row_label(path, line_no, row))
        records.append(row)
    return records, labels


def _given_labels(given: Sequence[int] | Mapping[str, int], subjects: Sequence[str],
                  root: Path) -> list[int]:
    if isinstance(given, Mapping):
        missing = [s for s in subjects if s not in given]
        if missing:
            raise DeltaSetError(f"no label for subjects {missing[:5]} of {root}; give a label "
                                "for every recorded subject.")
        return [given[s] for s in subjects]
    if len(given) != len(subjects):
        raise DeltaSetError(f"{len(given)} labels for the {len(subjects)} records of {root}; "
                            "give one per record, in records.jsonl order.")
    return list(given)


def load_delta_set(sweep_dir: str | Path,
                   labels: Sequence[int] | Mapping[str, int] | None = None) -> DeltaSet:
    """Read a sweep directory (``deltas.safetensors``, ``records.jsonl``, ``summary.json``).

    Labels are the recorded ones (``label``, or the original ``gender`` of older sweeps) unless
    ``labels`` gives them: one per record in order, or a mapping subject → label — to analyse
    one sweep by another concept.
    """
    root = Path(sweep_dir)
    for name in (DELTAS_FILE, RECORDS_FILE, SUMMARY_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} does not exist; point to a sweep output directory (it holds "
                f"{DELTAS_FILE}, {RECORDS_FILE} and {SUMMARY_FILE}), or run the sweep first."
            )
    try:
        file_meta, names, deltas = read_tensor_entry(root / DELTAS_FILE, DELTA_TENSOR)
    except (SafetensorError, OSError) as err:
        raise DeltaSetError(f"{root / DELTAS_FILE} is not a readable safetensors file ({err}); "
                            "re-run the sweep (pickled tensors are never loaded).") from err
    if deltas is None:
        raise DeltaSetError(f"{root / DELTAS_FILE} has no tensor {DELTA_TENSOR!r} (found "
                            f"{sorted(names)}); re-run the sweep.")
    try:
        summary = json.loads((root / SUMMARY_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DeltaSetError(f"{root / SUMMARY_FILE} is not valid JSON ({err.msg}).") from err
    if not isinstance(summary, dict) or "model_identity" not in summary or "layer" not in summary:
        raise DeltaSetError(f"{root / SUMMARY_FILE} must be a JSON object with 'model_identity' "
                            "and 'layer'; re-run the sweep.")
    for key in ("model_identity", "layer"):  # the tensor file may carry its own provenance
        if key in file_meta and file_meta[key] != str(summary[key]):
            raise DeltaSetError(f"{root}: {DELTAS_FILE} says {key}={file_meta[key]!r} but "
                                f"{SUMMARY_FILE} says {summary[key]!r}; the files come from "
                                "different sweeps — re-run or re-merge the sweep.")
    records, recorded = _read_records(root / RECORDS_FILE)
    if deltas.ndim != 2 or deltas.shape[0] != len(records):
        raise DeltaSetError(
            f"{root}: {tuple(deltas.shape)} delta tensor for {len(records)} records; the sweep "
            "must write one delta row per record line, in the same order."
        )
    layer = summary["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise DeltaSetError(f"{root / SUMMARY_FILE}: 'layer' must be an int, got {layer!r}.")
    subjects = tuple(str(r["subject"]) for r in records)
    if labels is not None:
        values = _given_labels(labels, subjects, root)
        classes = tuple(summary.get("classes") or DEFAULT_CLASSES)
    else:
        unlabelled = [i + 1 for i, y in enumerate(recorded) if y is None]
        if unlabelled:
            raise DeltaSetError(f"{root / RECORDS_FILE}: lines {unlabelled[:5]} have no 'label'; "
                                "the sweep was run without labels — pass labels= (one per "
                                "record, or subject → label).")
        values = [y for y in recorded if y is not None]  # all labelled: checked just above
        legacy = any("label" not in r for r in records)
        classes = LEGACY_CLASSES if legacy else tuple(summary.get("classes") or DEFAULT_CLASSES)
    try:
        y = torch.tensor(values, dtype=torch.int64)
    except (TypeError, ValueError) as err:
        raise DeltaSetError(f"labels must be 0/1 integers ({err}).") from None
    prompt = summary.get("prompt")
    ds = DeltaSet(deltas, y, subjects, str(summary["model_identity"]), layer,
                  classes, prompt if isinstance(prompt, str) else None)
    log.info("loaded %d deltas of width %d (%d %s, %d %s) from %s", ds.n, ds.width,
             ds.class_counts[1], ds.classes[1], ds.class_counts[0], ds.classes[0], root)
    return ds
