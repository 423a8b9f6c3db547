"""Recorded value changes ``δ = v* − v_orig`` of ROME edits, with their edit-direction labels.

METHOD.md, "The gender-vector experiment": every name is edited to the other gender and the
optimised value change ``δ`` at the edit layer is recorded.  A :class:`DeltaSet` holds those rows
with ``label = 1`` for a female→male edit (the original gender was female) and ``label = 0`` for a
male→female edit, plus the model identity and layer they came from, so that deltas of different
models or layers are never mixed by accident.

A sweep directory holds ``deltas.safetensors`` (tensor ``"delta"``, one row per edit),
``records.jsonl`` (one JSON object per row, in the same order, with at least ``subject``,
``gender`` and ``target``) and ``summary.json`` (with ``model_identity`` and ``layer``).
Nothing is unpickled: tensors come from safetensors and records from JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

log = logging.getLogger(__name__)

DELTAS_FILE = "deltas.safetensors"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
DELTA_TENSOR = "delta"
GENDERS = ("female", "male")


class DeltaSetError(ValueError):
    """Deltas that cannot be analysed as given; the message names the problem and the fix."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality
class DeltaSet:
    """``n`` recorded deltas of width ``d`` from one model and one edit layer.

    ``deltas`` is float32 (n, d); ``labels`` is int64 (n,) with 1 = female→male edit and
    0 = male→female edit; ``subjects`` names the edited subject of each row.
    """

    deltas: Tensor
    labels: Tensor
    subjects: tuple[str, ...]
    model_identity: str
    layer: int

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
                f"{shape}; give 1 for a female→male edit and 0 for male→female."
            )
        if y.is_floating_point() or y.is_complex() or not bool(((y == 0) | (y == 1)).all()):
            raise DeltaSetError(
                f"labels must be integers in {{0, 1}} (1 = female→male, 0 = male→female), got "
                f"values {sorted(set(y.flatten().tolist()))[:6]} of dtype {y.dtype}."
            )
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

    @property
    def n(self) -> int:
        return self.deltas.shape[0]

    @property
    def width(self) -> int:
        return self.deltas.shape[1]

    @property
    def class_counts(self) -> tuple[int, int]:
        """(number of male→female rows, number of female→male rows)."""
        n_fm = int(self.labels.sum())
        return self.n - n_fm, n_fm

    @property
    def mean_norm(self) -> float:
        """Mean Euclidean norm of the deltas (the reference scale for the gender vector)."""
        return float(self.deltas.norm(dim=1).mean())

    def require_both_classes(self, min_per_class: int = 2) -> None:
        """Raise unless each edit direction has at least ``min_per_class`` rows."""
        n_mf, n_fm = self.class_counts
        if min(n_mf, n_fm) < min_per_class:
            raise DeltaSetError(
                f"a classifier needs at least {min_per_class} deltas of each edit direction, got "
                f"{n_fm} female→male and {n_mf} male→female; sweep names of both genders "
                "(or concatenate two sweeps of the same model and layer)."
            )

    def subset(self, index: Tensor | Sequence[int]) -> DeltaSet:
        """The rows at ``index`` (indices or a boolean mask), same model and layer."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        rows = idx.tolist()
        return DeltaSet(self.deltas[idx], self.labels[idx], tuple(self.subjects[i] for i in rows),
                        self.model_identity, self.layer)


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
        if other.width != first.width:
            raise DeltaSetError(
                f"cannot mix deltas of width {first.width} and {other.width} (set {i}); they "
                "cannot come from the same layer of the same model."
            )
    return DeltaSet(
        torch.cat([s.deltas for s in sets]), torch.cat([s.labels for s in sets]),
        tuple(subject for s in sets for subject in s.subjects), first.model_identity, first.layer,
    )


def label_for_gender(gender: str) -> int:
    """1 when the original gender is female (so the edit is female→male), else 0."""
    g = str(gender).strip().lower()
    if g not in GENDERS:
        raise DeltaSetError(f"gender {gender!r} is not 'female' or 'male'.")
    return int(g == "female")


def _read_records(path: Path) -> list[dict]:
    records = []
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
        missing = [k for k in ("subject", "gender", "target") if k not in row]
        if missing:
            raise DeltaSetError(f"{path}:{line_no}: missing keys {missing}; each record needs "
                                "'subject', 'gender' and 'target'.")
        try:
            label_for_gender(row["gender"])
        except DeltaSetError as err:
            raise DeltaSetError(f"{path}:{line_no}: {err} Use the subject's original gender.") \
                from err
        target = str(row["target"]).strip().lower()
        if target == str(row["gender"]).strip().lower():
            raise DeltaSetError(f"{path}:{line_no}: target {row['target']!r} equals the original "
                                "gender; the sweep must edit each name to the other gender.")
        records.append(row)
    return records


def load_delta_set(sweep_dir: str | Path) -> DeltaSet:
    """Read a sweep directory (``deltas.safetensors``, ``records.jsonl``, ``summary.json``)."""
    root = Path(sweep_dir)
    for name in (DELTAS_FILE, RECORDS_FILE, SUMMARY_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} does not exist; point to a sweep output directory (it holds "
                f"{DELTAS_FILE}, {RECORDS_FILE} and {SUMMARY_FILE}), or run the sweep first."
            )
    try:
        with safe_open(str(root / DELTAS_FILE), framework="pt") as f:
            file_meta = f.metadata() or {}
            names = list(f.keys())
            deltas = f.get_tensor(DELTA_TENSOR) if DELTA_TENSOR in names else None
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
    records = _read_records(root / RECORDS_FILE)
    if deltas.ndim != 2 or deltas.shape[0] != len(records):
        raise DeltaSetError(
            f"{root}: {tuple(deltas.shape)} delta tensor for {len(records)} records; the sweep "
            "must write one delta row per record line, in the same order."
        )
    layer = summary["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise DeltaSetError(f"{root / SUMMARY_FILE}: 'layer' must be an int, got {layer!r}.")
    labels = torch.tensor([label_for_gender(r["gender"]) for r in records], dtype=torch.int64)
    ds = DeltaSet(deltas, labels, tuple(str(r["subject"]) for r in records),
                  str(summary["model_identity"]), layer)
    log.info("loaded %d deltas of width %d (%d F→M, %d M→F) from %s",
             ds.n, ds.width, ds.class_counts[1], ds.class_counts[0], root)
    return ds
