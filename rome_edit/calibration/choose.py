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
   clamp, lower layer), plain ROME before a protected update (and a smaller protection weight
   first) — so the choice is deterministic.

If no candidate is eligible, the rule cannot be met and a **trade-off** is chosen instead, in
this order:

a. fluency is the floor measured on the fewest samples (a few generations per candidate), so it
   is relaxed first, to ``fallback_fluency_tolerance`` (default 10%): if candidates then pass
   every floor, the most effective of them (ties as above);
b. else, among the candidates that keep fluency (all of them if none does), those whose
   random-name specificity is within ``fallback_margin`` (default 0.01) of the best such
   specificity, and of those the highest efficacy (ties as above).

:attr:`Choice.rule_met` is then False and :attr:`Choice.tradeoff` says in one sentence what was
given up and why; the caller prints it.

:func:`pareto_front` gives the measured frontier: the candidates no other beats on both
efficacy and random-name specificity (among those that keep fluency, where any does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["ChoiceRule", "Choice", "choose", "counterfact_score", "pareto_front", "rank_key"]


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
    fallback_margin: float = 0.01
    fallback_fluency_tolerance: float = 0.10

    def __post_init__(self) -> None:
        for name in ("min_specificity_random", "fluency_tolerance",
                     "min_specificity_same_last_token", "min_city_kept", "fallback_margin",
                     "fallback_fluency_tolerance"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (got {value}).")

    def fluency_kept(self, row: dict, tolerance: float | None = None) -> bool:
        before, after = row.get("fluency_before"), row.get("fluency_after")
        tol = self.fluency_tolerance if tolerance is None else tolerance
        return before is None or after is None or after >= (1 - tol) * before

    def failures(self, row: dict) -> list[str]:
        """Why ``row`` is not eligible (empty if it is)."""
        out = []
        if _value(row, "specificity_random") < self.min_specificity_random:
            out.append(f"random-name specificity {_value(row, 'specificity_random'):.3f} < "
                       f"{self.min_specificity_random}")
        before, after = row.get("fluency_before"), row.get("fluency_after")
        if not self.fluency_kept(row):
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
                "min_city_kept": self.min_city_kept, "fallback_margin": self.fallback_margin,
                "fallback_fluency_tolerance": self.fallback_fluency_tolerance}


@dataclass(frozen=True)
class Choice:
    index: int  # row of the table chosen
    rule_met: bool
    eligible: tuple[int, ...]  # rows that passed the rule
    tradeoff: str = ""  # one sentence: which rule or trade-off chose the row, and why
    frontier: tuple[int, ...] = ()  # rows on the efficacy / random-specificity Pareto front


def _value(row: dict, key: str) -> float:
    """A metric, with a missing one (e.g. no same-last-token neighbours) counting as perfect:
    nothing measured could have been harmed."""
    value = row.get(key)
    return 1.0 if value is None else float(value)


def _tie_key(row: dict) -> tuple:
    return (counterfact_score(_value(row, "efficacy"), _value(row, "paraphrase"),
                              _value(row, "specificity")),
            _value(row, "specificity_same_last_token"), _value(row, "city_kept"),
            -row["v_num_grad_steps"], -row["clamp_norm_factor"], -row["layer"],
            row.get("protect_source") is None, -(row.get("protect_weight") or 0.0))


def rank_key(row: dict) -> tuple:
    """Efficacy, then the tie-breaks: larger is better (the order of :func:`choose`)."""
    return (_value(row, "efficacy"), *_tie_key(row))


def pareto_front(rows: Sequence[dict], among: Sequence[int] | None = None) -> tuple[int, ...]:
    """Rows (of ``among``, default all) that no other of them beats on efficacy and random-name
    specificity at once (at least as good on both, better on one), by ascending specificity."""
    among = range(len(rows)) if among is None else among
    points = {i: (_value(rows[i], "efficacy"), _value(rows[i], "specificity_random"))
              for i in among}
    front = [i for i, (e, s) in points.items()
             if not any(e2 >= e and s2 >= s and (e2, s2) != (e, s)
                        for e2, s2 in points.values())]
    return tuple(sorted(front, key=lambda i: (points[i][1], -points[i][0], i)))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _describe(row: dict) -> str:
    out = f"layer {row['layer']}, clamp {row['clamp_norm_factor']:g}, " \
          f"{row['v_num_grad_steps']} steps"
    if row.get("protect_source") is None:
        return out + ", plain ROME"
    weight = "" if row.get("protect_weight") is None else f" weight {row['protect_weight']:g}"
    return out + f", protecting {row['protect_source']} ({row['protect_form']}{weight})"


def choose(rows: Sequence[dict], rule: ChoiceRule = ChoiceRule()) -> Choice:
    """Apply ``rule`` to the measured ``rows`` (one dict per candidate, as in the table)."""
    if not rows:
        raise ValueError("no candidates were measured; the grid is empty.")
    fluent = [i for i in range(len(rows)) if rule.fluency_kept(rows[i])]
    pool = fluent or list(range(len(rows)))
    front = pareto_front(rows, pool)  # a candidate that lost fluency is no option to trade
    eligible = tuple(i for i, row in enumerate(rows) if not rule.failures(row))
    eff = lambda i: _value(rows[i], "efficacy")  # noqa: E731
    spec = lambda i: _value(rows[i], "specificity_random")  # noqa: E731
    if eligible:
        best = max(eligible, key=lambda i: (eff(i), *_tie_key(rows[i])))
        why = (f"rule met: {len(eligible)} of {len(rows)} candidates keep random-name "
               f"specificity ≥ {_pct(rule.min_specificity_random)} and fluency; chose the most "
               f"effective of them ({_describe(rows[best])}: efficacy {_pct(eff(best))}, "
               f"random-name specificity {_pct(spec(best))}).")
        return Choice(best, True, eligible, why, front)
    relaxed = replace(rule, fluency_tolerance=max(rule.fluency_tolerance,
                                                  rule.fallback_fluency_tolerance))
    almost = tuple(i for i, row in enumerate(rows) if not relaxed.failures(row))
    if almost:  # (a): only the fluency floor, measured on few samples, stood in the way
        best = max(almost, key=lambda i: (eff(i), *_tie_key(rows[i])))
        b = rows[best]
        why = (f"rule not met: no candidate keeps fluency within "
               f"{_pct(rule.fluency_tolerance)} together with random-name specificity ≥ "
               f"{_pct(rule.min_specificity_random)}; fluency, the floor measured on the fewest "
               f"samples, was relaxed to {_pct(rule.fallback_fluency_tolerance)}, which "
               f"{len(almost)} candidates meet; chose the most effective of them "
               f"({_describe(b)}: efficacy {_pct(eff(best))}, random-name specificity "
               f"{_pct(spec(best))}, fluency {b.get('fluency_after', float('nan')):.3f} against "
               f"{b.get('fluency_before', float('nan')):.3f} unedited) — check fluency on a "
               f"larger sweep; see the frontier ({len(front)} of {len(rows)} candidates).")
        return Choice(best, False, almost, why, front)
    top = max(spec(i) for i in pool)
    near = [i for i in pool if spec(i) >= top - rule.fallback_margin - 1e-12]
    best = max(near, key=lambda i: (eff(i), *_tie_key(rows[i])))
    most = max(pool, key=lambda i: (eff(i), *_tie_key(rows[i])))
    reached = [i for i in range(len(rows)) if spec(i) >= rule.min_specificity_random]
    if reached:  # specificity was reached, but only where fluency was lost (or other floors)
        cause = (f"the {len(reached)} candidates with random-name specificity ≥ "
                 f"{_pct(rule.min_specificity_random)} fail the rule's other floors "
                 f"({'; '.join(rule.failures(rows[reached[0]]))} for the first)")
    else:
        cause = (f"no candidate reaches random-name specificity ≥ "
                 f"{_pct(rule.min_specificity_random)} (best {_pct(top)})")
    why = (f"rule not met: {cause}{'' if fluent else ' and none keeps fluency'}; chose the "
           f"highest efficacy among the {len(near)} candidates within "
           f"{_pct(rule.fallback_margin)} of the best specificity ({_describe(rows[best])}: "
           f"efficacy {_pct(eff(best))}, random-name specificity {_pct(spec(best))}), keeping "
           "other names' facts first; "
           + ("it is also the most effective candidate" if eff(most) <= eff(best) else
              f"the most effective candidate ({_describe(rows[most])}) reaches efficacy "
              f"{_pct(eff(most))} at specificity {_pct(spec(most))}")
           + f" — see the frontier ({len(front)} of {len(rows)} candidates).")
    return Choice(best, False, (), why, front)
