"""ROME step 2: the value ``v*`` — the reference's one-request-at-a-time optimisation.

``v* = v_init + δ`` where δ, added to the edit layer's MLP output at the subject's last token of
every rewriting prompt and of the KL prompt, minimises (Meng et al. 2022, Eq. 4)

    L(δ) = mean_j NLL(target | context_j + prompt)            (summed per prompt / #target tokens)
           + kl_factor · KL(p_δ ‖ p_0) at the KL prompt's subject token
           + v_weight_decay · ‖δ‖ / ‖v_init‖²                  (the norm, not its square)

with Adam (lr ``v_lr``), at most ``v_num_grad_steps`` loss evaluations (no update after the last),
stopping once L < 0.05, and projecting ‖δ‖ ≤ ``clamp_norm_factor``·‖v_init‖ after each update.
This module is the plain implementation (a full forward per step): the ground truth that
:mod:`rome_edit.editing.value_batched` must reproduce, and the benchmark's baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.request import EditRequest, PromptLayout, rewriting_layouts
from rome_edit.models.architectures import edit_device
from rome_edit.models.hooks import edit_output
from rome_edit.models.layers import logits_at_layer
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id, right_pad

EARLY_STOP_LOSS = 5e-2


@dataclass(frozen=True)
class ValueResult:
    v_init: torch.Tensor  # (d_model,) MLP output at the subject's last token, bare prompt
    delta: torch.Tensor  # (d_model,) the optimised δ = v* − v_init
    losses: tuple[float, ...]  # total loss at each evaluation
    nll: tuple[float, ...]  # its NLL part
    k_star: torch.Tensor | None = None  # (d_mlp,) k*, where the engine computed it on the way
    step: str = "full-forward"  # what computed each step's logits (see editing.suffix_step)

    @property
    def v_star(self) -> torch.Tensor:
        return self.v_init + self.delta


def loss_layer_of(lm: LoadedModel, hp: ROMEHyperParams) -> int:
    loss_layer = max(hp.v_loss_layer, hp.layer)
    if loss_layer >= lm.n_layers:
        raise ValueError(f"v_loss_layer {hp.v_loss_layer} is beyond this model's last layer "
                         f"({lm.n_layers - 1}); set v_loss_layer to {lm.n_layers - 1}.")
    return loss_layer


def rewriting_nll(log_probs: torch.Tensor, rows: Sequence[PromptLayout],
                  lengths: Sequence[int]) -> torch.Tensor:
    """Per-prompt NLL of the target tokens, summed and divided by their count.

    ``log_probs[i, j]`` is the next-token distribution at column ``j`` of row ``i``; row ``i``'s
    real tokens end at column ``lengths[i] - 1``.
    """
    out = []
    for i, (row, length) in enumerate(zip(rows, lengths)):
        n_t = len(row.targets)
        cols = torch.arange(length - n_t, length)
        tgt = torch.tensor(row.targets)
        out.append(-log_probs[i, cols, tgt].sum() / n_t)
    return torch.stack(out)


def regulariser(delta: torch.Tensor, v_init: torch.Tensor, hp: ROMEHyperParams) -> torch.Tensor:
    return hp.v_weight_decay * (delta.norm(dim=-1) / v_init.norm(dim=-1) ** 2)


def clamp_(delta: torch.Tensor, v_init: torch.Tensor, hp: ROMEHyperParams) -> None:
    """Project each δ row back into the ball ‖δ‖ ≤ clamp_norm_factor·‖v_init‖ (in place)."""
    with torch.no_grad():
        max_norm = hp.clamp_norm_factor * v_init.norm(dim=-1, keepdim=True)
        norm = delta.norm(dim=-1, keepdim=True)
        delta.copy_(torch.where(norm > max_norm, delta * max_norm / norm, delta))


def optimize_value(
    lm: LoadedModel, request: EditRequest, hp: ROMEHyperParams, context_templates: Sequence[str]
) -> ValueResult:
    """Optimise δ for one request exactly as the reference does (full forward every step)."""
    layouts, kl = rewriting_layouts(lm.tokenizer, request, context_templates)
    rows = [*layouts, kl]
    lengths = [len(r.ids) for r in rows]
    ids, mask = right_pad([r.ids for r in rows], pad_id(lm.tokenizer), lm.device)
    dev = edit_device(lm.model, lm.arch, hp.layer)  # δ lives beside the edited layer
    lookups = torch.tensor([r.lookup for r in rows], device=dev)
    row_index = torch.arange(len(rows), device=dev)
    loss_layer = loss_layer_of(lm, hp)
    mlp_name = lm.arch.mlp.format(hp.layer)

    d_model = lm.model.config.hidden_size
    delta = torch.zeros(d_model, requires_grad=True, device=dev)
    state: dict[str, torch.Tensor] = {}

    def add_delta(hidden: torch.Tensor, _name: str) -> torch.Tensor:
        if "v_init" not in state:
            state["v_init"] = hidden[0, lookups[0]].detach().float().clone()
        hidden = hidden.clone()
        hidden[row_index, lookups] += delta.to(hidden.dtype)
        return hidden

    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    losses, nlls = [], []
    for step in range(hp.v_num_grad_steps):
        optimizer.zero_grad()
        with edit_output(lm.model, {mlp_name: add_delta}):
            logits = logits_at_layer(lm, loss_layer, input_ids=ids, attention_mask=mask).to(dev)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        kl_log_probs = log_probs[-1, lookups[-1]][None]
        if "kl_init" not in state:
            state["kl_init"] = kl_log_probs.detach().clone()
        nll = rewriting_nll(log_probs[:-1], layouts, lengths[:-1]).mean()
        kl_loss = hp.kl_factor * F.kl_div(state["kl_init"], kl_log_probs, log_target=True,
                                          reduction="batchmean")
        loss = nll + kl_loss + regulariser(delta, state["v_init"], hp)
        losses.append(loss.item())
        nlls.append(nll.item())
        if loss.item() < EARLY_STOP_LOSS or step == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        optimizer.step()
        clamp_(delta, state["v_init"], hp)
    return ValueResult(state["v_init"], delta.detach().clone(), tuple(losses), tuple(nlls))
