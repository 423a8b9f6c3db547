"""Figures of causal traces, after Meng et al. (2022), Figures 1 and 2.

One heatmap per kind (tokens or roles × layers; hidden states purple, MLP green, attention red,
as in the paper), the colour the indirect effect ``p_restored − p_corrupt``, subject tokens
marked with ``*``; and, for an average, a line plot of each kind's effect at the last subject
token per layer with the recommended layer marked.  Figures are drawn on
``matplotlib.figure.Figure`` objects (the Agg canvas), so no pyplot state or display is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rome_edit.tracing.average import LAST_SUBJECT, ROLES, LocateResult
from rome_edit.tracing.trace import TraceResult

COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
LINE_COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
STATE = {"hidden": "single restored layer", "mlp": "restored MLP", "attn": "restored attention"}


def _xlabel(kind: str, window: int) -> str:
    if kind == "hidden" or window == 1:
        return f"{STATE[kind]} output at layer"
    return f"centre of {window} {STATE[kind]} layers"


def heatmap(
    grid: torch.Tensor, row_labels: Sequence[str], kind: str, title: str, xlabel: str,
    path: Path,
) -> Path:
    """Save one tokens × layers heatmap of indirect effects; NaN cells are left blank."""
    values = np.ma.masked_invalid(grid.double().numpy())
    n_rows, n_layers = values.shape
    fig = Figure(figsize=(2.5 + 0.3 * max(n_layers, 8), 1.4 + 0.3 * n_rows), dpi=150)
    ax = fig.add_subplot()
    # As in the paper the scale starts at p_corrupt (effect 0): negative effects show white.
    vmin = 0.0
    vmax = max(float(values.max()) if values.count() else 0.0, 1e-6)
    mesh = ax.pcolormesh(values, cmap=COLOURS.get(kind, "Greys"), vmin=vmin, vmax=vmax)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(n_rows) + 0.5, labels=list(row_labels), fontsize=8)
    step = max(1, n_layers // 14)
    ticks = np.arange(0, n_layers, step)
    ax.set_xticks(ticks + 0.5, labels=[str(t) for t in ticks], fontsize=8)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(mesh, ax=ax)
    bar.set_label("indirect effect  p(restored) − p(corrupted)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_trace(result: TraceResult, out_dir: str | Path) -> list[Path]:
    """``trace_<kind>.png`` for each kind of a single-prompt trace."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [repr(tok)[1:-1] + ("*" if result.subject_start <= i < result.subject_end else "")
              for i, tok in enumerate(result.tokens)]
    paths = []
    for kind, grid in result.effects.items():
        title = (f"Restoring {kind} after corrupting {result.subject!r}\n"
                 f"answer {result.answer!r}: p_clean {result.p_clean:.3f}, "
                 f"p_corrupt {result.p_corrupt:.3f}")
        paths.append(heatmap(grid, labels, kind, title, _xlabel(kind, result.window),
                             out_dir / f"trace_{kind}.png"))
    return paths


def plot_average(result: LocateResult, out_dir: str | Path) -> list[Path]:
    """``average_<kind>.png`` per kind and ``last_subject_by_layer.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [f"{role}*" if "subject" in role else role for role in ROLES]
    paths = []
    for kind, grid in result.effects.items():
        title = (f"Average indirect effect of {kind}\nover {result.n_cases} prompts "
                 f"{result.template!r}")
        paths.append(heatmap(grid, labels, kind, title, _xlabel(kind, result.window),
                             out_dir / f"average_{kind}.png"))
    paths.append(plot_last_subject(result, out_dir / "last_subject_by_layer.png"))
    return paths


def plot_last_subject(result: LocateResult, path: Path) -> Path:
    """Each kind's averaged effect at the last subject token, per layer."""
    fig = Figure(figsize=(6, 3.6), dpi=150)
    ax = fig.add_subplot()
    for kind, grid in result.effects.items():
        ax.plot(grid[LAST_SUBJECT].numpy(), marker="o", color=LINE_COLOURS.get(kind),
                label=kind if kind == "hidden" or result.window == 1
                else f"{kind} (window {result.window})")
    for layer in result.excluded_layers:
        ax.axvspan(layer - 0.5, layer + 0.5, color="0.85", zorder=0)
    ax.axvline(result.recommended_layer, color="k", linestyle="--", linewidth=1,
               label=f"recommended layer {result.recommended_layer}")
    ax.axhline(0, color="0.5", linewidth=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (grey: excluded from the recommendation)", fontsize=9)
    ax.set_ylabel("indirect effect at last subject token", fontsize=9)
    ax.set_title(f"Average over {result.n_cases} prompts", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
