"""ROME step 1: the key ``k*`` and the bare prompt's key/value ``k(s)``, ``v(s)``.

The key is the input of the edit layer's MLP output projection at the subject's last token
(``fact_token = subject_last``); ``k*`` averages it over the context templates (Meng et al. 2022,
Eq. 3).  The forward pass stops right after the output projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rome_edit.models.hooks import capture, run_until
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id, right_pad
from rome_edit.models.subject import locate_subjects
from rome_edit.rome.context import compose


@torch.no_grad()
def keys_and_values(
    lm: LoadedModel, layer: int, templates: Sequence[str], subjects: Sequence[str],
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key (d_mlp) and value (d_model) at each filled template's subject-last token, float32."""
    name = lm.arch.out_proj.format(layer)
    spans = locate_subjects(lm.tokenizer, templates, subjects)
    keys, values = [], []
    pad = pad_id(lm.tokenizer)
    for start in range(0, len(spans), batch_size):
        chunk = spans[start : start + batch_size]
        ids, mask = right_pad([s.input_ids for s in chunk], pad, lm.device)
        last = torch.tensor([s.last for s in chunk])
        with capture(lm.model, [name], inputs=True, stop_after=name) as rec:
            run_until(lm.model, input_ids=ids, attention_mask=mask)
        rows = torch.arange(len(chunk))
        keys.append(rec.inputs[name][rows, last.to(lm.device)].float().cpu())
        values.append(rec.outputs[name][rows, last.to(lm.device)].float().cpu())
    return torch.cat(keys), torch.cat(values)


@torch.no_grad()
def prompt_keys(
    lm: LoadedModel, layer: int, prompt: str, subjects: Sequence[str], batch_size: int = 256,
) -> list[torch.Tensor]:
    """The key at *every* token of ``prompt`` filled with each subject: one ``(n_tokens,
    d_mlp)`` float32 tensor per subject (what an update ``ΔW`` moves at each position)."""
    name = lm.arch.out_proj.format(layer)
    spans = locate_subjects(lm.tokenizer, [prompt] * len(subjects), list(subjects))
    pad = pad_id(lm.tokenizer)
    out: list[torch.Tensor] = []
    for start in range(0, len(spans), batch_size):
        chunk = spans[start : start + batch_size]
        ids, mask = right_pad([s.input_ids for s in chunk], pad, lm.device)
        with capture(lm.model, [name], inputs=True, stop_after=name) as rec:
            run_until(lm.model, input_ids=ids, attention_mask=mask)
        out += [rec.inputs[name][j, : len(s.input_ids)].float().cpu()
                for j, s in enumerate(chunk)]
    return out


def key_star(
    lm: LoadedModel, layer: int, prompt: str, subject: str, context_templates: Sequence[str]
) -> torch.Tensor:
    """``k*``: the mean key over ``context.format(prompt)`` for every context template."""
    templates = [compose(c, prompt) for c in context_templates]
    keys, _ = keys_and_values(lm, layer, templates, [subject] * len(templates))
    return keys.mean(dim=0)


def key_stars(
    lm: LoadedModel, layer: int, prompts: Sequence[str], subjects: Sequence[str],
    context_templates: Sequence[str],
) -> torch.Tensor:
    """``k*`` for many requests in batched forward passes, shape ``(n, d_mlp)``."""
    n_ctx = len(context_templates)
    templates = [compose(c, p) for p in prompts for c in context_templates]
    subj = [s for s in subjects for _ in range(n_ctx)]
    keys, _ = keys_and_values(lm, layer, templates, subj)
    return keys.view(len(prompts), n_ctx, -1).mean(dim=1)
