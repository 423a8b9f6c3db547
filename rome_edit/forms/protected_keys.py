"""Which keys an edit protects, and writing protected updates into records.

``--protect`` takes one of

* ``other-names`` — every other subject of the run's name list;
* ``same-last-token`` — the other subjects whose last token (in the edit prompt) is the edited
  subject's: the names faithful ROME spills over to (``vectors/spillover.json``);
* ``FILE`` — the subjects listed in a file (a CSV with a ``name`` column, or one per line).

A protected subject's key is computed exactly as an edit's ``k*`` (Meng et al. 2022, Eq. 3): the
input of the edit layer's output projection at the subject's last token, averaged over the
same context templates, on the same prompt.  The edited subject itself (and, for many edits in
one model, every subject being edited) is never in its own protected set.

``positions="all"`` (``--protect-positions all``) also protects the key at *every* token of
each protected subject's prompt (``Name: Anna. Gender:`` — the name's earlier tokens and the
tokens after it), not only its last token: an update moves every key it meets, and when many
edits pile up in one model their pushes at those positions add up (docs/beyond-rome.md,
"Many edits in one model").  Each prompt's ``T`` token keys are scaled by ``1/√T``, so in the
soft form a prompt's tokens together weigh as much as the subject's own key:
``Σ_t ‖ΔW k_t/√T‖² = (1/T) Σ_t ‖ΔW k_t‖²``.  The shared tokens make hard constraints
degenerate, so ``auto`` picks ``soft`` for such a bank.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rome_edit.errors import MissingFileError, ParameterError
from rome_edit.forms.protect import ProtectedDirections, ProtectSettings
from rome_edit.models.layers import layer_output
from rome_edit.models.loading import LoadedModel
from rome_edit.models.subject import last_tokens
from rome_edit.rome.context import (
    check_subject_forms,
    form_applies,
    form_prompt,
    form_templates,
)
from rome_edit.rome.key import key_stars, prompt_keys
from rome_edit.rome.record import EditRecord
from rome_edit.rome.solver import Solver
from rome_edit.rome.update import combine_forms

log = logging.getLogger(__name__)
SOURCES = ("other-names", "same-last-token")
POSITIONS = ("last", "all")
NAMES_IN_RECORD = 64  # protected sets up to this size are listed by name in each record

__all__ = ["POSITIONS", "ProtectedKeyBank", "Protection", "SOURCES", "build_bank",
           "protect_records", "protected_u", "read_names_file"]


def read_names_file(path: str | Path) -> list[str]:
    """Subjects from a CSV with a ``name`` column, or a text file with one per line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"protected names file {path}: no such file; give the source "
                               "'other-names', 'same-last-token' or a file of names (CSV with a "
                               "'name' column, or one per line).", parameters=("protect",))
    text = path.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    if "," in first and "name" in [c.strip() for c in first.split(",")]:
        names = [row["name"].strip() for row in csv.DictReader(text.splitlines())]
    else:
        names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ParameterError(f"protected names file {path} lists no names; give a file with "
                             "names, or the source 'other-names'.", parameters=("protect",))
    return list(dict.fromkeys(names))


@dataclass(frozen=True, eq=False)
class ProtectedKeyBank:
    """Candidate protected subjects with their keys at the edit layer: one row per key, each
    row owned by a subject (``names[i]``, ``last_tokens[i]``: the owner of row ``i``; a
    subject owns one row with ``positions="last"``, one more per prompt token with ``"all"``)."""

    source: str  # "other-names", "same-last-token" or "file:PATH"
    prompt: str
    layer: int
    names: tuple[str, ...]
    keys: torch.Tensor  # (rows, d_mlp) float32
    last_tokens: tuple[int, ...]
    positions: str = "last"
    forms: tuple[str, ...] = ()  # other spellings of each subject protected too (subject_forms)

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown protected positions {self.positions!r}; use one of "
                             f"{list(POSITIONS)}.")
        if not (len(self.names) == len(self.last_tokens) == self.keys.shape[0]):
            raise ValueError("a key bank needs one owner name and last token per key row.")

    @property
    def subjects(self) -> tuple[str, ...]:
        """The protected subjects, each once."""
        return tuple(dict.fromkeys(self.names))

    def effective(self, settings: ProtectSettings) -> ProtectSettings:
        """``settings`` with ``auto`` made concrete where the bank decides it: every-token banks
        are protected softly (their shared tokens make hard constraints degenerate)."""
        if settings.form == "auto" and self.positions == "all":
            return replace(settings, form="soft")
        return settings

    def select(self, subject: str, last_token: int, exclude: Iterable[str] = ()) -> torch.Tensor:
        """Indices of the bank rows that ``subject``'s edit protects."""
        skip = {subject, *exclude}
        same = self.source == "same-last-token"
        return torch.tensor([i for i, (n, t) in enumerate(zip(self.names, self.last_tokens))
                             if n not in skip and (not same or t == last_token)],
                            dtype=torch.long)

    def describe(self, rows: torch.Tensor, settings: ProtectSettings) -> dict:
        """What goes into a record: the source, the form used, its parameters, the names."""
        names = list(dict.fromkeys(self.names[i] for i in rows.tolist()))
        form = self.effective(settings).resolve(len(rows), self.keys.shape[1])
        out = {"source": self.source, "form": form, "requested_form": settings.form,
               "weight": settings.weight, "threshold": settings.threshold, "n_keys": len(names),
               "names": names if len(names) <= NAMES_IN_RECORD else None,
               "names_sha256": hashlib.sha256(json.dumps(names).encode()).hexdigest()}
        if self.positions != "last":  # records of last-token banks keep their old shape
            out.update(positions=self.positions, n_key_rows=len(rows))
        if self.forms:
            out["forms"] = list(self.forms)
        return out


@dataclass(frozen=True, eq=False)
class Protection:
    """A bank of protected keys and the form that protects them (what ``--protect`` builds)."""

    bank: ProtectedKeyBank
    settings: ProtectSettings = ProtectSettings()

    def manifest(self) -> dict:
        """What a sweep manifest stores (a resume with other protection is refused)."""
        subjects = list(self.bank.subjects)
        out = {"source": self.bank.source, "n_candidates": len(subjects),
               "names_sha256": hashlib.sha256(json.dumps(subjects).encode()).hexdigest(),
               **self.settings.to_dict()}
        if self.bank.positions != "last":  # manifests of earlier sweeps stay resumable
            out["positions"] = self.bank.positions
        if self.bank.forms:
            out["forms"] = list(self.bank.forms)
        return out

    @property
    def effective(self) -> ProtectSettings:
        """The settings with ``auto`` resolved where the bank decides it."""
        return self.bank.effective(self.settings)


def build_bank(lm: LoadedModel, layer: int, prompt: str, names: Sequence[str],
               context_templates: Sequence[str], source: str, positions: str = "last",
               forms: Sequence[str] = ()) -> ProtectedKeyBank:
    """Keys of ``names`` for ``--protect source`` (a source of :data:`SOURCES`, or a file whose
    names replace ``names``); ``positions="all"`` adds every prompt token's key, scaled by
    ``1/√T`` (see the module docstring).  ``forms`` (an edit's ``subject_forms``) adds the same
    keys on the prompt in each form (:mod:`rome_edit.rome.context`), since such an edit writes
    there too; a form's rows carry that form's last token."""
    if positions not in POSITIONS:
        raise ValueError(f"unknown protected positions {positions!r}; use one of "
                         f"{list(POSITIONS)}.")
    if source not in SOURCES:
        names = read_names_file(source)
        source = f"file:{source}"
    names = list(dict.fromkeys(names))
    if not names:
        raise ParameterError("there are no names to protect; pass a names list, or a file of "
                             "names as the source.", parameters=("protect",))
    forms = tuple(f for f in check_subject_forms(forms)
                  if form_applies(prompt, f, context_templates))
    owners: list[str] = []
    owner_lasts: list[int] = []
    rows: list[torch.Tensor] = []
    for form in (None, *forms):
        text = prompt if form is None else form_prompt(prompt, form)
        templates = context_templates if form is None else form_templates(context_templates, form)
        lasts = subject_last_tokens(lm, text, names)
        rows.append(key_stars(lm, layer, [text] * len(names), names, templates))
        owners += names
        owner_lasts += lasts
        if positions == "all":
            for name, last, tokens in zip(names, lasts, prompt_keys(lm, layer, text, names)):
                rows.append(tokens / len(tokens) ** 0.5)
                owners += [name] * len(tokens)
                owner_lasts += [last] * len(tokens)
    return ProtectedKeyBank(source, prompt, layer, tuple(owners), torch.cat(rows),
                            tuple(owner_lasts), positions, forms)


def subject_last_tokens(lm: LoadedModel, prompt: str, subjects: Sequence[str]) -> list[int]:
    """Each subject's last token id in ``prompt``, in order (repeats allowed)."""
    last = last_tokens(lm.tokenizer, prompt, subjects)
    return [last[s] for s in subjects]


def protected_u(lm: LoadedModel, protection: Protection, subjects: Sequence[str],
                k_star: torch.Tensor, solver: Solver | None = None,
                exclude: Iterable[str] = ()) -> torch.Tensor:
    """Each subject's protected ``u`` (rows, ``uᵀk* = 1``), its own key never protected."""
    bank = protection.bank
    dirs = ProtectedDirections(bank.keys, protection.effective, solver)
    toks = subject_last_tokens(lm, bank.prompt, subjects)
    exclude = set(exclude)
    return torch.stack([dirs.direction(k, bank.select(s, t, exclude))
                        for s, t, k in zip(subjects, toks, k_star)])


def protect_records(lm: LoadedModel, records: Sequence[EditRecord], protection: Protection,
                    solver: Solver | None = None, exclude: Iterable[str] = ()
                    ) -> list[EditRecord]:
    """The same edits (same ``k*``, ``v*`` and delta) with protected updates ``Λ uᵀ``.

    Each record's ``u`` is recomputed by :class:`~rome_edit.forms.protect.ProtectedDirections`
    and ``Λ = v* − (W k* + b)`` (``uᵀk* = 1``) against the *current* weights — the weights the
    records were computed on.  ``exclude`` names subjects never protected (e.g. all subjects
    edited together).  Only the paper form maps ``k*`` to ``v*``, so it is required.
    """
    if not records:
        return []
    bank, settings = protection.bank, protection.effective
    for r in records:
        if r.update_form != "paper":
            raise ParameterError(f"protected updates build on the paper form (k* ↦ v*); the "
                                 f"record for {r.request.subject!r} uses {r.update_form!r}. "
                                 "Compute the records with update_form='paper' to protect keys.",
                                 parameters=("update_form",))
        if r.layer != bank.layer:
            raise ValueError(f"protected keys are for layer {bank.layer} but the record for "
                             f"{r.request.subject!r} edits layer {r.layer}.")
        if r.request.prompt != bank.prompt:
            raise ValueError(f"protected keys were computed on prompt {bank.prompt!r}, the edit "
                             f"of {r.request.subject!r} uses {r.request.prompt!r}.")
    t0 = time.perf_counter()
    dirs = ProtectedDirections(bank.keys, settings, solver)
    exclude = set(exclude)
    subjects = [r.request.subject for r in records]
    toks = subject_last_tokens(lm, bank.prompt, subjects)
    k_star = torch.stack([r.k_star.float() for r in records])
    residual = torch.stack([r.v_star.float() for r in records]) - \
        layer_output(lm, bank.layer, k_star)
    out = []
    for i, (r, tok) in enumerate(zip(records, toks)):
        rows = bank.select(r.request.subject, tok, exclude)
        u = dirs.direction(r.k_star, rows)
        described = replace(r, protection=bank.describe(rows, protection.settings))
        if r.forms:  # every form's key under the same protection, one update exact at all
            out.append(combine_forms(lm, described, r.forms, torch.stack(
                [u, *(dirs.direction(f.k_star, rows) for f in r.forms)])))
        else:
            out.append(replace(described, u=u, lam=residual[i].clone()))
    seconds = (time.perf_counter() - t0) / len(records)
    return [replace(r, timings={**r.timings, "protect_s": seconds,
                                "total_s": r.timings.get("total_s", 0.0) + seconds})
            for r in out]
