"""Tiny GGUF files written in the tests (no download, no 93 MB file): a random Llama with the
bundled toy model's byte-level BPE tokenizer, in llama.cpp's layout (names, permuted q/k), so
that transformers dequantises it back to exactly the model it was written from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rome_edit.models.loading import bundled_model_path

WIDTH, LAYERS, HEADS, KV_HEADS, FFN = 32, 4, 4, 2, 64

# transformers' module name -> llama.cpp's tensor name ({} is the block)
_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The random Llama the tiny GGUF holds (vocabulary: the toy tokenizer's 1,024 tokens)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=WIDTH, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # non-trivial outputs, as tests/conftest.py's tiny models
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per head (its rotary layout); transformers undoes it
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(LAYERS):
        for hf, cpp in _NAMES.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if cpp in ("attn_q", "attn_k"):
                w = _permute(w, HEADS if cpp == "attn_q" else KV_HEADS)
            out[f"blk.{i}.{cpp}.weight"] = w
    return out


def write_tiny_gguf(path: Path, model: LlamaForCausalLM | None = None,
                    architecture: str = "llama") -> Path:
    """Write ``model`` (default :func:`tiny_llama`) as a float32 GGUF file at ``path``;
    ``architecture`` is the ``general.architecture`` recorded (another name makes a file of an
    architecture transformers cannot read)."""
    import gguf

    model = model if model is not None else tiny_llama()
    tok = json.loads((bundled_model_path() / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, array in _tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
