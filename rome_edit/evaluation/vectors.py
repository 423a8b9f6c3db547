"""Applying a vector in delta space to subjects the analysis never saw (the test of Xodarap
2023, "Gender Vectors in ROME's Latent Space", LessWrong).

For a subject with value ``v_orig`` at the edit layer, two modes:

* ``weights`` — the source's method: write ``v_orig + s·g`` into the layer with the rank-one
  update at the subject's key.  The source used the reference code's form (``u = C⁻¹k*/‖C⁻¹k*‖``,
  ``Λ = (v* − v(s))/(k(s)·u) = s·g/(k(s)·u)``), which is the default here (``update_form=
  "rome-reference"``): ``Λ`` is linear in ``g``, so ``+g`` then ``−g`` cancels exactly and a zero
  vector changes nothing.  ``update_form="paper"`` solves ``Λ = (v_orig + s·g − W k*)/(uᵀk*)``
  (Meng et al. 2022, Eq. 2) instead, which also moves ``k*`` (the context-averaged key) onto the
  bare prompt's value.  Because ``(W + Λuᵀ)k = Wk + Λ(uᵀk)``, the edit is evaluated for all
  subjects in one batch by a hook that adds each row's own ``Λ(uᵀk)`` to the output projection's
  output at every position — the same function as editing the weights subject by subject (a
  test checks it against real edits).
* ``activations`` — activation addition (Baker 2023, LessWrong; after Turner et al. 2023,
  arXiv 2308.10248): add ``s·g`` to the MLP output at the
  subject's last token at inference; no weight changes.

The concept is binary: each :class:`BinaryTask` names answers ``(A, B)`` such that a label-1
edit turns A into B and a label-0 edit B into A (the gender study: ``(" Female", " Male")``,
label 1 = female→male).  ``+vector`` should move label-1 subjects to B and ``−vector`` label-0
subjects to A.  Metrics (:class:`FlipTable`) are success rates: ``flip_label1`` (label-1
subjects answering B under ``+g``), ``keep_label0`` (label-0 subjects still answering B under
``+g``), ``flip_label0`` and ``keep_label1`` (the same under ``−g``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from rome_edit.forms.protected_keys import Protection, protected_u
from rome_edit.models.architectures import check_editable, check_layer, get_module, get_weight
from rome_edit.models.hooks import EditFn, edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import encode_batch, single_token_id
from rome_edit.models.subject import locate_subject, split_template
from rome_edit.rome.hparams import UpdateForm
from rome_edit.rome.key import key_stars, keys_and_values
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.weights.write import add_rank_one, preserved, row_edits

Mode = Literal["weights", "activations"]
MODES = ("weights", "activations")


@dataclass(frozen=True)
class BinaryTask:
    """A prompt (one ``{}``) and its answers ``(A, B)``: a label-1 edit turns A into B."""

    prompt: str
    answers: tuple[str, str]

    def __post_init__(self) -> None:
        split_template(self.prompt)
        if len(self.answers) != 2 or self.answers[0] == self.answers[1]:
            raise ValueError(f"task {self.prompt!r} needs two different answers (A, B), got "
                             f"{self.answers!r}.")
        object.__setattr__(self, "answers", tuple(self.answers))


@dataclass(frozen=True)
class FlipTable:
    """Success rates for one vector (already scaled) on held-out subjects."""

    mode: str
    norm: float
    flip_label1: float
    keep_label0: float
    flip_label0: float
    keep_label1: float
    paraphrase_flip_label1: float
    paraphrase_flip_label0: float
    n_label1: int
    n_label0: int

    @property
    def flip_rate(self) -> float:
        """Mean of the two flip rates."""
        return (self.flip_label1 + self.flip_label0) / 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_update_form(update_form: str) -> None:
    if update_form not in ("paper", "rome-reference"):
        raise ValueError(f"unknown update form {update_form!r}; use 'paper' or "
                         "'rome-reference'.")


class SubjectKeys:
    """Each subject's ``k*``, bare key and value at ``layer`` on ``prompt``, and the rank-one
    direction ``u`` — everything a vector needs to become a weight edit.

    Per subject (row ``i`` is ``subjects[i]``), float32 on the CPU: ``k_star``, ``k_bare``,
    ``u``: ``(n, d_mlp)``; ``v_orig``, ``value_of_k`` (the unedited layer's output at ``k*``):
    ``(n, d_model)``.  Vectors given to the methods are ``(d_model,)``.
    """

    def __init__(self, lm: LoadedModel, layer: int, subjects: Sequence[str], prompt: str,
                 context_templates: Sequence[str], inverse: InverseSecondMoment | None,
                 update_form: UpdateForm = "rome-reference",
                 protection: Protection | None = None) -> None:
        _check_update_form(update_form)
        if protection is not None and update_form != "paper":
            raise ValueError("protected keys need the paper update form (k* ↦ v*); pass "
                             "update_form='paper' with protection.")
        check_layer(lm.model, lm.arch, layer)
        check_editable(lm.model, lm.arch, layer)
        if not subjects:
            raise ValueError("no subjects to apply the vector to; give at least one.")
        self.lm, self.layer, self.update_form = lm, layer, update_form
        self.subjects = list(subjects)
        n = len(self.subjects)
        self.k_star = key_stars(lm, layer, [prompt] * n, self.subjects, context_templates)
        self.k_bare, self.v_orig = keys_and_values(lm, layer, [prompt] * n, self.subjects)
        self.u = inverse.solve(self.k_star).float() if inverse is not None else self.k_star
        if update_form == "rome-reference":
            self.u = self.u / self.u.norm(dim=-1, keepdim=True)
        if protection is not None:  # each subject's u spares the other protected subjects
            self.u = protected_u(lm, protection, self.subjects, self.k_star,
                                 inverse)
        module = get_module(lm.model, lm.arch.out_proj.format(layer))
        with torch.no_grad():
            w = get_weight(lm.model, lm.arch.out_proj.format(layer))
            self.value_of_k = module(self.k_star.to(w.device, w.dtype)).float().cpu()

    @property
    def width(self) -> int:
        return self.v_orig.shape[1]

    def check_vector(self, vector: torch.Tensor) -> torch.Tensor:
        vector = vector.detach().float().cpu()
        if vector.shape != (self.width,):
            raise ValueError(f"vector has shape {tuple(vector.shape)} but the layer's values "
                             f"are {self.width} wide; use a vector of this model and layer.")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("the vector contains NaN or inf; recompute it.")
        return vector

    def update_for(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each subject's ``(u, Λ)`` writing ``v_orig + vector`` at its key.

        ``vector``: ``(d_model,)``.  Returns ``u``: ``(n, d_mlp)`` and ``Λ``: ``(n, d_model)``,
        float32."""
        vector = self.check_vector(vector)
        if self.update_form == "rome-reference":
            return self.u, vector[None, :] / (self.u * self.k_bare).sum(-1, keepdim=True)
        denom = (self.u * self.k_star).sum(-1, keepdim=True)
        return self.u, (self.v_orig + vector - self.value_of_k) / denom

    def write(self, vector: torch.Tensor, signs: Sequence[float] | None = None) -> None:
        """Persistently write ``v_orig + sign·vector`` for every subject (one rank-one update
        each, in subject order; a sign of 0 leaves that subject alone); pair with
        :func:`~rome_edit.weights.write.preserved` to undo.  ``vector``: ``(d_model,)``;
        ``signs``: one per subject (default all 1)."""
        signs = [1.0] * len(self.subjects) if signs is None else list(signs)
        if len(signs) != len(self.subjects):
            raise ValueError(f"{len(signs)} signs for {len(self.subjects)} subjects.")
        updates = {i: self.update_for(s * vector) for i, s in enumerate(signs) if s != 0}
        for i, (u, lam) in updates.items():  # all validated before anything is written
            add_rank_one(self.lm, self.layer, u[i], lam[i])

    @contextlib.contextmanager
    def written(self, vector: torch.Tensor, signs: Sequence[float] | None = None
                ) -> Iterator[LoadedModel]:
        """:meth:`write` for the duration of the block, then restore the exact original bits."""
        self.check_vector(vector)
        with preserved(self.lm, [self.layer]):
            self.write(vector, signs)
            yield self.lm


class VectorApplier(SubjectKeys):
    """Precomputes each held-out subject's key, value and prompts once; applies many vectors.

    ``labels`` (0/1 per subject) say which answer each subject gives before: label-1 subjects
    answer A, label-0 subjects B, on every task.  The first task's prompt is where the vector
    is written (the edit prompt).  ``label1``: ``(n,)`` bool, the labels as given; the keys and
    values are :class:`SubjectKeys`'s.
    """

    def __init__(self, lm: LoadedModel, layer: int, subjects: Sequence[str],
                 labels: Sequence[int], tasks: Sequence[BinaryTask],
                 context_templates: Sequence[str], inverse: InverseSecondMoment | None,
                 update_form: UpdateForm = "rome-reference",
                 protection: Protection | None = None) -> None:
        if not tasks:
            raise ValueError("no tasks; give at least the edit prompt and its two answers.")
        if len(labels) != len(subjects) or any(y not in (0, 1) for y in labels):
            raise ValueError(f"give one 0/1 label per subject ({len(subjects)} subjects, "
                             f"{len(labels)} labels).")
        super().__init__(lm, layer, subjects, tasks[0].prompt, context_templates, inverse,
                         update_form, protection)
        self.tasks = tuple(tasks)
        # One row per (subject, task); rows of subject i are i*T .. i*T+T-1.
        self.prompts, self.lookups, self.answer_ids = [], [], []
        for subject in self.subjects:
            for task in self.tasks:
                span = locate_subject(lm.tokenizer, task.prompt, subject)
                self.prompts.append(span.prompt)
                self.lookups.append(span.last)
                self.answer_ids.append([single_token_id(lm.tokenizer, a) for a in task.answers])
        self.label1 = torch.tensor([bool(y) for y in labels])

    def predict_b(self, vector: torch.Tensor | None, mode: Mode = "weights") -> torch.Tensor:
        """Is answer B preferred after adding ``vector``?

        ``vector``: ``(d_model,)``, or ``None`` for the unedited model.  Returns
        ``(n, n_tasks)`` bool (row ``i``: subject ``i``; column ``t``: task ``t``)."""
        scores = self.answer_logits(vector, mode)
        return scores[..., 1] > scores[..., 0]

    def answer_logits(self, vector: torch.Tensor | None, mode: Mode = "weights") -> torch.Tensor:
        """Logits of the answers (A, B) after the vector.

        ``vector``: ``(d_model,)``, or ``None``.  Returns ``(n, n_tasks, 2)`` float32 on the
        CPU (last axis: A, B)."""
        lm, n_tasks = self.lm, len(self.tasks)
        ids, mask, last = encode_batch(lm.tokenizer, self.prompts, lm.device)
        hooks: dict[str, EditFn] = {}
        rows_ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use 'weights' or 'activations'.")
        if vector is not None:
            vec = self.check_vector(vector)
            if mode == "weights":
                u, lam = self.update_for(vec)
                rows_ctx = row_edits(lm, self.layer, u.repeat_interleave(n_tasks, 0),
                                     lam.repeat_interleave(n_tasks, 0))
            else:
                rows = torch.arange(len(self.prompts), device=lm.device)
                cols = torch.tensor(self.lookups, device=lm.device)
                vec = vec.to(lm.device)

                def add(hidden: torch.Tensor, _name: str) -> torch.Tensor:
                    hidden = hidden.clone()
                    hidden[rows, cols] += vec.to(hidden.dtype)
                    return hidden

                hooks = {lm.arch.mlp.format(self.layer): add}
        with torch.no_grad(), edit_output(lm.model, hooks), rows_ctx:
            logits: torch.Tensor = lm.model(input_ids=ids, attention_mask=mask).logits
        final = logits[torch.arange(len(last)), last].float().cpu()
        answers = torch.tensor(self.answer_ids)
        return final.gather(1, answers).view(len(self.subjects), n_tasks, 2)

    def flip_table(self, vector: torch.Tensor, mode: Mode = "weights") -> FlipTable:
        """Apply ``+vector`` and ``−vector``; the four success rates on held-out subjects.

        ``vector``: ``(d_model,)``, already scaled (its norm is recorded)."""
        plus, minus = self.predict_b(vector, mode), self.predict_b(-vector, mode)
        one, zero = self.label1, ~self.label1

        def rate(x: torch.Tensor) -> float:
            return x.float().mean().item() if x.numel() else float("nan")

        return FlipTable(
            mode=mode, norm=float(vector.norm()),
            flip_label1=rate(plus[one, 0]), keep_label0=rate(plus[zero, 0]),
            flip_label0=rate(~minus[zero, 0]), keep_label1=rate(~minus[one, 0]),
            paraphrase_flip_label1=rate(plus[one, 1:]),
            paraphrase_flip_label0=rate(~minus[zero, 1:]),
            n_label1=int(one.sum()), n_label0=int(zero.sum()),
        )

    def baseline_accuracy(self) -> float:
        """Success rate of the unedited model on the first task (label-1 → A, label-0 → B)."""
        pred_b = self.predict_b(None)[:, 0]
        return (pred_b == ~self.label1).float().mean().item()


def random_directions(width: int, norm: float, seeds: Sequence[int]) -> list[torch.Tensor]:
    """Random Gaussian directions rescaled to ``norm`` (the control)."""
    out = []
    for seed in seeds:
        v = torch.randn(width, generator=torch.Generator().manual_seed(seed))
        out.append(v / v.norm() * norm)
    return out
