"""The rule that picks one candidate from the measured table.

Default rule (every threshold a field of :class:`ChoiceRule`):

1. **Eligible** candidates keep other names' facts and the model's fluency: random-name
   specificity ≥ ``min_specificity_random`` (default 0.99) and fluency after the edit ≥
   ``(1 − fluency_tolerance)`` × the unedited model's fluency on the same prompts (default 5%
   tolerance; ROME's n-gram entropy).  Optional floors on same-last-token specificity and city
   kept (off by default: names sharing the edited name's last token share its key at early
   layers, so some spill-over there is what a rank-one edit does).
2. Among the eligible, the **highest efficacy** (the edit does what was asked).
3. Ties (equal efficacy on the sample) are broken by the CounterFact score (harmonic mean of
   efficacy, paraphrase and specificity over all neighbours), then by same-last-token
   specificity, city kept, and finally by the cheaper and gentler setting (fewer steps, smaller
   clamp, lower layer) — so the choice is deterministic.

If no candidate is eligible, the candidate with the highest random-name specificity (ties as
above, efficacy first) is chosen and :attr:`Choice.rule_met` is False; the caller must say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ChoiceRule", "Choice", "choose", "counterfact_score"]


def counterfact_score(efficacy: float, paraphrase: float, specificity: float) -> float:
    """Harmonic mean of the three success rates (CounterFact's score); 0 if any is 0."""
    values = (efficacy, paraphrase, specificity)
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


@dataclass(frozen=True)
class ChoiceRule:
    """Thresholds of the rule (module docstring)."""

    min_specificity_random: float = 0.99
    fluency_tolerance: float = 0.05
    min_specificity_same_last_token: float | None = None
    min_city_kept: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_specificity_random", "fluency_tolerance",
                     "min_specificity_same_last_token", "min_city_kept"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (got {value}).")

    def failures(self, row: dict) -> list[str]:
        """Why ``row`` is not eligible (empty if it is)."""
        out = []
        if _value(row, "specificity_random") < self.min_specificity_random:
            out.append(f"random-name specificity {_value(row, 'specificity_random'):.3f} < "
                       f"{self.min_specificity_random}")
        before, after = row.get("fluency_before"), row.get("fluency_after")
        if before is not None and after is not None \
                and after < (1 - self.fluency_tolerance) * before:
            out.append(f"fluency {after:.3f} < {1 - self.fluency_tolerance:.2f} × {before:.3f}")
        if self.min_specificity_same_last_token is not None and \
                _value(row, "specificity_same_last_token") < self.min_specificity_same_last_token:
            out.append("same-last-token specificity below "
                       f"{self.min_specificity_same_last_token}")
        if self.min_city_kept is not None and _value(row, "city_kept") < self.min_city_kept:
            out.append(f"city kept below {self.min_city_kept}")
        return out

    def to_dict(self) -> dict:
        return {"min_specificity_random": self.min_specificity_random,
                "fluency_tolerance": self.fluency_tolerance,
                "min_specificity_same_last_token": self.min_specificity_same_last_token,
                "min_city_kept": self.min_city_kept}


@dataclass(frozen=True)
class Choice:
    index: int  # row of the table chosen
    rule_met: bool
    eligible: tuple[int, ...]  # rows that passed the rule


def _value(row: dict, key: str) -> float:
    """A metric, with a missing one (e.g. no same-last-token neighbours) counting as perfect:
    nothing measured could have been harmed."""
    value = row.get(key)
    return 1.0 if value is None else float(value)


def _tie_key(row: dict) -> tuple:
    return (counterfact_score(_value(row, "efficacy"), _value(row, "paraphrase"),
                              _value(row, "specificity")),
            _value(row, "specificity_same_last_token"), _value(row, "city_kept"),
            -row["v_num_grad_steps"], -row["clamp_norm_factor"], -row["layer"])


def choose(rows: Sequence[dict], rule: ChoiceRule = ChoiceRule()) -> Choice:
    """Apply ``rule`` to the measured ``rows`` (one dict per candidate, as in the table)."""
    if not rows:
        raise ValueError("no candidates were measured; the grid is empty.")
    eligible = tuple(i for i, row in enumerate(rows) if not rule.failures(row))
    if eligible:
        best = max(eligible, key=lambda i: (_value(rows[i], "efficacy"), *_tie_key(rows[i])))
        return Choice(best, True, eligible)
    best = max(range(len(rows)), key=lambda i: (_value(rows[i], "specificity_random"),
                                                _value(rows[i], "efficacy"),
                                                *_tie_key(rows[i])))
    return Choice(best, False, ())
