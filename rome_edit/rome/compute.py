"""ROME end to end: key, value, rank-one update → :class:`EditRecord` (Meng et al. 2022, §3).

:func:`compute_edits` computes every request against the *current* weights independently (what
a sweep records: each name's edit of the original model) and writes nothing;
:func:`rome_edit.forms.sequential.edit_sequentially` applies each edit before computing the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch

from rome_edit.errors import ParameterError
from rome_edit.models.architectures import check_editable, check_layer, mlp_widths
from rome_edit.models.identity import check_same_model
from rome_edit.models.layers import layer_output
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.context import form_applies, form_prompt, form_templates
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import key_stars, keys_and_values
from rome_edit.rome.record import EditRecord, FormWrite
from rome_edit.rome.request import EditRequest

# SecondMomentInverse (deprecated) and Solver stay importable from here, their pre-0.3 home.
from rome_edit.rome.solver import SecondMomentInverse, Solver, SolverWithProvenance
from rome_edit.rome.update import combine_forms, rank_one_update
from rome_edit.rome.value_batched import optimise_values
from rome_edit.rome.value_loop import EARLY_STOP_LOSS, loss_layer_of
from rome_edit.rome.value_reference import optimise_value

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "Engine", "SecondMomentInverse", "Solver", "SolverWithProvenance",
           "check_request_inputs", "compute_edits"]
# "batched": the batched value engine, with the GPT-J kernel where it applies and agrees;
# "batched-generic": the same engine on the model's own forward only; "simple": one request at
# a time, every step a full forward over all prompts (the reference's way).
Engine = Literal["batched", "batched-generic", "simple"]
ENGINES: tuple[str, ...] = ("batched", "batched-generic", "simple")


def check_request_inputs(lm: LoadedModel, hp: ROMEHyperParams,
                         inverse: SolverWithProvenance | None) -> None:
    check_layer(lm.model, lm.arch, hp.layer)
    check_editable(lm.model, lm.arch, hp.layer)
    loss_layer_of(lm, hp)
    if hp.mom2_adjustment and inverse is None:
        raise ParameterError("mom2_adjustment is on but no second-moment statistics were "
                             "given; pass stats= (a file from SecondMoment.save, or let "
                             "Editor.load compute and cache them), or set the hyperparameter "
                             "mom2_adjustment to False.",
                             parameters=("stats", "mom2_adjustment"))
    if inverse is not None:
        prov = inverse.provenance
        _, d_mlp = mlp_widths(lm.model, lm.arch)
        if prov.get("layer") is not None and int(prov["layer"]) != hp.layer:
            raise ParameterError(f"statistics are for layer {prov['layer']} but the edit is at "
                                 f"layer {hp.layer}; compute them with rome_edit.stats."
                                 f"compute_second_moment(lm, layer={hp.layer}).",
                                 parameters=("compute_second_moment",))
        identity = prov.get("model_identity")
        if identity is not None:
            check_same_model(lm, identity, "the second moment C",
                             "compute them for this model with "
                             "rome_edit.stats.compute_second_moment.",
                             parameters=("compute_second_moment",))
        if prov.get("d_mlp") is not None and int(prov["d_mlp"]) != d_mlp:
            raise ValueError(f"statistics have width {prov['d_mlp']} but this layer's keys have "
                             f"{d_mlp}; they belong to another model.")


def compute_edits(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    inverse: SolverWithProvenance | None = None,
    engine: Engine = "batched",
    chunk_size: int = 64,
    progress: bool = True,
    early_stop_loss: float = EARLY_STOP_LOSS,
) -> list[EditRecord]:
    """Records for ``requests``, each computed against the current weights; nothing is applied.

    ``early_stop_loss`` is the value loop's threshold (the reference's 0.05; 0 holds every edit
    to ``v_num_grad_steps``, as benchmarks do).
    """
    check_request_inputs(lm, hp, inverse)
    fitted = [*requests, *(r for f in hp.subject_forms
                           for r in _form_requests(requests, f, context_templates)[1])]
    if hp.fit_phrasings and not any(p.joins(r) for r in fitted for p in hp.fit_phrasings):
        log.warning("no fit phrasing joins any value fit: a phrasing needs the same text before "
                    "the subject as the prompt fitted (e.g. '{} is my' joins the text-start "
                    "form's '{}. Gender:') and an answer for the edit's target_new.")
    return _compute(lm, requests, hp, context_templates, inverse, engine, chunk_size, progress,
                    early_stop_loss)


def _compute(lm: LoadedModel, requests: Sequence[EditRequest], hp: ROMEHyperParams,
             context_templates: Sequence[str], inverse: SolverWithProvenance | None,
             engine: Engine, chunk_size: int, progress: bool,
             early_stop_loss: float) -> list[EditRecord]:
    layer = hp.layer
    t0 = time.perf_counter()
    prompts = [r.prompt for r in requests]
    subjects = [r.subject for r in requests]
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {list(ENGINES)}.")
    k_bare, v_bare = keys_and_values(lm, layer, prompts, subjects)
    if engine == "simple":
        k_star = key_stars(lm, layer, prompts, subjects, context_templates)
    t_key = time.perf_counter() - t0
    if engine != "simple":  # k* comes out of the value pass's first forward
        values = optimise_values(lm, requests, hp, context_templates, chunk_size, progress,
                                 use_kernel=engine == "batched", early_stop_loss=early_stop_loss)
        k_star = torch.stack([v.k_star for v in values])
    else:
        values = [optimise_value(lm, r, hp, context_templates, early_stop_loss)
                  for r in requests]
    t_value = time.perf_counter() - t0 - t_key
    use_c = hp.mom2_adjustment and inverse is not None
    c_inv_k = inverse.solve(k_star).float().cpu() if use_c else k_star
    value_of_k_star = layer_output(lm, layer, k_star)
    total = time.perf_counter() - t0
    records = []
    for i, (req, val) in enumerate(zip(requests, values)):
        v_star = val.v_init + val.delta
        upd = rank_one_update(hp.update_form, c_inv_k[i], k_star[i], v_star,
                              value_of_k_star=value_of_k_star[i], k_bare=k_bare[i],
                              v_bare=v_bare[i])
        records.append(EditRecord(
            request=req, model_identity=lm.identity, layer=layer, hparams=hp.to_dict(),
            k_star=k_star[i], v_orig=val.v_init, v_star=v_star, delta=val.delta, u=upd.u,
            lam=upd.lam, update_form=hp.update_form,
            stats=dict(inverse.provenance) if use_c else None, losses=val.losses,
            timings={"key_s": t_key / len(requests), "value_s": t_value / len(requests),
                     "total_s": total / len(requests), "engine": engine, "step": val.step,
                     "batch": len(requests)},
            context_templates=tuple(context_templates),
            attn_implementation=lm.attn_implementation,
        ))
    if hp.subject_forms:
        records = _with_forms(lm, requests, records, hp, context_templates, inverse, engine,
                              chunk_size, progress, early_stop_loss)
    return records


def _with_forms(lm: LoadedModel, requests: Sequence[EditRequest], records: list[EditRecord],
                hp: ROMEHyperParams, context_templates: Sequence[str],
                inverse: SolverWithProvenance | None, engine: Engine, chunk_size: int,
                progress: bool, early_stop_loss: float) -> list[EditRecord]:
    """Each record also written at ``hp.subject_forms`` (:mod:`rome_edit.rome.context`): every
    form's key and value computed as ROME computes the edit's own, one update exact at all."""
    t0 = time.perf_counter()
    one_key = replace(hp, subject_forms=())
    writes: list[list[FormWrite]] = [[] for _ in requests]
    for form in hp.subject_forms:
        which, form_requests = _form_requests(requests, form, context_templates)
        if not which:
            continue
        parts = _compute(lm, form_requests, one_key, form_templates(context_templates, form),
                         inverse, engine, chunk_size, progress, early_stop_loss)
        for i, p in zip(which, parts):
            writes[i].append(FormWrite(form, p.request.prompt, p.k_star, p.v_orig, p.v_star,
                                       p.u, p.lam))
    out = [combine_forms(lm, rec, w, torch.stack([rec.u, *(f.u for f in w)])) if w else rec
           for rec, w in zip(records, writes)]
    seconds = (time.perf_counter() - t0) / len(records)
    return [replace(r, timings={**r.timings, "forms_s": seconds,
                                "total_s": r.timings["total_s"] + seconds}) for r in out]


def _form_requests(requests: Sequence[EditRequest], form: str, context_templates: Sequence[str]
                   ) -> tuple[list[int], list[EditRequest]]:
    """The requests ``form`` applies to (their indices) and each one's request in that form."""
    which = [i for i, r in enumerate(requests) if form_applies(r.prompt, form, context_templates)]
    return which, [replace(requests[i], prompt=form_prompt(requests[i].prompt, form))
                   for i in which]
