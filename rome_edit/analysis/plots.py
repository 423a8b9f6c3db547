"""Figures of the delta analysis, written as PNG files.

- :func:`plot_delta_projection`: the deltas on the two most informative axes — a concept direction
  (by default the classifier's) and the top principal component of what is left once that
  direction is removed — coloured by edit direction (Roger 2022 shows such planes).
- :func:`plot_weight_histogram`: the classifier's weights in raw delta coordinates.
- :func:`plot_flip_rates`: flip rate vs scale for each direction, over the band of random
  directions of the same norm (the rates themselves come from the editor-side code).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display,
and no change to the caller's backend, so notebooks keep theirs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from rome_edit.analysis.errors import DEFAULT_CLASSES
from rome_edit.analysis.rlace import project_out

log = logging.getLogger(__name__)

CLASS_COLOURS = {1: "tab:blue", 0: "tab:orange"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    log.info("wrote %s", path)
    return path


def projection_axes(x: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)``: the unit ``direction`` and the top principal axis of ``x`` orthogonal to it."""
    a = direction.detach().to(torch.float64).cpu()
    a = a / a.norm()
    xc = x.detach().to(torch.float64).cpu()
    xc = xc - xc.mean(dim=0)
    resid = project_out(xc, a)
    _, _, vh = torch.linalg.svd(resid, full_matrices=False)
    b = vh[0] - (vh[0] @ a) * a  # already orthogonal up to rounding; make it exact
    return a, b / b.norm()


def plot_delta_projection(x: Tensor, y: Tensor, direction: Tensor, path: str | Path, *,
                          direction_name: str = "classifier direction",
                          classes: Sequence[str] = DEFAULT_CLASSES, layer: int | None = None
                          ) -> Path:
    """Scatter the deltas ``x`` ``(n, d)`` on ``direction`` × the top residual principal
    component, coloured by the labels ``y`` ``(n,)`` (named by ``classes``; ``layer`` goes in
    the title)."""
    width = x.shape[1]
    if direction.numel() != width:
        raise ValueError(f"direction has width {direction.numel()}, deltas {width}; pass a "
                         "direction fitted on these deltas.")
    a, b = projection_axes(x, direction)
    x64 = x.to(torch.float64)
    pa, pb = (x64 @ a).numpy(), (x64 @ b).numpy()
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for label, colour in CLASS_COLOURS.items():
        m = (y == label).numpy()
        ax.scatter(pa[m], pb[m], s=10, alpha=0.6, c=colour,
                   label=f"{classes[label]} (n={int(m.sum())})")
    ax.set_xlabel(f"projection on the {direction_name}")
    ax.set_ylabel("top principal component of the residual")
    ax.set_title("Edit deltas" if layer is None else f"Edit deltas, layer {layer}")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_weight_histogram(weights: Tensor, path: str | Path, *, bins: int = 50) -> Path:
    """Histogram of the classifier weights (raw delta coordinates)."""
    w = weights.detach().to(torch.float64).cpu().numpy()
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(w, bins=bins, color="tab:gray")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("classifier weight (raw delta coordinate)")
    ax.set_ylabel("number of coordinates")
    ax.set_title(f"{len(w)} weights; {np.mean(w > 0):.0%} positive, max |w| {np.abs(w).max():.3g}")
    return _save(fig, path)


def _check_rates(name: str, scales: Sequence[float], rates: np.ndarray) -> None:
    if rates.shape[-1] != len(scales) or len(scales) == 0:
        raise ValueError(f"{name}: {rates.shape[-1]} rates for {len(scales)} scales; give one "
                         "rate per scale.")
    if not np.isfinite(rates).all() or rates.min() < 0 or rates.max() > 1:
        raise ValueError(f"{name}: flip rates must be finite fractions in [0, 1].")


@dataclass(frozen=True)
class FlipCurve:
    """Flip rate of one direction at each scale (scales as multiples of the mean delta norm)."""

    name: str
    scales: tuple[float, ...]
    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_rates(self.name, self.scales, np.asarray(self.rates, dtype=float))


@dataclass(frozen=True)
class ControlBand:
    """Flip rates of random directions of the same norm: one row of rates per random seed."""

    scales: tuple[float, ...]
    rates_per_seed: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        rates = np.asarray(self.rates_per_seed, dtype=float)
        if rates.ndim != 2 or rates.shape[0] == 0:
            raise ValueError("rates_per_seed must be a non-empty (n_seeds, n_scales) table.")
        _check_rates("random control", self.scales, rates)

    @property
    def mean(self) -> np.ndarray:
        return np.mean(self.rates_per_seed, axis=0)

    @property
    def std(self) -> np.ndarray:
        return np.std(self.rates_per_seed, axis=0)


def plot_flip_rates(curves: Sequence[FlipCurve], control: ControlBand | None, path: str | Path, *,
                    ylabel: str = "flip rate (held-out subjects)", title: str = "") -> Path:
    """Flip rate vs scale for each direction; the control is its mean ± 1 std over seeds."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    if control is not None:
        lo = np.clip(control.mean - control.std, 0, 1)
        hi = np.clip(control.mean + control.std, 0, 1)
        n_seeds = len(control.rates_per_seed)
        ax.fill_between(control.scales, lo, hi, color="gray", alpha=0.3,
                        label=f"random directions, mean ± std ({n_seeds} seeds)")
        ax.plot(control.scales, control.mean, color="gray", ls="--", lw=1)
    for curve in curves:
        ax.plot(curve.scales, curve.rates, marker="o", ms=3, label=curve.name)
    ax.set_xlabel("scale (× mean delta norm)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
