"""One value-optimisation step's logits: the model's own forward, or the GPT-J kernel if it agrees.

The batched engine (:mod:`rome_edit.rome.value_batched`) needs, at every step, the logits at
each row's target columns as a function of δ at the subject's last token.  Two ways compute
them from the δ = 0 pass (:mod:`rome_edit.rome.prefix_pass`):

* :class:`GenericSuffix` — any supported family: the model's own base model over the suffix,
  blocks ``L+1 .. v_loss_layer`` only, against the fixed prefix as a cache, and its head at the
  read columns.
* :class:`~rome_edit.models.gptj_suffix.SuffixGroups` — an undispatched GPT-J: a kernel that
  mirrors GPT-J's eager attention and skips what δ cannot change.

A mirror of a model's arithmetic breaks silently when the library refactors the model (GPT-J's
rotary table moved in transformers 5.24).  So the kernel is trusted only after it agrees with
the generic path: on its first use for a model (and edit/loss layer pair) both compute the
logits of the first chunk at a fixed random δ, and the kernel is kept if
``max|kernel − generic| ≤ tol · max(1, max|generic|)`` with ``tol`` from
:data:`KERNEL_TOLERANCE` (per dtype).  If it raises or disagrees, one warning is logged and the
generic path serves that model from then on: never a crash, never silently different numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, cast
from weakref import WeakKeyDictionary

import torch
from torch import nn

from rome_edit.models.architectures import get_module
from rome_edit.models.compat import FixedPrefix, cache_kwargs, cache_of
from rome_edit.models.gptj_suffix import SuffixGroups, supports_gptj_suffix
from rome_edit.models.layers import only_blocks
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.prefix_pass import PrefixPass, PromptBatch

log = logging.getLogger(__name__)

StepLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepPath = Literal["gptj-kernel", "generic"]

# Largest kernel − generic logit difference accepted, relative to the largest logit: float32
# agrees to rounding (measured ≤ 2e-6 on the test models); half precision rounds each block.
KERNEL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# model → {(layer, loss_layer): kernel agreed}; weak, so a freed model leaves no entry
_VERDICTS: WeakKeyDictionary[nn.Module, dict[tuple[int, int], bool]] = WeakKeyDictionary()


class GenericSuffix:
    """Any supported family: the model's own base model over the suffix, blocks ``L+1 ..
    v_loss_layer`` only, against the fixed prefix cache, then the model's own head at the read
    columns only (not at every suffix column)."""

    def __init__(self, lm: LoadedModel, b: PromptBatch, prefix_kv: list, h_suffix: torch.Tensor,
                 layer: int, loss_layer: int) -> None:
        self.lm, self.b, self.h_suffix = lm, b, h_suffix
        self.layer, self.loss_layer = layer, loss_layer
        self.kv = list(prefix_kv)  # blocks L+1 .. v_loss_layer
        self.rows = torch.arange(h_suffix.shape[0], device=h_suffix.device)  # rows kept
        self.position_offset = None
        if lm.arch.position_embed:  # the model adds these to inputs_embeds itself
            embed = get_module(lm.model, lm.arch.position_embed)
            self.position_offset = embed(b.pos[:, b.P :]).to(h_suffix.device)

    def logits(self, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        b = self.b
        if not torch.equal(self.rows, rows):  # names left: drop their rows, a layer at a time
            pos = torch.searchsorted(self.rows, rows)
            for i, (k, v) in enumerate(self.kv):
                self.kv[i] = (k[pos.to(k.device)], v[pos.to(v.device)])
            self.h_suffix = self.h_suffix[pos]
            if self.position_offset is not None:
                self.position_offset = self.position_offset[pos]
            self.rows = rows
        # blocks 0 .. L do not run; their cache slots only tell the mask code the prefix length
        slots = [self.kv[0]] * (self.layer + 1) + self.kv if self.kv else []
        cache = cache_of([FixedPrefix(k, v) for k, v in slots])
        emb = self.h_suffix.clone()
        emb[:, 0] = emb[:, 0] + delta.to(emb.dtype)
        cols = b.t_cols[rows]
        if self.layer == self.loss_layer:  # the logit lens at L itself: no block runs
            hidden = get_module(self.lm.model, self.lm.arch.final_norm)(_columns(emb, cols))
        else:
            if self.position_offset is not None:
                emb = emb - self.position_offset
            # The base model (blocks, then its final norm) and the head apart, so that the head
            # — on SmolLM2 as many weights as 8 blocks — runs at the read columns only, not at
            # every suffix column as the causal-LM forward would (docs: BENCHMARKS.md, bound).
            base = cast(nn.Module, self.lm.model.base_model)
            with only_blocks(self.lm, self.layer + 1, self.loss_layer + 1):
                hidden = base(inputs_embeds=emb, attention_mask=b.mask[rows],
                              position_ids=b.pos[rows, b.P :], use_cache=True,
                              **cache_kwargs(base, cache)).last_hidden_state
            hidden = _columns(hidden, cols)
        logits = get_module(self.lm.model, self.lm.arch.lm_head)(hidden)
        return logits.to(delta.device)


def _columns(hidden: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``hidden[i, cols[i, j]]`` for every row ``i`` and read column ``j``."""
    cols = cols.to(hidden.device)
    return hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))


def kernel_disagreement(kernel: StepLogits, generic: StepLogits, v_init: torch.Tensor,
                        R: int) -> float:
    """``max|kernel − generic| / max(1, max|generic|)`` at a fixed random δ of the size of
    ``v_init`` (one per request, repeated over its ``R`` rows), all rows."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    delta = torch.randn(v_init.shape, generator=gen).to(v_init.device) * v_init.norm(
        dim=-1, keepdim=True) / v_init.shape[-1] ** 0.5
    rows = torch.arange(v_init.shape[0] * R, device=v_init.device)
    with torch.no_grad():
        ours = kernel(delta.repeat_interleave(R, dim=0), rows).float()
        theirs = generic(delta.repeat_interleave(R, dim=0), rows).float()
    scale = max(1.0, theirs.abs().max().item())
    return (ours - theirs).abs().max().item() / scale


def step_logits(lm: LoadedModel, b: PromptBatch, pre: PrefixPass, layer: int, loss_layer: int,
                v_init: torch.Tensor, use_kernel: bool = True) -> tuple[StepLogits, StepPath]:
    """The step's logits function for this chunk, and which path computes it (see the module
    docstring for when the GPT-J kernel is used)."""

    def generic() -> StepLogits:
        return GenericSuffix(lm, b, pre.prefix_kv(), pre.h_suffix, layer, loss_layer).logits

    if not use_kernel or not supports_gptj_suffix(lm.model, lm.arch):
        return generic(), "generic"
    verdicts = _VERDICTS.setdefault(lm.model, {})
    agreed = verdicts.get((layer, loss_layer))
    if agreed is False:
        return generic(), "generic"
    try:
        kernel = SuffixGroups(lm.model, lm.arch, layer, loss_layer, pre.shared_kv, pre.own_kv,
                              pre.h_suffix, b.pos[:, b.P :], b.mask, b.t_cols, b.R).logits
        if agreed is None:
            reference = generic()
            gap = kernel_disagreement(kernel, reference, v_init, b.R)
            tol = KERNEL_TOLERANCE.get(pre.h_suffix.dtype, 5e-2)
            if not gap <= tol:  # NaN included
                raise ValueError(f"its logits differ from the model's own forward by {gap:.3g} "
                                 f"of the largest logit (tolerance {tol:g})")
            log.info("GPT-J kernel agrees with the model's forward (%.2g, tolerance %g)",
                     gap, tol)
            verdicts[(layer, loss_layer)] = True
    except Exception as err:  # noqa: BLE001 - any failure of the mirror means: do not use it
        verdicts[(layer, loss_layer)] = False
        log.warning("the GPT-J step kernel is not used for this model (layers %d..%d): %s: %s. "
                    "Falling back to the model's own forward (same results, slower).",
                    layer, loss_layer, type(err).__name__, err)
        return generic(), "generic"
    return kernel, "gptj-kernel"
