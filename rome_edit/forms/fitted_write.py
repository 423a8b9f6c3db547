"""One vector written for many subjects, fitted to each subject's measured response.

Writing a value vector ``v`` for N subjects at one layer as ``ΔW = v aᵀ`` moves every subject
``s`` by ``x_s = aᵀk_s`` times ``v`` at its last token (``k_s``: its key on the bare prompt).
The least-squares forms (:mod:`~rome_edit.forms.many`) ask ``x = 1`` on the edited keys and
``x = 0`` on protected ones, and trade the two off.  What matters, though, is whether each
subject's *answer* changes, and the model's answer is not linear in ``x``.  So this form:

1. measures each subject's response: the margin ``m_s(t) = log p(b) − log p(a)`` between the
   task's two answers when ``t·v`` is added at its last token, for ``t`` on a grid
   ``[−span, span]``;
2. turns it into constraints on ``x_s``: an edited subject needs ``x_s ≥ t_s``, the push beyond
   which its answer is the target all the way to the grid's end (subjects that never get there
   are *unreachable* and left out); a protected subject needs ``lo_s ≤ x_s ≤ hi_s``, the
   interval around 0 over which its answer stays;
3. fits ``a`` by minimising squared hinges on those constraints (with a safety ``margin`` in
   units of ``v``) plus ``w_P aᵀPa`` (every other token of every prompt: the pushes there, as
   ``--protect-positions all``, each prompt's tokens scaled by ``1/√T``) plus ``w_C aᵀCa``
   (the statistics: the change at an average corpus token).

It keeps the answers of the subjects it is given far better than those it is not
(docs/beyond-rome.md measures both), like every protected form.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rome_edit.forms.protect import second_moment_matrix
from rome_edit.models.hooks import edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import next_token_logprobs, single_token_id
from rome_edit.models.subject import fill, locate_subjects
from rome_edit.rome.key import prompt_keys
from rome_edit.rome.solver import Solver
from rome_edit.weights.write import add_rank_one

log = logging.getLogger(__name__)

__all__ = ["FitSettings", "FittedWrite", "fit_vector_write", "response_curves",
           "write_fitted"]


@dataclass(frozen=True)
class FitSettings:
    """The grid of pushes (``span``, ``points``), the safety margin (units of the vector),
    and the weights of the prompts' other tokens and of the statistics."""

    margin: float = 0.15
    span: float = 4.0
    points: int = 81
    position_weight: float = 0.03
    stats_weight: float = 1e-3

    def __post_init__(self) -> None:
        if not (self.span > 0 and self.points >= 3 and self.margin >= 0
                and self.position_weight >= 0 and self.stats_weight > 0):
            raise ValueError("fit settings need span > 0, points >= 3, margin >= 0, "
                             "position_weight >= 0 and stats_weight > 0.")

    @property
    def grid(self) -> torch.Tensor:
        return torch.linspace(-self.span, self.span, self.points, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class FittedWrite:
    """The fitted key-space functional ``a`` (``ΔW = v aᵀ``) and what the fit predicts."""

    layer: int
    a: torch.Tensor
    edited: tuple[str, ...]
    unreachable: tuple[str, ...]
    protected: tuple[str, ...]
    predicted_reached: float  # share of reachable edited subjects pushed past their threshold
    predicted_kept: float  # share of protected subjects whose push stays in their interval
    settings: FitSettings
    seconds: float

    def to_dict(self) -> dict:
        return {"form": "fitted", "layer": self.layer, "n_edits": len(self.edited),
                "unreachable": list(self.unreachable), "n_protected": len(self.protected),
                "predicted_reached": self.predicted_reached,
                "predicted_kept": self.predicted_kept, "fit": vars(self.settings),
                "a_norm": float(self.a.norm()), "seconds": self.seconds}  # ‖ΔW‖ = ‖v‖·‖a‖


@torch.no_grad()
def response_curves(lm: LoadedModel, layer: int, prompt: str, subjects: Sequence[str],
                    vector: torch.Tensor, answers: tuple[str, str], grid: torch.Tensor
                    ) -> torch.Tensor:
    """``(n_subjects, len(grid))``: ``log p(answers[1]) − log p(answers[0])`` after ``prompt``
    with ``t·vector`` added to the layer's output at each subject's last token."""
    module = lm.arch.out_proj.format(layer)
    spans = locate_subjects(lm.tokenizer, [prompt] * len(subjects), list(subjects))
    last = torch.tensor([s.last for s in spans])
    ids = [single_token_id(lm.tokenizer, a) for a in answers]
    texts = [fill(prompt, s) for s in subjects]
    curves = []
    for t in grid.tolist():
        # one batch holds every text, so row i is subject i
        def push(hidden: torch.Tensor, name: str, t: float = t) -> None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden[rows, last.to(hidden.device)] += t * vector.to(hidden)

        with edit_output(lm.model, {module: push}):
            lp = next_token_logprobs(lm.model, lm.tokenizer, texts, batch_size=len(texts))
        curves.append((lp[:, ids[1]] - lp[:, ids[0]]).double())
    return torch.stack(curves, dim=1)


def _threshold(curve: torch.Tensor, grid: torch.Tensor, target: int) -> float | None:
    """The least push ``t ≥ 0`` from which the answer is ``target`` up to the grid's end."""
    holds = (curve > 0) == bool(target)
    zero = int(grid.abs().argmin())
    first = None
    for i in range(len(grid) - 1, zero - 1, -1):
        if not holds[i]:
            break
        first = i
    return None if first is None else float(grid[first])


def _interval(curve: torch.Tensor, grid: torch.Tensor) -> tuple[float, float]:
    """The pushes around 0 over which the answer stays what it is at 0."""
    same = (curve > 0) == (curve[int(grid.abs().argmin())] > 0)
    lo = hi = int(grid.abs().argmin())
    while lo > 0 and same[lo - 1]:
        lo -= 1
    while hi < len(grid) - 1 and same[hi + 1]:
        hi += 1
    return float(grid[lo]) if lo > 0 else -float("inf"), \
        float(grid[hi]) if hi < len(grid) - 1 else float("inf")


def fit_vector_write(lm: LoadedModel, layer: int, prompt: str, vector: torch.Tensor,
                     edited: Sequence[str], targets: Sequence[int], protected: Sequence[str],
                     answers: tuple[str, str], solver: Solver | None = None,
                     settings: FitSettings | None = None) -> FittedWrite:
    """Fit ``a`` so that ``ΔW = vector aᵀ`` gives each edited subject answer
    ``answers[targets[i]]`` and leaves each protected subject's answer (nothing is written)."""
    settings = settings or FitSettings()
    if len(edited) != len(targets) or not edited:
        raise ValueError("give one target (0 or 1, an index into the answers) per edited "
                         "subject, and at least one subject.")
    protected = [s for s in dict.fromkeys(protected) if s not in set(edited)]
    t0 = time.perf_counter()
    subjects = [*edited, *protected]
    grid = settings.grid
    curves = response_curves(lm, layer, prompt, subjects, vector.float(), answers, grid)
    # one pass gives both the last-token keys (the pushes x = K a) and every other token's
    spans = locate_subjects(lm.tokenizer, [prompt] * len(subjects), subjects)
    token_keys = prompt_keys(lm, layer, prompt, subjects)
    keys = torch.stack([k[sp.last] for k, sp in zip(token_keys, spans)]).double()
    need = [_threshold(curves[i], grid, int(t)) for i, t in enumerate(targets)]
    reach = [i for i, t in enumerate(need) if t is not None]
    bounds = torch.tensor([_interval(curves[len(edited) + j], grid)
                           for j in range(len(protected))], dtype=torch.float64).reshape(-1, 2)
    k_edit, t_edit = keys[reach], torch.tensor([need[i] for i in reach], dtype=torch.float64)
    k_prot = keys[len(edited):]
    others = torch.cat([k[[p for p in range(len(k)) if p != sp.last]] / len(k) ** 0.5
                        for k, sp in zip(token_keys, spans)]).double()
    penalty = (settings.position_weight * (others.T @ others)
               + settings.stats_weight * second_moment_matrix(solver, keys.shape[1]))
    a = _fit(k_edit, t_edit + settings.margin, k_prot, bounds[:, 0] + settings.margin,
             bounds[:, 1] - settings.margin, penalty)
    x_edit, x_prot = k_edit @ a, k_prot @ a
    kept = ((x_prot >= bounds[:, 0]) & (x_prot <= bounds[:, 1])).double()
    unreachable = tuple(edited[i] for i, t in enumerate(need) if t is None)
    if unreachable:
        log.warning("%d edited subject(s) never reach their target within ±%g × the vector: "
                    "%s", len(unreachable), settings.span, list(unreachable)[:5])
    return FittedWrite(layer, a.float(), tuple(edited), unreachable, tuple(protected),
                       float((x_edit >= t_edit).double().mean()) if reach else 0.0,
                       float(kept.mean()) if len(kept) else 1.0, settings,
                       time.perf_counter() - t0)


def _fit(k_edit: torch.Tensor, low_edit: torch.Tensor, k_prot: torch.Tensor, lo: torch.Tensor,
         hi: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """``argmin Σ relu(low − K_e a)² + Σ relu(K_p a − hi)² + relu(lo − K_p a)² + aᵀ·penalty·a``
    (convex; L-BFGS in float64)."""
    a = torch.zeros(penalty.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a], max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)
    finite_lo, finite_hi = torch.isfinite(lo), torch.isfinite(hi)

    def loss() -> torch.Tensor:
        opt.zero_grad()
        x_e, x_p = k_edit @ a, k_prot @ a
        value = (torch.relu(low_edit - x_e).pow(2).sum()
                 + torch.relu(x_p - hi)[finite_hi].pow(2).sum()
                 + torch.relu(lo - x_p)[finite_lo].pow(2).sum() + a @ penalty @ a)
        value.backward()
        return value

    with torch.enable_grad():
        for _ in range(4):  # L-BFGS restarts: the hinges switch on and off as a moves
            opt.step(loss)
    return a.detach()


def write_fitted(lm: LoadedModel, fit: FittedWrite, vector: torch.Tensor) -> None:
    """Write ``ΔW = vector aᵀ`` into the layer (persistent; wrap in ``preserved`` to undo)."""
    add_rank_one(lm, fit.layer, fit.a, vector.float())
