"""The fast causal trace: the same numbers as :mod:`rome_edit.tracing.plain`, far fewer FLOPs.

Five savings, all exact (causal attention and the block structure make them so):

1. **Batching.**  Many restorations — of one prompt or of many prompts of the same length —
   share one forward pass: each occupies ``n_copies`` consecutive rows ("a group") and carries
   its own restoration hooks, input tokens, noise and answer.
2. **Layers below the restoration are not recomputed.**  A restoration starting at layer ``s``
   (hidden state at ``l`` → ``s = l + 1``; MLP/attention window ``[lo, hi)`` → ``s = lo``)
   leaves blocks ``< s`` as in the corrupted run, so :func:`~rome_edit.tracing.reuse.skip_blocks`
   swaps their ``forward`` for a stub returning the cached corrupted output.  The model's own
   forward still builds the attention mask and position ids / rotary embeddings, so this works
   for every family — GPT-J, GPT-2 and Llama alike — without calling blocks by hand.
3. **Tokens before the restored one are not recomputed.**  A restoration at token ``t`` changes
   nothing at positions ``< t``; the pass runs only positions ``t..T-1``, with the corrupted
   keys/values of positions ``< t`` given as ``past_key_values``.  For families outside
   :data:`~rome_edit.tracing.reuse.PREFIX_FAMILIES`, or if the corrupted cache does not hold
   every position (a sliding window shorter than the prompt), this step is skipped and whole
   prompts are run, still batched and still skipping lower blocks.
4. **The first layer of an MLP (or, in parallel blocks, attention) window is not run.**  Its
   output reaches the residual stream unchanged, so restoring it changes that block's output
   at the restored token only, by ``clean − corrupted`` state
   (:func:`~rome_edit.tracing.reuse.residual_kinds`); that is written in as a hidden state.
5. **Cells whose result is p_corrupt by causality are not run**: tokens before the subject
   (clean and corrupted states are identical there) and, except at the last token,
   restorations confined to the last layer (which no later position reads).  Likewise the
   last block's MLP runs on the last position only
   (:func:`~rome_edit.tracing.reuse.last_position_mlp`).

Passes are planned per restored token by :func:`plan_passes`, trading the fixed cost of a pass
against the blocks a low-starting cell forces on the others.

Memory.  A pass over ``q = T − t`` positions holds, per row, the keys/values of every layer
(``2·L·T·d_model`` elements), the transient activations of one block (about
``q·(8·d_model + 2·d_mlp + 2·heads·T)`` elements) and the last position's logits (float32).
:func:`rows_per_chunk` divides 60% of the free accelerator memory (``torch.cuda.mem_get_info``;
4 GiB on CPU) by that per-row size, capped at 2,048 rows; ``max_batch`` (rows) overrides it.
For GPT-J-6B in float16 and a 12-token prompt that is ≈7.5 MB a row: with 12 GB of weights on
a 24 GB GPU, ≈6.5 GB of budget gives ≈850 rows (85 restorations) per pass.  Each prompt handed
to :func:`trace_fast_many` also keeps its clean states and corrupted run until it is done, at
most ``(3 + 5·n_copies)·L·T·d_model`` elements (≈150 MB for GPT-J-6B, 10 copies, 12 tokens).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rome_edit.models.architectures import mlp_widths
from rome_edit.models.compat import accepts_logits_to_keep, cache_kwargs
from rome_edit.models.hooks import edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.tracing.core import (
    Kind,
    TracePrompt,
    module_name,
    restore_edits,
    restored_layers,
)
from rome_edit.tracing.reuse import Corrupted, last_position_mlp, prefix_cache, skip_blocks

MAX_ROWS = 2048
# Fixed cost of a forward pass (Python, hooks, kernel launches), in units of one restoration
# through one block; ≈1.5 for the bundled model on CPU.  Only affects scheduling.
PASS_OVERHEAD = 2.0


@dataclass(frozen=True)
class FastItem:
    """One prompt ready for restoration: its clean states and its corrupted run."""

    tp: TracePrompt
    noise: torch.Tensor  # (n_copies, n_subject_tokens, d_model)
    clean: dict[str, torch.Tensor]
    corrupted: Corrupted


def rows_per_chunk(lm: LoadedModel, n_tokens: int, max_batch: int | None = None) -> int:
    """Rows (noised sequences) per restoration pass; see the module docstring for the rule."""
    if max_batch is not None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1 row (got {max_batch}).")
        return max_batch
    config = lm.model.config
    d_model, d_mlp = mlp_widths(lm.model, lm.arch)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    elt = next(lm.model.parameters()).element_size()
    vocab = getattr(config, "vocab_size", None) or len(lm.tokenizer)
    per_row = elt * (2 * lm.n_layers * n_tokens * d_model
                     + n_tokens * (8 * d_model + 2 * d_mlp + 2 * heads * n_tokens)) + 4 * vocab
    device = lm.device
    if device.type == "cuda":
        budget = 0.6 * torch.cuda.mem_get_info(device)[0]
    else:
        budget = 4 * 2**30
    return int(max(1, min(MAX_ROWS, budget // per_row)))


def start_layer(kind: Kind, layer: int, window: int, n_layers: int,
                folded: frozenset[str] = frozenset()) -> int:
    """The lowest block a restoration's pass must run (the blocks below are stubbed)."""
    if kind == "hidden":
        return layer + 1
    first = restored_layers(kind, layer, window, n_layers).start
    return first + 1 if kind in folded else first


def is_trivial(tp: TracePrompt, kind: Kind, token: int, layer: int, window: int,
               n_layers: int) -> bool:
    """Cells whose p_restored equals p_corrupt by causality (see the module docstring)."""
    if token < tp.start:
        return True
    return (token < tp.n_tokens - 1
            and restored_layers(kind, layer, window, n_layers).start == n_layers - 1)


def plan_passes(starts: Sequence[int], n_layers: int, max_cells: int) -> list[tuple[int, int]]:
    """Split cells (sorted by start layer) into passes ``[lo, hi)`` of at most ``max_cells``.

    A pass costs :data:`PASS_OVERHEAD` plus, per cell, one unit per block it runs — from the
    pass's lowest start layer up — so mixing a low-starting cell into a pass makes every other
    cell in it run the low blocks too.  Dynamic programming over the sorted cells finds the
    cheapest split.  This only schedules work: the numbers do not depend on it.
    """
    best = [0.0] + [float("inf")] * len(starts)
    cut = [0] * (len(starts) + 1)
    for hi in range(1, len(starts) + 1):
        for lo in range(max(0, hi - max_cells), hi):
            cost = best[lo] + PASS_OVERHEAD + (hi - lo) * (n_layers - starts[lo] + 1)
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    passes, hi = [], len(starts)
    while hi:
        passes.append((cut[hi], hi))
        hi = cut[hi]
    return passes[::-1]


GroupCell = tuple[int, Kind, int]  # (item index, kind, centre layer)


@torch.no_grad()
def _run_pass(lm: LoadedModel, items: Sequence[FastItem], cells: Sequence[GroupCell],
              window: int, token: int, offset: int) -> torch.Tensor:
    """p_restored of ``cells`` (all at ``token``; prompts of one length) in one forward pass
    over prompt positions ``offset..T-1``."""
    n_layers = lm.n_layers
    n_copies = items[0].noise.shape[0]
    members = [items[i] for i, _, _ in cells]
    folded = frozenset(members[0].corrupted.states)
    plan: dict[str, list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
    for g, (item, (_, kind, layer)) in enumerate(zip(members, cells, strict=True)):
        layers = restored_layers(kind, layer, window, n_layers)
        if kind in folded:  # the window's first block changes at one position only
            first, layers = layers.start, layers[1:]
            name = module_name(lm.arch, kind, first)
            # In float32: in half precision the difference of two residual-sized vectors
            # would lose the small state's bits.
            value = (item.corrupted.blocks[first][:, token].float()
                     - item.corrupted.states[kind][first][:, token].float()
                     + item.clean[name][token].float())
            plan[module_name(lm.arch, "hidden", first)].append((g, token - offset, value))
        for j in layers:
            name = module_name(lm.arch, kind, j)
            plan[name].append((g, token - offset, item.clean[name][token]))
    below = min(start_layer(k, layer, window, n_layers, folded) for _, k, layer in cells)
    ids = torch.cat([m.tp.input_ids[:, offset:].expand(n_copies, -1) for m in members])
    kwargs: dict = {"input_ids": ids}
    if offset:
        kwargs |= cache_kwargs(lm.model, prefix_cache([m.corrupted for m in members], offset,
                                                      below))
        kwargs["use_cache"] = True
    if accepts_logits_to_keep(lm.model):
        kwargs["logits_to_keep"] = 1
    edits = restore_edits(plan, n_copies)
    if below == 0:  # the embeddings are used: noise each group's subject positions run here
        delta = torch.zeros(*ids.shape, items[0].noise.shape[-1], device=lm.device,
                            dtype=items[0].noise.dtype)
        for g, m in enumerate(members):
            lo = max(m.tp.start, offset)
            if lo < m.tp.end:
                delta[g * n_copies : (g + 1) * n_copies, lo - offset : m.tp.end - offset] = \
                    m.noise[:, lo - m.tp.start :]
        edits[lm.arch.embed] = lambda hidden, _: hidden + delta.to(hidden.device, hidden.dtype)
        stub_hidden = None
    else:
        stub_hidden = torch.cat([m.corrupted.blocks[below - 1][:, offset:] for m in members])
    # last_position_mlp is entered first so that its hooks run before the restorations'.
    with last_position_mlp(lm), \
            skip_blocks(lm, below, stub_hidden, members[0].corrupted.block_rest), \
            edit_output(lm.model, edits):
        logits = lm.model(**kwargs).logits
    answers = torch.tensor([m.tp.answer_id for m in members], device=logits.device)
    probs = torch.softmax(logits[:, -1].float(), dim=-1)
    picked = probs[torch.arange(len(ids), device=logits.device),
                   answers.repeat_interleave(n_copies)]
    return picked.view(-1, n_copies).mean(dim=1).double().cpu()


def trace_fast_many(
    lm: LoadedModel,
    items: Sequence[FastItem],
    kinds: Sequence[Kind],
    window: int,
    max_batch: int | None = None,
) -> list[dict[Kind, torch.Tensor]]:
    """p_restored grids ``{kind: (n_tokens, n_layers)}`` for each item, as :func:`trace_plain`
    gives them; restorations of items with the same number of tokens share passes."""
    if len({item.noise.shape[0] for item in items}) > 1:
        raise ValueError("all prompts traced together need the same number of noised copies.")
    n_layers = lm.n_layers
    folded = frozenset(items[0].corrupted.states) if items else frozenset()
    grids = [{k: torch.full((item.tp.n_tokens, n_layers), item.corrupted.p_corrupt,
                            dtype=torch.float64) for k in kinds} for item in items]
    buckets: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        buckets[item.tp.n_tokens, item.corrupted.kv is not None].append(i)
    for (n_tokens, reuse_prefix), members in buckets.items():
        n_copies = items[members[0]].noise.shape[0]
        cells_per_pass = max(1, rows_per_chunk(lm, n_tokens, max_batch) // n_copies)
        for token in range(n_tokens):
            cells = [(i, k, layer) for i in members for k in kinds for layer in range(n_layers)
                     if not is_trivial(items[i].tp, k, token, layer, window, n_layers)]
            cells.sort(key=lambda c: start_layer(c[1], c[2], window, n_layers, folded))
            starts = [start_layer(k, layer, window, n_layers, folded) for _, k, layer in cells]
            for lo, hi in plan_passes(starts, n_layers, cells_per_pass):
                chunk = cells[lo:hi]
                probs = _run_pass(lm, items, chunk, window, token,
                                  token if reuse_prefix else 0)
                for (i, kind, layer), p in zip(chunk, probs.tolist(), strict=True):
                    grids[i][kind][token, layer] = p
    return grids
