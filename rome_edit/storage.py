"""Atomic file writes: a temporary file in the same folder, then ``os.replace``; and reading one
tensor of a safetensors file with its header.

A run killed at any moment leaves either the old file or the new one, never a truncated file,
and no temporary file survives a failed write.  Used by every store rome-edit writes (sweep
shards and merged stores, statistics, concept vectors).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@contextmanager
def _temporary_beside(path: Path) -> Iterator[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_partial_writes(path: str | Path) -> None:
    """Delete the temporary files that writes of ``path`` left when their process was killed
    (SIGKILL skips the cleanup above)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    with _temporary_beside(path) as tmp:
        write(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return _atomic(path, write)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, atomically."""
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensor_entry(path: str | Path, name: str
                      ) -> tuple[dict[str, str], list[str], torch.Tensor | None]:
    """``(header metadata, tensor names, tensor `name` or None)`` of a safetensors file, in one
    open (nothing is unpickled).  Raises ``SafetensorError``/``OSError`` for an unreadable
    file; callers turn them into messages that say what to re-create."""
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        return f.metadata() or {}, names, f.get_tensor(name) if name in names else None
