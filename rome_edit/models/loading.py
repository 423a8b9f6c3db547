"""Loading a causal LM (hub id or local directory) together with its architecture entry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rome_edit.errors import ParameterError
from rome_edit.models.architectures import Architecture, detect_architecture, get_weight, n_layers
from rome_edit.models.compat import (
    ATTENTION_IMPLEMENTATIONS,
    TRANSFORMERS_VERSION,
    attention_of,
    set_attention,
)
from rome_edit.models.gguf import drop_quantization, gguf_source, read_gguf
from rome_edit.models.identity import (
    LEGACY_DIGITS,
    fingerprint,
    fingerprint_of,
    legacy_fingerprints,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_model_path() -> Path:
    """The toy GPT-J shipped inside the package (see ``scripts/train_toy_model.py``)."""
    # one name per joinpath: Python 3.10's Traversable.joinpath takes a single child
    return Path(str(resources.files("rome_edit").joinpath("assets").joinpath("toy-gptj")))


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, where its parts are, and a fingerprint of which model it is
    (:mod:`rome_edit.models.identity`; for a model read from a GGUF file, ``gguf_file``, the
    file's fingerprint, :mod:`rome_edit.models.gguf`)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    name: str
    fingerprint: str
    gguf_file: Path | None = None

    @property
    def identity(self) -> str:
        """``name@fingerprint``: what records and statistics are keyed by."""
        return f"{self.name}@{self.fingerprint}"

    @cached_property
    def legacy_fingerprints(self) -> frozenset[str]:
        """This model's fingerprints under rome-edit 0.1.0's scheme (computed on first use)."""
        return legacy_fingerprints(self.model, get_weight(self.model, self.arch.embed))

    def same_model(self, recorded: str) -> bool:
        """Whether an identity read from saved work names this model: its fingerprint, or one
        of its scheme-1 fingerprints (files written before the upgrade-proof scheme)."""
        theirs = fingerprint_of(recorded)
        if theirs == self.fingerprint:
            return True
        return len(theirs) == LEGACY_DIGITS and theirs in self.legacy_fingerprints

    @property
    def saved_as(self) -> str:
        """What ``save_pretrained`` writes for this model, for messages: a safetensors
        checkpoint in the weights' dtype, and, for a GGUF model, that it is dequantised (the
        folder, not the ``.gguf``, is what loads the saved model)."""
        dtype = str(get_weight(self.model, self.arch.embed).dtype).removeprefix("torch.")
        text = f"a safetensors checkpoint ({dtype})"
        if self.gguf_file is not None:
            text += (f", dequantised from the GGUF file {self.gguf_file.name} (load it with "
                     "--model <that folder>)")
        return text

    @property
    def attn_implementation(self) -> str:
        """The attention implementation the model runs (recorded with every result)."""
        return attention_of(self.model)

    @property
    def n_layers(self) -> int:
        return n_layers(self.model, self.arch)

    @property
    def device(self) -> torch.device:
        return get_weight(self.model, self.arch.embed).device


def wrap_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str,
    templates: dict[str, str] | None = None, attn_implementation: str | None = None,
) -> LoadedModel:
    """Wrap an already loaded model (e.g. built in a notebook) without reloading it.

    ``attn_implementation`` (``eager`` or ``sdpa``) switches the model's attention; ``None``
    keeps what it has (see :attr:`LoadedModel.attn_implementation`).
    """
    arch = detect_architecture(model, **(templates or {}))
    if attn_implementation is not None:
        set_attention(model, attn_implementation)
    model.eval()
    model.requires_grad_(False)  # ROME never trains weights; gradients flow to δ only
    embed = get_weight(model, arch.embed)
    return LoadedModel(model, tokenizer, arch, name, fingerprint(model, embed, name))


def load_model(
    name_or_path: str | Path | None = None,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict[str, int | str | torch.device] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    templates: dict[str, str] | None = None,
    offload_folder: str | Path | None = None,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load a Hugging Face causal LM by hub id, local directory or GGUF file (default: the
    bundled model).

    A GGUF file (``*.gguf``, or a name of :data:`rome_edit.models.gguf.GGUF_MODELS` such as
    ``smollm2-135m-gguf``) is checked, fingerprinted from the file and dequantised to ``dtype``
    (:mod:`rome_edit.models.gguf`); it needs the ``gguf`` package (``rome-edit[gguf]``).

    ``device_map``/``max_memory``/``offload_folder`` are passed to ``from_pretrained``
    (accelerate places the blocks, e.g. ``device_map="auto", max_memory={0: "20GiB", 1:
    "20GiB"}`` splits a model over two GPUs); otherwise the model goes to ``device`` (default
    CPU).  Blocks that accelerate offloads (to ``"cpu"`` beside GPUs, or ``"disk"``) can be read
    through but not edited (see :func:`rome_edit.models.architectures.check_editable`).

    ``attn_implementation`` is stated, not left to the release's default (GPT-J's changed from
    eager to sdpa in transformers 5.24): ``eager`` is the reference's arithmetic, ``sdpa``
    PyTorch's fused kernel; both give the same edits and traces within the tolerances tested
    in ``tests/test_attention.py``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {attn_implementation!r}; use one "
                         f"of {list(ATTENTION_IMPLEMENTATIONS)}.")
    if device_map is not None and device is not None:  # refused before any loading
        raise ValueError("give either device or device_map, not both (a device map places "
                         "every block itself).")
    source = str(name_or_path) if name_or_path is not None else str(bundled_model_path())
    gguf_path = gguf_source(source) if name_or_path is not None else None
    header = read_gguf(gguf_path) if gguf_path is not None else None  # refused before loading
    if name_or_path is None and not (Path(source) / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled model is missing at {source}; reinstall the package or train it "
            "with scripts/train_toy_model.py."
        )
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    log.info("loading %s (%s)", source, dtype)
    folder, file_kwargs = source, dict[str, str]()
    if gguf_path is not None:  # transformers takes a GGUF file as folder + gguf_file
        folder, file_kwargs = str(gguf_path.parent), {"gguf_file": gguf_path.name}
        kwargs.update(file_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **file_kwargs)
        model: nn.Module = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {source!r}: {err}. Pass a local model directory or a hub id "
            "that is in the local cache (this machine cannot download)."
        ) from None
    except ValueError as err:
        if "attention" not in str(err) and "attn_implementation" not in str(err):
            raise
        raise ParameterError(f"{source} cannot run {attn_implementation!r} attention under "
                             f"transformers {TRANSFORMERS_VERSION}; use "
                             "attn_implementation='eager'.",
                             parameters=("attn_implementation",)) from None
    if device_map is None:
        model.to(device or "cpu")
    name = "bundled:toy-gptj" if name_or_path is None else source
    if header is None:
        return wrap_model(model, tokenizer, name, templates, attn_implementation)
    drop_quantization(model)  # dequantised floats from here on: saved as plain safetensors
    lm = wrap_model(model, tokenizer, name, templates, attn_implementation)
    return replace(lm, fingerprint=header.fingerprint, gguf_file=header.path)
