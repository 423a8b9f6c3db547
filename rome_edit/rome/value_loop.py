"""ROME step 2's optimisation loop, shared by every value engine (Meng et al. 2022, Eq. 4).

``v* = v_init + δ`` where δ, added to the edit layer's MLP output at the subject's last token of
every rewriting prompt and of the KL prompt, minimises

    L(δ) = mean_j NLL(target | context_j + prompt)            (summed per prompt / #target tokens)
           + kl_factor · KL(p_δ ‖ p_0) at the KL prompt's subject token
           + v_weight_decay · ‖δ‖ / ‖v_init‖²                  (the norm, not its square)

with Adam (lr ``v_lr``, torch's defaults otherwise), at most ``v_num_grad_steps`` loss
evaluations (no update after the last), stopping once L < 0.05, and projecting
‖δ‖ ≤ ``clamp_norm_factor``·‖v_init‖ after each update.  With the rome-edit option
``fit_phrasings`` the mean also runs over ``context_j + phrasing`` with each phrasing's answer,
for the phrasings that read the subject at the same key
(:class:`~rome_edit.rome.request.FitPhrasing`).  The KL term's reference distribution is
the first step's (δ = 0), as in the reference.

The engines differ only in how a step's logits are computed — a full forward over every prompt
(:mod:`rome_edit.rome.value_reference`) or the batched suffix-only step
(:mod:`rome_edit.rome.value_batched`) — so they implement :class:`StepProblem` and share this
loop.  One δ per request is stacked into an ``(n, d_model)`` tensor; Adam being element-wise,
that equals ``n`` separate runs, and a request whose loss falls below the threshold leaves the
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rome_edit.models.loading import LoadedModel
from rome_edit.rome.hparams import ROMEHyperParams

__all__ = ["EARLY_STOP_LOSS", "LoopResult", "StepProblem", "ValueResult", "clamp_",
           "loss_layer_of", "optimise_deltas"]

EARLY_STOP_LOSS = 5e-2  # the reference's threshold
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults, as the reference uses


@dataclass(frozen=True)
class ValueResult:
    v_init: torch.Tensor  # (d_model,) MLP output at the subject's last token, bare prompt
    delta: torch.Tensor  # (d_model,) the optimised δ = v* − v_init
    losses: tuple[float, ...]  # total loss at each evaluation
    nll: tuple[float, ...]  # its NLL part
    k_star: torch.Tensor | None = None  # (d_mlp,) k*, where the engine computed it on the way
    step: str = "full-forward"  # what computed each step's logits (see rome.suffix_step)

    @property
    def v_star(self) -> torch.Tensor:
        return self.v_init + self.delta


def loss_layer_of(lm: LoadedModel, hp: ROMEHyperParams) -> int:
    """The layer whose output the value loss reads (never below the edit layer), checked
    against the model's depth."""
    loss_layer = max(hp.v_loss_layer, hp.layer)
    if loss_layer >= lm.n_layers:
        raise ValueError(f"v_loss_layer {hp.v_loss_layer} is beyond this model's last layer "
                         f"({lm.n_layers - 1}); set v_loss_layer to {lm.n_layers - 1}.")
    return loss_layer


class StepProblem(Protocol):
    """The prompts of ``n`` requests, ``R`` rows each (rewriting prompts, then the KL prompt)."""

    n: int
    R: int
    d_model: int
    device: torch.device
    t_ids: torch.Tensor  # (n·R, T) target token ids at the columns the logits are read at
    t_mask: torch.Tensor  # (n·R, T) 1.0 where a column holds a target token (none on KL rows)

    def logits(self, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(len(rows), T, vocab)`` logits at each row's target columns (a KL row's column 0 is
        the subject's last token) with ``delta[j]`` added at row ``rows[j]``'s subject token."""
        ...

    def v_init(self) -> torch.Tensor:
        """``(n, d_model)`` float32 MLP output at the subject's last token of each request's
        first row; available once :meth:`logits` has run at δ = 0."""
        ...


@dataclass(frozen=True)
class LoopResult:
    v_init: torch.Tensor  # (n, d_model)
    delta: torch.Tensor  # (n, d_model)
    losses: tuple[tuple[float, ...], ...]  # per request, the total loss at each evaluation
    nlls: tuple[tuple[float, ...], ...]  # per request, its NLL part


def clamp_(delta: torch.Tensor, v_init: torch.Tensor, hp: ROMEHyperParams) -> None:
    """Project each δ row back into the ball ‖δ‖ ≤ clamp_norm_factor·‖v_init‖ (in place)."""
    with torch.no_grad():
        max_norm = hp.clamp_norm_factor * v_init.norm(dim=-1, keepdim=True)
        norm = delta.norm(dim=-1, keepdim=True)
        delta.copy_(torch.where(norm > max_norm, delta * max_norm / norm, delta))


def optimise_deltas(problem: StepProblem, hp: ROMEHyperParams,
                    early_stop_loss: float = EARLY_STOP_LOSS) -> LoopResult:
    """Minimise Eq. 4 for every request of ``problem`` (see the module docstring).

    ``early_stop_loss`` is the reference's 0.05; 0 never stops early (the loss is never
    negative), which benchmarks use to hold the step count fixed.
    """
    n, R, dev = problem.n, problem.R, problem.device
    delta = torch.zeros(n, problem.d_model, device=dev)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    losses: list[list[float]] = [[] for _ in range(n)]
    nlls: list[list[float]] = [[] for _ in range(n)]
    active = torch.arange(n, device=dev)
    rows = torch.arange(n * R, device=dev)
    v_init = kl_init = None
    for step in range(hp.v_num_grad_steps):
        d = delta[active].clone().requires_grad_(True)
        logits = problem.logits(d.repeat_interleave(R, dim=0), rows)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if v_init is None:
            v_init = problem.v_init().float().to(dev)
        t_mask = problem.t_mask[rows]
        picked = log_probs.gather(2, problem.t_ids[rows][..., None])[..., 0] * t_mask
        nll = (-picked.sum(-1) / t_mask.sum(-1).clamp(min=1)).view(len(active), R)[:, : R - 1]
        nll = nll.mean(-1)
        kl_lp = log_probs.view(len(active), R, *log_probs.shape[1:])[:, R - 1, 0]
        if kl_init is None:  # δ = 0: the unedited next-token distribution
            kl_init = kl_lp.detach().clone()
        kl = (kl_lp.exp() * (kl_lp - kl_init[active])).sum(-1)
        v0 = v_init[active]
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * (d.norm(dim=-1) / v0.norm(dim=-1) ** 2)
        for j, i in enumerate(active.tolist()):
            losses[i].append(loss[j].item())
            nlls[i].append(nll[j].item())
        done = (loss.detach() < early_stop_loss) | (step == hp.v_num_grad_steps - 1)
        if done.all():
            break
        loss.sum().backward()
        keep = ~done
        idx = active[keep]
        _adam_(d.grad[keep], delta, exp_avg, exp_avg_sq, idx, step + 1, hp.v_lr)
        sub = delta[idx]
        clamp_(sub, v_init[idx], hp)
        delta[idx] = sub
        active = idx
        rows = (active[:, None] * R + torch.arange(R, device=dev)).flatten()
    return LoopResult(v_init, delta, tuple(map(tuple, losses)), tuple(map(tuple, nlls)))


@torch.no_grad()
def _adam_(grad, param, exp_avg, exp_avg_sq, idx, step: int, lr: float) -> None:
    """torch.optim.Adam's single-tensor update, applied to rows ``idx`` of ``param``."""
    beta1, beta2 = ADAM_BETAS
    m = exp_avg[idx].lerp_(grad, 1 - beta1)
    v = exp_avg_sq[idx].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg[idx], exp_avg_sq[idx] = m, v
    step_size = lr / (1 - beta1**step)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
    param[idx] = param[idx].addcdiv(m, denom, value=-step_size)
