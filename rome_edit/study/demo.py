"""The whole experiment on the bundled model in one call: ``rome-edit demo``.

locate the edit layer → flip every recorded-edit name's gender (batched sweep) → classifier,
box vector and direction comparison on the deltas → apply to held-out names → a report
(``report.md`` with the figures inline, ``report.json`` with the numbers).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from rome_edit.api.analyze import AnalysisSettings
from rome_edit.api.editor import Editor
from rome_edit.evaluation.sweep import FLUENCY_TOKENS
from rome_edit.models.loading import load_model
from rome_edit.models.subject import fill
from rome_edit.study.experiment import analyze_gender
from rome_edit.study.knowledge import gender_accuracy
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.sweep import run_gender_sweep
from rome_edit.study.task import EDIT_PROMPT, gender_cases
from rome_edit.tracing.average import locate
from rome_edit.tracing.plots import plot_average

log = logging.getLogger(__name__)
# --quick: a subset, and statistics over 2,000 documents instead of the preset's count.
QUICK = {"n_locate": 20, "n_sweep": 80, "n_heldout": 40, "mom2_n_samples": 2000}
FULL = {"n_locate": 100, "n_sweep": None, "n_heldout": None, "mom2_n_samples": None}


def run_demo(out_dir: str | Path, quick: bool = False, model: str | None = None,
             seed: int = 0, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    sizes = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(model)
    names = load_names()
    edit_names = balanced_names([e for e in names if e.split == "edit"], sizes["n_sweep"])
    heldout = balanced_names([e for e in names if e.split == "heldout"], sizes["n_heldout"])
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    located = locate(lm, EDIT_PROMPT, gender_cases(balanced_names(edit_names, sizes["n_locate"])),
                     seed=seed, progress=progress)
    (out / "trace").mkdir(exist_ok=True)
    (out / "trace" / "trace.json").write_text(json.dumps(located.to_json(), indent=1))
    trace_plots = plot_average(located, out / "trace")
    seconds["locate"] = time.perf_counter() - t

    t = time.perf_counter()
    ed = Editor.from_loaded(lm, layer=located.recommended_layer, seed=seed, progress=progress)
    if sizes["mom2_n_samples"]:
        ed.hparams = replace(ed.hparams, mom2_n_samples=sizes["mom2_n_samples"])
    hp, templates, inverse = ed.hparams, ed.context_templates, ed.inverse
    seconds["stats_and_templates"] = time.perf_counter() - t

    t = time.perf_counter()
    sweep = run_gender_sweep(lm, edit_names, hp, templates, out / "sweep", inverse,
                             neighbour_names=names, progress=progress)
    seconds["sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    analysis = analyze_gender(out / "sweep", out / "analysis", lm, heldout, templates, inverse,
                              AnalysisSettings(seed=seed))
    seconds["analysis"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    report = build_report(lm, names, located, sweep, analysis, seconds, quick)
    report["generations"] = _example_generations(out / "sweep", sweep["prompt"])
    # paths relative to ``out``, so the report stays valid wherever the folder is moved
    report["plots"] = {"trace": [str(Path(p).relative_to(out)) for p in trace_plots],
                       "analysis": [f"analysis/{p}" for p in analysis["plots"]]}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(report, analysis, out))
    return report


def build_report(lm, names, located, sweep, analysis, seconds, quick) -> dict:
    vec, ctl = analysis["vector_weights"], analysis["control_weights"]
    return {
        "quick": quick,
        "model": {"identity": lm.identity, "attn_implementation": lm.attn_implementation,
                  "gender_accuracy": gender_accuracy(lm, names)},
        "trace": {"recommended_layer": located.recommended_layer,
                  "mlp_effect_at_last_subject_token": located.recommended_effect,
                  "n_cases": located.n_cases, "n_skipped": located.n_skipped},
        "sweep": {k: sweep.get(k) for k in ("n_edits", "layer", "efficacy", "paraphrase",
                                            "specificity", "city_kept", "fluency_before",
                                            "fluency_after", "seconds_per_edit",
                                            "mean_delta_norm")},
        "classifier": {k: analysis["classifier"][k] for k in ("test_accuracy",
                                                              "shuffled_test_accuracy")},
        "vector": {"norm": analysis["vector"]["norm"], "raw_norm": analysis["vector"]["raw_norm"],
                   "scale_mode": analysis["vector"]["scale_mode"],
                   **{k: vec[k] for k in ("flip_f_to_m", "flip_m_to_f", "keep_m", "keep_f")}},
        "control": {k: ctl[k]["mean"] for k in ("flip_f_to_m", "flip_m_to_f", "keep_m",
                                                "keep_f")},
        "activation_addition": {k: analysis["vector_activations"][k] for k in
                                ("flip_f_to_m", "flip_m_to_f", "keep_m", "keep_f")},
        "best_scale": analysis.get("best_scale"),
        "heldout": analysis["heldout"],
        "seconds": seconds,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fluency_lines(sweep: dict, examples: list[dict]) -> list[str]:
    if sweep.get("fluency_after") is None:
        return []
    lines = [f"Fluency (n-gram entropy of {FLUENCY_TOKENS}-token greedy generations, sampled "
             f"names): {sweep['fluency_before']:.2f} bits before, {sweep['fluency_after']:.2f} "
             "after.",
             "", "```"]
    for ex in examples:
        lines += [f"[before] {ex['prompt']}{ex['before']}", f"[after]  {ex['prompt']}{ex['after']}"]
    return [*lines, "```", ""]


def _example_generations(sweep_dir: Path, prompt: str, n: int = 3) -> list[dict]:
    """Before/after generations of the first ``n`` sampled names, as in the source document."""
    examples = []
    for line in (sweep_dir / "records.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("generation_after") is not None:
            examples.append({"prompt": fill(prompt, row["subject"]),
                             "before": row["generation_before"],
                             "after": row["generation_after"]})
            if len(examples) == n:
                break
    return examples


def render_markdown(report: dict, analysis: dict, out: Path) -> str:
    r = report
    lines = [
        "# rome-edit demo: gender vectors in ROME's value space", "",
        f"Model `{r['model']['identity']}` ({r['model']['attn_implementation']} attention): "
        f"gender accuracy {_pct(r['model']['gender_accuracy'])} on `Name: X. Gender:`."
        + (" (quick run: a subset)" if r["quick"] else ""), "",
        "## 1. Where is the fact stored?", "",
        f"Averaged causal trace over {r['trace']['n_cases']} names ({r['trace']['n_skipped']} "
        f"skipped). Recommended edit layer: **{r['trace']['recommended_layer']}** (MLP indirect "
        f"effect at the last subject token {r['trace']['mlp_effect_at_last_subject_token']:.3f}).",
        "",
    ]
    lines += [f"![{Path(p).stem}]({p})" for p in r["plots"]["trace"]]
    s = r["sweep"]
    lines += [
        "", "## 2. Flip every name's gender (ROME)", "",
        f"{s['n_edits']} edits at layer {s['layer']}: efficacy {_pct(s['efficacy'])}, "
        f"paraphrase {_pct(s['paraphrase'])}, specificity {_pct(s['specificity'])}, city kept "
        f"{_pct(s['city_kept'])}; {s['seconds_per_edit']:.3f} s per edit; mean ‖δ‖ "
        f"{s['mean_delta_norm']:.1f}.", "",
        *_fluency_lines(s, r.get("generations", [])),
        "## 3. A linear classifier on the deltas", "",
        f"Test accuracy {_pct(r['classifier']['test_accuracy'])} (shuffled labels "
        f"{_pct(r['classifier']['shuffled_test_accuracy'])}).", "",
        "## 4. The bounded gender vector on held-out names", "",
        f"‖g‖ = {r['vector']['norm']:.1f} (raw box vector {r['vector']['raw_norm']:.1f}, scale "
        f"{r['vector']['scale_mode']}). Rank-one weight edits on {r['heldout']['n']} held-out "
        "names:", "",
        "| vector | F→M flipped (+g) | M kept (+g) | M→F flipped (−g) | F kept (−g) |",
        "|---|---|---|---|---|",
    ]
    for label, row in (("box vector g", r["vector"]), ("random, same norm", r["control"]),
                       ("g as activation addition", r["activation_addition"])):
        lines.append(f"| {label} | {_pct(row['flip_f_to_m'])} | {_pct(row['keep_m'])} | "
                     f"{_pct(row['flip_m_to_f'])} | {_pct(row['keep_f'])} |")
    if r.get("best_scale"):
        b = r["best_scale"]
        lines += ["", f"Best scale with both keep-rates ≥ 95%: {b['scale']}× mean ‖δ‖ — F→M "
                  f"{_pct(b['flip_f_to_m'])}, M→F {_pct(b['flip_m_to_f'])}."]
    lines += ["", "Completions before/after writing `v_orig ± g`:", "", "```"]
    for c in analysis.get("completions", []):
        lines.append(f"[{c['vector']}] {c['prompt']}{c['before']}")
        lines.append(f"     → {c['prompt']}{c['after']}")
    lines += ["```", "", "## 5. Which direction carries the concept?", "",
              "| direction | cos with box | F→M | M→F | probe accuracy after erasing it |",
              "|---|---|---|---|---|"]
    for row in analysis["directions"]:
        at = row.get("at_vector_norm", {})
        lines.append(f"| {row['direction']} | {row['cosine_with_box']:.3f} | "
                     f"{_pct(at.get('flip_f_to_m'))} | {_pct(at.get('flip_m_to_f'))} | "
                     f"{_pct(row.get('probe_accuracy_after_erasure'))} |")
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in r["plots"]["analysis"]]
    lines += ["", f"Total time {r['seconds']['total']:.0f} s "
              + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items() if k != "total"), ""]
    return "\n".join(lines)
