"""A concept vector (the study's "gender vector") as a saved artefact: its scale, provenance
and safetensors file.

A raw box vector (``box_vector.py``) can be far shorter than real deltas (docs/method.md, "A
feasibility run on a toy GPT-J": ‖g‖ ≈ 13 vs mean ‖δ‖ ≈ 50), so the scale is explicit:
``"raw"`` (as optimised), ``"mean-norm"`` (rescaled to the mean delta norm) or a float ``f``
(``f`` × the mean delta norm, scale mode ``"multiple"``).

File format: a safetensors file with one float32 tensor ``"vector"`` of shape (d,) and the
provenance as string metadata in its header (``format``, ``scale_mode``, ``scale``, ``raw_norm``,
``model_identity``, ``layer``, ``classifier_test_accuracy``, ``mean_delta_norm``, and ``classes``
as a JSON list).  Files written before vectors were generic carry the format
``rome-edit/gender-vector/1`` and load with the gender study's classes.  Loading never unpickles:
a pickle or ``torch.save`` file is recognised and refused with a message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor

from rome_edit.errors import MissingFileError, ParameterError
from rome_edit.storage import atomic_save_tensors, read_tensor_entry

log = logging.getLogger(__name__)

_Handle = TypeVar("_Handle", covariant=True)


class VectorWriter(Protocol[_Handle]):
    """What writes a vector into a model: ``rome_edit.Editor`` (whose handle is
    ``rome_edit.Applied``).  A protocol, so that analysis imports no model code, not even for
    annotations."""

    def apply_vector(self, vector: ConceptVector, subjects: str | Sequence[str],
                     scale: float = 1.0, *, prompt: str | None = None) -> _Handle: ...


ScaleSpec = str | float  # "raw", "mean-norm", or a positive multiple of the mean delta norm
SCALE_MODES = ("raw", "mean-norm", "multiple")
FILE_FORMAT = "rome-edit/concept-vector/1"
LEGACY_FORMAT = "rome-edit/gender-vector/1"  # no classes in the header: the gender study's
LEGACY_CLASSES = ("male→female", "female→male")
VECTOR_TENSOR = "vector"
_FLOAT_FIELDS = ("scale", "raw_norm", "classifier_test_accuracy", "mean_delta_norm")


class ConceptVectorError(ParameterError):
    """A concept vector, scale or vector file that cannot be used; the message says what to
    fix."""


def resolve_scale(scale: ScaleSpec, raw_norm: float, mean_delta_norm: float) -> tuple[str, float]:
    """``(scale_mode, multiplier applied to the raw vector)`` for a scale specification."""
    if raw_norm <= 0:
        raise ConceptVectorError("the raw box vector is zero (the classifier weights are zero); "
                                 "retrain the classifier on deltas of both edit directions.")
    if isinstance(scale, str):
        if scale == "raw":
            return "raw", 1.0
        if scale == "mean-norm":
            return "mean-norm", mean_delta_norm / raw_norm
        try:
            scale = float(scale)
        except ValueError:
            raise ConceptVectorError(f"scale {scale!r} is not 'raw', 'mean-norm' or a number "
                                     "(a multiple of the mean delta norm).") from None
    if isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise ConceptVectorError(f"scale {scale!r} must be a positive, finite multiple of the mean "
                                 "delta norm (to reverse the vector use a negative scale in "
                                 "ConceptVector.signed).", parameters=("sign",))
    return "multiple", float(scale) * mean_delta_norm / raw_norm


@dataclass(frozen=True, eq=False)
class ConceptVector:
    """The scaled box vector of one model and edit layer, with where it came from.

    ``vector``: ``(d_model,)`` float32 (other floating dtypes are converted; kept on the CPU),
    ``vector = scale × raw box vector``; ``raw_norm`` is the raw vector's norm and
    ``mean_delta_norm`` the mean ‖δ‖ of the deltas it was derived from; ``classes`` names the
    labels of those deltas: ``+vector`` points from ``classes[0]``-like deltas towards
    ``classes[1]``-like ones.  Apply it to a model with :mod:`rome_edit.evaluation.vectors`
    (or ``rome_edit.Editor``).
    """

    vector: Tensor
    scale_mode: str
    scale: float
    raw_norm: float
    model_identity: str
    layer: int
    classifier_test_accuracy: float
    mean_delta_norm: float
    classes: tuple[str, str] = ("0", "1")
    prompt: str | None = None  # the edit prompt of the deltas (where the vector is written)

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, Tensor) or v.ndim != 1 or v.numel() == 0:
            raise ConceptVectorError("a concept vector must be a non-empty 1-D tensor.")
        if not v.is_floating_point():
            raise ConceptVectorError(f"a concept vector must be floating point, got {v.dtype}.")
        if not bool(torch.isfinite(v).all()):
            raise ConceptVectorError("the concept vector contains NaN or inf; recompute it.")
        if self.scale_mode not in SCALE_MODES:
            raise ConceptVectorError(f"scale_mode {self.scale_mode!r} is not one of {SCALE_MODES}.")
        for name in ("scale", "raw_norm", "mean_delta_norm"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ConceptVectorError(f"{name} must be positive and finite, got {value!r}.")
        object.__setattr__(self, "vector", v.detach().to(torch.float32).cpu().contiguous())
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def width(self) -> int:
        return self.vector.numel()

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def multiple(self) -> float:
        """The vector's norm as a multiple of the mean delta norm."""
        return self.norm / self.mean_delta_norm

    @property
    def raw(self) -> Tensor:
        """The box vector as optimised (every component in [−1, 1]): ``(d_model,)`` float32."""
        return self.vector / self.scale

    def to_json(self) -> dict[str, Any]:
        """The provenance and norms (the vector itself goes in the safetensors file)."""
        return {"norm": self.norm, "multiple_of_mean_delta_norm": self.multiple,
                "scale_mode": self.scale_mode, "scale": self.scale, "raw_norm": self.raw_norm,
                "model_identity": self.model_identity, "layer": self.layer,
                "classifier_test_accuracy": self.classifier_test_accuracy,
                "mean_delta_norm": self.mean_delta_norm, "width": self.width,
                "classes": list(self.classes), "prompt": self.prompt}

    def rescaled(self, scale: ScaleSpec) -> ConceptVector:
        """The same direction at another scale (same provenance)."""
        mode, multiplier = resolve_scale(scale, self.raw_norm, self.mean_delta_norm)
        return ConceptVector(self.raw * multiplier, mode, multiplier, self.raw_norm,
                            self.model_identity, self.layer, self.classifier_test_accuracy,
                            self.mean_delta_norm, self.classes, self.prompt)

    def signed(self, scale: float) -> Tensor:
        """The vector at ``|scale|`` × the mean delta norm, negated when ``scale < 0``: a
        positive scale pushes a subject the way label-1 edits did (the study: female→male).
        Returns ``(d_model,)`` float32."""
        if isinstance(scale, bool) or not np.isfinite(scale) or scale == 0:
            raise ConceptVectorError(f"scale {scale!r} must be a non-zero finite number (a "
                                     "multiple of the mean delta norm; negative reverses).")
        return self.raw * resolve_scale(abs(float(scale)), self.raw_norm,
                                        self.mean_delta_norm)[1] * (1.0 if scale > 0 else -1.0)

    def applied(self, editor: VectorWriter[_Handle], subjects: str | Sequence[str],
                scale: float = 1.0, *, prompt: str | None = None) -> _Handle:
        """Write ``v_orig + s·g`` for each subject into ``editor``'s model (``rome_edit.Editor``:
        the rank-one edit of Xodarap 2023, ``s`` = ``scale`` × the mean ‖δ‖, see :meth:`signed`) and
        return the handle: use it as a context manager (``with vector.applied(ed, "Ani",
        scale=2.0): ...`` reverts on exit) or keep it and call ``.revert()`` — the persistent
        form.  The vector stays model-free: the editor does the writing."""
        return editor.apply_vector(self, subjects, scale=scale, prompt=prompt)

    def check_compatible(self, model_identity: str, layer: int, width: int) -> None:
        """Raise unless this vector belongs to that model, layer and value width."""
        if width != self.width:
            raise ConceptVectorError(f"the vector has width {self.width} but the layer's values "
                                     f"have width {width}; use a vector made for this model.")
        if model_identity != self.model_identity:
            raise ConceptVectorError(f"the vector was made for model {self.model_identity!r}, not "
                                     f"{model_identity!r}; analyse a sweep of this model.")
        if layer != self.layer:
            raise ConceptVectorError(f"the vector was made for layer {self.layer}, not {layer}; "
                                     f"edit layer {self.layer} or analyse a sweep of layer "
                                     f"{layer}.")


def save_concept_vector(vector: ConceptVector, path: str | Path) -> Path:
    """Write ``vector`` (its ``(d_model,)`` float32 tensor) as safetensors with its provenance
    in the header; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FILE_FORMAT, "scale_mode": vector.scale_mode,
                "model_identity": vector.model_identity, "layer": str(vector.layer),
                "classes": json.dumps(list(vector.classes))}
    if vector.prompt is not None:
        metadata["prompt"] = vector.prompt
    metadata |= {name: repr(float(getattr(vector, name))) for name in _FLOAT_FIELDS}
    atomic_save_tensors({VECTOR_TENSOR: vector.vector}, path, metadata)
    log.info("saved concept vector (norm %.3f, %s) to %s", vector.norm, vector.scale_mode, path)
    return path


def _refuse_non_safetensors(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header's length (u64, little endian) and then "{";
    # that length's first byte can be 0x80, so recognise safetensors before pickles.
    if len(head) == 9 and head[8:9] == b"{":
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        kind = "a pickle" if head[:1] == b"\x80" else "a zip archive (torch.save format)"
        raise ConceptVectorError(
            f"{path} looks like {kind}; rome_edit never unpickles files. Save the vector with "
            "rome_edit.analysis.concept_vector.save_concept_vector (safetensors) instead."
        )


def load_concept_vector(path: str | Path, *, expected_width: int | None = None) -> ConceptVector:
    """Read and validate a vector file written by :func:`save_concept_vector` (or by
    ``rome-edit analyze`` before vectors were generic).  The file's tensor must be 1-D
    floating point, ``(d_model,)``; ``expected_width`` (the edit layer's ``d_model``) is
    checked when given."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; pass a vector file written by "
                               "save_concept_vector (rome_edit.api.analyze.analyze writes "
                               "vectors/*.safetensors).", parameters=("analyze",))
    _refuse_non_safetensors(path)
    try:
        metadata, keys, tensor = read_tensor_entry(path, VECTOR_TENSOR)
    except (SafetensorError, OSError) as err:
        raise ConceptVectorError(f"{path} is not a safetensors file ({err}); pass a vector file "
                                 "written by save_concept_vector.",
                                 parameters=("analyze",)) from err
    if tensor is None:
        raise ConceptVectorError(f"{path} has no tensor {VECTOR_TENSOR!r} (found {keys}); it is "
                                 "not a concept-vector file.")
    if metadata.get("format") not in (FILE_FORMAT, LEGACY_FORMAT):
        raise ConceptVectorError(f"{path} has format {metadata.get('format')!r}, expected "
                                 f"{FILE_FORMAT!r}; re-create it with "
                                 "rome_edit.api.analyze.analyze.", parameters=("analyze",))
    if tensor.ndim != 1 or not tensor.is_floating_point():
        raise ConceptVectorError(f"{path}: the vector must be a 1-D float tensor, got shape "
                                 f"{tuple(tensor.shape)} of dtype {tensor.dtype}; re-create it "
                                 "with rome_edit.api.analyze.analyze (or save a 1-D float "
                                 "tensor).", parameters=("analyze",))
    if not bool(torch.isfinite(tensor).all()):
        raise ConceptVectorError(f"{path}: the vector contains NaN or inf; recompute it.")
    if expected_width is not None and tensor.numel() != expected_width:
        raise ConceptVectorError(f"{path}: the vector has width {tensor.numel()} but "
                                 f"{expected_width} was expected (the edit layer's value width); "
                                "use a vector made for this model and layer.")
    try:
        fields = {name: float(metadata[name]) for name in _FLOAT_FIELDS}
        layer = int(metadata["layer"])
        identity, mode = metadata["model_identity"], metadata["scale_mode"]
        classes = (tuple(json.loads(metadata["classes"])) if metadata["format"] == FILE_FORMAT
                   else LEGACY_CLASSES)
    except (KeyError, ValueError) as err:
        raise ConceptVectorError(f"{path}: missing or malformed metadata ({err}); re-create it "
                                 "with rome_edit.api.analyze.analyze.",
                                 parameters=("analyze",)) from err
    return ConceptVector(tensor, mode, fields["scale"], fields["raw_norm"], identity, layer,
                        fields["classifier_test_accuracy"], fields["mean_delta_norm"], classes,
                        metadata.get("prompt"))
