"""Causal traces averaged over many prompts, and the edit layer they recommend.

Meng et al. (2022, Figure 2) average indirect effects over facts with tokens aligned by *role*,
because subjects differ in length: first subject token, middle subject tokens (mean), last
subject token, first subsequent token, further tokens (mean), last token.  Tokens before the
subject have no role: the noise cannot reach them, so their effect is identically zero.  A
role a prompt lacks (no middle tokens in a two-token subject) leaves that prompt out of that
role's mean; when roles coincide (a one-token suffix is both the first subsequent and the last
token) the token counts for both.

Only informative cases are averaged: the model must answer correctly (the expected answer is
the top-1 among ``candidates``, as the reference keeps only known facts), and the corruption
must lower p(answer) by at least ``min_effect`` (default 0.05: below that the noised model
still gives the answer — typically its default guess — and every restoration measures noise).

**The recommended edit layer** is the argmax over layers of the averaged MLP indirect effect at
the last subject token — ROME's "early site" (GPT-J: layer 5 of 28 in the paper) — excluding
layer 0 on parallel-block families (``arch.parallel``: GPT-J, GPT-NeoX).  There the layer-0 MLP
reads ``ln(h₀)``, the token's own embedding, since attention runs beside it rather than before
it: its key at the last subject token is the same for every name ending in that token
("Brittany", "Tiffany"), so an edit there cannot single out one subject.  For the same reason a
large layer-0 effect in a trace only undoes the noise on that one embedding, not a recall.  In
sequential families (GPT-2, Llama) the layer-0 MLP runs after attention and sees the whole name.

The MLP effect at centre ``l`` restores a *window* of layers, so every centre whose window
reaches layer 0 carries that artifact too (on the bundled model, window 2: the effect at centre 1
is 0.21, of which layer 0 alone gives 0.21 and layer 1 alone 0.04).  Such centres are excluded
as well when ``exclude_window_artifacts=True`` (:func:`excluded_layers`; CLI
``--exclude-window-artifacts``); if that would exclude every layer, only layer 0 is, with a
warning to pass a smaller window.  It is off by default: the default follows the reference rule
(exclude layer 0 only), under which GPT-J-6B's window of 10 keeps the paper's layer 5 (the
stricter rule would exclude centres 0–5 there).  On the bundled model the default recommends
layer 1 and the stricter rule layer 3; edits at both reach the efficacy target.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rome_edit.errors import ParameterError
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import single_token_id
from rome_edit.tracing.core import (
    KINDS,
    check_kinds,
    check_window,
    prepare_prompt,
    restored_layers,
)
from rome_edit.tracing.noise import DEFAULT_NOISE, NoiseSpec, resolve_noise
from rome_edit.tracing.trace import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    Method,
    restore_many,
    run_baseline,
)

log = logging.getLogger(__name__)

ROLES = ("first subject token", "middle subject tokens", "last subject token",
         "first subsequent token", "further tokens", "last token")
LAST_SUBJECT = ROLES.index("last subject token")
DEFAULT_MIN_EFFECT = 0.05
DEFAULT_BATCH_PROMPTS = 32


def role_positions(start: int, end: int, n_tokens: int) -> list[list[int]]:
    """Token positions of each role in :data:`ROLES` for a subject at ``[start, end)``."""
    return [[start], list(range(start + 1, end - 1)), [end - 1],
            [end] if end < n_tokens else [], list(range(end + 1, n_tokens - 1)),
            [n_tokens - 1]]


def align_roles(grid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``(n_tokens, n_layers)`` → ``(len(ROLES), n_layers)``; NaN rows for absent roles."""
    rows = [grid[p].mean(dim=0) if p else torch.full_like(grid[0], float("nan"))
            for p in role_positions(start, end, grid.shape[0])]
    return torch.stack(rows)


def excluded_layers(parallel: bool, window: int, n_layers: int) -> tuple[int, ...]:
    """Centres whose MLP window includes layer 0 of a parallel-block model (module docstring)."""
    if not parallel or n_layers < 2:
        return ()
    reach = tuple(centre for centre in range(n_layers)
                  if restored_layers("mlp", centre, window, n_layers).start == 0)
    if len(reach) == n_layers:
        log.warning("every MLP window of %d layers includes layer 0; only layer 0 is excluded "
                    "from the recommendation; pass a smaller window to avoid its artifact.",
                    window)
        return (0,)
    return reach


def recommend_layer(mlp_last_subject: torch.Tensor, excluded: Sequence[int] = ()) -> int:
    """Argmax of the MLP effect at the last subject token over the layers not excluded."""
    scores = torch.nan_to_num(mlp_last_subject.clone(), nan=float("-inf"))
    scores[list(excluded)] = float("-inf")
    return int(scores.argmax())


@dataclass(frozen=True)
class LocateResult:
    """The averaged trace: ``effects[kind]`` is ``(len(ROLES), n_layers)``."""

    template: str
    candidates: tuple[str, ...]
    effects: dict[str, torch.Tensor]
    role_counts: tuple[int, ...]
    n_cases: int
    n_skipped: int
    skipped: dict[str, int]
    recommended_layer: int
    excluded_layers: tuple[int, ...]
    p_clean: float  # means over the kept cases
    p_corrupt: float
    noise_std: float
    noise: str
    window: int
    samples: int
    seed: int
    min_effect: float

    @property
    def layer_table(self) -> list[dict]:
        """Per layer: the averaged effect of each kind at the last subject token."""
        n_layers = next(iter(self.effects.values())).shape[1]
        return [{"layer": layer, "excluded": layer in self.excluded_layers,
                 **{k: g[LAST_SUBJECT, layer].item() for k, g in self.effects.items()}}
                for layer in range(n_layers)]

    @property
    def recommended_effect(self) -> float:
        return self.effects["mlp"][LAST_SUBJECT, self.recommended_layer].item()

    def to_json(self) -> dict:
        nan_to_none = lambda v: None if v != v else v  # noqa: E731  (JSON has no NaN)
        return {
            "template": self.template, "candidates": list(self.candidates),
            "recommended_layer": self.recommended_layer,
            "recommended_mlp_effect": self.recommended_effect,
            "excluded_layers": list(self.excluded_layers),
            "n_cases": self.n_cases, "n_skipped": self.n_skipped, "skipped": self.skipped,
            "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
            "noise": self.noise, "noise_std": self.noise_std, "window": self.window,
            "samples": self.samples, "seed": self.seed, "min_effect": self.min_effect,
            "role_counts": dict(zip(ROLES, self.role_counts, strict=True)),
            "layer_table": self.layer_table,
            "effects": {k: {"rows": list(ROLES),
                            "grid": [[nan_to_none(v) for v in row] for row in g.tolist()]}
                        for k, g in self.effects.items()},
        }


def locate(
    lm: LoadedModel,
    template: str,
    cases: Sequence[tuple[str, str]],
    *,
    candidates: Sequence[str] | None = None,
    noise: str | float = DEFAULT_NOISE,
    samples: int = DEFAULT_SAMPLES,
    window: int | None = None,
    kinds: Sequence[str] = KINDS,
    seed: int = DEFAULT_SEED,
    min_effect: float = DEFAULT_MIN_EFFECT,
    method: Method = "fast",
    max_batch: int | None = None,
    batch_prompts: int = DEFAULT_BATCH_PROMPTS,
    progress: bool = True,
    exclude_window_artifacts: bool = False,
) -> LocateResult:
    """Trace every case, keep the informative ones, average by role and recommend a layer.

    ``cases`` are ``(subject, expected answer)`` pairs; ``candidates`` (default: the distinct
    expected answers) are what "answers correctly" is judged among.  A relative ``noise``
    ("3x") is scaled by the embedding std over the traced subjects in ``template``.  With the
    fast method the restorations of up to ``batch_prompts`` kept prompts are batched together
    (each held prompt costs the memory given in :mod:`rome_edit.tracing.fast`).
    """
    kinds = check_kinds(kinds)
    if "mlp" not in kinds:
        raise ValueError("locating the edit layer needs the 'mlp' kind; add it to kinds.")
    window = check_window(window, lm.n_layers)
    cases = [(str(subject), str(answer)) for subject, answer in cases]
    if not cases:
        raise ValueError("no prompts to trace; give at least one (subject, answer) pair.")
    candidates = tuple(candidates or dict.fromkeys(a for _, a in cases))
    candidate_ids = torch.tensor([single_token_id(lm.tokenizer, c) for c in candidates])
    missing = sorted({a for _, a in cases} - set(candidates))
    if missing:
        raise ValueError(f"expected answers {missing} are not among candidates {candidates}.")
    spec = NoiseSpec.parse(noise)
    noise_std = resolve_noise(lm, spec, template, [s for s, _ in cases])

    sums = {k: torch.zeros(len(ROLES), lm.n_layers, dtype=torch.float64) for k in kinds}
    counts = torch.zeros(len(ROLES), dtype=torch.long)
    skipped: Counter[str] = Counter()
    p_clean, p_corrupt = [], []
    pending: list = []

    def flush() -> None:
        results = restore_many(lm, pending, kinds=kinds, window=window, max_batch=max_batch)
        for (tp, base), effects in zip(pending, results, strict=True):
            for kind, grid in effects.items():
                sums[kind] += torch.nan_to_num(align_roles(grid, tp.start, tp.end))
            counts.add_(torch.tensor([len(p) > 0 for p in role_positions(
                tp.start, tp.end, tp.n_tokens)]))
            p_clean.append(base.p_clean)
            p_corrupt.append(base.p_corrupt)
        pending.clear()

    for subject, answer in tqdm(cases, desc="tracing", unit="prompt", disable=not progress):
        tp = prepare_prompt(lm, template, subject, answer)
        base = run_baseline(lm, tp, noise_std=noise_std, samples=samples, seed=seed,
                            kinds=kinds, method=method)
        if candidate_ids[base.clean_probs[candidate_ids].argmax()] != tp.answer_id:
            skipped["wrong answer"] += 1
            continue
        if base.p_clean - base.p_corrupt < min_effect:
            skipped[f"corruption lowers p by < {min_effect:g}"] += 1
            continue
        pending.append((tp, base))
        if method == "plain" or len(pending) >= batch_prompts:
            flush()
    if pending:
        flush()
    n_cases = len(p_clean)
    if n_cases == 0:
        raise ParameterError(
            f"all {len(cases)} cases were skipped ({dict(skipped)}); the model does not answer "
            "these prompts, or the noise is too weak (raise noise= or lower min_effect=).",
            parameters=("noise", "min_effect"),
        )
    # 0 / 0 = NaN marks a role no kept prompt has.
    effects = {k: s / counts[:, None].double() for k, s in sums.items()}
    if exclude_window_artifacts:
        excluded = excluded_layers(lm.arch.parallel, window, lm.n_layers)
    else:
        excluded = (0,) if lm.arch.parallel and lm.n_layers > 1 else ()
    layer = recommend_layer(effects["mlp"][LAST_SUBJECT], excluded)
    log.info("kept %d of %d cases; recommended layer %d", n_cases, len(cases), layer)
    return LocateResult(
        template, candidates, effects, tuple(counts.tolist()), n_cases, len(cases) - n_cases,
        dict(skipped), layer, excluded, sum(p_clean) / n_cases, sum(p_corrupt) / n_cases,
        noise_std, str(spec), window, samples, seed, min_effect,
    )
