"""One saved model holding the gender vector for many names (``rome-edit apply --persist``).

The study's test of a vector (Xodarap 2023) writes ``v_orig + s·g`` for one held-out name at a time,
in memory.  Here every name gets its edit in one model (:func:`rome_edit.forms.many.
write_edits`), the model is saved as a standard checkpoint, and the flips are measured on the
checkpoint *loaded fresh*: ``flip_f_to_m`` / ``keep_m`` under ``+g`` (``flip_m_to_f`` /
``keep_f`` under ``−g``), and ``others_kept`` — the names not edited whose predicted gender did
not change (split, as in a sweep, into names sharing some edited name's last token and the
rest).

Which form writes it: :func:`choose_persist_form` gives the documented default — the fitted form
protecting every other name (docs/beyond-rome.md: 99.8% of other names kept, against 72.4% for
ROME's sequential rank-one updates) — with the reason, and the fallback where it cannot run;
``rome-edit apply --persist`` prints that reason, :func:`persist_vector` (``form=None``) logs it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rome_edit.analysis.concept_vector import ConceptVector
from rome_edit.errors import ParameterError
from rome_edit.forms.fitted_write import FitSettings, fit_vector_write, write_fitted
from rome_edit.forms.many import DEFAULT_MOM2_WEIGHT, ManyForm, vector_targets, write_edits
from rome_edit.forms.protected_keys import Protection, build_bank
from rome_edit.models.loading import LoadedModel, load_model
from rome_edit.models.subject import last_tokens
from rome_edit.rome.solver import Solver
from rome_edit.study.edited_model import ModelState, model_state
from rome_edit.study.names import NameEntry, load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT
from rome_edit.weights.persist import save_edited

log = logging.getLogger(__name__)
ANALYSIS_FILE = "analysis.json"

DEFAULT_FORM = "fitted"
DEFAULT_PROTECT = "other-names"
REFERENCE_FLAG = "--many-form sequential"  # ROME's rank-one update, one name after another

__all__ = ["DEFAULT_FORM", "DEFAULT_PROTECT", "PersistChoice", "choose_persist_form",
           "default_scale", "other_names_protection", "persist_vector", "score_persisted",
           "without_pool"]


@dataclass(frozen=True)
class PersistChoice:
    """The form a saved write uses (``fitted``, ``sequential`` or ``batched``), what it protects
    (a ``--protect`` source or ``None``), why, and whether nothing was asked (the default)."""

    form: str
    protect: str | None
    why: str
    defaulted: bool = False

    def line(self) -> str:
        """The one line ``rome-edit apply --persist`` prints."""
        protect = f" + protect {self.protect}" if self.protect else ", no protection"
        return f"form: {self.form}{protect} ({self.why})"


def choose_persist_form(form: str | None, protect: str | None, records: bool = False
                        ) -> PersistChoice:
    """The form for ``apply --persist``: ``form``/``protect`` as asked (``None``: not given;
    ``protect="none"``: no protection), ``records`` for record folders instead of one vector.

    A vector defaults to the fitted form protecting other names, the best form
    docs/beyond-rome.md measured for a saved model; records (which the fitted form cannot
    write) and ``--protect none`` (it needs names to keep) fall back to ``sequential``, ROME's
    rank-one update for one subject after another."""
    asked_none = protect == "none"
    source = None if asked_none else protect
    if records:
        if form == "fitted":
            raise ParameterError("form='fitted' writes one vector; for records use "
                                 "form='sequential' or 'batched'.",
                                 parameters=("persist_vector.form",))
        if form is None:
            return PersistChoice("sequential", source, "the fitted form, the default for a "
                                 "--vector, cannot write records: fell back to ROME's rank-one "
                                 "update, one record after another; --many-form batched for "
                                 "MEMIT's", defaulted=True)
        return PersistChoice(form, source, f"--many-form {form}")
    if form is None:
        if asked_none:
            return PersistChoice("sequential", None, "--protect none: the fitted form needs "
                                 "names to keep, so ROME's reference form, one rank-one update "
                                 "per name", defaulted=True)
        return PersistChoice(DEFAULT_FORM, source or DEFAULT_PROTECT,
                             "the default for a saved vector: docs/beyond-rome.md measured it "
                             "keeping 99.8% of other names' gender, ROME's sequential form "
                             f"72.4%; it takes minutes; {REFERENCE_FLAG} for the reference "
                             "form", defaulted=True)
    if form == "fitted":
        if asked_none:
            raise ParameterError("form='fitted' keeps the answers of protected names; drop "
                                 "protect='none', or use form='sequential'.",
                                 parameters=("protect", "persist_vector.form"))
        return PersistChoice(form, source or DEFAULT_PROTECT,
                             "--many-form fitted" + ("" if source else
                                                     ", protecting other names by default"))
    reference = form == "sequential" and source is None
    return PersistChoice(form, source, f"--many-form {form}"
                         + (": ROME's reference form, one rank-one update per subject"
                            if reference else ""))


def without_pool(choice: PersistChoice) -> PersistChoice:
    """The fallback when the fitted form has no name left to protect (every name of the pool
    is being edited): refused if it was asked for, else ROME's sequential form."""
    if not choice.defaulted:
        raise ParameterError("the fitted form has no other name to protect: every name of the "
                             "protected pool is being edited; give a pool of names that are not "
                             "edited (other_names_protection(pool=...)), or use "
                             "form='sequential'.", parameters=("other_names_protection.pool",
                                                               "persist_vector.form"))
    return PersistChoice("sequential", None, "no name outside the edited ones to protect, so "
                         "the fitted form cannot run: fell back to ROME's reference form, one "
                         "rank-one update per name", defaulted=True)


def other_names_protection(lm: LoadedModel, layer: int, prompt: str, edited: Sequence[str],
                           context_templates: Sequence[str],
                           pool: Sequence[str] | None = None) -> Protection | None:
    """``--protect other-names`` for a saved write: every name of ``pool`` (default: the
    bundled names) that is not edited; ``None`` when none is left."""
    skip = set(edited)
    names = [n for n in dict.fromkeys(pool if pool is not None
                                      else [e.name for e in load_names()]) if n not in skip]
    if not names:
        return None
    return Protection(build_bank(lm, layer, prompt, names, context_templates, DEFAULT_PROTECT))


def default_scale(vector_path: str | Path, gv: ConceptVector) -> tuple[float, str]:
    """The multiplier of the stored vector that ``analyze`` found best (highest mean flip rate
    with both keep rates ≥ its threshold), read from ``analysis.json`` beside the vector; its
    ``best_scale.scale`` is a multiple of the mean delta norm.  ``(1.0, why)`` without one."""
    path = Path(vector_path).with_name(ANALYSIS_FILE)
    if not path.exists():
        return 1.0, f"no {ANALYSIS_FILE} beside the vector: scale 1"
    best = json.loads(path.read_text()).get("best_scale")
    if not best:
        return 1.0, f"{path} records no usable scale: scale 1"
    multiplier = float(best["scale"]) * gv.mean_delta_norm / float(gv.vector.norm())
    return multiplier, f"best documented scale {best['scale']} × mean delta norm ({path})"


def persist_vector(lm: LoadedModel, names: Sequence[str], vector: torch.Tensor, layer: int,
                   context_templates: Sequence[str], out_dir: str | Path,
                   solver: Solver | None = None, form: ManyForm | str | None = None,
                   protection: Protection | None = None,
                   mom2_weight: float = DEFAULT_MOM2_WEIGHT, described: dict | None = None,
                   prompt: str = EDIT_PROMPT, progress: bool = True, sign: int = 1,
                   fit: FitSettings | None = None) -> Path:
    """Write ``v_orig + vector`` for every name into ``lm`` (persistently) and save it.

    ``form="fitted"`` (:mod:`~rome_edit.forms.fitted_write`) fits the write to every name's
    measured answer instead: the edited names must answer the gender ``vector`` points to
    (``sign`` 1: male), the names of ``protection``'s bank must keep theirs.

    ``form=None`` is the default ``rome-edit apply --persist`` uses (:func:`choose_persist_form`):
    fitted, protecting ``protection`` or, without one, every bundled name not edited
    (:func:`other_names_protection`); ROME's sequential form where no name is left to protect.
    The choice is logged.  ``form="sequential"`` without ``protection`` is ROME's reference."""
    if form is None:
        choice = choose_persist_form(None, None)
        if protection is None:
            protection = other_names_protection(lm, layer, prompt, names, context_templates)
        if protection is None or not set(protection.bank.subjects) - set(names):
            choice, protection = without_pool(choice), None
        else:
            choice = replace(choice, protect=protection.bank.source)
        log.info("%s", choice.line())
        form = choice.form
    base = lm.identity
    targets = vector_targets(lm, layer, names, vector, context_templates, prompt)
    if form == "fitted":
        if protection is None:
            raise ParameterError("the fitted form keeps the answers of the protected names; "
                                 "pass protection= (other_names_protection(...), or "
                                 "Editor.protection with a file of names).",
                                 parameters=("protection",))
        answers = (ANSWERS["female"], ANSWERS["male"])
        fitted = fit_vector_write(lm, layer, prompt, vector, list(names),
                                  [1 if sign > 0 else 0] * len(names),
                                  protection.bank.subjects, answers, solver, fit)
        write_fitted(lm, fitted, vector)
        result = fitted.to_dict()
    else:
        result = write_edits(lm, targets, form, solver, protection, mom2_weight,
                             progress).to_dict()
    written = {**result, **(described or {}), "vector_norm": float(vector.norm())}
    return save_edited(lm, out_dir, targets, base, written)


def score_persisted(directory: str | Path, before: ModelState, edited: Sequence[NameEntry],
                    sign: int, attn_implementation: str = "eager") -> dict:
    """Load the checkpoint fresh and score it: flips/keeps over ``edited`` for a ``+g``
    (``sign`` 1) or ``−g`` model, and the other names' gender kept."""
    fresh = load_model(directory, attn_implementation=attn_implementation)
    after = model_state(fresh, before.names, prompt=before.prompt)
    index = {n: i for i, n in enumerate(before.names)}
    edited_names = {e.name for e in edited}
    moved_to = "male" if sign > 0 else "female"
    flip_from = "female" if sign > 0 else "male"

    def rate(flags: list[bool]) -> float | None:
        return sum(flags) / len(flags) if flags else None

    flip = [after.gender[index[e.name]] == moved_to for e in edited if e.gender == flip_from]
    keep = [after.gender[index[e.name]] == moved_to for e in edited if e.gender == moved_to]
    last = last_tokens(fresh.tokenizer, before.prompt, before.names)
    edited_last = {last[n] for n in edited_names}
    kept = {n: after.gender[i] == before.gender[i] for n, i in index.items()
            if n not in edited_names}
    others = list(kept.values())
    key = "f_to_m" if sign > 0 else "m_to_f"
    return {f"flip_{key}": rate(flip), f"keep_{'m' if sign > 0 else 'f'}": rate(keep),
            "others_kept": rate(others),
            "others_kept_same_last_token": rate([v for n, v in kept.items()
                                                 if last[n] in edited_last]),
            "others_kept_random": rate([v for n, v in kept.items()
                                        if last[n] not in edited_last]),
            "n_flip": len(flip), "n_keep": len(keep),
            "n_others": len(others), "prompt": before.prompt, "loaded_from": str(directory),
            "model_identity": fresh.identity}
