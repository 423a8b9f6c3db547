"""ROME's value optimisation for many requests at once, recomputing only what δ can change.

Same objective, optimiser, clamp and early stop as :mod:`rome_edit.editing.value` (one δ per
request, Adam being element-wise makes a stacked ``(n, d_model)`` δ equal to n separate runs),
but these facts about the computation are exploited:

1. δ enters at the edit layer ``L`` at the subject's last token ``s``.  Tokens before ``s`` never
   change, so their attention keys/values are computed once and reused as a fixed prefix cache.
2. Below and at ``L`` nothing changes either: the block-``L`` outputs at positions ``≥ s`` are
   cached once; each step adds δ at ``s`` (the MLP output is added straight into the residual
   stream in every supported family) and runs only blocks ``L+1 .. v_loss_layer``.
3. Only the logits that the loss reads are computed (the target positions, and ``s`` of the KL
   prompt); on an undispatched GPT-J the step runs :mod:`rome_edit.models.gptj_suffix`, which
   also skips what cannot change inside blocks ``L+1`` and ``v_loss_layer``, runs the KL
   prompt over its first suffix column only, and keeps the shared prefix once per template —
   once it has agreed with the model's own forward (:mod:`rome_edit.editing.suffix_step`).
4. The δ = 0 pass (:mod:`rome_edit.editing.prefix_pass`) computes each shared token once, and
   k* (Eq. 3) is read from it, since the text up to ``s`` is exactly ``context + prompt``.
5. Requests whose loss falls below the early-stop threshold leave the batch.

It also runs GPT-style ``gelu_new`` as torch's fused kernel (:func:`fused_activations`; the
same function to float rounding).  The KL term's reference distribution is the first step's
(δ = 0), as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.prefix_pass import PromptBatch, prefix_pass
from rome_edit.editing.request import EditRequest, rewriting_layouts
from rome_edit.editing.suffix_step import step_logits
from rome_edit.editing.value import EARLY_STOP_LOSS, ValueResult, clamp_, loss_layer_of
from rome_edit.models.architectures import edit_device
from rome_edit.models.layers import fused_activations
from rome_edit.models.loading import LoadedModel

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults, as the reference uses


def optimize_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    chunk_size: int = 64,
    progress: bool = True,
    use_kernel: bool = True,
) -> list[ValueResult]:
    """δ for every request; equal to :func:`rome_edit.editing.value.optimize_value` per request.

    ``chunk_size`` requests share one batch (``chunk_size × (len(context_templates) + 1)``
    rows); lower it to save memory.  ``use_kernel=False`` keeps an undispatched GPT-J on the
    model's own forward instead of the checked kernel (:mod:`rome_edit.editing.suffix_step`).
    """
    results: list[ValueResult] = []
    bar = tqdm(total=len(requests), desc="v* (batched)", unit="edit", disable=not progress)
    with fused_activations(lm.model):
        for start in range(0, len(requests), chunk_size):
            chunk = requests[start : start + chunk_size]
            results.extend(_optimize_chunk(lm, chunk, hp, context_templates, use_kernel))
            bar.update(len(chunk))
    bar.close()
    return results


def _optimize_chunk(lm, requests, hp, context_templates, use_kernel) -> list[ValueResult]:
    layer, loss_layer = hp.layer, loss_layer_of(lm, hp)
    per_request = []
    for req in requests:
        layouts, kl = rewriting_layouts(lm.tokenizer, req, context_templates)
        per_request.append([*layouts, kl])
    # Everything the optimisation indexes lives where the edit layer's MLP output does (the
    # same device everywhere unless a device map splits the model; then accelerate's hooks
    # move each block's inputs to that block, and logits come back here).
    dev = edit_device(lm.model, lm.arch, layer)
    b = PromptBatch(lm, per_request, dev)
    n, R = b.n, b.R
    pre = prefix_pass(lm, b, layer, loss_layer)
    v_init = pre.value_at_s[torch.arange(0, n * R, R)].float()  # the bare prompt's rows
    # k* (Eq. 3): the mean key at s over the rewriting prompts, whose text up to s is exactly
    # context + prompt, so causal attention makes it the key of key.key_stars
    keys = pre.key_at_s.view(n, R, -1)[:, : R - 1].mean(1)
    read_logits, path = step_logits(lm, b, pre, layer, loss_layer, v_init, use_kernel)
    del pre

    delta = torch.zeros_like(v_init)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    losses: list[list[float]] = [[] for _ in range(n)]
    nlls: list[list[float]] = [[] for _ in range(n)]
    active = torch.arange(n, device=dev)
    rows = torch.arange(n * R, device=dev)
    for step in range(hp.v_num_grad_steps):
        d = delta[active].clone().requires_grad_(True)
        # logits (rows, T, vocab) at each row's target columns; a KL row's column 0 is s
        log_probs = torch.log_softmax(read_logits(d.repeat_interleave(R, dim=0), rows).float(),
                                      dim=-1)
        picked = log_probs.gather(2, b.t_ids[rows][..., None])[..., 0] * b.t_mask[rows]
        n_t = b.t_mask[rows].sum(-1).clamp(min=1)
        nll_rows = (-picked.sum(-1) / n_t).view(len(active), R)[:, : R - 1]
        nll = nll_rows.mean(-1)
        kl_lp = log_probs.view(len(active), R, *log_probs.shape[1:])[:, R - 1, 0]
        if step == 0:  # δ = 0: the unedited next-token distribution, as the reference takes it
            kl_init = kl_lp.detach().clone()
        kl = (kl_lp.exp() * (kl_lp - kl_init[active])).sum(-1)
        v0 = v_init[active]
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * (d.norm(dim=-1) / v0.norm(dim=-1) ** 2)
        for j, i in enumerate(active.tolist()):
            losses[i].append(loss[j].item())
            nlls[i].append(nll[j].item())
        done = (loss.detach() < EARLY_STOP_LOSS) | (step == hp.v_num_grad_steps - 1)
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
    return [ValueResult(v_init[i].cpu(), delta[i].cpu(), tuple(losses[i]), tuple(nlls[i]),
                        keys[i].cpu(), path) for i in range(n)]


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
