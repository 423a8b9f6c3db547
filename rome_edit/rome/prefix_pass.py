"""The batched value engine's layout and its δ = 0 pass: everything that δ cannot change.

ROME adds δ at the edit layer ``L`` at the subject's last token ``s`` (Meng et al. 2022, Eq. 4).
So the attention keys and values of every token before ``s``, and block L's output from ``s``
on, are the same in every optimisation step; this module computes them once per chunk, and
computes each of them once:

* Within a chunk, the rows built from one context template start with the same tokens (the
  context text, ``Name:``); those run once per template.
* Rows are grouped by the number of their own tokens before ``s`` (a name's first tokens), so
  no group pays for the longest name's padding.
* Blocks ``0 .. L`` run over each row's own tokens and suffix; blocks ``L+1 .. v_loss_layer``
  only over the own tokens (their suffix is recomputed every step anyway).

The result is laid out as ``[left pad][shared, C][left pad][own, O][suffix from s, S][pad]``,
``s`` in column ``P = C + O`` of every row; position ids count real tokens only, so positions
equal the plain implementation's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rome_edit.models.architectures import get_module
from rome_edit.models.compat import (
    FixedPrefix,
    GrowingPrefix,
    cache_kwargs,
    cache_of,
    empty_cache_layer,
    output_cache,
)
from rome_edit.models.hooks import capture
from rome_edit.models.layers import only_blocks
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id
from rome_edit.rome.request import PromptLayout


def shared_length(rows: Sequence[PromptLayout]) -> int:
    """Tokens every row of one context template has in common before its subject's last token."""
    limit = min(r.lookup for r in rows)
    first = rows[0].ids
    for c in range(limit):
        if any(r.ids[c] != first[c] for r in rows):
            return c
    return limit


class PromptBatch:
    """Token layout of all prompts of a chunk of requests (``R`` rows per request, row ``i``
    from context template ``i % R``; the last is the KL prompt).  See the module docstring."""

    def __init__(self, lm: LoadedModel, per_request: list[list[PromptLayout]],
                 dev: torch.device) -> None:
        rows = [r for layouts in per_request for r in layouts]
        self.n, self.R = len(per_request), len(per_request[0])
        self.shared = [shared_length([layouts[j] for layouts in per_request])
                       for j in range(self.R)]
        own = [r.lookup - self.shared[i % self.R] for i, r in enumerate(rows)]
        self.C, self.O = max(self.shared), max(own)
        self.P = self.C + self.O
        self.S = max(len(r.ids) - r.lookup for r in rows)
        pad = pad_id(lm.tokenizer)
        ids = torch.full((len(rows), self.P + self.S), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        t_max = max(len(r.targets) for r in rows)
        t_cols = torch.zeros((len(rows), max(t_max, 1)), dtype=torch.long)
        t_ids = torch.zeros_like(t_cols)
        t_mask = torch.zeros(t_cols.shape)
        for i, r in enumerate(rows):
            c = self.shared[i % self.R]
            ids[i, self.C - c : self.C] = torch.tensor(r.ids[:c], dtype=torch.long)
            mask[i, self.C - c : self.C] = 1
            ids[i, self.P - own[i] : self.P - own[i] + len(r.ids) - c] = torch.tensor(r.ids[c:])
            mask[i, self.P - own[i] : self.P - own[i] + len(r.ids) - c] = 1
            n_t = len(r.targets)
            if n_t:  # suffix column j predicts the token after it
                first = len(r.ids) - n_t - r.lookup
                t_cols[i, :n_t] = torch.arange(first, first + n_t)
                t_ids[i, :n_t] = torch.tensor(r.targets)
                t_mask[i, :n_t] = 1.0
        self.own = torch.tensor(own)
        self.ids, self.mask = ids.to(dev), mask.to(dev)
        self.pos = (mask.cumsum(-1) - 1).clamp(min=0).to(dev)
        # the logits a step reads: suffix columns of the targets (a KL row: column 0, s)
        self.t_cols, self.t_ids, self.t_mask = t_cols.to(dev), t_ids.to(dev), t_mask.to(dev)


@dataclass(frozen=True)
class PrefixPass:
    """What the δ = 0 pass leaves for the steps (rows in batch order).

    The attention prefix of blocks ``L+1 .. v_loss_layer`` comes in two parts: ``shared_kv``
    once per context template, ``(R, heads, C, head_dim)`` (``None`` when ``C = 0``), and
    ``own_kv`` per row, ``(rows, heads, O, head_dim)``; :meth:`prefix_kv` joins them.
    """

    shared_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    own_kv: list[tuple[torch.Tensor, torch.Tensor]]
    h_suffix: torch.Tensor  # block L's output from s on, (rows, S, d_model)
    value_at_s: torch.Tensor  # the MLP output at s (v for the bare prompt's row), (rows, d_model)
    key_at_s: torch.Tensor  # the input of the output projection at s, (rows, d_mlp), float32

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row's whole prefix ``(rows, heads, C + O, head_dim)``, per block above L."""
        if not self.shared_kv:
            return list(self.own_kv)
        template = torch.arange(self.h_suffix.shape[0]) % self.shared_kv[0][0].shape[0]
        return [tuple(torch.cat([sh[template.to(sh.device)], own.to(sh.device)], dim=2)
                      for sh, own in zip(shared, owned))
                for shared, owned in zip(self.shared_kv, self.own_kv)]


@torch.no_grad()
def prefix_pass(lm: LoadedModel, b: PromptBatch, layer: int, loss_layer: int) -> PrefixPass:
    """Run the δ = 0 pass of a chunk (see the module docstring)."""
    names = [lm.arch.block.format(layer), lm.arch.mlp.format(layer),
             lm.arch.out_proj.format(layer)]
    n_rows, R, C, P, S = b.ids.shape[0], b.R, b.C, b.P, b.S
    template = torch.arange(n_rows) % R
    shared = None
    if C:  # rows 0 .. R-1 are one request's, i.e. one row per template
        with only_blocks(lm, 0, loss_layer + 1):
            out = lm.model(input_ids=b.ids[:R, :C], attention_mask=b.mask[:R, :C],
                           position_ids=b.pos[:R, :C], use_cache=True, logits_to_keep=1)
        shared = [(lay.keys, lay.values)
                  for lay in list(output_cache(out).layers)[: loss_layer + 1]]

    def cache(g: torch.Tensor, growing: range):
        """Rows ``g``'s cache for the blocks in ``growing``, each layer starting from its
        template's shared tokens; a layer below them does not run, and only tells the mask code
        the prefix length (C), so it is a view, not a copy."""
        if shared is None:
            return cache_of([empty_cache_layer() for _ in range(growing.stop)])
        idx = template[g]
        return cache_of([
            GrowingPrefix(*(t[idx.to(t.device)] for t in shared[i])) if i in growing
            else FixedPrefix(*(t[:1].expand(len(g), *t.shape[1:]) for t in shared[0]))
            for i in range(growing.stop)])

    h_suffix = value_at_s = key_at_s = None
    own_kv: list[list[torch.Tensor | None]] = [[None, None] for _ in range(loss_layer - layer)]
    for o in sorted(set(b.own.tolist())):
        g = (b.own == o).nonzero()[:, 0]
        keep = torch.cat([torch.arange(C), torch.arange(P - o, P + S)])
        g_dev, keep_dev = g.to(b.ids.device), keep.to(b.ids.device)
        mask = b.mask[g_dev][:, keep_dev]
        low = cache(g, range(layer + 1))
        with only_blocks(lm, 0, layer + 1), capture(lm.model, names, inputs=True) as rec:
            lm.model(input_ids=b.ids[g_dev, P - o :], attention_mask=mask,
                     position_ids=b.pos[g_dev, P - o :], use_cache=True, logits_to_keep=1,
                     **cache_kwargs(lm.model, low))
        block_out = rec.outputs[names[0]]
        if h_suffix is None:
            h_suffix = block_out.new_empty(n_rows, S, block_out.shape[-1])
            value_at_s = block_out.new_empty(n_rows, block_out.shape[-1])
            key_at_s = torch.empty(n_rows, rec.inputs[names[2]].shape[-1],
                                   device=block_out.device)
        h_suffix[g_dev] = block_out[:, o:]
        value_at_s[g_dev] = rec.outputs[names[1]][:, o]
        key_at_s[g_dev] = rec.inputs[names[2]][:, o].float()
        if layer == loss_layer:
            continue
        high = cache(g, range(layer + 1, loss_layer + 1))
        if o:  # the own tokens through the blocks above L
            emb = block_out[:, :o]
            if lm.arch.position_embed:  # the model adds these to inputs_embeds itself
                emb = emb - get_module(lm.model, lm.arch.position_embed)(b.pos[g_dev, P - o : P])
            with only_blocks(lm, layer + 1, loss_layer + 1):
                lm.model(inputs_embeds=emb, attention_mask=mask[:, : C + o],
                         position_ids=b.pos[g_dev, P - o : P], use_cache=True,
                         logits_to_keep=1, **cache_kwargs(lm.model, high))
        for j, lay in enumerate(high.layers[layer + 1 :]):
            if lay.keys is not None:  # else these rows have no token before s at all
                for side, t in enumerate((lay.keys, lay.values)):
                    if own_kv[j][side] is None:
                        own_kv[j][side] = t.new_zeros(n_rows, t.shape[1], b.O, t.shape[3])
                    # own tokens right before s (left padding between them and the shared part)
                    own_kv[j][side][g.to(t.device), :, b.O - o :] = t[:, :, C:]
    for pair in own_kv:  # no row has an own token before s
        if pair[0] is None:
            ref = low.layers[0].keys
            pair[0] = pair[1] = ref.new_zeros(n_rows, ref.shape[1], 0, ref.shape[3])
    shared_kv = None if shared is None else shared[layer + 1 :]
    return PrefixPass(shared_kv, [(k, v) for k, v in own_kv], h_suffix, value_at_s, key_at_s)
