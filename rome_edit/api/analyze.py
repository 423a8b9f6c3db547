"""The edit-vector study end to end on one sweep of any binary concept (Xodarap 2023, then
Roger 2022, Belrose et al. 2023 and Baker 2023; docs/method.md, "References").

1. classifier on deltas (label 0 vs label 1) with a shuffled-label control;
2. the bounded box vector ``g``, scaled explicitly, saved as safetensors;
3. candidate concept directions, their cosines and an erasure check;
4. with a model and held-out subjects: every direction applied at the same norms (rank-one
   weight edits, and activation addition), random directions of the same norm as the control,
   and a verdict per direction of the concept (:mod:`rome_edit.analysis.flip_verdict`: a
   direction the control already flips is *uninformative*, not a success);
5. plots and ``analysis.json``.

Steps 1–3 are :func:`rome_edit.analysis.report.analyze_deltas` (no model); step 4 uses
:class:`rome_edit.evaluation.vectors.VectorApplier`.  This module joins them, so it sits above
both layers.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rome_edit.analysis.concept_vector import ScaleSpec
from rome_edit.analysis.deltas import DeltaSet, load_delta_set
from rome_edit.analysis.flip_verdict import FLIP_KEYS, best_informative_scale, judge_table
from rome_edit.analysis.plots import ControlBand, FlipCurve, plot_flip_rates
from rome_edit.analysis.report import VECTOR_FILE, DeltaAnalysis, analyze_deltas
from rome_edit.evaluation.vectors import (
    BinaryTask,
    FlipTable,
    Mode,
    VectorApplier,
    random_directions,
)
from rome_edit.models.identity import check_same_model
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import generate
from rome_edit.models.subject import fill
from rome_edit.stats.inverse import InverseSecondMoment

log = logging.getLogger(__name__)
RATE_KEYS = ("flip_label1", "flip_label0", "keep_label0", "keep_label1")


@dataclass(frozen=True)
class AnalysisSettings:
    """The choices of :func:`analyze`: the seed of the fits, the scale of the saved vector
    (``"raw"``, ``"mean-norm"`` or a multiple of the mean ‖δ‖), the scales of the flip-rate
    curves, how many random control directions, the keep-rate a usable scale must reach, and
    how many held-out completions to record."""

    seed: int = 0
    scale: ScaleSpec = "mean-norm"  # of the saved vector
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # × mean delta norm, for the curves
    n_random: int = 3  # random control directions (seeds 1000, 1001, …)
    keep_threshold: float = 0.95  # a scale is "usable" when both keep-rates reach this
    n_completions: int = 4


@dataclass(frozen=True)
class HeldOut:
    """Subjects the deltas never saw, their 0/1 labels (label-1 subjects answer A, label-0
    subjects B) and the tasks to score them on (the first task's prompt is where vectors are
    written)."""

    subjects: tuple[str, ...]
    labels: tuple[int, ...]
    tasks: tuple[BinaryTask, ...]


def control_tables(applier: VectorApplier, norm: float, n_random: int, mode: Mode
                   ) -> list[FlipTable]:
    return [applier.flip_table(v, mode) for v in
            random_directions(applier.width, norm, range(1000, 1000 + n_random))]


def _mean_std(tables: Sequence[FlipTable], key: str) -> dict[str, float]:
    values = [getattr(t, key) for t in tables]
    return {"mean": statistics.fmean(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def completions(lm: LoadedModel, applier: VectorApplier, vector: torch.Tensor,
                subjects: Sequence[str], max_new_tokens: int = 16) -> list[dict[str, str | int]]:
    """Greedy completions of the first task's prompt before and after writing ``v_orig ± g``
    (``+g`` for label-1 subjects, ``−g`` for label-0 ones)."""
    out: list[dict[str, str | int]] = []
    index = {s: i for i, s in enumerate(applier.subjects)}
    for subject in subjects:
        i = index[subject]
        sign = 1.0 if bool(applier.label1[i]) else -1.0
        prompt = fill(applier.tasks[0].prompt, subject)
        before = generate(lm.model, lm.tokenizer, prompt, max_new_tokens)
        signs = [0.0] * len(applier.subjects)
        signs[i] = sign
        with applier.written(vector, signs):
            after = generate(lm.model, lm.tokenizer, prompt, max_new_tokens)
        out.append({"subject": subject, "label": int(applier.label1[i]),
                    "vector": "+g" if sign > 0 else "-g", "prompt": prompt,
                    "before": before, "after": after})
    return out


def analyze(
    sweep: str | Path | DeltaSet,
    out_dir: str | Path,
    lm: LoadedModel | None = None,
    heldout: HeldOut | None = None,
    context_templates: Sequence[str] = ("{}",),
    inverse: InverseSecondMoment | None = None,
    settings: AnalysisSettings = AnalysisSettings(),
    labels: Sequence[int] | Mapping[str, int] | None = None,
    vector_file: str = VECTOR_FILE,
) -> dict[str, Any]:
    """Run the study on a sweep directory (or a :class:`DeltaSet`); write ``analysis.json``,
    the vector and the plots into ``out_dir``.  ``labels`` replaces the sweep's recorded
    labels (see :func:`~rome_edit.analysis.deltas.load_delta_set`).  With ``lm`` and
    ``heldout``, every direction is also applied to the held-out subjects."""
    out = Path(out_dir)
    if isinstance(sweep, DeltaSet):
        if labels is not None:
            raise ValueError("labels= relabels a sweep directory; a DeltaSet has its labels.")
        ds = sweep
    else:
        ds = load_delta_set(sweep, labels)
    if lm is not None:
        check_same_model(lm, ds.model_identity, "the sweep", "load the sweep's model.")
    found = analyze_deltas(ds, out, seed=settings.seed, scale=settings.scale,
                           vector_file=vector_file)
    result: dict[str, Any] = {"sweep": str(sweep) if not isinstance(sweep, DeltaSet) else None,
                    **found.result}
    plots = list(found.plots)
    if lm is not None and heldout is not None and heldout.subjects:
        result.update(_apply_to_heldout(lm, found, heldout, context_templates, inverse,
                                        settings, out, plots))
    result["directions"] = found.table
    result["plots"] = [Path(p).name for p in plots]  # relative to out_dir: the report moves
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _apply_to_heldout(lm: LoadedModel, found: DeltaAnalysis, heldout: HeldOut,
                      templates: Sequence[str], inverse: InverseSecondMoment | None,
                      settings: AnalysisSettings, out: Path, plots: list[Path]) -> dict[str, Any]:
    ds, g = found.deltas, found.vector.vector
    applier = VectorApplier(lm, ds.layer, heldout.subjects, heldout.labels, heldout.tasks,
                            templates, inverse)
    norm = float(g.norm())
    res: dict[str, Any] = {"heldout": {"n": len(heldout.subjects),
                             "baseline_accuracy": applier.baseline_accuracy()}}
    for mode in ("weights", "activations"):
        res[f"vector_{mode}"] = applier.flip_table(g, mode).to_dict()
        controls = control_tables(applier, norm, settings.n_random, mode)
        res[f"control_{mode}"] = {k: _mean_std(controls, k) for k in RATE_KEYS}
        # A direction whose random control already flips most subjects is no evidence.
        res[f"verdict_{mode}"] = [v.to_dict() for v in judge_table(
            res[f"vector_{mode}"], res[f"control_{mode}"])]
    # Curves: every direction at the same norms, weight edits; random band at each scale.
    unit_dirs = {n: v.float() / v.float().norm() for n, v in found.directions.as_dict().items()}
    curves, band, per_scale = [], [], {}
    for name, u in unit_dirs.items():
        tables = [applier.flip_table(u * s * ds.mean_norm) for s in settings.scales]
        per_scale[name] = [t.to_dict() for t in tables]
        curves.append(FlipCurve(name, settings.scales, tuple(t.flip_rate for t in tables)))
    control_rates = []
    for s in settings.scales:
        tables = control_tables(applier, s * ds.mean_norm, settings.n_random, "weights")
        band.append([t.flip_rate for t in tables])
        control_rates.append({k: statistics.fmean(getattr(t, k) for t in tables)
                              for k in FLIP_KEYS})
    control = ControlBand(settings.scales, tuple(zip(*band)))
    plots.append(plot_flip_rates(curves, control, out / "flip_rate_vs_scale.png",
                                 title=f"held-out subjects, rank-one edits at layer {ds.layer}"))
    res["scale_curves"] = {"scales": list(settings.scales), "directions": per_scale,
                           "control_mean": control.mean.tolist(),
                           "control_std": control.std.tolist(),
                           "control_rates": control_rates}
    res["best_scale"] = best_scale(per_scale["box"], settings)
    res["best_informative_scale"] = best_informative_scale(settings.scales, per_scale["box"],
                                                           control_rates)
    at_norm = {name: applier.flip_table(u * norm).to_dict() for name, u in unit_dirs.items()}
    for row in found.table:
        if row["direction"] in at_norm:
            row["at_vector_norm"] = at_norm[row["direction"]]
    res["completions"] = completions(lm, applier, g,
                                     list(heldout.subjects[: settings.n_completions]))
    return res


def best_scale(box_tables: Sequence[Mapping[str, float]], settings: AnalysisSettings
               ) -> dict[str, float] | None:
    """The scale with the highest mean flip rate whose keep-rates both reach the threshold."""
    usable = [(s, t) for s, t in zip(settings.scales, box_tables)
              if min(t["keep_label0"], t["keep_label1"]) >= settings.keep_threshold]
    if not usable:
        return None
    s, t = max(usable, key=lambda st: (st[1]["flip_label1"] + st[1]["flip_label0"]) / 2)
    return {"scale": s, **t}
