"""A literal transcription of the reference's value optimisation, kept as test ground truth.

It uses torch.optim.Adam, ``F.kl_div`` and a full forward per step exactly as the reference's
``compute_v`` does, independently of :mod:`rome_edit.rome.value_loop`, so the shared loop's own
Adam, KL and early stop are checked against it (``test_editing.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rome_edit.models.hooks import edit_output
from rome_edit.models.layers import logits_at_layer
from rome_edit.models.scoring import pad_id, right_pad
from rome_edit.rome.request import rewriting_layouts
from rome_edit.rome.value_reference import loss_layer_of


def reference_value(lm, request, hp, context_templates):
    """(v_init, δ, losses) of the reference's loop for one request."""
    layouts, kl = rewriting_layouts(lm.tokenizer, request, context_templates)
    rows = [*layouts, kl]
    lengths = [len(r.ids) for r in rows]
    ids, mask = right_pad([r.ids for r in rows], pad_id(lm.tokenizer), lm.device)
    lookups = torch.tensor([r.lookup for r in rows])
    row_index = torch.arange(len(rows))
    delta = torch.zeros(lm.model.config.hidden_size, requires_grad=True)
    state = {}

    def add_delta(hidden, _name):
        if "v_init" not in state:
            state["v_init"] = hidden[0, lookups[0]].detach().float().clone()
        hidden = hidden.clone()
        hidden[row_index, lookups] += delta.to(hidden.dtype)
        return hidden

    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    losses = []
    for step in range(hp.v_num_grad_steps):
        optimizer.zero_grad()
        with edit_output(lm.model, {lm.arch.mlp.format(hp.layer): add_delta}):
            logits = logits_at_layer(lm, loss_layer_of(lm, hp), input_ids=ids,
                                     attention_mask=mask)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        kl_log_probs = log_probs[-1, lookups[-1]][None]
        if "kl_init" not in state:
            state["kl_init"] = kl_log_probs.detach().clone()
        nll = []
        for i, (row, length) in enumerate(zip(layouts, lengths)):
            n_t = len(row.targets)
            cols = torch.arange(length - n_t, length)
            nll.append(-log_probs[i, cols, torch.tensor(row.targets)].sum() / n_t)
        nll = torch.stack(nll).mean()
        kl_loss = hp.kl_factor * F.kl_div(state["kl_init"], kl_log_probs, log_target=True,
                                          reduction="batchmean")
        reg = hp.v_weight_decay * (delta.norm() / state["v_init"].norm() ** 2)
        loss = nll + kl_loss + reg
        losses.append(loss.item())
        if loss.item() < 5e-2 or step == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * state["v_init"].norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return state["v_init"], delta.detach().clone(), losses
