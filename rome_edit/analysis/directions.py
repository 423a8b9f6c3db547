"""Which direction in delta space carries the concept (Roger 2022; Belrose et al. 2023)?

Candidate unit directions, all fitted on the *training* rows of one stratified seeded split:

- ``box``: the source's box-optimised vector (``box_vector.py``), normalised;
- ``classifier``: the logistic-regression weight direction (raw coordinates, ``classifier.py``);
- ``mean-difference``: mean F→M delta minus mean M→F delta;
- ``inlp``: the first INLP direction (``inlp.py``; raw-coordinate probe as in the paper);
- ``rlace``: the rank-1 R-LACE direction (``rlace.py``);
- ``leace``: the direction LEACE (Belrose et al. 2023, arXiv 2306.03819) moves points along.
  For a binary concept the eraser is ``x ↦ x − a bᵀ(x − μ)`` with ``a = Σ^{1/2}u``,
  ``b = Σ^{−1/2}u`` and ``u ∝ Σ^{−1/2} Cov(x, z)`` (``concept_erasure`` stores ``a``/``b`` as
  ``proj_left``/``proj_right``).  We take ``a`` (the image of ``I − P``): the one direction in
  which the eraser changes representations, i.e. what "adding the concept" would move along.
  In exact arithmetic ``a ∝ Cov(x, z) ∝`` the mean difference; covariance shrinkage and SVD
  truncation make them differ slightly.  ``b`` (the read-out, ``∝ Σ⁻¹`` × mean difference, the
  LDA direction) is exposed as :attr:`LeaceDirections.read`.

Theory says three of these coincide: the LEACE image and (at its optimum) rank-1 R-LACE are both
the mean-difference direction of the training rows (see ``rlace.py``); the table shows how
closely the fits agree.  The classifier, INLP and box directions are different estimates.

Every direction is oriented so that it points from label-0 towards label-1 deltas (positive
projection of the mean difference; the study: from M→F towards F→M), so the cosines are signed
and ``+direction`` always means "towards label 1's edits" (the study: "towards male").
The erasure check removes each direction (orthogonal projection; LEACE's own oblique eraser for
``leace``; INLP's k-direction projection) from all rows, trains a fresh probe on the erased
training rows and reports its held-out accuracy against the unerased baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from concept_erasure import LeaceEraser, LeaceFitter
from torch import Tensor

from rome_edit.analysis.box_vector import optimise_box_vector
from rome_edit.analysis.classifier import (
    ClassifierResult,
    fit_linear_probe,
    split_indices,
    train_classifier,
)
from rome_edit.analysis.errors import DEFAULT_CLASSES, DeltaSetError, require_both_classes
from rome_edit.analysis.inlp import INLPResult, inlp
from rome_edit.analysis.rlace import RLACEResult, project_out, rlace_rank1

log = logging.getLogger(__name__)

DIRECTION_NAMES = ("box", "classifier", "mean-difference", "inlp", "rlace", "leace")


def unit(v: Tensor) -> Tensor:
    v = v.detach().to(torch.float64).cpu()
    norm = float(v.norm())
    if not norm > 0:
        raise DeltaSetError("a candidate direction is zero; the deltas carry no linear signal "
                            "for this method (check the labels and the sweep).")
    return v / norm


def mean_difference(x: Tensor, y: Tensor) -> Tensor:
    """Mean of the F→M rows (label 1) minus mean of the M→F rows (label 0)."""
    x64 = x.detach().to(torch.float64)
    return x64[y == 1].mean(dim=0) - x64[y == 0].mean(dim=0)


def orient(v: Tensor, reference: Tensor) -> Tensor:
    """``v`` flipped if needed so that ``v · reference ≥ 0``."""
    return -v if float(v @ reference) < 0 else v


@dataclass(frozen=True, eq=False)
class LeaceDirections:
    """A fitted LEACE eraser and its rank-1 edit (``image``) and read-out (``read``) directions."""

    eraser: LeaceEraser
    image: Tensor  # unit, proj_left: where the eraser moves points
    read: Tensor  # unit, proj_right: what the eraser reads


def fit_leace(x: Tensor, y: Tensor) -> LeaceDirections:
    """Fit LEACE for the binary label ``y`` (one concept column, so the eraser is rank 1).

    ``constrain_cov_trace=False`` keeps the eraser exactly the rank-1 LEACE solution; the trace
    constraint (a blend towards an orthogonal projection, meant for re-injecting scrubbed
    activations) would make it rank 2 and no longer provably erasing.
    """
    x64 = x.detach().to(torch.float64).cpu()
    z = y.detach().to(torch.float64).cpu().reshape(-1, 1)
    eraser = LeaceFitter.fit(x64, z, constrain_cov_trace=False).eraser
    left, right = eraser.proj_left[:, 0], eraser.proj_right[0]
    if float(left.norm()) == 0.0:
        raise DeltaSetError("LEACE found no linear signal (the whitened cross-covariance is "
                            "below its SVD tolerance); the deltas do not encode the labels.")
    md = mean_difference(x64, y)
    return LeaceDirections(eraser, orient(unit(left), md), orient(unit(right), md))


@dataclass(frozen=True, eq=False)
class ConceptDirections:
    """Unit candidate directions (rows of ``vectors``, in ``names`` order) and the fits behind."""

    names: tuple[str, ...]
    vectors: Tensor  # (k, d) float64, unit rows, oriented towards label 1 (the study: F→M)
    classifier: ClassifierResult
    inlp: INLPResult
    rlace: RLACEResult
    leace: LeaceDirections
    model_identity: str | None  # the deltas' provenance, when given
    layer: int | None

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(f"no direction {name!r}; have {self.names}")
        return self.vectors[self.names.index(name)]

    def as_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.vectors, strict=True))


def candidate_directions(x: Tensor, y: Tensor, *, seed: int = 0, test_size: float = 0.3,
                         C: float = 1.0, inlp_iterations: int = 10, rlace_steps: int = 100,
                         classifier: ClassifierResult | None = None,
                         model_identity: str | None = None, layer: int | None = None,
                         classes: Sequence[str] = DEFAULT_CLASSES) -> ConceptDirections:
    """Fit every candidate direction on the training rows of the seeded stratified split.

    ``x``: ``(n, d)`` deltas; ``y``: ``(n,)`` int64 labels in {0, 1}.  ``classifier`` reuses an
    already trained classifier; it must come from the same split.  ``model_identity`` and
    ``layer`` (the deltas' provenance) are stored in the result (``DeltaSet.directions()``
    passes its own); ``classes`` names the labels in error messages.
    """
    require_both_classes(y, classes=classes)
    train, test = split_indices(y, seed, test_size)
    if classifier is None:
        clf = train_classifier(x, y, seed=seed, test_size=test_size, C=C, classes=classes)
    elif (classifier.seed, classifier.n_train, classifier.n_test) != (seed, len(train), len(test)):
        raise ValueError(
            f"the classifier was trained on another split (seed {classifier.seed}, "
            f"{classifier.n_train}/{classifier.n_test} rows) than seed {seed}, "
            f"{len(train)}/{len(test)}; pass the same seed and test_size, or no classifier."
        )
    else:
        clf = classifier
    # inlp() re-derives the same seeded split: its probes train on these rows, score on the rest.
    inlp_result = inlp(x, y, n_iterations=inlp_iterations, seed=seed, test_size=test_size, C=C)
    train_t = torch.from_numpy(train)
    x_train, y_train = x[train_t], y[train_t]
    md = mean_difference(x_train, y_train)
    rlace_result = rlace_rank1(x_train, y_train, seed=seed, n_steps=rlace_steps)
    leace = fit_leace(x_train, y_train)
    raw = {
        "box": optimise_box_vector(clf.probe).vector,
        "classifier": clf.weights,
        "mean-difference": md,
        "inlp": inlp_result.first_direction,
        "rlace": rlace_result.direction,
        "leace": leace.image,
    }
    vectors = torch.stack([orient(unit(raw[name]), md) for name in DIRECTION_NAMES])
    return ConceptDirections(DIRECTION_NAMES, vectors, clf, inlp_result, rlace_result, leace,
                             model_identity, layer)


@dataclass(frozen=True)
class CosineTable:
    names: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]

    def __call__(self, a: str, b: str) -> float:
        return self.matrix[self.names.index(a)][self.names.index(b)]

    def to_json(self) -> dict[str, dict[str, float]]:
        return {a: dict(zip(self.names, row, strict=True))
                for a, row in zip(self.names, self.matrix, strict=True)}


def cosine_table(directions: Mapping[str, Tensor]) -> CosineTable:
    """Signed cosine similarity between every pair of directions."""
    names = tuple(directions)
    u = torch.stack([unit(directions[n]) for n in names])
    cos = (u @ u.T).clamp(-1.0, 1.0)
    return CosineTable(names, tuple(tuple(float(c) for c in row) for row in cos))


@dataclass(frozen=True)
class ErasureRow:
    """A fresh probe's held-out accuracy before and after removing one direction."""

    name: str
    accuracy_before: float
    accuracy_after: float

    @property
    def drop(self) -> float:
        return self.accuracy_before - self.accuracy_after

    def to_json(self) -> dict:
        return {"name": self.name, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "drop": self.drop}


def erasure_check(x: Tensor, y: Tensor, directions: ConceptDirections, *, seed: int = 0,
                  test_size: float = 0.3, C: float = 1.0, inlp_k: int | None = None
                  ) -> tuple[ErasureRow, ...]:
    """Probe accuracy after erasing each direction, LEACE, INLP×k, and a random control.

    ``x``: ``(n, d)`` deltas; ``y``: ``(n,)`` int64 labels in {0, 1}."""
    train, test = (torch.from_numpy(i) for i in split_indices(y, seed, test_size))
    width = x.shape[1]
    x = x.to(torch.float64)

    def probe_accuracy(xe: Tensor) -> float:
        probe = fit_linear_probe(xe[train], y[train], C=C, seed=seed)
        return probe.accuracy(xe[test], y[test])

    baseline = probe_accuracy(x)
    gen = torch.Generator().manual_seed(seed)
    random_dir = unit(torch.randn(width, generator=gen, dtype=torch.float64))
    erasers: dict[str, Callable[[Tensor], Tensor]] = {
        name: (lambda v: lambda xx: project_out(xx, v))(vec)
        for name, vec in directions.as_dict().items() if name != "leace"
    }
    erasers["leace"] = directions.leace.eraser
    k = directions.inlp.directions.shape[0] if inlp_k is None else inlp_k
    erasers[f"inlp-{k}-directions"] = lambda xx: directions.inlp.erase(xx, k)
    erasers["random"] = lambda xx: project_out(xx, random_dir)
    rows = tuple(ErasureRow(name, baseline, probe_accuracy(fn(x))) for name, fn in erasers.items())
    for row in rows:
        log.info("erasure %-16s probe accuracy %.3f → %.3f", row.name, baseline,
                 row.accuracy_after)
    return rows


def directions_table(directions: ConceptDirections, erasure: tuple[ErasureRow, ...],
                     reference: str = "box") -> list[dict]:
    """One JSON-ready row per candidate: cosine with ``reference`` and its erasure result.

    Flip rates are measured by the editor-side code and can be merged into these rows by name.
    """
    cos = cosine_table(directions.as_dict())
    erased = {row.name: row for row in erasure}
    return [{"direction": name, f"cosine_with_{reference}": cos(name, reference),
             "probe_accuracy_after_erasure": erased[name].accuracy_after if name in erased
             else None, "probe_accuracy_drop": erased[name].drop if name in erased else None}
            for name in directions.names]
