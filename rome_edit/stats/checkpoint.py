"""Resumable statistics: the running sum of a second-moment pass, saved every few batches.

On GPT-J-6B the reference's 100,000 documents take hours; a run killed at any moment restarts
from its last checkpoint instead of from zero.  A checkpoint is one safetensors file (tensor
``sum``; the counts and what the pass is in the metadata), written atomically, and it is used
only by the *same* pass: same request (the cache key), batch size, and process rank and count,
because those decide which batches a process has already added.  Anything else is ignored
with a warning and the pass starts over; nothing is ever half-added.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rome_edit.storage import atomic_save_tensors

log = logging.getLogger(__name__)

FORMAT = "rome-edit/second-moment-checkpoint/v1"


@dataclass(frozen=True)
class PassIdentity:
    """What a partial sum belongs to; a checkpoint of any other pass is not resumed."""

    request: str  # model fingerprint, layer, corpus id, dtype, n_samples, max_length
    batch_size: int
    rank: int
    world_size: int

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PartialSum:
    """``Σ k kᵀ`` over the batches ``0 .. next_batch-1`` this process owns."""

    total: torch.Tensor | None
    n_tokens: int
    n_documents: int
    next_batch: int


EMPTY = PartialSum(None, 0, 0, 0)


def save_checkpoint(path: Path, identity: PassIdentity, partial: PartialSum) -> None:
    if partial.total is None:
        return  # nothing added yet: nothing worth saving
    metadata = {"format": FORMAT, **identity.metadata(), "n_tokens": str(partial.n_tokens),
                "n_documents": str(partial.n_documents), "next_batch": str(partial.next_batch)}
    atomic_save_tensors({"sum": partial.total.contiguous()}, path, metadata)


def load_checkpoint(path: Path, identity: PassIdentity) -> PartialSum:
    """The partial sum saved at ``path`` for this pass, else :data:`EMPTY`."""
    if not path.exists():
        return EMPTY
    try:
        with safe_open(path, "pt") as handle:  # one open: header first, the sum only if ours
            metadata = handle.metadata() or {}
            same = metadata.get("format") == FORMAT and all(
                metadata.get(k) == v for k, v in identity.metadata().items())
            total = handle.get_tensor("sum") if same else None
        if same:
            partial = PartialSum(total, int(metadata["n_tokens"]),
                                 int(metadata["n_documents"]), int(metadata["next_batch"]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable statistics checkpoint %s (%s); starting over", path, err)
        return EMPTY
    if not same or not torch.isfinite(total).all():
        log.warning("ignoring statistics checkpoint %s of another pass; starting over", path)
        return EMPTY
    log.info("resuming statistics from %s at batch %d (%d documents)", path,
             partial.next_batch, partial.n_documents)
    return partial
