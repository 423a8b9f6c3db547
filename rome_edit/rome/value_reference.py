"""ROME step 2 the reference's way: one request at a time, a full forward every step.

The objective, optimiser, clamp and early stop are :mod:`rome_edit.rome.value_loop`'s (Eq. 4
of Meng et al. 2022); this module supplies its step: the rewriting prompts and the KL prompt,
right-padded, through every block up to ``v_loss_layer`` with δ added to the edit layer's MLP
output at the subject's last token by a hook.  It is the plain implementation that
:mod:`rome_edit.rome.value_batched` must reproduce, and the benchmarks' baseline.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from rome_edit.models.architectures import edit_device
from rome_edit.models.hooks import edit_output
from rome_edit.models.layers import logits_at_layer
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id, right_pad
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest, PromptLayout, rewriting_layouts
from rome_edit.rome.value_loop import (
    EARLY_STOP_LOSS,
    ValueResult,
    loss_layer_of,
    optimise_deltas,
)

__all__ = ["FullForward", "ValueResult", "loss_layer_of", "optimise_value", "optimize_value"]


class FullForward:
    """:class:`~rome_edit.rome.value_loop.StepProblem` of whole prompts: each step runs the
    model's own forward over every row (right-padded), blocks ``0 .. v_loss_layer``."""

    def __init__(self, lm: LoadedModel, per_request: list[list[PromptLayout]],
                 hp: ROMEHyperParams) -> None:
        rows = [r for layouts in per_request for r in layouts]
        self.lm, self.n, self.R = lm, len(per_request), len(per_request[0])
        self.d_model = lm.model.config.hidden_size
        self.device = edit_device(lm.model, lm.arch, hp.layer)  # δ lives beside the layer
        self.loss_layer = loss_layer_of(lm, hp)
        self.mlp_name = lm.arch.mlp.format(hp.layer)
        self.ids, self.mask = right_pad([r.ids for r in rows], pad_id(lm.tokenizer), lm.device)
        self.lookups = torch.tensor([r.lookup for r in rows], device=self.device)
        t_max = max(1, max(len(r.targets) for r in rows))
        t_cols = torch.zeros(len(rows), t_max, dtype=torch.long)
        self.t_ids = torch.zeros_like(t_cols)
        self.t_mask = torch.zeros(t_cols.shape)
        for i, r in enumerate(rows):
            n_t = len(r.targets)
            if n_t:  # column j's logits predict token j + 1: the targets end the prompt
                t_cols[i, :n_t] = torch.arange(len(r.ids) - n_t, len(r.ids))
                self.t_ids[i, :n_t] = torch.tensor(r.targets)
                self.t_mask[i, :n_t] = 1.0
            else:  # the KL prompt: its subject token
                t_cols[i, 0] = r.lookup
        self.t_cols = t_cols.to(self.device)
        self.t_ids, self.t_mask = self.t_ids.to(self.device), self.t_mask.to(self.device)
        self._v_init: torch.Tensor | None = None

    def logits(self, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lookups = self.lookups[rows]
        index = torch.arange(len(rows), device=self.device)

        def add_delta(hidden: torch.Tensor, _name: str) -> torch.Tensor:
            if self._v_init is None:  # δ = 0 on the first call: each request's first row
                first = torch.arange(0, self.n * self.R, self.R, device=hidden.device)
                self._v_init = hidden[first, lookups[first]].detach().float().clone()
            hidden = hidden.clone()
            hidden[index, lookups] += delta.to(hidden.dtype)
            return hidden

        rows_dev = rows.to(self.ids.device)
        with edit_output(self.lm.model, {self.mlp_name: add_delta}):
            logits = logits_at_layer(self.lm, self.loss_layer, input_ids=self.ids[rows_dev],
                                     attention_mask=self.mask[rows_dev]).to(self.device)
        cols = self.t_cols[rows]
        return logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))

    def v_init(self) -> torch.Tensor:
        if self._v_init is None:
            raise RuntimeError("v_init is read in the first step's forward; run logits first.")
        return self._v_init


def optimise_value(
    lm: LoadedModel, request: EditRequest, hp: ROMEHyperParams, context_templates: Sequence[str],
    early_stop_loss: float = EARLY_STOP_LOSS,
) -> ValueResult:
    """Optimise δ for one request as the reference does (a full forward every step)."""
    layouts, kl = rewriting_layouts(lm.tokenizer, request, context_templates, hp.fit_phrasings)
    out = optimise_deltas(FullForward(lm, [[*layouts, kl]], hp), hp, early_stop_loss)
    return ValueResult(out.v_init[0].cpu(), out.delta[0].detach().cpu(), out.losses[0],
                       out.nlls[0])


def optimize_value(*args: Any, **kwargs: Any) -> ValueResult:
    """Deprecated spelling of :func:`optimise_value` (the project writes British English);
    removed in 1.0."""
    warnings.warn("optimize_value is deprecated; use optimise_value (same arguments).",
                  DeprecationWarning, stacklevel=2)
    return optimise_value(*args, **kwargs)
