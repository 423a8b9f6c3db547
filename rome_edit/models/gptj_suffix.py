"""GPT-J blocks evaluated on a short suffix against a fixed prefix: the batched value step's kernel.

ROME's value optimisation (Meng et al. 2022, Eq. 4) adds δ to the edit layer ``L``'s MLP output
at the subject's last token and reads logits at the target positions, many times per edit.
The generic batched engine runs the model's own forward over the suffix (the subject's last
token onwards) with the prefix as a key/value cache.  For GPT-J's *parallel* blocks
(``h + attn(ln₁ h) + mlp(ln₁ h)``) more things cannot change with δ or are never read, and
this module skips them:

* **Block L+1, positions after the subject.**  Their block input is block L's output, which δ
  does not reach (δ enters *after* block L's attention), so ``ln₁``, the query/key/value
  projections and the whole MLP there are constants, and so are their attention scores to
  every key but the subject's.  Their softmax over those fixed keys is reduced once to a
  maximum, a normaliser and a weighted value sum; each step adds only the subject's score and
  value to it, and recomputes the output projection.
* **The loss block, positions nobody reads.**  Logits are read only at the target positions
  (and at the subject for the KL prompt), so the loss block needs keys and values everywhere
  but queries, attention output, MLP and residual only there; the final norm and unembedding
  run only there too.
* **The KL prompt's later tokens.**  Its logits are read at the subject itself, so
  :class:`SuffixGroups` runs it over that one column, apart from the rewriting prompts.
* **Prefix keys.**  Attention scores against the fixed prefix and against the suffix are
  computed separately and joined before the softmax, so the prefix keys/values are never
  concatenated with the suffix's (a copy, and a full-size gradient, per block and step).
  The part of the prefix that all prompts of one context template share is held once per
  template, and its scores come from one matrix product per template and head over every
  request's queries, instead of thousands of tiny per-row products.

The arithmetic is GPT-J's eager attention (float32 attention scores, rotary on each head's
first ``rotary_dim`` features, ``1/√head_dim`` scaling, an additive mask); the modules' own
weights, projections, norms, MLPs and rotary table are called, so nothing is copied.  Because it
mirrors the model's attention it can drift from a future transformers release:
:mod:`rome_edit.rome.suffix_step` checks it against the model's own forward on its first use
for a model and falls back to the generic path if it cannot run or disagrees.  Used only for an
undispatched GPT-J (no accelerate device map); every other case takes the generic path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from rome_edit.models.architectures import Architecture, get_module
from rome_edit.models.compat import gptj_sin_cos
from rome_edit.models.gptj_rotary import apply_rotary


def supports_gptj_suffix(model: nn.Module, arch: Architecture) -> bool:
    """True for a GPT-J on one device without accelerate hooks (what this kernel assumes)."""
    if arch.family != "gptj" or getattr(model.config, "model_type", None) != "gptj":
        return False
    if getattr(model, "hf_device_map", None):
        return False
    return all(not hasattr(m, "_hf_hook") for m in model.modules())


def _take(x: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-row columns ``cols`` (rows, T) of ``x`` along ``dim`` (1 or 2)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = cols.shape
    index = cols.view(shape).expand(*x.shape[:dim], cols.shape[1], *x.shape[dim + 1 :])
    return x.gather(dim, index)


class _LaterColumns(NamedTuple):
    """Block L+1 at the suffix columns after the subject (rows first, so rows can be dropped)."""

    q: torch.Tensor  # queries (rows, heads, S-1, head_dim)
    m: torch.Tensor  # largest score over the fixed keys (rows, heads, S-1, 1)
    z: torch.Tensor  # Σ e^(s−m) over them (rows, heads, S-1, 1)
    u: torch.Tensor  # Σ e^(s−m)·v over them, float32 (rows, heads, S-1, head_dim)
    mlp: torch.Tensor  # MLP output (rows, S-1, d)


class GPTJSuffix:
    """Logits at chosen suffix columns as a function of δ at suffix column 0.

    Built once per chunk from the δ = 0 pass.  Per block ``L+1 .. stop``, keys (after rotary)
    and values of the prefix: ``shared_kv`` once per context template
    ``(R, heads, C, head_dim)`` (``None`` when nothing is shared; row ``i`` uses template
    ``i % R``), ``own_kv`` per row ``(rows, heads, O, head_dim)``.
    ``h_suffix``: block L's output over the suffix ``(rows, S, d)``; ``positions``: suffix
    position ids ``(rows, S)``; ``mask``: 1 for real tokens over shared, own and suffix
    columns ``(rows, C + O + S)``; ``read``: suffix columns whose logits are wanted
    ``(rows, T)``.  Rows come ``R`` per request, and leave a request at a time.
    """

    def __init__(self, model: nn.Module, arch: Architecture, layer: int, stop: int,
                 shared_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                 own_kv: list[tuple[torch.Tensor, torch.Tensor]], h_suffix: torch.Tensor,
                 positions: torch.Tensor, mask: torch.Tensor, read: torch.Tensor) -> None:
        cfg = model.config
        self.blocks = [get_module(model, arch.block.format(i)) for i in range(layer + 1, stop + 1)]
        self.ln_f = get_module(model, arch.final_norm)
        self.lm_head = get_module(model, arch.lm_head)
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.rot = cfg.rotary_dim or self.head_dim
        self.scale = math.sqrt(self.head_dim)
        self.shared_kv, self.own_kv = shared_kv or None, list(own_kv)
        self.R = shared_kv[0][0].shape[0] if shared_kv else 1
        self.h_suffix, self.read = h_suffix, read
        self.n_rows, S = positions.shape
        P = mask.shape[1] - S
        # sin/cos per suffix position from the model's own rotary table, repeated per feature
        # pair as GPT-J does
        attn = get_module(model, arch.attn.format(layer + 1 if self.blocks else layer))
        sin, cos = gptj_sin_cos(model, arch.layers.rpartition(".")[0], attn, positions,
                                h_suffix.dtype)
        self.sin = torch.repeat_interleave(sin[:, None], 2, 3)  # (rows, 1, S, rot)
        self.cos = torch.repeat_interleave(cos[:, None], 2, 3)
        # additive mask (rows, 1, S, P + S): padding anywhere, causal within the suffix
        causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        allowed = mask.bool()[:, None, :].expand(self.n_rows, S, P + S).clone()
        allowed[:, :, P:] &= causal
        self.mask = torch.zeros(allowed.shape, dtype=torch.float32, device=mask.device)
        self.mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        self.mask = self.mask[:, None]
        self.P = P
        self.later = self._later_columns() if self.blocks and S > 1 else None
        self._rows = torch.arange(self.n_rows, device=h_suffix.device)  # rows kept

    def _keep(self, rows: torch.Tensor) -> None:
        """Drop the rows that left (``rows``: the active ones, a sorted subset of those kept so
        far) from every constant, one tensor at a time, so memory never holds two copies of
        the prefix."""
        if torch.equal(self._rows, rows):
            return
        pos = torch.searchsorted(self._rows, rows)
        for name in ("h_suffix", "sin", "cos", "mask", "read"):
            setattr(self, name, getattr(self, name)[pos])
        for i, (k, v) in enumerate(self.own_kv):
            self.own_kv[i] = (k[pos], v[pos])
        if self.later is not None:
            self.later = _LaterColumns(*(t[pos] for t in self.later))
        self._rows = rows

    @torch.no_grad()
    def _later_columns(self) -> _LaterColumns:
        """Block L+1 after the subject: what δ cannot change there (see
        :meth:`_first_block_attention` for ``m``, ``z``, ``u``)."""
        block, P = self.blocks[0], self.P
        x = block.ln_1(self.h_suffix[:, 1:])
        q, k, v = self._qkv(block.attn, x, self.sin[:, :, 1:], self.cos[:, :, 1:])
        fixed_mask = torch.cat([self.mask[..., 1:, :P], self.mask[..., 1:, P + 1 :]], -1)
        s = torch.cat(self._scores(0, q, k), dim=-1) / self.scale + fixed_mask
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        return _LaterColumns(q, m, e.sum(-1, keepdim=True),
                             self._mix(0, e.to(v.dtype), v).float(), block.mlp(x))

    def _qkv(self, attn: nn.Module, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
             parts: str = "qkv") -> list[torch.Tensor | None]:
        """Rotary queries, keys and values ``(rows, heads, seq, head_dim)``, contiguous (those
        named in ``parts``; the others come back as ``None``)."""

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(*t.shape[:-1], self.heads, self.head_dim).transpose(1, 2)

        out: list[torch.Tensor | None] = [None, None, None]
        if "q" in parts:
            out[0] = apply_rotary(heads(attn.q_proj(x)), sin, cos, self.rot)
        if "k" in parts:
            out[1] = apply_rotary(heads(attn.k_proj(x)), sin, cos, self.rot)
        if "v" in parts:
            out[2] = heads(attn.v_proj(x)).contiguous()
        return out

    def _scores(self, i: int, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """Unscaled float32 scores of ``q`` against block ``i``'s shared prefix (when there is
        one), each row's own prefix and the suffix keys ``k``, in that order."""
        own_k = self.own_kv[i][0]
        q32 = q.float()
        parts = [q32 @ own_k.float().transpose(-1, -2), q32 @ k.float().transpose(-1, -2)]
        if self.shared_kv is not None:
            parts.insert(0, self._per_template(q32, self.shared_kv[i][0].float().transpose(-1, -2)))
        return parts

    def _mix(self, i: int, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``weights @ values`` over the same three key groups as :meth:`_scores`."""
        own_v = self.own_kv[i][1]
        widths = [own_v.shape[2], v.shape[2]]
        if self.shared_kv is not None:
            widths.insert(0, self.shared_kv[i][1].shape[2])
        w = weights.split(widths, dim=-1)
        out = w[-2] @ own_v + w[-1] @ v
        if self.shared_kv is not None:
            out = out + self._per_template(w[0], self.shared_kv[i][1])
        return out

    def _attend(self, i: int, q, k, v, mask) -> torch.Tensor:
        """GPT-J's ``_attn`` (float32 scores, ``1/√head_dim``, additive mask, softmax; weights
        cast to the values' dtype) with the key axis split as in :meth:`_scores`."""
        weights = torch.softmax(torch.cat(self._scores(i, q, k), dim=-1) / self.scale + mask, -1)
        return self._mix(i, weights.to(v.dtype), v)

    def _first_block_attention(self, q0, k0, v0) -> torch.Tensor:
        """Block L+1's attention output at every suffix column when only the subject's query,
        key and value (column 0) change.  Column 0 attends normally.  A later column's softmax
        over the fixed keys was reduced at construction to its largest score ``m``, its
        normaliser ``z = Σ e^(s−m)`` and its weighted value sum ``u = Σ e^(s−m)·v``; the
        subject's score ``s₀`` joins them as ``(u·e^(m−M) + v₀·e^(s₀−M)) / (z·e^(m−M) +
        e^(s₀−M))`` with ``M = max(m, s₀)``: the same softmax, its sum split in two (equal to
        float rounding)."""
        q_c, m, z, u, _ = self.later
        P, mask = self.P, self.mask
        out0 = self._attend(0, q0, k0, v0, mask[:, :, :1, : P + 1])
        s0 = (q_c.float() * k0.float()).sum(-1, keepdim=True) / self.scale
        s0 = s0 + mask[:, :, 1:, P : P + 1]
        peak = torch.maximum(m, s0)
        a, e0 = torch.exp(m - peak), torch.exp(s0 - peak)
        rest = (u * a + e0 * v0.float()) / (z * a + e0)
        return torch.cat([out0, rest.to(v0.dtype)], dim=2)

    @staticmethod
    def _project(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Heads merged, then the output projection."""
        return attn.out_proj(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1))

    def _per_template(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``x @ m[template of the row]`` for x ``(rows, heads, q, a)`` and m ``(R, heads, a,
        b)``, as one product per template and head over all requests' rows."""
        rows, heads, n_q, a = x.shape
        n = rows // self.R
        grouped = x.view(n, self.R, heads, n_q, a).permute(1, 2, 0, 3, 4)
        out = grouped.reshape(self.R, heads, n * n_q, a) @ m
        out = out.view(self.R, heads, n, n_q, -1).permute(2, 0, 1, 3, 4)
        return out.reshape(rows, heads, n_q, -1)

    def logits(self, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``(len(rows), T, vocab)`` at the ``read`` columns, δ (one per row) added to
        block L's MLP output (= its block output, the MLP being added into the residual) at
        suffix column 0.  ``rows`` are the active rows, in the numbering of construction; rows
        once left cannot come back."""
        self._keep(rows)
        h = self.h_suffix
        h = torch.cat([h[:, :1] + delta[:, None].to(h.dtype), h[:, 1:]], dim=1)
        sin, cos, mask, read = self.sin, self.cos, self.mask, self.read
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if i == 0 and self.later is not None:
                x0 = block.ln_1(h[:, :1])
                q0, k0, v0 = self._qkv(block.attn, x0, sin[:, :, :1], cos[:, :, :1])
                attn = self._project(block.attn, self._first_block_attention(q0, k0, v0))
                h = h + attn + torch.cat([block.mlp(x0), self.later.mlp], dim=1)
                if last:  # only the read columns go on
                    h = _take(h, read, dim=1)
                continue
            x = block.ln_1(h)
            if last:  # keys and values everywhere, the rest only where logits are read
                _, k, v = self._qkv(block.attn, x, sin, cos, "kv")
                x, h = _take(x, read, dim=1), _take(h, read, dim=1)
                q, _, _ = self._qkv(block.attn, x, _take(sin, read, 2), _take(cos, read, 2), "q")
                mask = _take(mask, read, dim=2)
            else:
                q, k, v = self._qkv(block.attn, x, sin, cos)
            h = h + self._project(block.attn, self._attend(i, q, k, v, mask)) + block.mlp(x)
        if not self.blocks:
            h = _take(h, read, dim=1)
        return self.lm_head(self.ln_f(h))


class SuffixGroups:
    """:class:`GPTJSuffix` per group of context templates, each over only the suffix columns its
    reads need: the KL prompt reads the logits at the subject itself, so its later suffix
    tokens never matter.  Same arguments as :class:`GPTJSuffix` (rows ``R`` per request,
    template ``i % R``); :meth:`logits` returns the rows in the order given."""

    def __init__(self, model: nn.Module, arch: Architecture, layer: int, stop: int,
                 shared_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                 own_kv: list[tuple[torch.Tensor, torch.Tensor]], h_suffix: torch.Tensor,
                 positions: torch.Tensor, mask: torch.Tensor, read: torch.Tensor,
                 R: int) -> None:
        n_rows, S = positions.shape
        before = mask.shape[1] - S  # prefix columns
        template = torch.arange(n_rows, device=read.device) % R
        need = read.max(1).values + 1  # suffix columns up to the last read one
        widths = [int(need[template == j].max()) for j in range(R)]
        self.R, self.groups = R, []
        for width in sorted(set(widths)):
            js = torch.tensor([j for j in range(R) if widths[j] == width], device=read.device)
            sel = torch.isin(template, js).nonzero()[:, 0]
            shared = None if shared_kv is None else [(k[js.to(k.device)], v[js.to(v.device)])
                                                      for k, v in shared_kv]
            runner = GPTJSuffix(model, arch, layer, stop, shared,
                                [(k[sel], v[sel]) for k, v in own_kv],
                                h_suffix[sel, :width], positions[sel, :width],
                                mask[sel, : before + width], read[sel])
            self.groups.append((js, runner))

    def logits(self, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        requests = rows.view(-1, self.R)[:, 0] // self.R
        local = torch.arange(len(requests), device=rows.device)[:, None] * self.R
        parts, order = [], []
        for js, runner in self.groups:
            where = (local + js).flatten()  # these templates' rows within ``rows``
            mine = (requests[:, None] * len(js) + torch.arange(len(js), device=rows.device))
            parts.append(runner.logits(delta[where], mine.flatten()))
            order.append(where)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]
