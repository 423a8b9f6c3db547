"""ROME's value optimisation for many requests at once, recomputing only what δ can change.

The loop is :mod:`rome_edit.rome.value_loop`'s, as for the one-at-a-time engine
(:mod:`rome_edit.rome.value_reference`); only a step's logits are computed differently, exploiting:

1. δ enters at the edit layer ``L`` at the subject's last token ``s``.  Tokens before ``s`` never
   change, so their attention keys/values are computed once and reused as a fixed prefix cache.
2. Below and at ``L`` nothing changes either: the block-``L`` outputs at positions ``≥ s`` are
   cached once; each step adds δ at ``s`` (the MLP output is added straight into the residual
   stream in every supported family) and runs only blocks ``L+1 .. v_loss_layer``.
3. Only the logits that the loss reads are computed (the target positions, and ``s`` of the KL
   prompt); on an undispatched GPT-J the step runs :mod:`rome_edit.models.gptj_suffix`, which
   also skips what cannot change inside blocks ``L+1`` and ``v_loss_layer``, runs the KL
   prompt over its first suffix column only, and keeps the shared prefix once per template —
   once it has agreed with the model's own forward (:mod:`rome_edit.rome.suffix_step`).
4. The δ = 0 pass (:mod:`rome_edit.rome.prefix_pass`) computes each shared token once, and
   k* (Eq. 3) is read from it, since the text up to ``s`` is exactly ``context + prompt``.
5. Requests whose loss falls below the early-stop threshold leave the batch (the loop's rule).

It also runs GPT-style ``gelu_new`` as torch's fused kernel (:func:`fused_activations`; the
same function to float rounding).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rome_edit.models.architectures import edit_device
from rome_edit.models.layers import fused_activations
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.prefix_pass import PromptBatch, prefix_pass
from rome_edit.rome.request import EditRequest, rewriting_layouts
from rome_edit.rome.suffix_step import step_logits
from rome_edit.rome.value_loop import EARLY_STOP_LOSS, ValueResult, loss_layer_of, optimise_deltas

__all__ = ["SuffixProblem", "optimise_values", "optimize_values"]


def optimise_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    chunk_size: int = 64,
    progress: bool = True,
    use_kernel: bool = True,
    early_stop_loss: float = EARLY_STOP_LOSS,
) -> list[ValueResult]:
    """δ for every request; per request equal to
    :func:`rome_edit.rome.value_reference.optimise_value`.

    ``chunk_size`` requests share one batch (``chunk_size × (len(context_templates) + 1)``
    rows); lower it to save memory.  ``use_kernel=False`` keeps an undispatched GPT-J on the
    model's own forward instead of the checked kernel (:mod:`rome_edit.rome.suffix_step`).
    """
    # A chunk's requests share one row layout, so requests that use different numbers of fit
    # phrasings (hp.fit_phrasings; FitPhrasing.joins says which) run apart.
    groups: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(sum(p.joins(req) for p in hp.fit_phrasings), []).append(i)
    results: list[ValueResult | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="v* (batched)", unit="edit", disable=not progress)
    with fused_activations(lm.model):
        for which in groups.values():
            for start in range(0, len(which), chunk_size):
                idx = which[start : start + chunk_size]
                chunk = [requests[i] for i in idx]
                for i, res in zip(idx, _optimise_chunk(lm, chunk, hp, context_templates,
                                                       use_kernel, early_stop_loss)):
                    results[i] = res
                bar.update(len(chunk))
    bar.close()
    return [r for r in results if r is not None]


class SuffixProblem:
    """:class:`~rome_edit.rome.value_loop.StepProblem` of a chunk: the δ = 0 pass once, then
    each step runs only the suffix above the edit layer (:mod:`rome_edit.rome.suffix_step`)."""

    def __init__(self, lm: LoadedModel, per_request, hp: ROMEHyperParams,
                 use_kernel: bool, n_key_rows: int) -> None:
        layer, loss_layer = hp.layer, loss_layer_of(lm, hp)
        # Everything the optimisation indexes lives where the edit layer's MLP output does (the
        # same device everywhere unless a device map splits the model; then accelerate's hooks
        # move each block's inputs to that block, and logits come back here).
        self.device = edit_device(lm.model, lm.arch, layer)
        b = PromptBatch(lm, per_request, self.device)
        self.n, self.R, self.d_model = b.n, b.R, lm.model.config.hidden_size
        self.t_ids, self.t_mask = b.t_ids, b.t_mask
        pre = prefix_pass(lm, b, layer, loss_layer)
        self._v_init = pre.value_at_s[torch.arange(0, b.n * b.R, b.R)].float()  # bare prompts
        # k* (Eq. 3): the mean key at s over the edit prompt's rows (the first n_key_rows; fit
        # phrasings follow), whose text up to s is exactly context + prompt, so causal
        # attention makes it the key of key.key_stars
        self.k_star = pre.key_at_s.view(b.n, b.R, -1)[:, :n_key_rows].mean(1)
        self.logits, self.path = step_logits(lm, b, pre, layer, loss_layer, self._v_init,
                                             use_kernel)

    def v_init(self) -> torch.Tensor:
        return self._v_init


def _optimise_chunk(lm, requests, hp, context_templates, use_kernel,
                    early_stop_loss) -> list[ValueResult]:
    per_request = []
    for req in requests:
        layouts, kl = rewriting_layouts(lm.tokenizer, req, context_templates, hp.fit_phrasings)
        per_request.append([*layouts, kl])
    problem = SuffixProblem(lm, per_request, hp, use_kernel, len(context_templates))
    out = optimise_deltas(problem, hp, early_stop_loss)
    return [ValueResult(out.v_init[i].cpu(), out.delta[i].detach().cpu(), out.losses[i],
                        out.nlls[i], problem.k_star[i].cpu(), problem.path)
            for i in range(problem.n)]


def optimize_values(*args: Any, **kwargs: Any) -> list[ValueResult]:
    """Deprecated spelling of :func:`optimise_values` (the project writes British English);
    removed in 1.0."""
    warnings.warn("optimize_values is deprecated; use optimise_values (same arguments).",
                  DeprecationWarning, stacklevel=2)
    return optimise_values(*args, **kwargs)
