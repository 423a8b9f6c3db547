"""Figures of the logit lens and of neuron importance in Helm-Burger's (2022, LessWrong)
orientation: layers top to bottom, tokens left to right.  Drawn on ``matplotlib.figure.Figure``
objects (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from rome_edit.inspection.lens import LensComparison, LensResult

__all__ = ["layer_token_heatmap", "plot_lens", "plot_lens_comparison"]


def _label(token: str) -> str:
    return repr(token)[1:-1]


def layer_token_heatmap(
    values: torch.Tensor, tokens: Sequence[str], path: Path, *, title: str, colour_label: str,
    cmap: str = "Blues", text: Sequence[Sequence[str]] | None = None, diverging: bool = False,
    marks: Sequence[tuple[int, int]] = (), row_labels: Sequence[str] | None = None,
    ylabel: str = "layer (block output)",
) -> Path:
    """One ``(n_layers, T)`` image, layer 0 in the top row; optional text in each cell and
    outlined cells ``(layer, position)``."""
    grid = values.double().numpy()
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(2.2 + 0.75 * max(n_cols, 6), 1.3 + 0.42 * max(n_rows, 4)), dpi=150)
    ax = fig.add_subplot()
    if diverging:
        bound = max(float(np.nanmax(np.abs(grid))) if grid.size else 0.0, 1e-6)
        vmin, vmax = -bound, bound
    else:
        vmin, vmax = 0.0, max(float(np.nanmax(grid)) if grid.size else 0.0, 1e-6)
    mesh = ax.pcolormesh(grid, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.invert_yaxis()  # layer 0 at the top (Helm-Burger 2022)
    ax.set_xticks(np.arange(n_cols) + 0.5, labels=[_label(t) for t in tokens], fontsize=8,
                  rotation=45, ha="right")
    labels = row_labels if row_labels is not None else [str(i) for i in range(n_rows)]
    ax.set_yticks(np.arange(n_rows) + 0.5, labels=list(labels), fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    if text is not None:
        for r in range(n_rows):
            for c in range(n_cols):
                shade = (grid[r, c] - vmin) / (vmax - vmin) if vmax > vmin else 0.0
                ax.text(c + 0.5, r + 0.5, _label(text[r][c])[:8], ha="center", va="center",
                        fontsize=6.5, color="white" if abs(shade) > 0.6 else "black")
    for r, c in marks:
        ax.add_patch(_outline(c, r))
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(mesh, ax=ax)
    bar.set_label(colour_label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _outline(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, fill=False, edgecolor="red", linewidth=2)


def _rows(result: LensResult) -> list[str]:
    rows = [str(layer) for layer in result.layers]
    rows[-1] += " (output)"
    return rows


def plot_lens(result: LensResult, out_dir: Path, stem: str = "lens") -> list[Path]:
    """``<stem>_top.png`` (top-1 probability, top token written in) and one
    ``<stem>_target<i>.png`` per target (its probability, top token written in)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [layer_token_heatmap(
        result.top_prob, result.tokens, out_dir / f"{stem}_top.png",
        title=f"Logit lens: top-1 next token\n{result.prompt!r}",
        colour_label="top-1 probability", text=result.top_token, row_labels=_rows(result))]
    for i, (target, prob) in enumerate(result.target_prob.items()):
        first = result.first_top1(target)
        marks = [(result.layers.index(first), len(result.tokens) - 1)] if first is not None \
            else []
        paths.append(layer_token_heatmap(
            prob, result.tokens, out_dir / f"{stem}_target{i}.png",
            title=f"Logit lens: p({target!r}); outlined: first layer of its top-1 run "
                  f"at the last token\n{result.prompt!r}",
            colour_label=f"p({target!r})", cmap="Greens", text=result.top_token, marks=marks,
            row_labels=_rows(result)))
    return paths


def plot_lens_comparison(comparison: LensComparison, out_dir: Path) -> list[Path]:
    """Before and after lenses and, per target, the difference ``p_after − p_before``
    (``lens_diff_target<i>.png``) with the layer where the target first wins outlined."""
    paths = plot_lens(comparison.before, out_dir, "lens_before")
    paths += plot_lens(comparison.after, out_dir, "lens_after")
    after = comparison.after
    targets = list(after.target_prob)
    for i, target in enumerate(targets):
        others = [t for t in targets if t != target]
        if others:  # where it first beats another target that used to win there
            flips = [f for f in (comparison.first_flip(target, o) for o in others)
                     if f is not None]
            first, what = (min(flips) if flips else None), "first layer where it flips"
        else:
            first, what = after.first_top1(target), "first layer of its top-1 run after"
        marks = [(after.layers.index(first), len(after.tokens) - 1)] if first is not None \
            else []
        paths.append(layer_token_heatmap(
            comparison.difference(target), after.tokens, out_dir / f"lens_diff_target{i}.png",
            title=f"p({target!r}) after − before ({comparison.description})\noutlined: {what}"
                  "; text: top token after", colour_label="Δ probability", cmap="RdBu_r",
            diverging=True, text=after.top_token, marks=marks, row_labels=_rows(after)))
    return paths
