"""The torch scorer matches the numpy scorer.

Tolerance: in float64 both compute the same arithmetic, so scores agree to
1e-9 absolute, and the verdict fields (anomalous, sustained points, points
scored) are equal. The tests run on CUDA when available, else on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("CI"):
    # CI installs torch (make test does), so a missing torch is a failure there.
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install -e '.[gpu]')"
    )

from activities import detection_torch  # noqa: E402
from activities.detection import alarm_scores, anomaly_scores, score_batch  # noqa: E402
from activities.detection_torch import score_batch_torch  # noqa: E402

TOLERANCE = 1e-9


def sample_values(seed: int = 5, n_series: int = 24, n_points: int = 200):
    rng = np.random.default_rng(seed)
    values = rng.normal(10.0, 1.0, (n_series, n_points))
    # Step changes, spikes and dips, gaps, flat and zero series, padding.
    values[0, 120:] += 8.0
    values[1, 50] = 40.0
    values[2, 90:95] = -5.0
    values[3, rng.choice(n_points, 40, replace=False)] = np.nan
    values[4] = 3.0
    values[5] = 0.0
    values[5, 150] = 1.0
    values[6, :70] = np.nan
    values[7, 30] = np.inf
    values[8] = np.round(values[8])
    values[9, :] = np.nan
    return values


def assert_same(expected, actual) -> None:
    np.testing.assert_array_equal(np.isnan(expected.scores), np.isnan(actual.scores))
    np.testing.assert_allclose(
        np.nan_to_num(actual.scores), np.nan_to_num(expected.scores), atol=TOLERANCE
    )
    np.testing.assert_allclose(actual.last_score, expected.last_score, atol=TOLERANCE)
    np.testing.assert_array_equal(actual.anomalous, expected.anomalous)
    np.testing.assert_array_equal(actual.sustained_points, expected.sustained_points)
    np.testing.assert_array_equal(actual.points_scored, expected.points_scored)


@pytest.mark.parametrize("direction", ["up", "down", "both"])
@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_matches_numpy(direction: str, threshold: float) -> None:
    values = sample_values()
    expected = score_batch(values, threshold, direction)
    actual = score_batch_torch(values, threshold, direction)
    assert_same(expected, actual)


def test_matches_numpy_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny chunk size splits the batch into several chunks.
    monkeypatch.setattr(detection_torch, "CHUNK_POINTS", 300 * 5)
    values = sample_values(seed=9, n_series=17)
    assert_same(score_batch(values), score_batch_torch(values))


def test_matches_numpy_past_the_episode() -> None:
    # 700 points pass EPISODE_POINTS, the seasonal lag and the short window.
    values = sample_values(n_points=700)
    values[10, 400:] += 3.0
    assert_same(
        score_batch(values, 0.8, "both"), score_batch_torch(values, 0.8, "both")
    )


def test_empty_and_invalid_input() -> None:
    assert score_batch_torch(np.zeros((0, 5))).scores.shape == (0, 5)
    assert score_batch_torch(np.zeros((2, 0))).points_scored.tolist() == [0, 0]
    with pytest.raises(ValueError):
        score_batch_torch(np.zeros((1, 5)), direction="sideways")
    with pytest.raises(ValueError):
        score_batch_torch(np.zeros(5))


@pytest.mark.parametrize("direction", ["up", "down", "both"])
def test_anomaly_scores_match(direction: str) -> None:
    # 700 points, so that the seasonal lag (288) and the short window (300)
    # are both reached.
    values = sample_values(n_points=700)
    values[10, 400:] += 3.0
    values[11] = np.cumsum(np.random.default_rng(2).normal(0.0, 1.0, 700)) * 1e6
    expected = anomaly_scores(values, direction)
    actual = detection_torch.anomaly_scores_torch(values, direction)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(
        np.nan_to_num(actual), np.nan_to_num(expected), atol=TOLERANCE
    )


def test_alarm_scores_match() -> None:
    scores = anomaly_scores(sample_values(n_points=700))
    expected = alarm_scores(scores)
    actual = detection_torch.alarm_scores_torch(scores)
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE)
