"""The measured trade-off between edit efficacy and random-name specificity.

Every candidate is a point (efficacy, random-name specificity); the Pareto front
(:func:`rome_edit.calibration.choose.pareto_front`) holds the candidates no other beats on both.
When no candidate meets the rule, the front is what a user chooses from; the report shows it as
a table and a figure (``calibration_frontier.png``), plain ROME and protected updates marked
apart.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from rome_edit.calibration.run import CalibrationResult

__all__ = ["form_label", "frontier_table", "plot_frontier"]


def form_label(row: dict) -> str:
    """``plain`` or the protection, e.g. ``other-names soft w=0.01``."""
    if row.get("protect_source") is None:
        return "plain"
    weight = "" if row.get("protect_weight") is None else f" w={row['protect_weight']:g}"
    return f"{row['protect_source']} {row['protect_form']}{weight}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def frontier_table(result: CalibrationResult) -> str:
    """The Pareto-front candidates, by ascending specificity (markdown)."""
    lines = ["| | layer | clamp | steps | update | efficacy | spec. random | "
             "spec. same last token | paraphrase | fluency |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i in result.choice.frontier:
        r = result.rows[i]
        mark = "**→**" if i == result.choice.index else ""
        lines.append(f"| {mark} | {r['layer']} | {r['clamp_norm_factor']:g} | "
                     f"{r['v_num_grad_steps']} | {form_label(r)} | {_pct(r['efficacy'])} | "
                     f"{_pct(r.get('specificity_random'))} | "
                     f"{_pct(r.get('specificity_same_last_token'))} | "
                     f"{_pct(r.get('paraphrase'))} | "
                     + ("–" if r.get("fluency_after") is None else f"{r['fluency_after']:.3f}")
                     + " |")
    return "\n".join(lines)


def plot_frontier(result: CalibrationResult, path: Path) -> Path:
    """Efficacy against random-name specificity of every candidate (hollow: fluency lost), the
    front as a line, the rule's specificity floor and the chosen candidate."""
    fig = Figure(figsize=(6.4, 4.2), dpi=150)
    ax = fig.add_subplot()

    def spec(r: dict) -> float:
        return 1.0 if r.get("specificity_random") is None else r["specificity_random"]

    for protected, marker, colour, name in ((False, "o", "tab:blue", "plain ROME"),
                                            (True, "^", "tab:green", "protected update")):
        group = [r for r in result.rows if (r.get("protect_source") is not None) == protected]
        for kept in (True, False):  # hollow: fails the rule's fluency floor (not an option)
            rows = [r for r in group if result.rule.fluency_kept(r) == kept]
            if rows:
                ax.scatter([spec(r) for r in rows], [r["efficacy"] for r in rows], marker=marker,
                           alpha=0.7, facecolors=colour if kept else "none", edgecolors=colour,
                           label=name + ("" if kept else ", fluency lost"))
    front = [result.rows[i] for i in result.choice.frontier]
    ax.plot([spec(r) for r in front], [r["efficacy"] for r in front], "-", color="grey",
            zorder=1, label="Pareto front")
    ax.axvline(result.rule.min_specificity_random, color="tab:red", linestyle="--",
               label=f"rule: specificity ≥ {result.rule.min_specificity_random:g}")
    c = result.chosen
    ax.plot([spec(c)], [c["efficacy"]], "*", color="black", markersize=15, zorder=3,
            label="chosen" + ("" if result.choice.rule_met else " (trade-off)"))
    ax.set_xlabel("random-name specificity")
    ax.set_ylabel("efficacy")
    ax.set_title(f"{len(result.rows)} candidates, {len(result.subjects)} edits each",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    return path
