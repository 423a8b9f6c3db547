"""A logistic-regression classifier that tells label-1 from label-0 edit deltas (the study:
female→male from male→female).

Xodarap 2023: "I randomly separate 30% of δ's into a test set and train a linear classifier on the
remaining 70%. This classifier has 100% accuracy on the test set."  Here the split is stratified
and seeded, and a shuffled-label control (same split, labels permuted with the same seed) shows
what accuracy chance alone reaches; a k-fold variant gives a spread.

Standardisation (``standardize``): by default (``"per-coordinate"``) the classifier is fitted on
standardised coordinates (mean 0, variance 1 per coordinate, statistics of the training rows
only) because delta coordinates differ widely in scale (Roger 2022: a few very large features),
and lbfgs converges slowly and the L2 penalty acts unevenly on unscaled inputs.  ``"global"``
centres and divides by one scalar (the root mean squared coordinate), which keeps the isotropic
geometry of raw deltas (an L2 penalty that treats every direction alike, as INLP's probes do)
while fixing the overall scale; ``"none"`` fits raw values.  The scaler is always folded into
the weights, ``w_raw = w / σ`` and ``b_raw = b − Σ μ·w / σ``, so every result here is a linear
function of *raw* delta coordinates — what the box vector and the direction analysis need.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import Tensor

from rome_edit.analysis.errors import DEFAULT_CLASSES, DeltaSetError, require_both_classes

log = logging.getLogger(__name__)

Standardize = Literal["per-coordinate", "global", "none"]
STANDARDIZE_MODES = ("per-coordinate", "global", "none")


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """``p(label 1 | δ) = σ(δ·weights + bias)`` in raw delta coordinates."""

    weights: Tensor  # (d,) float64
    bias: float

    def decision(self, x: Tensor) -> Tensor:
        """The logit for each row of ``x`` (n, d)."""
        return x.to(torch.float64) @ self.weights + self.bias

    def predict(self, x: Tensor) -> Tensor:
        return (self.decision(x) > 0).to(torch.int64)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y).to(torch.float64).mean())

    @property
    def direction(self) -> Tensor:
        """The unit weight vector (the direction the classifier reads)."""
        return self.weights / self.weights.norm()


@dataclass(frozen=True, eq=False)
class ClassifierResult:
    """A classifier on one 70/30 split, with its shuffled-label control."""

    train_accuracy: float
    test_accuracy: float
    shuffled_test_accuracy: float
    weights: Tensor  # (d,) in raw delta coordinates, scaler folded in
    bias: float
    seed: int
    n_train: int
    n_test: int
    C: float
    standardize: str

    @property
    def probe(self) -> LinearProbe:
        return LinearProbe(self.weights, self.bias)

    def to_json(self) -> dict:
        """The scalar fields (the weights are saved separately as a tensor)."""
        return {k: getattr(self, k) for k in (
            "train_accuracy", "test_accuracy", "shuffled_test_accuracy", "bias", "seed",
            "n_train", "n_test", "C", "standardize")} | {"weight_norm": float(self.weights.norm())}


@dataclass(frozen=True)
class KFoldResult:
    """Stratified k-fold test accuracies, with a shuffled-label control per fold."""

    k: int
    seed: int
    test_accuracies: tuple[float, ...]
    shuffled_test_accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.test_accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.test_accuracies))

    @property
    def shuffled_mean(self) -> float:
        return float(np.mean(self.shuffled_test_accuracies))


def split_indices(labels: Tensor, seed: int = 0, test_size: float = 0.3
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, test) row indices."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    y = labels.numpy()
    n_test = int(np.ceil(test_size * len(y)))
    if min(np.bincount(y, minlength=2)) < 2 or n_test < 2 or len(y) - n_test < 2:
        raise DeltaSetError(
            f"{len(y)} deltas with class counts {np.bincount(y, minlength=2).tolist()} are too "
            f"few for a stratified split with test_size={test_size}; record more edits."
        )
    train, test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y,
                                   random_state=seed)
    return np.sort(train), np.sort(test)


def fit_linear_probe(x: Tensor, y: Tensor, *, C: float = 1.0, seed: int = 0,
                     standardize: Standardize = "per-coordinate", max_iter: int = 2000
                     ) -> LinearProbe:
    """Fit L2-regularised logistic regression; return it in raw coordinates (scaler folded)."""
    if standardize not in STANDARDIZE_MODES:
        raise ValueError(f"standardize {standardize!r} is not one of {STANDARDIZE_MODES}.")
    xs = x.detach().to(torch.float64).cpu().numpy()
    ys = y.detach().cpu().numpy()
    if len(np.unique(ys)) < 2:
        raise DeltaSetError("the training rows hold only one class; a classifier needs deltas "
                            "of both labels.")
    d = xs.shape[1]
    mu = xs.mean(axis=0) if standardize != "none" else np.zeros(d)
    if standardize == "per-coordinate":
        sigma = xs.std(axis=0)
    elif standardize == "global":
        sigma = np.full(d, np.sqrt(np.mean((xs - mu) ** 2)))
    else:
        sigma = np.ones(d)
    sigma = np.where(sigma > 0, sigma, 1.0)  # a constant coordinate carries no signal
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit((xs - mu) / sigma, ys)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("logistic regression did not converge in %d iterations", max_iter)
    w_raw = model.coef_[0] / sigma
    b_raw = float(model.intercept_[0] - mu @ w_raw)
    return LinearProbe(torch.from_numpy(w_raw.copy()), b_raw)


def shuffled_labels(labels: Tensor, seed: int) -> Tensor:
    """The labels permuted with ``seed`` (the chance-level control)."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    return labels[torch.from_numpy(perm)]


def train_classifier(x: Tensor, y: Tensor, *, seed: int = 0, test_size: float = 0.3,
                     C: float = 1.0, standardize: Standardize = "per-coordinate",
                     classes: Sequence[str] = DEFAULT_CLASSES) -> ClassifierResult:
    """Train on a stratified seeded split; report test accuracy and the shuffled-label control.

    ``x``: ``(n, d)`` deltas; ``y``: ``(n,)`` int64 labels in {0, 1} (``classes`` names them in
    error messages).  ``DeltaSet.probe()`` calls this on its rows."""
    require_both_classes(y, classes=classes)
    train, test = split_indices(y, seed, test_size)
    probe = fit_linear_probe(x[train], y[train], C=C, seed=seed, standardize=standardize)
    y_shuf = shuffled_labels(y, seed)
    shuffled_probe = (fit_linear_probe(x[train], y_shuf[train], C=C, seed=seed,
                                       standardize=standardize)
                      if len(torch.unique(y_shuf[train])) == 2 else None)
    shuffled_acc = (shuffled_probe.accuracy(x[test], y_shuf[test]) if shuffled_probe is not None
                    else float((y_shuf[test] == y_shuf[train][0]).double().mean()))
    result = ClassifierResult(
        train_accuracy=probe.accuracy(x[train], y[train]),
        test_accuracy=probe.accuracy(x[test], y[test]),
        shuffled_test_accuracy=shuffled_acc,
        weights=probe.weights, bias=probe.bias, seed=seed, n_train=len(train), n_test=len(test),
        C=C, standardize=standardize,
    )
    log.info("classifier: test accuracy %.3f (shuffled labels %.3f), n_train=%d n_test=%d",
             result.test_accuracy, result.shuffled_test_accuracy, len(train), len(test))
    return result


def cross_validate(x: Tensor, y: Tensor, *, k: int = 5, seed: int = 0, C: float = 1.0,
                   standardize: Standardize = "per-coordinate",
                   classes: Sequence[str] = DEFAULT_CLASSES) -> KFoldResult:
    """Stratified k-fold test accuracies (and the shuffled-label control on the same folds).

    ``x``: ``(n, d)`` deltas; ``y``: ``(n,)`` int64 labels in {0, 1}."""
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}.")
    require_both_classes(y, min_per_class=k, classes=classes)
    y_shuf = shuffled_labels(y, seed)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    accs, shuf = [], []
    for train, test in folds.split(np.zeros(len(y)), y.numpy()):
        accs.append(fit_linear_probe(x[train], y[train], C=C, seed=seed,
                                     standardize=standardize).accuracy(x[test], y[test]))
        if len(torch.unique(y_shuf[train])) == 2:
            shuf.append(fit_linear_probe(x[train], y_shuf[train], C=C, seed=seed,
                                         standardize=standardize).accuracy(x[test], y_shuf[test]))
        else:
            shuf.append(float((y_shuf[test] == y_shuf[train][0]).double().mean()))
    return KFoldResult(k, seed, tuple(accs), tuple(shuf))
