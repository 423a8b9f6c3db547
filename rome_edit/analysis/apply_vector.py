"""Applying a vector in delta space to names the analysis never saw (seed 001's test).

For a held-out name with value ``v_orig`` at the edit layer, two modes:

* ``weights`` — the source's method: write ``v_orig + s·g`` into the layer with the rank-one
  update at the name's key.  The source used the reference code's form (``u = C⁻¹k*/‖C⁻¹k*‖``,
  ``Λ = (v* − v(s))/(k(s)·u) = s·g/(k(s)·u)``), which is the default here (``update_form=
  "rome-reference"``): ``Λ`` is linear in ``g``, so ``+g`` then ``−g`` cancels exactly and a zero
  vector changes nothing.  ``update_form="paper"`` solves ``Λ = (v_orig + s·g − W k*)/(uᵀk*)``
  instead, which also moves ``k*`` (the context-averaged key) onto the bare prompt's value.
  Because ``(W + Λuᵀ)k = Wk + Λ(uᵀk)``, the edit is evaluated for all names in one batch by a
  hook that adds each row's own ``Λ(uᵀk)`` to the output projection's output at every position —
  the same function as editing the weights name by name (a test checks it against real edits).
* ``activations`` — activation addition (seed 003): add ``s·g`` to the MLP output at the
  subject's last token at inference; no weight changes.

Metrics are success rates on the gender prompt and its paraphrases: ``flip_f_to_m`` (female
names predicted male under ``+g``), ``keep_m`` (male names still male under ``+g``),
``flip_m_to_f`` and ``keep_f`` (the same under ``−g``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from rome_edit.data.gender_task import ANSWERS, EDIT_PROMPT, PARAPHRASES
from rome_edit.data.names import NameEntry
from rome_edit.editing.apply import row_edits
from rome_edit.editing.hparams import UpdateForm
from rome_edit.editing.key import key_stars, keys_and_values
from rome_edit.editing.rome import SecondMomentInverse
from rome_edit.models.architectures import get_module
from rome_edit.models.hooks import edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import encode_batch, single_token_id
from rome_edit.models.subject import locate_subject

Mode = Literal["weights", "activations"]
TASKS = ((EDIT_PROMPT, ANSWERS), *PARAPHRASES)


@dataclass(frozen=True)
class FlipTable:
    """Success rates for one vector (already scaled) on held-out names."""

    mode: str
    norm: float
    flip_f_to_m: float
    keep_m: float
    flip_m_to_f: float
    keep_f: float
    paraphrase_flip_f_to_m: float
    paraphrase_flip_m_to_f: float
    n_female: int
    n_male: int

    def to_dict(self) -> dict:
        return asdict(self)


class VectorApplier:
    """Precomputes each held-out name's key, value and prompts once; applies many vectors."""

    def __init__(self, lm: LoadedModel, layer: int, names: Sequence[NameEntry],
                 context_templates: Sequence[str], inverse: SecondMomentInverse | None,
                 update_form: UpdateForm = "rome-reference") -> None:
        if update_form not in ("paper", "rome-reference"):
            raise ValueError(f"unknown update form {update_form!r}; use 'paper' or "
                             "'rome-reference'.")
        self.lm, self.layer, self.names, self.update_form = lm, layer, list(names), update_form
        subjects = [e.name for e in self.names]
        self.k_star = key_stars(lm, layer, [EDIT_PROMPT] * len(subjects), subjects,
                                context_templates)
        self.k_bare, self.v_orig = keys_and_values(lm, layer, [EDIT_PROMPT] * len(subjects),
                                                   subjects)
        self.u = inverse.solver.solve(self.k_star).float() if inverse is not None else self.k_star
        if update_form == "rome-reference":
            self.u = self.u / self.u.norm(dim=-1, keepdim=True)
        module = get_module(lm.model, lm.arch.out_proj.format(layer))
        with torch.no_grad():
            w = module.weight
            self.value_of_k = module(self.k_star.to(w.device, w.dtype)).float().cpu()
        # One row per (name, task); rows of name i are i*T .. i*T+T-1.
        self.prompts, self.lookups, self.answer_ids = [], [], []
        for e in self.names:
            for template, answers in TASKS:
                span = locate_subject(lm.tokenizer, template, e.name)
                self.prompts.append(span.prompt)
                self.lookups.append(span.last)
                self.answer_ids.append([single_token_id(lm.tokenizer, answers[g])
                                        for g in ("female", "male")])
        self.female = torch.tensor([e.gender == "female" for e in self.names])

    def predict_male(self, vector: torch.Tensor | None, mode: Mode = "weights") -> torch.Tensor:
        """Boolean ``(n_names, n_tasks)``: is the male answer preferred after adding ``vector``?"""
        scores = self.answer_logits(vector, mode)
        return scores[..., 1] > scores[..., 0]

    def update_for(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each name's ``(u, Λ)`` writing ``v_orig + vector`` at its key."""
        vector = vector.float().cpu()
        if self.update_form == "rome-reference":
            return self.u, vector[None, :] / (self.u * self.k_bare).sum(-1, keepdim=True)
        denom = (self.u * self.k_star).sum(-1, keepdim=True)
        return self.u, (self.v_orig + vector - self.value_of_k) / denom

    def answer_logits(self, vector: torch.Tensor | None, mode: Mode = "weights") -> torch.Tensor:
        """Logits of the (female, male) answers, ``(n_names, n_tasks, 2)``, after the vector."""
        lm, n_tasks = self.lm, len(TASKS)
        ids, mask, last = encode_batch(lm.tokenizer, self.prompts, lm.device)
        hooks: dict = {}
        rows_ctx = contextlib.nullcontext()
        if vector is not None:
            vec = vector.float().to(lm.device)
            if vec.shape != self.v_orig.shape[1:]:
                raise ValueError(f"vector has shape {tuple(vec.shape)} but the layer's values "
                                 f"are {self.v_orig.shape[1]} wide; use a vector of this model.")
            if mode == "weights":
                u, lam = self.update_for(vec)
                rows_ctx = row_edits(lm, self.layer, u.repeat_interleave(n_tasks, 0),
                                     lam.repeat_interleave(n_tasks, 0))
            elif mode == "activations":
                rows = torch.arange(len(self.prompts), device=lm.device)
                cols = torch.tensor(self.lookups, device=lm.device)

                def add(hidden: torch.Tensor, _name: str) -> torch.Tensor:
                    hidden = hidden.clone()
                    hidden[rows, cols] += vec.to(hidden.dtype)
                    return hidden

                hooks = {lm.arch.mlp.format(self.layer): add}
            else:
                raise ValueError(f"unknown mode {mode!r}; use 'weights' or 'activations'.")
        with torch.no_grad(), edit_output(lm.model, hooks), rows_ctx:
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
        final = logits[torch.arange(len(last)), last].float().cpu()
        answers = torch.tensor(self.answer_ids)
        return final.gather(1, answers).view(len(self.names), n_tasks, 2)

    def flip_table(self, vector: torch.Tensor, mode: Mode = "weights") -> FlipTable:
        """Apply ``+vector`` and ``−vector``; the four success rates on held-out names."""
        plus, minus = self.predict_male(vector, mode), self.predict_male(-vector, mode)
        f, m = self.female, ~self.female

        def rate(x: torch.Tensor) -> float:
            return x.float().mean().item() if x.numel() else float("nan")

        return FlipTable(
            mode=mode, norm=float(vector.norm()),
            flip_f_to_m=rate(plus[f, 0]), keep_m=rate(plus[m, 0]),
            flip_m_to_f=rate(~minus[m, 0]), keep_f=rate(~minus[f, 0]),
            paraphrase_flip_f_to_m=rate(plus[f, 1:]), paraphrase_flip_m_to_f=rate(~minus[m, 1:]),
            n_female=int(f.sum()), n_male=int(m.sum()),
        )

    def baseline_accuracy(self) -> float:
        pred = self.predict_male(None)[:, 0]
        return (pred == ~self.female).float().mean().item()


def random_directions(width: int, norm: float, seeds: Sequence[int]) -> list[torch.Tensor]:
    """Random Gaussian directions rescaled to ``norm`` (the control)."""
    out = []
    for seed in seeds:
        v = torch.randn(width, generator=torch.Generator().manual_seed(seed))
        out.append(v / v.norm() * norm)
    return out
