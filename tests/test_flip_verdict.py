"""Flip rates judged against the random-direction control (rome_edit.analysis.flip_verdict)."""

from __future__ import annotations

import pytest

from rome_edit.analysis.flip_verdict import best_informative_scale, judge, judge_table


def test_control_that_flips_most_subjects_makes_the_direction_uninformative():
    # The real-model case of issue 22: the vector flips 100% of female names to Male, random
    # directions of the same norm 93%.
    v = judge("flip_label1", 1.0, 0.93)
    assert v.verdict == "uninformative" and v.ratio == pytest.approx(1.0 / 0.93)


def test_three_times_the_control_with_a_margin_is_informative():
    assert judge("flip_label0", 0.83, 0.0).verdict == "informative"  # ratio undefined, margin ok
    assert judge("flip_label0", 0.60, 0.19).verdict == "informative"
    assert judge("flip_label0", 0.286, 0.190).verdict == "weak"  # 1.5×: the held-back toy
    assert judge("flip_label0", 0.05, 0.0).verdict == "weak"  # 5% vs 0%: under the margin
    assert judge("flip_label0", 0.45, 0.15).verdict == "informative"  # exactly 3×


def test_rates_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match="not a rate"):
        judge("flip_label1", 1.2, 0.1)


def test_judge_table_reads_recorded_control_means():
    verdicts = judge_table({"flip_label1": 1.0, "flip_label0": 0.83},
                           {"flip_label1": {"mean": 0.93, "std": 0.02},
                            "flip_label0": {"mean": 0.0, "std": 0.0}})
    assert [v.verdict for v in verdicts] == ["uninformative", "informative"]


def test_best_informative_scale_prefers_more_informative_directions():
    scales = (0.5, 1.0, 2.0)
    vector = [{"flip_label1": 0.3, "flip_label0": 0.4},
              {"flip_label1": 0.7, "flip_label0": 0.8},
              {"flip_label1": 1.0, "flip_label0": 1.0}]
    control = [{"flip_label1": 0.0, "flip_label0": 0.0},
               {"flip_label1": 0.2, "flip_label0": 0.1},
               {"flip_label1": 0.9, "flip_label0": 0.3}]
    best = best_informative_scale(scales, vector, control)
    # 0.5: both informative (ratios inf); 1.0: both (3.5, 8); 2.0: one uninformative.
    assert best is not None and best["scale"] == 0.5
    control[0] = {"flip_label1": 0.2, "flip_label0": 0.0}  # 0.5 now: label1 1.5× → weak
    best = best_informative_scale(scales, vector, control)
    assert best is not None and best["scale"] == 1.0
    assert best_informative_scale(scales, vector, [{"flip_label1": 0.9, "flip_label0": 0.9}] * 3
                                  ) is None
