"""What the fast trace reuses from the corrupted run instead of recomputing it.

The corrupted run is captured once per prompt: every block's output, what else each block
returned, and every layer's keys/values.  :func:`skip_blocks` then stands in for the blocks
below a restoration, and the keys/values serve as ``past_key_values`` for the positions before
the restored token.  Both are exact: blocks below a restoration, and positions before it, see
exactly the inputs they saw in the corrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from rome_edit.models.architectures import get_module
from rome_edit.models.loading import LoadedModel
from rome_edit.tracing.core import TracePrompt, answer_probability
from rome_edit.tracing.noise import corrupt_subject

# Families whose transformers-5 implementations were checked (tests/test_tracing.py) to give
# identical results when run on a suffix of the prompt with the prefix as past_key_values.
PREFIX_FAMILIES = frozenset({"gptj", "gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2"})


@dataclass(frozen=True)
class Corrupted:
    """The corrupted run: p_corrupt, each block's output ``(n, T, d)``, what else each block
    returned (re-emitted by the stubs), and per-layer ``(keys, values)`` (None: not reusable)."""

    p_corrupt: float
    blocks: tuple[torch.Tensor, ...]
    block_rest: tuple[tuple, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None


@torch.no_grad()
def corrupted_pass(lm: LoadedModel, tp: TracePrompt, noise: torch.Tensor) -> Corrupted:
    """Run the noised copies once and keep what restorations can reuse."""
    n_layers, n_copies = lm.n_layers, noise.shape[0]
    blocks: list = [None] * n_layers
    rest: list = [()] * n_layers
    handles = []

    def record(layer: int):
        def hook(module, args, output):
            if isinstance(output, tuple):
                blocks[layer], rest[layer] = output[0], tuple(output[1:])
            else:
                blocks[layer] = output
            return None
        return hook

    try:
        for layer in range(n_layers):
            block = get_module(lm.model, lm.arch.block.format(layer))
            handles.append(block.register_forward_hook(record(layer)))
        with corrupt_subject(lm, tp.start, tp.end, noise):
            out = lm.model(input_ids=tp.input_ids.repeat(n_copies, 1), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    kv = _prefix_cache(lm, out.past_key_values, tp.n_tokens)
    p_corrupt = answer_probability(out.logits, tp.answer_id, n_copies).item()
    return Corrupted(p_corrupt, tuple(blocks), tuple(rest), kv)


def _prefix_cache(lm: LoadedModel, cache, n_tokens: int):
    """Per-layer corrupted keys/values if they can serve as a prefix, else ``None``."""
    layers = getattr(cache, "layers", None)
    if (lm.arch.family not in PREFIX_FAMILIES or not isinstance(cache, DynamicCache)
            or layers is None or len(layers) != lm.n_layers):
        return None
    kv = []
    for layer in layers:
        # A sliding-window layer that still holds every position is as good as a full one.
        if (type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                or layer.keys.shape[-2] != n_tokens):
            return None
        kv.append((layer.keys, layer.values))
    return tuple(kv)


def prefix_cache(parts: Sequence[Corrupted], length: int) -> DynamicCache:
    """``past_key_values`` holding the first ``length`` positions of each part's corrupted
    keys/values, stacked along the batch in the order given."""
    n_layers = len(parts[0].kv)  # type: ignore[arg-type]
    return DynamicCache(ddp_cache_data=[
        (torch.cat([p.kv[layer][0][:, :, :length] for p in parts]),  # type: ignore[index]
         torch.cat([p.kv[layer][1][:, :, :length] for p in parts]))  # type: ignore[index]
        for layer in range(n_layers)])


@contextmanager
def skip_blocks(lm: LoadedModel, below: int, hidden: torch.Tensor | None,
                rest: Sequence[tuple]) -> Iterator[None]:
    """Blocks ``< below`` return ``hidden`` (block ``below − 1``'s cached corrupted output)
    instead of computing.  The model's own forward still builds masks and position ids /
    rotary embeddings, so no block is ever called with hand-made arguments; the lower stubs'
    outputs are ignored by the stub above them."""
    patched = []
    try:
        for layer in range(below):
            block = get_module(lm.model, lm.arch.block.format(layer))
            own = block.__dict__.get("forward")  # accelerate may have set one; keep it

            def stub(*args, _rest=rest[layer], **kwargs):
                return (hidden, *_rest) if _rest else hidden

            block.forward = stub
            patched.append((block, own))
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own
