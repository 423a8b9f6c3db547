"""The plain causal trace: one forward pass per (kind, token, layer) cell.

This is the algorithm as the reference runs it (Meng et al. 2022, §2.1): every restoration is a
full forward pass of the noised copies with the clean state written back in.  It is slow but has
no moving parts, so the tests use it as the ground truth for :mod:`rome_edit.tracing.fast` and
``benchmarks/bench_tracing.py`` uses it as the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rome_edit.models.hooks import edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.tracing.core import (
    Kind,
    TracePrompt,
    answer_probability,
    module_name,
    restore_edits,
    restored_layers,
)
from rome_edit.tracing.noise import corrupt_subject


@torch.no_grad()
def restored_probability(
    lm: LoadedModel,
    tp: TracePrompt,
    noise: torch.Tensor,
    clean: dict[str, torch.Tensor],
    states: Sequence[tuple[str, int]],
) -> float:
    """p of the answer in the noised copies with each ``(module, token)`` state restored.

    With no states this is p_corrupt; restoring a whole layer's hidden states gives p_clean.
    """
    n_copies = noise.shape[0]
    plan: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for name, token in states:
        if not 0 <= token < tp.n_tokens:
            raise ValueError(f"token {token} is outside the prompt's {tp.n_tokens} tokens.")
        plan.setdefault(name, []).append((0, token, clean[name][token]))
    batch = tp.input_ids.repeat(n_copies, 1)
    with corrupt_subject(lm, tp.start, tp.end, noise), \
            edit_output(lm.model, restore_edits(plan, n_copies)):
        logits = lm.model(input_ids=batch).logits
    return answer_probability(logits, tp.answer_id, n_copies).item()


def trace_plain(
    lm: LoadedModel,
    tp: TracePrompt,
    noise: torch.Tensor,
    clean: dict[str, torch.Tensor],
    kinds: Sequence[Kind],
    window: int,
) -> dict[Kind, torch.Tensor]:
    """p_restored for every cell: ``{kind: (n_tokens, n_layers)}``, one forward per cell."""
    n_layers = lm.n_layers
    grids: dict[Kind, torch.Tensor] = {}
    for kind in kinds:
        grid = torch.empty(tp.n_tokens, n_layers, dtype=torch.float64)
        for token in range(tp.n_tokens):
            for layer in range(n_layers):
                states = [(module_name(lm.arch, kind, j), token)
                          for j in restored_layers(kind, layer, window, n_layers)]
                grid[token, layer] = restored_probability(lm, tp, noise, clean, states)
        grids[kind] = grid
    return grids
