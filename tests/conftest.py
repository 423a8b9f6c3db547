"""Fixtures: tiny random-config models of every supported family (no downloads).

They share the bundled toy model's tokenizer (vocabulary 1,024), so prompts and names tokenize
exactly as on the bundled model, and each is small enough that a forward pass takes ~1 ms.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rome_edit.models.loading import LoadedModel, bundled_model_path, wrap_model

VOCAB = 1024
WIDTH, LAYERS, HEADS = 32, 4, 4


def _config_and_class(family: str):
    common_llama = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=HEADS, max_position_embeddings=128)
    return {
        "gptj": (GPTJConfig(vocab_size=VOCAB, n_positions=128, n_embd=WIDTH, n_layer=LAYERS,
                            n_head=HEADS, rotary_dim=4, n_inner=4 * WIDTH), GPTJForCausalLM),
        "gpt2": (GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=WIDTH, n_layer=LAYERS,
                            n_head=HEADS), GPT2LMHeadModel),
        "gpt_neo": (GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=128,
                                 hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                                 attention_types=[[["global", "local"], LAYERS // 2]],
                                 window_size=16), GPTNeoForCausalLM),
        "gpt_neox": (GPTNeoXConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                                   max_position_embeddings=128), GPTNeoXForCausalLM),
        "llama": (LlamaConfig(**common_llama), LlamaForCausalLM),
        "mistral": (MistralConfig(**common_llama), MistralForCausalLM),
        "qwen2": (Qwen2Config(**common_llama), Qwen2ForCausalLM),
    }[family]


@pytest.fixture(autouse=True)
def no_installed_handbook(monkeypatch, tmp_path_factory):
    """Tests see no Debian handbook unless they point ROME_EDIT_HANDBOOK at one: whether the
    machine has the package installed must not change which corpus a test's defaults pick."""
    monkeypatch.setenv("ROME_EDIT_HANDBOOK", str(tmp_path_factory.getbasetemp() / "no-handbook"))


FAMILIES = ["gptj", "gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2"]


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_path())


def make_tiny(family: str, tokenizer, seed: int = 0) -> LoadedModel:
    """A freshly initialised tiny model of ``family`` (float32, CPU, eval mode)."""
    torch.manual_seed(seed)
    config, cls = _config_and_class(family)
    model = cls(config)
    # Larger-than-default init so that random models have non-trivial, input-dependent outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return wrap_model(model, tokenizer, f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def tiny_model(request, tokenizer) -> LoadedModel:
    return make_tiny(request.param, tokenizer)


@pytest.fixture
def tiny_gptj(tokenizer) -> LoadedModel:
    return make_tiny("gptj", tokenizer)
