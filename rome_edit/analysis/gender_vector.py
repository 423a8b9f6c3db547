"""The gender vector as a saved artefact: its scale, provenance and safetensors file.

A raw box vector (``box_vector.py``) can be far shorter than real deltas (METHOD.md feasibility
run: ‖g‖ ≈ 13 vs mean ‖δ‖ ≈ 50), so the scale is explicit: ``"raw"`` (as optimised),
``"mean-norm"`` (rescaled to the mean delta norm) or a float ``f`` (``f`` × the mean delta norm,
scale mode ``"multiple"``).

File format: a safetensors file with one float32 tensor ``"vector"`` of shape (d,) and the
provenance as string metadata in its header (``format``, ``scale_mode``, ``scale``, ``raw_norm``,
``model_identity``, ``layer``, ``classifier_test_accuracy``, ``mean_delta_norm``).  Loading never
unpickles: a pickle or ``torch.save`` file is recognised and refused with a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from rome_edit.storage import atomic_save_tensors

log = logging.getLogger(__name__)

ScaleSpec = str | float  # "raw", "mean-norm", or a positive multiple of the mean delta norm
SCALE_MODES = ("raw", "mean-norm", "multiple")
FILE_FORMAT = "rome-edit/gender-vector/1"
VECTOR_TENSOR = "vector"
_FLOAT_FIELDS = ("scale", "raw_norm", "classifier_test_accuracy", "mean_delta_norm")


class GenderVectorError(ValueError):
    """A gender vector, scale or vector file that cannot be used; the message says what to fix."""


def resolve_scale(scale: ScaleSpec, raw_norm: float, mean_delta_norm: float) -> tuple[str, float]:
    """``(scale_mode, multiplier applied to the raw vector)`` for a scale specification."""
    if raw_norm <= 0:
        raise GenderVectorError("the raw box vector is zero (the classifier weights are zero); "
                                "retrain the classifier on deltas of both edit directions.")
    if isinstance(scale, str):
        if scale == "raw":
            return "raw", 1.0
        if scale == "mean-norm":
            return "mean-norm", mean_delta_norm / raw_norm
        try:
            scale = float(scale)
        except ValueError:
            raise GenderVectorError(f"scale {scale!r} is not 'raw', 'mean-norm' or a number "
                                    "(a multiple of the mean delta norm).") from None
    if isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise GenderVectorError(f"scale {scale!r} must be a positive, finite multiple of the mean "
                                "delta norm (use --sign -1 to reverse the vector).")
    return "multiple", float(scale) * mean_delta_norm / raw_norm


@dataclass(frozen=True, eq=False)
class GenderVector:
    """The scaled box vector of one model and edit layer, with where it came from.

    ``vector = scale × raw box vector``; ``raw_norm`` is the raw vector's norm and
    ``mean_delta_norm`` the mean ‖δ‖ of the deltas it was derived from.
    """

    vector: Tensor
    scale_mode: str
    scale: float
    raw_norm: float
    model_identity: str
    layer: int
    classifier_test_accuracy: float
    mean_delta_norm: float

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, Tensor) or v.ndim != 1 or v.numel() == 0:
            raise GenderVectorError("a gender vector must be a non-empty 1-D tensor.")
        if not v.is_floating_point():
            raise GenderVectorError(f"a gender vector must be floating point, got {v.dtype}.")
        if not bool(torch.isfinite(v).all()):
            raise GenderVectorError("the gender vector contains NaN or inf; recompute it.")
        if self.scale_mode not in SCALE_MODES:
            raise GenderVectorError(f"scale_mode {self.scale_mode!r} is not one of {SCALE_MODES}.")
        for name in ("scale", "raw_norm", "mean_delta_norm"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise GenderVectorError(f"{name} must be positive and finite, got {value!r}.")
        object.__setattr__(self, "vector", v.detach().to(torch.float32).cpu().contiguous())

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
        """The box vector as optimised (every component in [−1, 1])."""
        return self.vector / self.scale

    def to_json(self) -> dict:
        """The provenance and norms (the vector itself goes in the safetensors file)."""
        return {"norm": self.norm, "multiple_of_mean_delta_norm": self.multiple,
                "scale_mode": self.scale_mode, "scale": self.scale, "raw_norm": self.raw_norm,
                "model_identity": self.model_identity, "layer": self.layer,
                "classifier_test_accuracy": self.classifier_test_accuracy,
                "mean_delta_norm": self.mean_delta_norm, "width": self.width}

    def rescaled(self, scale: ScaleSpec) -> GenderVector:
        """The same direction at another scale (same provenance)."""
        mode, multiplier = resolve_scale(scale, self.raw_norm, self.mean_delta_norm)
        return GenderVector(self.raw * multiplier, mode, multiplier, self.raw_norm,
                            self.model_identity, self.layer, self.classifier_test_accuracy,
                            self.mean_delta_norm)

    def check_compatible(self, model_identity: str, layer: int, width: int) -> None:
        """Raise unless this vector belongs to that model, layer and value width."""
        if width != self.width:
            raise GenderVectorError(f"the vector has width {self.width} but the layer's values "
                                    f"have width {width}; use a vector made for this model.")
        if model_identity != self.model_identity:
            raise GenderVectorError(f"the vector was made for model {self.model_identity!r}, not "
                                    f"{model_identity!r}; analyse a sweep of this model.")
        if layer != self.layer:
            raise GenderVectorError(f"the vector was made for layer {self.layer}, not {layer}; "
                                    f"edit layer {self.layer} or analyse a sweep of layer {layer}.")


def save_gender_vector(vector: GenderVector, path: str | Path) -> Path:
    """Write ``vector`` as safetensors with its provenance in the header; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FILE_FORMAT, "scale_mode": vector.scale_mode,
                "model_identity": vector.model_identity, "layer": str(vector.layer)}
    metadata |= {name: repr(float(getattr(vector, name))) for name in _FLOAT_FIELDS}
    atomic_save_tensors({VECTOR_TENSOR: vector.vector}, path, metadata)
    log.info("saved gender vector (norm %.3f, %s) to %s", vector.norm, vector.scale_mode, path)
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
        raise GenderVectorError(
            f"{path} looks like {kind}; rome-edit never unpickles files. Save the vector with "
            "rome_edit.analysis.gender_vector.save_gender_vector (safetensors) instead."
        )


def load_gender_vector(path: str | Path, *, expected_width: int | None = None) -> GenderVector:
    """Read and validate a vector file written by :func:`save_gender_vector`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a vector file written by "
                                "`rome-edit analyze` (vectors/*.safetensors).")
    _refuse_non_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            tensor = f.get_tensor(VECTOR_TENSOR) if VECTOR_TENSOR in keys else None
    except (SafetensorError, OSError) as err:
        raise GenderVectorError(f"{path} is not a safetensors file ({err}); pass a vector file "
                                "written by `rome-edit analyze`.") from err
    if tensor is None:
        raise GenderVectorError(f"{path} has no tensor {VECTOR_TENSOR!r} (found {keys}); it is "
                                "not a gender-vector file.")
    if metadata.get("format") != FILE_FORMAT:
        raise GenderVectorError(f"{path} has format {metadata.get('format')!r}, expected "
                                f"{FILE_FORMAT!r}; re-create it with `rome-edit analyze`.")
    if tensor.ndim != 1 or not tensor.is_floating_point():
        raise GenderVectorError(f"{path}: the vector must be a 1-D float tensor, got shape "
                                f"{tuple(tensor.shape)} of dtype {tensor.dtype}; re-create it "
                                "with `rome-edit analyze` (or save a 1-D float tensor).")
    if not bool(torch.isfinite(tensor).all()):
        raise GenderVectorError(f"{path}: the vector contains NaN or inf; recompute it.")
    if expected_width is not None and tensor.numel() != expected_width:
        raise GenderVectorError(f"{path}: the vector has width {tensor.numel()} but "
                                f"{expected_width} was expected (the edit layer's value width); "
                                "use a vector made for this model and layer.")
    try:
        fields = {name: float(metadata[name]) for name in _FLOAT_FIELDS}
        layer = int(metadata["layer"])
        identity, mode = metadata["model_identity"], metadata["scale_mode"]
    except (KeyError, ValueError) as err:
        raise GenderVectorError(f"{path}: missing or malformed metadata ({err}); re-create it "
                                "with `rome-edit analyze`.") from err
    return GenderVector(tensor, mode, fields["scale"], fields["raw_norm"], identity, layer,
                        fields["classifier_test_accuracy"], fields["mean_delta_norm"])
