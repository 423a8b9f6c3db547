"""Which model a record, a statistic, a sweep or a vector belongs to — stable across upgrades.

Everything rome-edit saves carries the identity ``name@fingerprint`` of the model it was made
on.  The *name* records how the model was loaded (a hub id, a path); the *fingerprint* which
model it is, and only the fingerprint is compared.

**Scheme 2** (this release on; 16 hex digits): SHA-256 over the architecture-relevant
configuration — ``config.to_dict()`` without the keys in
:data:`~rome_edit.models.compat.NON_ARCHITECTURAL_CONFIG_KEYS`, without private keys and
without keys whose value is ``None`` (so a release that adds a new, unset default changes
nothing) — followed by a strided sample of the token embeddings, which ROME never edits, so a
model keeps its fingerprint through its edits, while two models with the same configuration and
different weights get different ones.  Library versions and paths are not part of it.
A checkpoint that ``rome-edit apply --persist`` wrote (a folder holding
:data:`PERSISTED_EDITS`) is the original model plus edits, with the original's configuration
and embeddings; its fingerprint also hashes those files, so it is not taken for the original
(whose cached statistics for later layers, records and sweeps do not describe it).

**Scheme 1** (rome-edit 0.1.0; 12 hex digits) hashed the whole ``to_dict()``, which carries
``transformers_version``: the same model got a new fingerprint on every transformers release.
Files written under it still load: a scheme-1 fingerprint is accepted when it equals the scheme-1
hash of *this* model (its own configuration and embeddings) under one of the releases in
:data:`~rome_edit.models.compat.LEGACY_RELEASES` or the installed one.  That is exactly the
old check with the release name varied, so a different model is refused as strictly as before.
New files are written with scheme 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rome_edit.errors import ParameterError
from rome_edit.models.compat import (
    LEGACY_RELEASES,
    NON_ARCHITECTURAL_CONFIG_KEYS,
    TRANSFORMERS_VERSION,
)

FINGERPRINT_DIGITS = 16
LEGACY_DIGITS = 12
# What rome_edit.weights.persist writes beside a saved edited model (named here because
# models/ sits below the editing rooms and must not import it).
PERSISTED_EDITS = ("rome_edit_edits.json", "rome_edit_edits.safetensors")


class ModelMismatchError(ParameterError):
    """Saved work belongs to another model than the one loaded."""


class Identified(Protocol):
    """What can answer whether a recorded identity is its own (a ``LoadedModel``)."""

    @property
    def identity(self) -> str: ...  # read-only: LoadedModel derives it from name + fingerprint

    def same_model(self, recorded: str) -> bool: ...


def fingerprint_of(identity: str) -> str:
    """The fingerprint of a ``name@fingerprint`` identity (the whole string otherwise)."""
    return identity.rsplit("@", 1)[-1]


def architecture_config(model: nn.Module) -> dict:
    """The part of ``model.config`` that determines what its weights compute."""
    return {key: value for key, value in model.config.to_dict().items()
            if key not in NON_ARCHITECTURAL_CONFIG_KEYS and not key.startswith("_")
            and value is not None}


def _embedding_sample(embed: torch.Tensor) -> bytes:
    """A strided sample of about 65,536 entries of the token embeddings ('' on the meta device)."""
    embed = embed.detach()
    if embed.device.type == "meta":
        return b""
    sample = embed.flatten()[:: max(1, embed.numel() // 65_536)].float().cpu()
    return sample.numpy().tobytes()


def _hexdigest(config: dict, sample: bytes) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(sample)
    return digest.hexdigest()


def persisted_edits_digest(source: str | Path | None) -> bytes:
    """SHA-256 of the persisted-edit files in the model folder ``source`` (b'' without them)."""
    if source is None or not Path(source).is_dir():
        return b""
    files = [Path(source) / name for name in PERSISTED_EDITS]
    if not any(f.is_file() for f in files):
        return b""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes() if f.is_file() else b"-")
    return digest.digest()


def fingerprint(model: nn.Module, embed: torch.Tensor, source: str | Path | None = None) -> str:
    """Scheme 2 (see the module docstring) for ``model`` with token embeddings ``embed``;
    ``source`` is the folder it was loaded from, which may hold persisted edits."""
    sample = _embedding_sample(embed) + persisted_edits_digest(source)
    return _hexdigest(architecture_config(model), sample)[:FINGERPRINT_DIGITS]


def legacy_fingerprints(model: nn.Module, embed: torch.Tensor) -> frozenset[str]:
    """Every scheme-1 fingerprint this model had under the releases it may have been made on."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    sample = _embedding_sample(embed)
    found = set()
    for release in {*LEGACY_RELEASES, TRANSFORMERS_VERSION}:
        config["transformers_version"] = release
        found.add(_hexdigest(config, sample)[:LEGACY_DIGITS])
    return frozenset(found)


def same_model(expected: str | Identified, recorded: str) -> bool:
    """Whether ``recorded`` names the model ``expected`` (a loaded model, which also accepts its
    scheme-1 fingerprints, or another identity string, compared by fingerprint)."""
    if isinstance(expected, str):
        return fingerprint_of(expected) == fingerprint_of(recorded)
    return expected.same_model(recorded)


def check_same_model(expected: Identified, recorded: str, what: str, fix: str,
                     parameters: tuple[str, ...] = ("model",)) -> None:
    """Raise :class:`ModelMismatchError` unless ``recorded`` is ``expected``'s identity;
    ``parameters`` are what ``fix`` tells the caller to change (:mod:`rome_edit.errors`)."""
    if not expected.same_model(recorded):
        raise ModelMismatchError(f"{what} was made on {recorded} but the model is "
                                 f"{expected.identity}; {fix}", parameters=parameters)
