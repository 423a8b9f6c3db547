"""How much accelerator memory an edit needs, counted from the model's shapes.

Used to size runs before loading anything big: the model is built on the meta device (shapes,
no storage), so GPT-J-6B's exact parameter count costs nothing to obtain.  The estimate covers
what the batched engine (:mod:`rome_edit.rome.value_batched`) holds at its peak:

* the weights in their dtype;
* the revert copy: :func:`rome_edit.weights.write.preserved` clones only the edited ``W_out``
  (``d_model × d_mlp``), never the model;
* the fixed prefix: the keys and values of blocks ``L+1 .. v_loss_layer`` over the tokens
  before the subject's last one, the part every request shares once per context template on
  the GPT-J kernel (:mod:`rome_edit.models.gptj_suffix`), all of it per prompt row otherwise;
* the larger of the δ = 0 pass (blocks ``0 .. L``'s keys and values over every token) and
  one optimisation step: what autograd saves in blocks ``L+1 .. v_loss_layer`` for the suffix
  tokens (block inputs, attention scores over the whole prompt, the MLP's ``d_mlp``-wide
  activations; the generic path's attention also joins prefix and suffix keys, which the
  kernel avoids), plus one prefix tensor's copy while the rows of names that stopped early
  are dropped (a tensor at a time);
* the logits at the target positions only, the float32 log-probs and their gradient.

The second moment (``d_mlp²`` float32) and its float64 Cholesky factor live in host memory
(:mod:`rome_edit.stats.inverse`), computed once per layer and cached.  The activation terms are
an upper bound checked against measured peaks in ``tests/test_memory.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from rome_edit.models.architectures import detect_architecture, mlp_widths, n_layers
from rome_edit.models.gptj_suffix import supports_gptj_suffix

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 1024**3


@dataclass(frozen=True)
class EditMemory:
    """Bytes of accelerator memory at the peak of one chunk's value optimisation."""

    parameters: int
    weights: int
    revert_copy: int
    prefix_cache: int
    step_activations: int
    logits: int
    host_second_moment: int  # C (float32) + its float64 factor, in host RAM

    @property
    def device_total(self) -> int:
        return (self.weights + self.revert_copy + self.prefix_cache + self.step_activations
                + self.logits)

    def fits(self, device_bytes: int, reserve: float = 0.1) -> bool:
        """Whether the total fits ``device_bytes`` minus a ``reserve`` share for the allocator,
        the CUDA context and fragmentation."""
        return self.device_total <= device_bytes * (1 - reserve)

    def table(self) -> list[tuple[str, float]]:
        """(item, GiB) rows for docs and the CLI."""
        rows = [(k, v / GIB) for k, v in asdict(self).items() if k != "parameters"]
        return [*rows, ("device total", self.device_total / GIB)]


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device: every shape, no storage, no time."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def estimate_edit_memory(
    model: nn.Module,
    dtype: str = "float16",
    layer: int = 5,
    loss_layer: int | None = None,
    chunk_size: int = 16,
    n_prompts: int = 22,
    prefix_tokens: int = 24,
    suffix_tokens: int = 8,
    target_tokens: int = 1,
    own_tokens: int = 4,
) -> EditMemory:
    """Peak memory of a batched edit of ``chunk_size`` requests with ``n_prompts`` rows each
    (21 context templates + the KL prompt by default); ``prefix_tokens``/``suffix_tokens``
    bound the tokens before/after the subject's last token (GPT-J's reference templates are
    at most 10 tokens, plus the prompt and the target), ``own_tokens`` those of them that
    differ between requests (the subject's tokens but its last: a name is 1–4 tokens);
    ``target_tokens`` is the new target's length in tokens (`` Female`` is one in GPT-J's
    vocabulary)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}.")
    arch = detect_architecture(model)
    size = DTYPE_BYTES[dtype]
    total_layers = n_layers(model, arch)
    loss_layer = total_layers - 1 if loss_layer is None else loss_layer
    d_model, d_mlp = mlp_widths(model, arch)
    config = model.config
    heads = config.num_attention_heads
    vocab = config.vocab_size
    kv_width = d_model * getattr(config, "num_key_value_heads", heads) // heads
    parameters = sum(p.numel() for p in model.parameters())
    rows = chunk_size * n_prompts
    tokens = prefix_tokens + suffix_tokens
    trained = loss_layer - layer  # blocks that run with grad
    # keys and values of the blocks above L over the prefix, kept through the optimisation
    kernel = supports_gptj_suffix(model, arch)
    if kernel:  # the tokens every request shares are kept once per template
        own_tokens = min(own_tokens, prefix_tokens)
        prefix_cache = trained * 2 * kv_width * size * (
            rows * own_tokens + n_prompts * (prefix_tokens - own_tokens))
    else:
        prefix_cache = rows * trained * 2 * prefix_tokens * kv_width * size
    per_token_block = (
        8 * d_model            # norms, residual adds, q/k/v/out projections' inputs
        + 3 * d_mlp            # fc_in output, activation input and output
    ) * size
    per_block = rows * (suffix_tokens * per_token_block
                        + 2 * heads * suffix_tokens * tokens * size)    # scores and softmax
    if not kernel:  # the model's own attention joins the keys
        per_block += rows * 2 * 2 * tokens * kv_width * size            # prefix ⧺ suffix k/v
    # when names leave, the prefix is compacted one key or value tensor at a time
    step = trained * per_block + (prefix_cache // (2 * trained) if trained else 0)
    # the δ = 0 pass holds blocks 0 .. L's keys and values over every token instead, earlier
    first_pass = rows * (layer + 1) * 2 * tokens * kv_width * size
    step_activations = max(step, first_pass)
    # logits at the read columns (model dtype), the float32 log-probs kept for the backward,
    # and their gradient
    logits = rows * target_tokens * vocab * (size + 4 + 4)
    return EditMemory(
        parameters=parameters, weights=parameters * size, revert_copy=d_model * d_mlp * size,
        prefix_cache=prefix_cache, step_activations=step_activations, logits=logits,
        host_second_moment=d_mlp * d_mlp * (4 + 8),
    )


def largest_chunk(model: nn.Module, device_bytes: int, dtype: str = "float16",
                  **kwargs) -> int:
    """The largest ``chunk_size`` whose estimate fits ``device_bytes`` (0 if none does)."""
    best = 0
    for chunk in range(1, 1025):
        if not estimate_edit_memory(model, dtype, chunk_size=chunk, **kwargs).fits(device_bytes):
            break
        best = chunk
    return best
