"""The logit lens (nostalgebraist 2020; Helm-Burger 2022): what each layer would predict if it
were last.

The residual stream after block ``l`` is decoded through the model's *own* final norm and
unembedding modules — ``lm_head(final_norm(h_l))`` — at every position.  For the last block this
is exactly the model's output (the same modules on the same tensor; a test checks the logits are
bit-identical).  Helm-Burger's orientation: layers top to bottom, tokens left to right.

:func:`compare_lens` runs the lens before and after a modification (an edit record applied with
:func:`rome_edit.weights.write.applied`, a vector written in at a subject, …) given as a context
manager, and reports where a target first becomes the top-1 prediction — "at which layer does
the flipped gender first appear".
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from rome_edit.errors import ParameterError
from rome_edit.models.architectures import get_module
from rome_edit.models.hooks import capture
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import single_token_id

__all__ = ["LensComparison", "LensResult", "compare_lens", "lens_logits", "logit_lens"]


@torch.no_grad()
def lens_logits(lm: LoadedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lens, model_logits)``: lens logits ``(n_layers, T, vocab)`` of one prompt
    ``input_ids (1, T)`` — block ``l``'s output through the final norm and the unembedding —
    and the model's own logits ``(T, vocab)`` from the same forward pass."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the lens reads one prompt: input_ids must be (1, T), got "
                         f"{tuple(input_ids.shape)}.")
    blocks = [lm.arch.block.format(layer) for layer in range(lm.n_layers)]
    with capture(lm.model, blocks) as rec:
        logits = lm.model(input_ids=input_ids.to(lm.device)).logits
    norm = get_module(lm.model, lm.arch.final_norm)
    head = get_module(lm.model, lm.arch.lm_head)
    # One call per layer with the model's own shapes (1, T, d): batching the layers would let
    # the matmul kernels round differently, and the last layer must reproduce the model's
    # logits bit for bit.
    lens = torch.cat([head(norm(rec.outputs[name])).to(logits.dtype) for name in blocks])
    return lens, logits[0]


@dataclass(frozen=True)
class LensResult:
    """The lens of one prompt.  ``[layer][position]`` indexing throughout."""

    prompt: str
    tokens: tuple[str, ...]
    layers: tuple[int, ...]
    top_token: tuple[tuple[str, ...], ...]
    top_prob: torch.Tensor  # (n_layers, T)
    target_prob: dict[str, torch.Tensor]  # target text -> (n_layers, T)
    target_rank: dict[str, torch.Tensor]  # target text -> (n_layers, T), 0 = top-1

    def first_top1(self, target: str, position: int = -1) -> int | None:
        """The lowest layer from which ``target`` stays the top-1 prediction at ``position``
        up to the output (None: not top-1 at the output)."""
        ranks = self.target_rank[target][:, position]
        if ranks[-1] != 0:
            return None
        layer = len(ranks) - 1
        while layer > 0 and ranks[layer - 1] == 0:
            layer -= 1
        return self.layers[layer]

    def first_ever_top1(self, target: str, position: int = -1) -> int | None:
        """The lowest layer at which ``target`` is top-1 at ``position`` at all."""
        hits = (self.target_rank[target][:, position] == 0).nonzero()
        return self.layers[int(hits[0])] if len(hits) else None

    def to_json(self) -> dict:
        out: dict = {
            "prompt": self.prompt, "tokens": list(self.tokens), "layers": list(self.layers),
            "top_token": [list(row) for row in self.top_token],
            "top_prob": self.top_prob.tolist(),
        }
        if self.target_prob:
            out["targets"] = {
                t: {"prob": p.tolist(), "rank": self.target_rank[t].tolist(),
                    "first_top1_last_position": self.first_top1(t),
                    "first_ever_top1_last_position": self.first_ever_top1(t)}
                for t, p in self.target_prob.items()}
        return out


def logit_lens(lm: LoadedModel, prompt: str, targets: Sequence[str] = ()) -> LensResult:
    """The lens of ``prompt`` (plain text, no ``{}``), with each single-token target's
    probability and rank in every cell."""
    if not prompt:
        raise ValueError("the prompt is empty; pass the text to read, e.g. 'Name: Brittany. "
                         "Gender:'.")
    target_ids = {t: single_token_id(lm.tokenizer, t) for t in dict.fromkeys(targets)}
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens.")
    lens, _ = lens_logits(lm, torch.tensor([ids], device=lm.device))
    probs = torch.softmax(lens.float(), dim=-1).cpu()
    top_prob, top_id = probs.max(dim=-1)
    decode = lm.tokenizer.decode
    top_token = tuple(tuple(decode([int(i)]) for i in row) for row in top_id)
    target_prob, target_rank = {}, {}
    for text, tid in target_ids.items():
        p = probs[..., tid]
        target_prob[text] = p
        target_rank[text] = (probs > p[..., None]).sum(-1)
    return LensResult(prompt, tuple(decode([i]) for i in ids), tuple(range(lm.n_layers)),
                      top_token, top_prob, target_prob, target_rank)


@dataclass(frozen=True)
class LensComparison:
    """The lens before and after a modification, and where each target first wins."""

    before: LensResult
    after: LensResult
    description: str

    def difference(self, target: str) -> torch.Tensor:
        """``p_after − p_before`` of ``target`` per cell ``(n_layers, T)``."""
        return self.after.target_prob[target] - self.before.target_prob[target]

    def first_beats(self, target: str, other: str, position: int = -1) -> int | None:
        """After the modification: the lowest layer from which ``target`` is more probable
        than ``other`` at ``position`` up to the output (None: not at the output)."""
        wins = self.after.target_prob[target][:, position] > \
            self.after.target_prob[other][:, position]
        if not wins[-1]:
            return None
        layer = len(wins) - 1
        while layer > 0 and wins[layer - 1]:
            layer -= 1
        return self.after.layers[layer]

    def first_flip(self, target: str, other: str, position: int = -1) -> int | None:
        """The lowest layer at which the modification turns ``other > target`` (before) into
        ``target > other`` (after) at ``position``: where the new answer first wins where the
        old one used to (None: no layer flips)."""
        before = self.before.target_prob[other][:, position] > \
            self.before.target_prob[target][:, position]
        after = self.after.target_prob[target][:, position] > \
            self.after.target_prob[other][:, position]
        hits = (before & after).nonzero()
        return self.after.layers[int(hits[0])] if len(hits) else None

    def to_json(self) -> dict:
        """The unmodified model's lens at the top level (``tokens``, ``layers``,
        ``top_token``, ``targets``), the modified one under ``after``, and the differences."""
        targets = list(self.before.target_prob)
        out = {**self.before.to_json(), "modification": self.description,
               "after": self.after.to_json(),
               "difference": {t: self.difference(t).tolist() for t in targets}}
        if len(targets) >= 2:
            pairs = [(a, b) for a in targets for b in targets if a != b]
            out["first_beats_last_position"] = {f"{a} > {b}": self.first_beats(a, b)
                                                for a, b in pairs}
            out["first_flip_last_position"] = {f"{a} > {b}": self.first_flip(a, b)
                                               for a, b in pairs}
        return out


def compare_lens(lm: LoadedModel, prompt: str, modification: AbstractContextManager,
                 targets: Sequence[str], description: str = "") -> LensComparison:
    """The lens of ``prompt`` outside and inside ``modification`` (entered once, and left
    before returning, so the model is as it was)."""
    if not targets:
        raise ParameterError("a before/after lens needs at least one answer to follow; pass "
                             "targets=, e.g. [' Female', ' Male'].", parameters=("targets",))
    before = logit_lens(lm, prompt, targets)
    with modification:
        after = logit_lens(lm, prompt, targets)
    return LensComparison(before, after, description)
