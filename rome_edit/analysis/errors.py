"""What every delta estimator shares: the error type and the check that both labels are present.

The estimators (``classifier``, ``box_vector``, ``inlp``, ``directions``, ``plots``) are plain
functions of tensors ``(x, y, …)``; :class:`~rome_edit.analysis.deltas.DeltaSet` holds the data
and calls them.  They raise :class:`DeltaSetError`, which therefore lives here, below both, so
that the data flows one way (``deltas`` imports the estimators, never the reverse).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["DEFAULT_CLASSES", "DeltaSetError", "require_both_classes"]

DEFAULT_CLASSES = ("0", "1")


class DeltaSetError(ValueError):
    """Deltas that cannot be analysed as given; the message names the problem and the fix."""


def require_both_classes(labels: Tensor, min_per_class: int = 2,
                         classes: Sequence[str] = DEFAULT_CLASSES) -> None:
    """Raise unless each label of ``labels`` ``(n,)`` (0/1) has at least ``min_per_class`` rows;
    ``classes`` names label 0 and label 1 in the message."""
    n_1 = int(labels.sum())
    n_0 = labels.shape[0] - n_1
    if min(n_0, n_1) < min_per_class:
        raise DeltaSetError(
            f"a classifier needs at least {min_per_class} deltas of each label, got {n_1} "
            f"{classes[1]!r} and {n_0} {classes[0]!r}; sweep requests of both "
            "labels (or concatenate two sweeps of the same model and layer)."
        )
