"""Causal tracing of one prompt (Meng et al. 2022, §2.1 and Figure 1).

``trace(lm, "Name: {}. Gender:", "Brittany", noise_std=...)`` returns a :class:`TraceResult`:
p_clean, p_corrupt and, for each kind of state (residual ``hidden`` state after a block, ``mlp``
output, ``attn`` output), the grid of indirect effects ``p_restored − p_corrupt`` over
tokens × layers.  ``method="fast"`` (default) and ``method="plain"`` compute the same numbers;
see :mod:`rome_edit.tracing.fast` and :mod:`rome_edit.tracing.plain`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from rome_edit.models.architectures import mlp_widths
from rome_edit.models.loading import LoadedModel
from rome_edit.tracing.core import (
    KINDS,
    Kind,
    TracePrompt,
    check_kinds,
    check_window,
    clean_run,
    corrupted_run,
    prepare_prompt,
    state_names,
)
from rome_edit.tracing.fast import FastItem, trace_fast_many
from rome_edit.tracing.noise import subject_noise
from rome_edit.tracing.plain import trace_plain
from rome_edit.tracing.reuse import Corrupted, corrupted_pass

log = logging.getLogger(__name__)

Method = Literal["fast", "plain"]
DEFAULT_SAMPLES = 10
DEFAULT_SEED = 1  # the reference seeds its noise generator with 1


@dataclass(frozen=True)
class TraceResult:
    """One prompt's trace.  ``effects[kind][t, l]`` is the indirect effect of restoring that
    state (for mlp/attn: the window of ``window`` layers centred on ``l``)."""

    prompt: str
    subject: str
    tokens: tuple[str, ...]
    subject_start: int
    subject_end: int  # exclusive
    answer: str
    p_clean: float
    p_corrupt: float
    effects: dict[str, torch.Tensor]  # kind -> (n_tokens, n_layers), float64
    noise_std: float
    window: int
    samples: int
    seed: int

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "answer": self.answer,
            "tokens": list(self.tokens),
            "subject_tokens": [self.subject_start, self.subject_end],
            "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
            "total_effect": self.total_effect,
            "noise_std": self.noise_std, "window": self.window, "samples": self.samples,
            "seed": self.seed,
            "effects": {k: {"rows": list(self.tokens), "grid": g.tolist()}
                        for k, g in self.effects.items()},
        }


@dataclass(frozen=True)
class Baseline:
    """The clean and corrupted runs a trace restores between."""

    p_clean: float
    p_corrupt: float
    clean_probs: torch.Tensor  # (vocab,) clean next-token distribution
    noise: torch.Tensor  # (samples, n_subject_tokens, d_model)
    clean: dict[str, torch.Tensor]
    corrupted: Corrupted | None  # kept for the fast method


def run_baseline(
    lm: LoadedModel, tp: TracePrompt, *, noise_std: float, samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED, kinds: Sequence[Kind] = KINDS, method: Method = "fast",
) -> Baseline:
    if method not in ("fast", "plain"):
        raise ValueError(f"unknown method {method!r}; use 'fast' or 'plain'.")
    d_model, _ = mlp_widths(lm.model, lm.arch)
    dtype = next(lm.model.parameters()).dtype
    noise = subject_noise(samples, tp.end - tp.start, d_model, noise_std, seed, dtype, lm.device)
    probs, clean = clean_run(lm, tp, state_names(lm.arch, kinds, lm.n_layers))
    p_clean = probs[tp.answer_id].item()
    if method == "fast":
        corrupted = corrupted_pass(lm, tp, noise)
        return Baseline(p_clean, corrupted.p_corrupt, probs, noise, clean, corrupted)
    return Baseline(p_clean, corrupted_run(lm, tp, noise), probs, noise, clean, None)


def restore_all(
    lm: LoadedModel, tp: TracePrompt, base: Baseline, *, kinds: Sequence[Kind] = KINDS,
    window: int, max_batch: int | None = None,
) -> dict[str, torch.Tensor]:
    """Indirect-effect grids for ``kinds`` from a baseline (its method decides the algorithm)."""
    return restore_many(lm, [(tp, base)], kinds=kinds, window=window, max_batch=max_batch)[0]


def restore_many(
    lm: LoadedModel, cases: Sequence[tuple[TracePrompt, Baseline]], *,
    kinds: Sequence[Kind] = KINDS, window: int, max_batch: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`restore_all` for several prompts; the fast method batches them together."""
    fast = [(tp, b) for tp, b in cases if b.corrupted is not None]
    if fast and len(fast) != len(cases):
        raise ValueError("baselines of one call must all come from the same method.")
    if fast:
        items = [FastItem(tp, b.noise, b.clean, b.corrupted) for tp, b in fast]  # type: ignore
        scores = trace_fast_many(lm, items, kinds, window, max_batch)
    else:
        scores = [trace_plain(lm, tp, b.noise, b.clean, kinds, window) for tp, b in cases]
    return [{k: g - b.p_corrupt for k, g in grid.items()}
            for grid, (_, b) in zip(scores, cases, strict=True)]


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    noise_std: float,
    samples: int = DEFAULT_SAMPLES,
    window: int | None = None,
    kinds: Sequence[str] = KINDS,
    seed: int = DEFAULT_SEED,
    method: Method = "fast",
    max_batch: int | None = None,
) -> TraceResult:
    """Trace where ``answer`` (one token; default: the model's top prediction) is computed.

    ``noise_std`` is absolute; :func:`rome_edit.tracing.noise.resolve_noise` turns "3x" into
    one.  ``window`` defaults to 10 layers scaled to the model's depth (10 of 28 for GPT-J).
    """
    kinds = check_kinds(kinds)
    window = check_window(window, lm.n_layers)
    if not noise_std > 0:
        raise ValueError(f"noise_std must be positive (got {noise_std}).")
    tp = prepare_prompt(lm, prompt, subject, answer)
    base = run_baseline(lm, tp, noise_std=noise_std, samples=samples, seed=seed, kinds=kinds,
                        method=method)
    effects = restore_all(lm, tp, base, kinds=kinds, window=window, max_batch=max_batch)
    log.info("traced %r: p_clean %.3f, p_corrupt %.3f", tp.prompt, base.p_clean, base.p_corrupt)
    return result_from(tp, base, effects, noise_std, window, samples, seed)


def result_from(tp: TracePrompt, base: Baseline, effects: dict[str, torch.Tensor],
                noise_std: float, window: int, samples: int, seed: int) -> TraceResult:
    return TraceResult(tp.prompt, tp.subject, tp.tokens, tp.start, tp.end, tp.answer,
                       base.p_clean, base.p_corrupt, effects, noise_std, window, samples, seed)
