"""The edit-vector study end to end on one sweep (seed 001, then seeds 000/002/003).

1. classifier on deltas (male→female vs female→male) with a shuffled-label control;
2. the bounded box vector ``g``, scaled explicitly, saved as safetensors;
3. candidate concept directions, their cosines and an erasure check;
4. with a model: every direction applied to held-out names at the same norms (rank-one weight
   edits, and activation addition), random directions of the same norm as the control;
5. plots and ``analysis.json``.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rome_edit.analysis.apply_vector import FlipTable, VectorApplier, random_directions
from rome_edit.analysis.box_vector import make_gender_vector
from rome_edit.analysis.classifier import train_classifier
from rome_edit.analysis.deltas import load_delta_set
from rome_edit.analysis.directions import (
    candidate_directions,
    cosine_table,
    directions_table,
    erasure_check,
)
from rome_edit.analysis.gender_vector import save_gender_vector
from rome_edit.analysis.plots import (
    ControlBand,
    FlipCurve,
    plot_delta_projection,
    plot_flip_rates,
    plot_weight_histogram,
)
from rome_edit.data.names import NameEntry
from rome_edit.editing.apply import add_rank_one, preserved
from rome_edit.editing.rome import SecondMomentInverse
from rome_edit.models.identity import check_same_model
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import generate
from rome_edit.models.subject import fill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisSettings:
    seed: int = 0
    scale: str | float = "mean-norm"  # of the saved vector
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # × mean delta norm, for the curves
    n_random: int = 3  # random control directions (seeds 1000, 1001, …)
    keep_threshold: float = 0.95  # a scale is "usable" when both keep-rates reach this
    n_completions: int = 4


def flip_rate(t: FlipTable) -> float:
    return (t.flip_f_to_m + t.flip_m_to_f) / 2


def control_tables(applier: VectorApplier, norm: float, n_random: int, mode: str
                   ) -> list[FlipTable]:
    width = applier.v_orig.shape[1]
    return [applier.flip_table(v, mode) for v in  # type: ignore[arg-type]
            random_directions(width, norm, range(1000, 1000 + n_random))]


def _mean_std(tables: Sequence[FlipTable], key: str) -> dict[str, float]:
    values = [getattr(t, key) for t in tables]
    return {"mean": statistics.fmean(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def completions(lm: LoadedModel, applier: VectorApplier, vector: torch.Tensor,
                names: Sequence[str], max_new_tokens: int = 16) -> list[dict]:
    """Greedy completions of ``Name: X. Gender:`` before and after writing ``v_orig ± g``."""
    out = []
    index = {e.name: i for i, e in enumerate(applier.names)}
    for name in names:
        i = index[name]
        sign = 1.0 if applier.names[i].gender == "female" else -1.0
        u, lam = applier.update_for(sign * vector)
        prompt = fill("Name: {}. Gender:", name)
        before = generate(lm.model, lm.tokenizer, prompt, max_new_tokens)
        with preserved(lm, [applier.layer]):
            add_rank_one(lm, applier.layer, u[i], lam[i])
            after = generate(lm.model, lm.tokenizer, prompt, max_new_tokens)
        out.append({"name": name, "gender": applier.names[i].gender,
                    "vector": "+g" if sign > 0 else "-g", "prompt": prompt,
                    "before": before, "after": after})
    return out


def analyze(
    sweep_dir: str | Path,
    out_dir: str | Path,
    lm: LoadedModel | None = None,
    heldout: Sequence[NameEntry] = (),
    context_templates: Sequence[str] = ("{}",),
    inverse: SecondMomentInverse | None = None,
    settings: AnalysisSettings = AnalysisSettings(),
) -> dict:
    """Run the study on ``sweep_dir``; write ``analysis.json``, the vector and the plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_delta_set(sweep_dir)
    if lm is not None:
        check_same_model(lm, ds.model_identity, "the sweep", "load the sweep's model (--model).")
    clf = train_classifier(ds, seed=settings.seed)
    gv = make_gender_vector(ds, clf, settings.scale)
    vector_path = save_gender_vector(gv, out / "gender_vector.safetensors")
    dirs = candidate_directions(ds, seed=settings.seed)
    cosines = cosine_table(dirs.as_dict())
    erasure = erasure_check(ds, dirs, seed=settings.seed)
    table = directions_table(dirs, erasure)
    plots = [
        plot_delta_projection(ds, dirs["classifier"], out / "deltas_projection.png"),
        plot_weight_histogram(clf.weights, out / "classifier_weights.png"),
    ]
    result: dict = {
        "sweep": str(sweep_dir), "model_identity": ds.model_identity, "layer": ds.layer,
        "deltas": {"n": ds.n, "width": ds.width, "mean_norm": ds.mean_norm,
                   "class_counts": list(ds.class_counts)},
        "classifier": clf.to_json(),
        "vector": {"norm": float(gv.vector.norm()), "raw_norm": gv.raw_norm,
                   "scale_mode": gv.scale_mode, "scale": gv.scale, "file": vector_path.name},
        "cosines": cosines.to_json(), "erasure": [r.to_json() for r in erasure],
    }
    if lm is not None and heldout:
        result.update(_apply_to_heldout(lm, ds, dirs, gv.vector, heldout, context_templates,
                                        inverse, settings, table, out, plots))
    result["directions"] = table
    result["plots"] = [Path(p).name for p in plots]  # relative to out_dir: the report moves
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _apply_to_heldout(lm, ds, dirs, g, heldout, templates, inverse, settings, table, out, plots):
    applier = VectorApplier(lm, ds.layer, heldout, templates, inverse)
    norm = float(g.norm())
    res: dict = {"heldout": {"n": len(heldout), "baseline_accuracy": applier.baseline_accuracy()}}
    for mode in ("weights", "activations"):
        res[f"vector_{mode}"] = applier.flip_table(g, mode).to_dict()
        controls = control_tables(applier, norm, settings.n_random, mode)
        res[f"control_{mode}"] = {k: _mean_std(controls, k) for k in
                                  ("flip_f_to_m", "flip_m_to_f", "keep_m", "keep_f")}
    # Curves: every direction at the same norms, weight edits; random band at each scale.
    unit_dirs = {n: v.float() / v.float().norm() for n, v in dirs.as_dict().items()}
    curves, band, per_scale = [], [], {}
    for name, u in unit_dirs.items():
        tables = [applier.flip_table(u * s * ds.mean_norm) for s in settings.scales]
        per_scale[name] = [t.to_dict() for t in tables]
        curves.append(FlipCurve(name, settings.scales, tuple(flip_rate(t) for t in tables)))
    for s in settings.scales:
        band.append([flip_rate(t) for t in control_tables(applier, s * ds.mean_norm,
                                                          settings.n_random, "weights")])
    control = ControlBand(settings.scales, tuple(zip(*band)))
    plots.append(plot_flip_rates(curves, control, out / "flip_rate_vs_scale.png",
                                 title=f"held-out names, rank-one edits at layer {ds.layer}"))
    res["scale_curves"] = {"scales": list(settings.scales), "directions": per_scale,
                           "control_mean": control.mean.tolist(),
                           "control_std": control.std.tolist()}
    res["best_scale"] = _best_scale(per_scale["box"], settings)
    at_norm = {name: applier.flip_table(u * norm).to_dict() for name, u in unit_dirs.items()}
    for row in table:
        if row["direction"] in at_norm:
            row["at_vector_norm"] = at_norm[row["direction"]]
    names = [e.name for e in heldout[: settings.n_completions]]
    res["completions"] = completions(lm, applier, g, names)
    return res


def _best_scale(box_tables: Sequence[dict], settings: AnalysisSettings) -> dict | None:
    """The scale with the highest mean flip rate whose keep-rates both reach the threshold."""
    usable = [(s, t) for s, t in zip(settings.scales, box_tables)
              if min(t["keep_m"], t["keep_f"]) >= settings.keep_threshold]
    if not usable:
        return None
    s, t = max(usable, key=lambda st: (st[1]["flip_f_to_m"] + st[1]["flip_m_to_f"]) / 2)
    return {"scale": s, **t}
