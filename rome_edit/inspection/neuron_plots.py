"""Figures of neuron importance in Helm-Burger's (2022, LessWrong) orientation (layers top to
bottom, tokens left to right): every neuron (``neurons_all.png``: one band of ``d_mlp`` rows per
layer) and the per-layer mean (``neurons_mean.png``, his "mean layer importances"), plus the
same mean image for the gradient × Δactivation attribution for comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from rome_edit.inspection.lens_plots import layer_token_heatmap
from rome_edit.inspection.neurons import NeuronTrace

__all__ = ["plot_neurons"]


def _labels(trace: NeuronTrace) -> list[str]:
    return [tok + ("*" if trace.subject_start <= i < trace.subject_end else "")
            for i, tok in enumerate(trace.tokens)]


def plot_neurons(trace: NeuronTrace, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(trace)
    head = (f"after corrupting {trace.subject!r}; answer {trace.answer!r}: p_clean "
            f"{trace.p_clean:.3f}, p_corrupt {trace.p_corrupt:.3f}")
    paths = [
        layer_token_heatmap(trace.layer_means, labels, out_dir / "neurons_mean.png",
                            title=f"Mean indirect effect over the {trace.effects.shape[-1]} "
                                  f"neurons of each layer\n{head}",
                            colour_label="mean IE per neuron", cmap="RdBu_r", diverging=True),
        layer_token_heatmap(trace.attribution.mean(-1), labels,
                            out_dir / "neurons_mean_attribution.png",
                            title=f"Mean gradient × Δactivation per layer\n{head}",
                            colour_label="mean attribution per neuron", cmap="RdBu_r",
                            diverging=True),
        _all_neurons(trace, labels, out_dir / "neurons_all.png", head),
    ]
    return paths


def _all_neurons(trace: NeuronTrace, labels: list[str], path: Path, head: str) -> Path:
    """Rows: layer 0's neurons, then layer 1's, …; a line between layers."""
    n_layers, n_tokens, d_mlp = trace.effects.shape
    grid = trace.effects.permute(0, 2, 1).reshape(n_layers * d_mlp, n_tokens).numpy()
    bound = max(float(np.abs(grid).max()), 1e-9)
    fig = Figure(figsize=(2.2 + 0.75 * max(n_tokens, 6), 7.5), dpi=150)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(grid, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.invert_yaxis()
    for layer in range(1, n_layers):
        ax.axhline(layer * d_mlp, color="k", linewidth=0.6)
    ax.set_yticks((np.arange(n_layers) + 0.5) * d_mlp,
                  labels=[f"layer {i}" for i in range(n_layers)], fontsize=8)
    ax.set_xticks(np.arange(n_tokens) + 0.5, labels=[repr(t)[1:-1] for t in labels],
                  fontsize=8, rotation=45, ha="right")
    ax.set_title(f"Indirect effect of each MLP neuron ({d_mlp} per layer)\n{head}", fontsize=9)
    fig.colorbar(mesh, ax=ax).set_label("p(restored) − p(corrupted)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
