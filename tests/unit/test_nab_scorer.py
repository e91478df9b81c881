"""Tests of our NAB scorer on tiny synthetic files with hand-computed values.

The expected numbers come from the SCORING.md formulas by hand:
s(-1) = 2 / (1 + e^-5) - 1 = 0.986614, s(-0.6) / s(-1) = 0.905148 / 0.986614
= 0.917429, s(-0.2) / s(-1) = 0.462117 / 0.986614 = 0.468387 and
s(0.5) = 2 / (1 + e^2.5) - 1 = -0.848284.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import pytest

from bench.nab.scorer import (
    PROFILES,
    FileResult,
    Window,
    optimise_threshold,
    probation_rows,
    score_corpus,
    score_detections,
    sigmoid,
    windows_to_rows,
)

STANDARD, LOW_FP, LOW_FN = PROFILES
# 20 rows: rows 0-2 are probation (floor(0.15 * 20) = 3), the window is 10-14.
WINDOW = Window(10, 14)


def detections(*rows: int, n: int = 20) -> np.ndarray:
    marks = np.zeros(n, dtype=bool)
    marks[list(rows)] = True
    return marks


def test_sigmoid_values() -> None:
    assert sigmoid(0.0) == 0.0
    assert sigmoid(-1.0) == pytest.approx(0.986614, abs=1e-6)
    assert sigmoid(0.5) == pytest.approx(-0.848284, abs=1e-6)
    assert sigmoid(3.0) == pytest.approx(-0.9999994, abs=1e-7)
    assert sigmoid(3.01) == -1.0


def test_probation_rows() -> None:
    assert probation_rows(20) == 3
    assert probation_rows(1000) == 150
    assert probation_rows(10_000) == 750


def test_true_positive_at_left_edge_is_worth_tp_weight() -> None:
    assert score_detections(detections(10), [WINDOW], STANDARD) == pytest.approx(1.0)


def test_true_positive_later_in_window_is_worth_less() -> None:
    # Row 12: y = -(14 - 12 + 1) / 5 = -0.6.
    assert score_detections(detections(12), [WINDOW], STANDARD) == pytest.approx(
        0.917429, abs=1e-6
    )
    # Row 14: y = -1 / 5 = -0.2.
    assert score_detections(detections(14), [WINDOW], STANDARD) == pytest.approx(
        0.468387, abs=1e-6
    )


def test_only_earliest_detection_in_window_counts() -> None:
    assert score_detections(
        detections(12, 13, 14), [WINDOW], STANDARD
    ) == pytest.approx(0.917429, abs=1e-6)


def test_missed_window_costs_fn_weight() -> None:
    assert score_detections(detections(), [WINDOW], STANDARD) == -1.0
    assert score_detections(detections(), [WINDOW], LOW_FN) == -2.0


def test_false_positive_before_any_window_costs_fp_weight() -> None:
    # Row 5 precedes the window: -0.11, plus -1 for the missed window.
    assert score_detections(detections(5), [WINDOW], STANDARD) == pytest.approx(-1.11)
    assert score_detections(detections(5), [WINDOW], LOW_FP) == pytest.approx(-1.22)


def test_false_positive_after_window_uses_distance() -> None:
    # Row 16: y = |14 - 16| / (5 - 1) = 0.5, cost 0.11 * s(0.5) = -0.093311.
    assert score_detections(detections(10, 16), [WINDOW], STANDARD) == pytest.approx(
        1.0 - 0.093311, abs=1e-6
    )
    # Far after the window (y > 3) costs the full weight: row 40, y = 26 / 4.
    assert score_detections(
        detections(10, 40, n=50), [WINDOW], STANDARD
    ) == pytest.approx(1.0 - 0.11)


def test_probation_detections_are_ignored() -> None:
    assert score_detections(detections(0, 2, 10), [WINDOW], STANDARD) == 1.0


def test_file_without_windows() -> None:
    assert score_detections(detections(), [], STANDARD) == 0.0
    assert score_detections(detections(5, 6), [], STANDARD) == pytest.approx(-0.22)


def test_optimal_threshold_is_exact() -> None:
    # Row 5 (FP, -0.11) scores 0.5, row 10 (left edge, 1.0) 0.4, row 12
    # (0.917429) 0.9. Totals by threshold: above 0.9, -1; 0.9, 0.917429;
    # 0.5, 0.807429; 0.4, 0.897429 (row 10 replaces row 12, FP still paid).
    scores = np.zeros(20)
    scores[[5, 10, 12]] = [0.5, 0.4, 0.9]
    threshold, raw = optimise_threshold(
        [FileResult("a.csv", scores, (WINDOW,))], STANDARD
    )
    assert threshold == 0.9
    assert raw == pytest.approx(0.917429, abs=1e-6)
    # The search agrees with scoring the detections at that threshold.
    assert raw == pytest.approx(score_detections(scores >= 0.9, [WINDOW], STANDARD))


def test_equal_scores_are_taken_together() -> None:
    # Rows 5 and 10 both score 0.7: a threshold cannot take row 10 alone.
    scores = np.zeros(20)
    scores[[5, 10]] = 0.7
    threshold, raw = optimise_threshold(
        [FileResult("a.csv", scores, (WINDOW,))], STANDARD
    )
    assert threshold == 0.7
    assert raw == pytest.approx(1.0 - 0.11)


def test_no_detection_when_every_detection_costs() -> None:
    scores = np.zeros(20)
    scores[5] = 0.9
    threshold, raw = optimise_threshold([FileResult("a.csv", scores, ())], STANDARD)
    assert math.isinf(threshold)
    assert raw == 0.0


def test_normalised_scores_of_perfect_and_null() -> None:
    perfect = np.zeros(20)
    perfect[10] = 1.0
    files = [FileResult("a.csv", perfect, (WINDOW,))]
    assert [result.normalised for result in score_corpus(files)] == [100.0] * 3
    files = [FileResult("a.csv", np.zeros(20), (WINDOW,))]
    results = score_corpus(files)
    # Every row scores 0, so a threshold of 0 catches the window at its left
    # edge but pays the FPs at rows 3-9 (7 rows before the window) and rows
    # 15-19 (y = 1/4 ... 5/4 from the window).
    assert results[0].normalised == pytest.approx(
        100.0 * (score_detections(np.arange(20) >= 0, [WINDOW], STANDARD) + 1.0) / 2.0
    )


def test_normalised_score_of_late_detection() -> None:
    # One window, caught at row 12: standard (0.917429 + 1) / 2 = 95.87;
    # reward_low_FN (0.917429 + 2) / 3 = 97.25.
    scores = np.zeros(20)
    scores[12] = 1.0
    by_profile = {
        result.profile: result.normalised
        for result in score_corpus([FileResult("a.csv", scores, (WINDOW,))])
    }
    assert by_profile["standard"] == pytest.approx(95.8714, abs=1e-3)
    assert by_profile["reward_low_FP_rate"] == pytest.approx(95.8714, abs=1e-3)
    assert by_profile["reward_low_FN_rate"] == pytest.approx(97.2476, abs=1e-3)


def test_windows_to_rows_is_inclusive() -> None:
    start = datetime(2014, 1, 1)
    stamps = [start + timedelta(minutes=5 * row) for row in range(10)]
    windows = windows_to_rows(
        stamps, [["2014-01-01 00:10:00.000000", "2014-01-01 00:20:00.000000"]]
    )
    assert windows == (Window(2, 4),)
    assert windows[0].width == 3
