"""ROME's value optimisation for many requests at once, recomputing only what δ can change.

Same objective, optimiser, clamp and early stop as :mod:`rome_edit.editing.value` (one δ per
request, Adam being element-wise makes a stacked ``(n, d_model)`` δ equal to n separate runs),
but three facts about the computation are exploited:

1. δ enters at the edit layer ``L`` at the subject's last token ``s``.  Tokens before ``s`` never
   change, so their attention keys/values are computed once and reused as a fixed prefix cache.
2. Below and at ``L`` nothing changes either: the block-``L`` outputs at positions ``≥ s`` are
   cached once; each step adds δ at ``s`` (the MLP output is added straight into the residual
   stream in every supported family) and runs only blocks ``L+1 .. v_loss_layer``.
3. Requests whose loss falls below the early-stop threshold leave the batch.

It also runs GPT-style ``gelu_new`` as torch's fused kernel (:func:`fused_activations`; the
same function to float rounding).

Each prompt is laid out as ``[left pad][prefix][suffix][right pad]`` so every prompt's ``s``
sits in the same column; position ids count real tokens only, so positions equal the plain
implementation's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.request import EditRequest, PromptLayout, rewriting_layouts
from rome_edit.editing.value import EARLY_STOP_LOSS, ValueResult, clamp_, loss_layer_of
from rome_edit.models.architectures import edit_device, get_module
from rome_edit.models.hooks import capture
from rome_edit.models.layers import fused_activations, only_blocks
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id

log = logging.getLogger(__name__)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults, as the reference uses


class _FixedPrefix(DynamicLayer):
    """A cache layer holding a fixed prefix: attention sees prefix + new tokens, nothing is
    stored, so the same prefix serves every optimisation step without copies or crops."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2))


class _Batch:
    """Token layout of all prompts of a chunk of requests (``R`` rows per request)."""

    def __init__(self, lm: LoadedModel, per_request: list[list[PromptLayout]],
                 dev: torch.device) -> None:
        rows = [r for layouts in per_request for r in layouts]
        self.n, self.R = len(per_request), len(per_request[0])
        self.P = max(r.lookup for r in rows)
        self.S = max(len(r.ids) - r.lookup for r in rows)
        pad = pad_id(lm.tokenizer)
        ids = torch.full((len(rows), self.P + self.S), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        t_max = max(len(r.targets) for r in rows)
        self.t_cols = torch.zeros((len(rows), max(t_max, 1)), dtype=torch.long)
        self.t_ids = torch.zeros_like(self.t_cols)
        self.t_mask = torch.zeros(self.t_cols.shape)
        for i, r in enumerate(rows):
            begin = self.P - r.lookup
            ids[i, begin : begin + len(r.ids)] = torch.tensor(r.ids)
            mask[i, begin : begin + len(r.ids)] = 1
            n_t = len(r.targets)
            if n_t:  # suffix column j predicts the token after it
                first = len(r.ids) - n_t - r.lookup
                self.t_cols[i, :n_t] = torch.arange(first, first + n_t)
                self.t_ids[i, :n_t] = torch.tensor(r.targets)
                self.t_mask[i, :n_t] = 1.0
        self.ids, self.mask = ids.to(dev), mask.to(dev)
        self.pos = (mask.cumsum(-1) - 1).clamp(min=0).to(dev)
        self.t_cols, self.t_ids, self.t_mask = (self.t_cols.to(dev), self.t_ids.to(dev),
                                                self.t_mask.to(dev))


def optimize_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    chunk_size: int = 64,
    progress: bool = True,
) -> list[ValueResult]:
    """δ for every request; equal to :func:`rome_edit.editing.value.optimize_value` per request.

    ``chunk_size`` requests share one batch (``chunk_size × (len(context_templates) + 1)``
    rows); lower it to save memory.
    """
    results: list[ValueResult] = []
    bar = tqdm(total=len(requests), desc="v* (batched)", unit="edit", disable=not progress)
    with fused_activations(lm.model):
        for start in range(0, len(requests), chunk_size):
            chunk = requests[start : start + chunk_size]
            results.extend(_optimize_chunk(lm, chunk, hp, context_templates))
            bar.update(len(chunk))
    bar.close()
    return results


def _optimize_chunk(lm, requests, hp, context_templates) -> list[ValueResult]:
    layer, loss_layer = hp.layer, loss_layer_of(lm, hp)
    per_request = []
    for req in requests:
        layouts, kl = rewriting_layouts(lm.tokenizer, req, context_templates)
        per_request.append([*layouts, kl])
    # Everything the optimisation indexes lives where the edit layer's MLP output does (the
    # same device everywhere unless a device map splits the model; then accelerate's hooks
    # move each block's inputs to that block, and logits come back here).
    dev = edit_device(lm.model, lm.arch, layer)
    b = _Batch(lm, per_request, dev)
    n, R = b.n, b.R
    block_name, mlp_name = lm.arch.block.format(layer), lm.arch.mlp.format(layer)

    with torch.no_grad(), only_blocks(lm, 0, loss_layer + 1), \
            capture(lm.model, [block_name, mlp_name]) as rec:
        # Only column P's logits are read (the KL prompt's initial distribution); keeping just
        # that column spares a rows × tokens × vocab tensor, the largest of the chunk.
        out = lm.model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.pos, use_cache=True,
                       logits_to_keep=torch.tensor([b.P], device=dev))
    h_suffix = rec.outputs[block_name][:, b.P :].clone()  # block-L output at positions ≥ s
    v_init = rec.outputs[mlp_name][torch.arange(0, n * R, R), b.P].float()  # bare prompt rows
    kl_rows = torch.arange(R - 1, n * R, R, device=dev)
    kl_init = torch.log_softmax(out.logits.to(dev)[kl_rows, 0].float(), dim=-1)
    kv = [(lay.keys[..., : b.P, :], lay.values[..., : b.P, :])
          for lay in list(out.past_key_values.layers)[: loss_layer + 1]]
    del out
    position_offset = None
    if lm.arch.position_embed:  # the model adds these to inputs_embeds itself
        position_offset = get_module(lm.model, lm.arch.position_embed)(b.pos[:, b.P :]).to(dev)

    delta = torch.zeros_like(v_init)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    losses: list[list[float]] = [[] for _ in range(n)]
    nlls: list[list[float]] = [[] for _ in range(n)]
    active = torch.arange(n, device=dev)
    rows = torch.arange(n * R, device=dev)
    cache_rows = None
    for step in range(hp.v_num_grad_steps):
        if cache_rows is None or len(cache_rows) != len(rows):
            cache_rows = rows
            kv_active = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in kv]
        cache = DynamicCache()
        cache.layers = [_FixedPrefix(k, v) for k, v in kv_active]
        d = delta[active].clone().requires_grad_(True)
        emb = h_suffix[rows].clone()
        emb[:, 0] = emb[:, 0] + d.repeat_interleave(R, dim=0).to(emb.dtype)
        if position_offset is not None:
            emb = emb - position_offset[rows]
        with only_blocks(lm, layer + 1, loss_layer + 1):
            logits = lm.model(inputs_embeds=emb, past_key_values=cache,
                              attention_mask=b.mask[rows], position_ids=b.pos[rows, b.P :],
                              use_cache=True).logits.to(dev)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(1, b.t_cols[rows][..., None].expand(-1, -1, log_probs.shape[-1]))
        picked = picked.gather(2, b.t_ids[rows][..., None])[..., 0] * b.t_mask[rows]
        n_t = b.t_mask[rows].sum(-1).clamp(min=1)
        nll_rows = (-picked.sum(-1) / n_t).view(len(active), R)[:, : R - 1]
        nll = nll_rows.mean(-1)
        kl_lp = log_probs.view(len(active), R, *log_probs.shape[1:])[:, R - 1, 0]
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
    return [ValueResult(v_init[i].cpu(), delta[i].cpu(), tuple(losses[i]), tuple(nlls[i]))
            for i in range(n)]


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
