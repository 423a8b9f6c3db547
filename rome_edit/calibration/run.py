"""Calibrate ROME's hyperparameters on a model: measure a grid of candidates, choose by a rule.

Steps (each reusing the toolkit's own parts):

1. **Trace** the requests' prompt (:func:`rome_edit.tracing.average.locate`, each request's true
   answer traced) for the recommended layer and the per-layer MLP effect at the last subject
   token.
2. **Grid** (:mod:`rome_edit.calibration.grid`): every layer in a band around that layer ×
   ``clamp_norm_factor`` values × step counts × loss layers × update form (plain ROME; the
   protected forms on each layer's best few plain candidates).
3. For each layer, the **statistics** ``C`` once (:class:`rome_edit.assembly.session.Session`,
   the assembly point ``Editor`` is built on; cached on disk by :mod:`rome_edit.stats.cache`,
   shared by all that layer's candidates); for each candidate, all sample edits at once with
   the **batched engine** (:func:`rome_edit.rome.compute.compute_edits`), scored with
   :func:`rome_edit.evaluation.evaluate.evaluate_edits` (efficacy, paraphrase, specificity on
   same-last-token and random neighbours, kept facts) and greedy-generation **fluency** on the
   first few requests (ROME's n-gram entropy; the unedited model's is measured once).  Then the
   protected variants of that layer's best plain candidates: the same records with the
   protected direction ``u`` (keys of the neighbour pool computed once per layer), scored the
   same way (:mod:`rome_edit.calibration.measure`).
4. **Choose** by :class:`rome_edit.calibration.choose.ChoiceRule` and return the base
   hyperparameters with the chosen candidate's values.

Context templates are sampled once and shared by every candidate, so candidates differ only in
what the grid changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from rome_edit.assembly.session import (
    Session,
    no_preset_hparams,
    preset_name,
    relative_depth_layer,
)
from rome_edit.calibration.choose import Choice, ChoiceRule, choose, rank_key
from rome_edit.calibration.grid import CalibrationGrid, Candidate
from rome_edit.calibration.measure import (
    FLUENCY_TOKENS,
    LayerBanks,
    fluency,
    measure,
    protected_records,
)
from rome_edit.errors import ParameterError
from rome_edit.evaluation.evaluate import KeptFact
from rome_edit.models.loading import LoadedModel
from rome_edit.models.subject import fill
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest
from rome_edit.stats.stability import Stability
from rome_edit.tracing.average import LocateResult, locate

__all__ = ["CalibrationResult", "calibrate", "FLUENCY_TOKENS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationResult:
    """The measured table, the choice, and the hyperparameters it gives."""

    hparams: ROMEHyperParams
    base: ROMEHyperParams
    rows: tuple[dict, ...]  # one per candidate, in grid order
    choice: Choice
    rule: ChoiceRule
    grid: CalibrationGrid
    trace: LocateResult | None  # None: no traced case was informative
    traced_layer: int  # the trace's recommendation, or the reference's relative depth
    subjects: tuple[str, ...]
    context_templates: tuple[str, ...]
    fluency_before: float | None
    seconds: float
    model_identity: str

    @property
    def chosen(self) -> dict:
        return self.rows[self.choice.index]

    def per_layer(self) -> list[dict]:
        """Per measured layer: the best efficacy over its candidates, the best among those the
        rule allows, and the causal-trace MLP effect there."""
        effect = {row["layer"]: row["mlp"] for row in self.trace.layer_table} \
            if self.trace is not None else {}
        out = []
        for layer in sorted({r["layer"] for r in self.rows}):
            rows = [(i, r) for i, r in enumerate(self.rows) if r["layer"] == layer]
            allowed = [r["efficacy"] for i, r in rows if i in self.choice.eligible]
            out.append({"layer": layer, "trace_mlp_effect": effect.get(layer),
                        "best_efficacy": max(r["efficacy"] for _, r in rows),
                        "best_eligible_efficacy": max(allowed) if allowed else None})
        return out

    def to_json(self) -> dict:
        return {
            "model_identity": self.model_identity, "seconds": self.seconds,
            "n_edits": len(self.subjects), "subjects": list(self.subjects),
            "rule": self.rule.to_dict(), "rule_met": self.choice.rule_met,
            "chosen_index": self.choice.index, "chosen": self.chosen,
            "eligible": list(self.choice.eligible),
            "tradeoff": self.choice.tradeoff, "frontier": list(self.choice.frontier),
            "grid": {"band": self.grid.band, "clamps": list(self.grid.clamps),
                     "steps": list(self.grid.steps), "loss_layers": list(self.grid.loss_layers),
                     "layers": None if self.grid.layers is None else list(self.grid.layers),
                     "protections": [p.to_dict() for p in self.grid.protections],
                     "protect_top": self.grid.protect_top},
            "fluency_before": self.fluency_before,
            "traced_layer": self.traced_layer,
            "trace": None if self.trace is None else {
                "recommended_layer": self.trace.recommended_layer,
                "excluded_layers": list(self.trace.excluded_layers),
                "n_cases": self.trace.n_cases, "layer_table": self.trace.layer_table},
            "per_layer": self.per_layer(),
            "table": list(self.rows),
            "base_hparams": self.base.to_dict(), "hparams": self.hparams.to_dict(),
            "context_templates": list(self.context_templates),
        }


def base_hparams(lm: LoadedModel, layer: int) -> ROMEHyperParams:
    """What the grid varies from: the model's shipped preset (the bundled model's, SmolLM2's;
    :func:`rome_edit.assembly.session.preset_name`), else the no-preset defaults
    (:func:`rome_edit.assembly.session.no_preset_hparams`)."""
    name = preset_name(lm)
    if name is not None:
        return ROMEHyperParams.preset(name).with_layer(layer)
    return no_preset_hparams(lm, layer)


def _check_requests(requests: Sequence[EditRequest]) -> str:
    if not requests:
        raise ParameterError("no edit requests to calibrate on; give at least one (requests=, "
                             "e.g. 48).", parameters=("requests",))
    prompts = {r.prompt for r in requests}
    if len(prompts) != 1:
        raise ValueError(f"calibration requests must share one prompt (found {sorted(prompts)}); "
                         "calibrate one prompt at a time.")
    missing = [r.subject for r in requests if r.target_true is None]
    if missing:
        raise ValueError(f"requests for {missing[:3]} have no target_true (the old answer); "
                         "calibration needs it to trace and to score the edits.")
    return prompts.pop()


def calibrate(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    *,
    neighbour_pool: Sequence[str] = (),
    kept: Sequence[KeptFact] = (),
    grid: CalibrationGrid | None = None,
    rule: ChoiceRule | None = None,
    base: ROMEHyperParams | None = None,
    context_templates: Sequence[str] | None = None,
    corpus: str | None = None,
    cache_dir: str | Path | None = None,
    n_fluency: int = 4,
    n_same_last: int = 5,
    n_random: int = 10,
    seed: int = 0,
    until_stable: Stability | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Measure every candidate of ``grid`` on ``requests`` and choose one by ``rule``.

    ``requests`` share one prompt and carry ``target_true`` (and, for the paraphrase metric,
    paraphrases); neighbours come from ``neighbour_pool`` (default: the requests' subjects);
    ``kept`` are other facts each edit must leave alone (e.g. the city).  ``base`` (default:
    :func:`base_hparams`) supplies everything the grid does not vary; its statistics corpus
    can be overridden with ``corpus`` (as ``--corpus``); ``until_stable`` stops each layer's
    statistics pass once ``u = C⁻¹k`` settles (:mod:`rome_edit.stats.stability`).
    """
    grid = grid or CalibrationGrid()
    rule = rule or ChoiceRule()
    prompt = _check_requests(requests)
    if n_fluency < 0:
        raise ValueError(f"n_fluency must be ≥ 0 (got {n_fluency}).")
    if grid.layers is not None:  # refuse a bad grid before any costly step
        grid.layers_for(0, lm.n_layers)
    grid.loss_layer_values(lm.n_layers)
    t0 = time.perf_counter()
    answers = tuple(dict.fromkeys(a for r in requests for a in (r.target_true, r.target_new)))
    try:
        trace: LocateResult | None = locate(
            lm, prompt, [(r.subject, r.target_true) for r in requests], candidates=answers,
            progress=progress)
        traced, excluded = trace.recommended_layer, trace.excluded_layers
    except ValueError as err:  # no informative case: the model does not know these facts
        trace, traced = None, relative_depth_layer(lm)
        excluded = (0,) if lm.arch.parallel and lm.n_layers > 1 else ()
        log.warning("the causal trace found no informative case (%s); the band is centred on "
                    "layer %d, the reference's relative depth.", err, traced)
    layers = grid.layers_for(traced, lm.n_layers, excluded)
    candidates = grid.candidates(layers, lm.n_layers)
    if not candidates:
        raise ValueError(f"the grid has no candidate: every loss layer lies below the edit "
                         f"layers {layers}; include the last layer (-1) in the loss layers.")
    base = base or base_hparams(lm, traced)
    # One session for every candidate: the templates are sampled once and shared, and its
    # corpus is resolved once, so a sampled corpus is sampled once and every layer reads it.
    session = Session(lm, base, context_templates, corpus=corpus, until_stable=until_stable,
                      seed=seed, progress=progress, cache_dir=cache_dir)
    templates = session.context_templates
    log.info("calibrating %d candidates on %d edits (layers %s, traced layer %d)",
             len(candidates), len(requests), layers, traced)
    texts = [fill(r.prompt, r.subject) for r in requests[:n_fluency]]
    before = fluency(lm, texts)
    fluency_before = sum(before) / len(before) if before else None
    pool = list(neighbour_pool) or [r.subject for r in requests]
    scoring = dict(neighbour_pool=neighbour_pool, kept=kept, n_same_last=n_same_last,
                   n_random=n_random)
    n_protected = sum(len(grid.protected([c for c in candidates if c.layer == x]))
                      for x in layers)
    measured: list[Candidate] = []
    rows: list[dict] = []
    bar = tqdm(total=len(candidates) + n_protected, desc="calibrate", unit="candidate",
               disable=not progress)
    for layer in layers:
        plain: dict[Candidate, list] = {}
        for cand in (c for c in candidates if c.layer == layer):
            session.hparams = hp = cand.apply(base)
            inverse = session.inverse  # C once per layer (and from the disk cache after)
            bar.set_postfix(layer=cand.layer, clamp=cand.clamp_norm_factor,
                            steps=cand.v_num_grad_steps)
            start = time.perf_counter()
            plain[cand] = compute_edits(lm, requests, hp, templates, inverse,
                                        chunk_size=len(requests), progress=False)
            rows.append(measure(lm, cand, plain[cand], texts, fluency_before, **scoring,
                                started=start))
            measured.append(cand)
            bar.update()
            log.info("candidate %s: efficacy %.3f, random specificity %s", cand.to_dict(),
                     rows[-1]["efficacy"], rows[-1]["specificity_random"])
        ranked = sorted(plain, key=lambda c: rank_key(rows[measured.index(c)]), reverse=True)
        banks = LayerBanks(lm, layer, prompt, pool, templates, base.subject_forms)
        for cand in grid.protected(ranked):
            assert cand.protect is not None
            bar.set_postfix(layer=layer, protect=cand.protect.label())
            start = time.perf_counter()
            records = protected_records(banks, cand.protect, plain[cand.plain], session.solver)
            rows.append(measure(lm, cand, records, texts, fluency_before, **scoring,
                                started=start))
            measured.append(cand)
            bar.update()
            log.info("candidate %s: efficacy %.3f, random specificity %s", cand.to_dict(),
                     rows[-1]["efficacy"], rows[-1]["specificity_random"])
        if banks.seconds:
            log.info("layer %d: protected keys of %d names in %.1f s", layer, len(pool),
                     banks.seconds)
    bar.close()
    choice = choose(rows, rule)
    chosen = measured[choice.index]
    (log.info if choice.rule_met else log.warning)("%s", choice.tradeoff)
    return CalibrationResult(
        hparams=chosen.apply(base), base=base, rows=tuple(rows), choice=choice, rule=rule,
        grid=grid, trace=trace, traced_layer=traced, subjects=tuple(r.subject for r in requests),
        context_templates=tuple(templates), fluency_before=fluency_before,
        seconds=time.perf_counter() - t0, model_identity=lm.identity)
