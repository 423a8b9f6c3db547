"""What ``calibrate`` writes: the hparams file, the measured table (JSON + markdown) and a figure
of per-layer edit success next to the causal-trace effect (Hase et al. 2023 compare the two).

Files: ``OUT`` (reference-format hparams, loadable with ``--hparams``), and in the report
folder ``calibration.json`` (everything: grid, rule, table, trace, choice), ``calibration.md``
(the table, the rule, the choice or the trade-off, the efficacy/specificity frontier),
``calibration_layers.png`` and ``calibration_frontier.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from rome_edit.calibration.frontier import form_label, frontier_table, plot_frontier
from rome_edit.calibration.run import CalibrationResult
from rome_edit.storage import atomic_write_text

__all__ = ["write_report", "markdown_table", "plot_layers"]

COLUMNS = (("layer", "layer"), ("clamp_norm_factor", "clamp"), ("v_num_grad_steps", "steps"),
           ("v_loss_layer", "loss layer"), ("update", "update"), ("efficacy", "efficacy"),
           ("paraphrase", "paraphrase"), ("specificity_random", "spec. random"),
           ("specificity_same_last_token", "spec. same last token"),
           ("city_kept", "city kept"), ("fluency_after", "fluency"),
           ("mean_delta_over_v_orig", "‖δ‖/‖v‖"), ("seconds", "s"))


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(result: CalibrationResult) -> str:
    """One row per candidate; the chosen one in bold, ineligible ones marked ``✗``."""
    rows = [{**r, "update": form_label(r)} for r in result.rows]
    keys = [k for k, _ in COLUMNS if any(k in r for r in rows)]
    names = dict(COLUMNS)
    lines = ["| " + " | ".join(["", *[names[k] for k in keys]]) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for i, row in enumerate(rows):
        mark = "**→**" if i == result.choice.index else \
            ("" if i in result.choice.eligible else "✗")
        cells = [_cell(row.get(k)) for k in keys]
        if i == result.choice.index:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join([mark, *cells]) + " |")
    return "\n".join(lines)


def plot_layers(result: CalibrationResult, path: Path) -> Path:
    """Per layer: the trace's MLP effect at the last subject token (bars, every layer) and the
    measured edit efficacy (best over the grid, and best the rule allows; markers)."""
    fig = Figure(figsize=(6.4, 3.6), dpi=150)
    ax = fig.add_subplot()
    if result.trace is not None:
        table = result.trace.layer_table
        layers = [row["layer"] for row in table]
        ax.bar(layers, [row["mlp"] for row in table], alpha=0.45,
               color=["lightgrey" if row["excluded"] else "tab:green" for row in table],
               hatch=["//" if row["excluded"] else "" for row in table],
               label="causal trace: MLP effect at last subject token (grey: excluded)")
    else:  # nothing to draw for the trace; keep the measured layers on the axis
        layers = sorted({r["layer"] for r in result.rows})
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect (trace)")
    ax.set_xticks(layers)
    twin = ax.twinx()
    per_layer = result.per_layer()
    xs = [p["layer"] for p in per_layer]
    twin.plot(xs, [p["best_efficacy"] for p in per_layer], "o-", color="tab:blue",
              label="edit efficacy, best over grid")
    allowed = [(p["layer"], p["best_eligible_efficacy"]) for p in per_layer
               if p["best_eligible_efficacy"] is not None]
    if allowed:
        twin.plot(*zip(*allowed), "s--", color="tab:orange", markersize=7, zorder=3,
                  label="edit efficacy, best the rule allows")
    chosen = result.chosen
    twin.plot([chosen["layer"]], [chosen["efficacy"]], "*", color="black", markersize=14,
              label="chosen", zorder=1)
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("edit efficacy (success rate)")
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    twin.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, ncol=2,
                loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax.set_title(f"calibration: traced layer {result.traced_layer}, "
                 f"chosen layer {chosen['layer']}", fontsize=9)
    fig.savefig(path, bbox_inches="tight")  # the legend sits below the axes
    return path


def _markdown(result: CalibrationResult, hparams_path: Path) -> str:
    c = result.chosen
    rule = result.rule
    met = "met" if result.choice.rule_met else "NOT met by any candidate (trade-off below)"
    return "\n".join([
        f"# Calibration of {result.model_identity}",
        "",
        f"{len(result.subjects)} edits per candidate, {len(result.rows)} candidates, "
        f"{result.seconds:.0f} s. Traced layer {result.traced_layer} "
        + (f"({result.trace.n_cases} informative cases)." if result.trace is not None else
           "(no informative case: the reference's relative depth)."),
        "",
        f"Rule: random-name specificity ≥ {rule.min_specificity_random}, fluency ≥ "
        f"{1 - rule.fluency_tolerance:.2f} × unedited ({_cell(result.fluency_before)} bits), "
        "then the highest efficacy (ties: CounterFact score, same-last-token specificity, "
        f"city kept, fewer steps, smaller clamp, lower layer, plain before protected) — {met}.",
        "",
        f"**{result.choice.tradeoff[0].upper() + result.choice.tradeoff[1:]}**",
        "",
        f"Chosen: layer {c['layer']}, clamp_norm_factor {c['clamp_norm_factor']:g}, "
        f"v_num_grad_steps {c['v_num_grad_steps']}, v_loss_layer {c['v_loss_layer']}, update "
        f"{form_label(c)} → `{hparams_path}`"
        + ("" if c.get("protect_source") is None else
           " (the protection in its \"protect\" key, which `edit` and `sweep` read)") + ".",
        "",
        "## Measured frontier (efficacy vs random-name specificity)",
        "",
        frontier_table(result),
        "",
        "![efficacy against random-name specificity](calibration_frontier.png)",
        "",
        "## Every candidate",
        "",
        markdown_table(result),
        "",
        "![per-layer edit efficacy and causal-trace effect](calibration_layers.png)",
        "",
    ])


def write_report(result: CalibrationResult, hparams_path: str | Path,
                 report_dir: str | Path) -> dict[str, Path]:
    """Write the hparams file and the report; returns the paths written."""
    hparams_path, report_dir = Path(hparams_path), Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    hparams_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(hparams_path, json.dumps(result.hparams.to_dict(), indent=2) + "\n")
    paths = {"hparams": hparams_path,
             "json": report_dir / "calibration.json",
             "markdown": report_dir / "calibration.md",
             "figure": report_dir / "calibration_layers.png",
             "frontier": report_dir / "calibration_frontier.png"}
    atomic_write_text(paths["json"], json.dumps(result.to_json(), indent=1) + "\n")
    atomic_write_text(paths["markdown"], _markdown(result, hparams_path))
    plot_layers(result, paths["figure"])
    plot_frontier(result, paths["frontier"])
    return paths
