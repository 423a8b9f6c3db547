"""Is a held-out flip rate evidence for a direction, or what any vector of that norm would do?

Writing ``v_orig ± s·g`` into a subject's value can flip its answer for two reasons: ``g``
carries the concept, or the write is large enough to erase the subject, after which the model
falls back to its default answer.  The random directions of the same norm (the control) measure
the second: where they already flip most subjects in one direction (a model that answers
" Male" when it does not know the name flips female names "to male" under any large write), a
high flip rate for ``g`` in that direction says nothing about ``g``.

Each direction of the concept (label 1 → A, label 0 → B) gets one verdict:

- ``uninformative``: the control flips at least ``room`` (default half) of the subjects: there is
  no room left to tell ``g`` from noise;
- ``informative``: the vector flips at least ``min_ratio`` (default 3) times as many as the
  control does, and more than the control by at least one subject in ten (so 3 × 0% is not a
  success);
- ``weak``: otherwise.

Pure maths on rates: no model is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["informative", "weak", "uninformative"]
ROOM = 0.5  # a control flipping at least this fraction leaves no room
MIN_RATIO = 3.0  # the vector must flip at least this many times the control's rate
MIN_MARGIN = 0.1  # … and this much more in absolute terms
FLIP_KEYS = ("flip_label1", "flip_label0")

__all__ = ["FLIP_KEYS", "FlipVerdict", "MIN_RATIO", "ROOM", "Verdict", "best_informative_scale",
           "judge", "judge_table"]


@dataclass(frozen=True)
class FlipVerdict:
    """One direction's flip rate against the random control's, and what it shows."""

    key: str  # "flip_label1" or "flip_label0"
    rate: float
    control: float
    ratio: float | None  # rate / control; None when the control flipped nothing
    verdict: Verdict

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "rate": self.rate, "control": self.control,
                "ratio": self.ratio, "verdict": self.verdict}


def judge(key: str, rate: float, control: float, *, min_ratio: float = MIN_RATIO,
          room: float = ROOM, margin: float = MIN_MARGIN) -> FlipVerdict:
    """The verdict on one direction's flip ``rate`` given the control's mean rate."""
    for name, value in (("rate", rate), ("control", control)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} {value} is not a rate in [0, 1].")
    ratio = rate / control if control > 0 else None
    if control >= room:
        verdict: Verdict = "uninformative"
    elif rate - control >= margin and (ratio is None or ratio >= min_ratio):
        verdict = "informative"
    else:
        verdict = "weak"
    return FlipVerdict(key, rate, control, ratio, verdict)


def judge_table(vector: Mapping[str, float], control: Mapping[str, float | Mapping[str, float]],
                **options: float) -> tuple[FlipVerdict, ...]:
    """Verdicts for both directions of a flip table (``flip_label1``, ``flip_label0``) against
    the control's rates (plain numbers, or ``{"mean": …}`` as :func:`rome_edit.analyze`
    records them)."""
    def mean(value: float | Mapping[str, float]) -> float:
        return float(value["mean"]) if isinstance(value, Mapping) else float(value)
    return tuple(judge(k, float(vector[k]), mean(control[k]), **options) for k in FLIP_KEYS)


def best_informative_scale(scales: Sequence[float],
                           vector_tables: Sequence[Mapping[str, float]],
                           control_tables: Sequence[Mapping[str, float]],
                           **options: float) -> dict[str, object] | None:
    """The scale at which the most directions are informative, ties broken by the smallest
    ratio over those directions (the weaker one decides); ``None`` if no scale has one.
    Directions whose control leaves no room at a scale count as not informative there."""
    best: tuple[tuple[int, float], dict[str, object]] | None = None
    for s, vt, ct in zip(scales, vector_tables, control_tables, strict=True):
        verdicts = judge_table(vt, ct, **options)
        good = [v for v in verdicts if v.verdict == "informative"]
        if not good:
            continue
        weakest = min(v.ratio if v.ratio is not None else float("inf") for v in good)
        rank = (len(good), weakest)
        if best is None or rank > best[0]:
            best = (rank, {"scale": s, "verdicts": [v.to_dict() for v in verdicts]})
    return None if best is None else best[1]
