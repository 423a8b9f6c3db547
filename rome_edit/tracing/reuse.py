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
from rome_edit.models.compat import first_tensor, output_cache, replace_first
from rome_edit.models.hooks import capture
from rome_edit.models.loading import LoadedModel
from rome_edit.tracing.core import TracePrompt, answer_probability
from rome_edit.tracing.noise import corrupt_subject

# Families whose transformers-5 implementations were checked (tests/test_tracing.py) to give
# identical results when run on a suffix of the prompt with the prefix as past_key_values.
PREFIX_FAMILIES = frozenset({"gptj", "gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2"})
# Families whose blocks add the MLP output (and, if parallel, the attention output) straight
# onto the residual stream, with no norm after it: block output = … + mlp_out.
RESIDUAL_FAMILIES = PREFIX_FAMILIES


@dataclass(frozen=True)
class Corrupted:
    """The corrupted run: p_corrupt, each block's output ``(n, T, d)``, what else each block
    returned (re-emitted by the stubs), per-layer ``(keys, values)`` (None: not reusable), and
    the outputs ``(n, T, d)`` of the states :func:`residual_kinds` allows to fold."""

    p_corrupt: float
    blocks: tuple[torch.Tensor, ...]
    block_rest: tuple[tuple, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None
    states: dict[str, tuple[torch.Tensor, ...]]


def residual_kinds(lm: LoadedModel) -> frozenset[str]:
    """Kinds whose output is added unchanged to the block's output: restoring one at the
    first layer of its window is then a change of that block's output at a single position,
    ``corrupted block output − corrupted state + clean state``, with no need to run the block.
    The MLP output in every family listed; the attention output only in parallel blocks
    (in sequential ones the MLP reads it)."""
    if lm.arch.family not in RESIDUAL_FAMILIES:
        return frozenset()
    return frozenset({"mlp", "attn"} if lm.arch.parallel else {"mlp"})


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

    folded = sorted(residual_kinds(lm))
    templates = {"mlp": lm.arch.mlp, "attn": lm.arch.attn}
    names = [templates[k].format(layer) for k in folded for layer in range(n_layers)]
    try:
        for layer in range(n_layers):
            block = get_module(lm.model, lm.arch.block.format(layer))
            handles.append(block.register_forward_hook(record(layer)))
        with corrupt_subject(lm, tp.start, tp.end, noise), capture(lm.model, names) as rec:
            out = lm.model(input_ids=tp.input_ids.repeat(n_copies, 1), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    kv = _prefix_cache(lm, output_cache(out), tp.n_tokens)
    p_corrupt = answer_probability(out.logits, tp.answer_id, n_copies).item()
    states = {k: tuple(rec.outputs[templates[k].format(layer)] for layer in range(n_layers))
              for k in folded}
    return Corrupted(p_corrupt, tuple(blocks), tuple(rest), kv, states)


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


def prefix_cache(parts: Sequence[Corrupted], length: int, below: int = 0) -> DynamicCache:
    """``past_key_values`` holding the first ``length`` positions of each part's corrupted
    keys/values, stacked along the batch in the order given.

    Layers ``< below`` are stubbed and never read their cache; they get a one-element-wide
    placeholder of the right length (the model reads the cached length from layer 0).
    """
    data = []
    for layer in range(len(parts[0].kv)):  # type: ignore[arg-type]
        if layer < below:
            keys = parts[0].kv[layer][0][:1, :1, :length, :1]  # type: ignore[index]
            data.append((keys, keys))
        else:
            data.append(tuple(torch.cat([p.kv[layer][i][:, :, :length]  # type: ignore[index]
                                         for p in parts]) for i in (0, 1)))
    return DynamicCache(ddp_cache_data=data)


@contextmanager
def last_position_mlp(lm: LoadedModel) -> Iterator[None]:
    """Run the last block's MLP on the last position only (zeros elsewhere).

    Exact for the logits at the last position: the MLP is position-wise and, in the last
    block, no later position reads the other positions' outputs.  Saves about two thirds of
    the last block's work at every other position.
    """
    mlp = get_module(lm.model, lm.arch.mlp.format(lm.n_layers - 1))
    widths: list[int] = []

    def trim(module, args):
        if not args or args[0].shape[1] == 1:
            widths.append(0)
            return None
        widths.append(args[0].shape[1])
        return (args[0][:, -1:], *args[1:])

    def pad(module, args, output):
        width = widths.pop()
        if not width:
            return None
        out = first_tensor(output)
        full = out.new_zeros(out.shape[0], width, *out.shape[2:])
        full[:, -1:] = out
        return replace_first(output, full)

    handles = [mlp.register_forward_pre_hook(trim), mlp.register_forward_hook(pad)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
