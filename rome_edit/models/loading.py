"""Loading a causal LM (hub id or local directory) together with its architecture entry."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rome_edit.models.architectures import Architecture, detect_architecture, get_module, n_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_model_path() -> Path:
    """The toy GPT-J shipped inside the package (see ``scripts/train_toy_model.py``)."""
    return Path(str(resources.files("rome_edit").joinpath("assets", "toy-gptj")))


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, where its parts are, and a fingerprint of which model it is."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    name: str
    fingerprint: str

    @property
    def identity(self) -> str:
        """``name@fingerprint``: what records and statistics are keyed by."""
        return f"{self.name}@{self.fingerprint}"

    @property
    def n_layers(self) -> int:
        return n_layers(self.model, self.arch)

    @property
    def device(self) -> torch.device:
        return get_module(self.model, self.arch.embed).weight.device


def fingerprint(model: nn.Module, arch: Architecture) -> str:
    """Hash of the config and a strided sample of the token embeddings.

    The embeddings are never edited, so a model keeps its fingerprint through ROME edits, while
    two models with the same config but different weights get different ones.
    """
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # the same weights loaded from another path stay the same
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    embed = get_module(model, arch.embed).weight.detach()
    if embed.device.type != "meta":
        sample = embed.flatten()[:: max(1, embed.numel() // 65_536)].float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:12]


def wrap_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str,
    templates: dict[str, str] | None = None,
) -> LoadedModel:
    """Wrap an already loaded model (e.g. built in a notebook) without reloading it."""
    arch = detect_architecture(model, **(templates or {}))
    model.eval()
    model.requires_grad_(False)  # ROME never trains weights; gradients flow to δ only
    return LoadedModel(model, tokenizer, arch, name, fingerprint(model, arch))


def load_model(
    name_or_path: str | Path | None = None,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    templates: dict[str, str] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a Hugging Face causal LM by hub id or local directory (default: the bundled model).

    ``device_map``/``max_memory``/``offload_folder`` are passed to ``from_pretrained``
    (accelerate places the blocks, e.g. ``device_map="auto", max_memory={0: "20GiB", 1:
    "20GiB"}`` splits a model over two GPUs); otherwise the model goes to ``device`` (default
    CPU).  Blocks that accelerate offloads (to ``"cpu"`` beside GPUs, or ``"disk"``) can be read
    through but not edited (see :func:`rome_edit.models.architectures.check_editable`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    if device_map is not None and device is not None:  # refused before any loading
        raise ValueError("give either device or device_map, not both (a device map places "
                         "every block itself).")
    source = str(name_or_path) if name_or_path is not None else str(bundled_model_path())
    if name_or_path is None and not (Path(source) / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled model is missing at {source}; reinstall rome-edit or train it with "
            "scripts/train_toy_model.py."
        )
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    log.info("loading %s (%s)", source, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {source!r}: {err}. Pass a local model directory or a hub id "
            "that is in the local cache (this machine cannot download)."
        ) from None
    if device_map is None:
        model.to(device or "cpu")
    name = "bundled:toy-gptj" if name_or_path is None else source
    return wrap_model(model, tokenizer, name, templates)
