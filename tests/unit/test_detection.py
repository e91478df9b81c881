"""Tests of the streaming anomaly scorer and the `score_series` activity."""

from __future__ import annotations

import numpy as np
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.detection import (
    DEFAULT_THRESHOLD,
    EPISODE_POINTS,
    DetectionActivities,
    alarm_scores,
    anomaly_scores,
    pack_series,
    score_batch,
)
from workflows.models import DetectionInput, Series

STEP = 15.0


def baseline(points: int = 30, seed: int = 7) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(0.01 + rng.normal(0.0, 0.002, points))


def step_change(anomalous_points: int = 5) -> list[float]:
    rng = np.random.default_rng(11)
    return baseline() + list(0.4 + rng.normal(0.0, 0.01, anomalous_points))


async def score(*values: list[float | None], threshold: float = 0.8):
    input = DetectionInput(
        series=[
            Series(key=f"s{index}", step_seconds=STEP, values=series)
            for index, series in enumerate(values)
        ],
        threshold=threshold,
    )
    return await ActivityEnvironment().run(DetectionActivities().score_series, input)


async def test_step_change_is_sustained() -> None:
    result = await score(step_change())
    verdict = result.verdicts[0]
    assert verdict.anomalous is True
    assert verdict.score >= 0.8
    assert verdict.sustained_seconds >= 5 * STEP
    assert verdict.points_scored > 0
    assert result.device == "cpu"


async def test_flat_series_not_anomalous() -> None:
    verdict = (await score([0.01] * 35)).verdicts[0]
    assert verdict.anomalous is False
    assert verdict.score == 0.0
    assert verdict.sustained_seconds == 0.0


async def test_blip_then_normal_not_sustained() -> None:
    values = baseline() + [0.4] + baseline(4, seed=3)
    verdict = (await score(values)).verdicts[0]
    assert verdict.anomalous is False
    assert verdict.sustained_seconds == 0.0


async def test_blip_at_end_one_step() -> None:
    verdict = (await score(baseline() + [0.4])).verdicts[0]
    assert verdict.anomalous is True
    assert verdict.sustained_seconds == STEP


async def test_all_gaps_score_zero() -> None:
    verdict = (await score([None] * 40)).verdicts[0]
    assert verdict.score == 0.0
    assert verdict.anomalous is False
    assert verdict.points_scored == 0


async def test_short_series_score_zero() -> None:
    verdict = (await score([0.01, 0.02, 0.5])).verdicts[0]
    assert verdict.score == 0.0
    assert verdict.anomalous is False
    assert verdict.points_scored == 0


async def test_empty_series_score_zero() -> None:
    verdict = (await score([])).verdicts[0]
    assert verdict.score == 0.0
    assert verdict.anomalous is False


async def test_gaps_are_skipped_not_anomalous() -> None:
    values: list[float | None] = baseline()
    values[10] = None
    values[20] = None
    values += [None, None]
    verdict = (await score(values)).verdicts[0]
    assert verdict.anomalous is False
    assert verdict.points_scored == 30 - 2 - 8


async def test_gaps_inside_anomaly_skipped() -> None:
    values: list[float | None] = step_change(6)
    values[-3] = None
    verdict = (await score(values)).verdicts[0]
    assert verdict.anomalous is True
    assert verdict.sustained_seconds == 5 * STEP


async def test_drop_is_not_anomalous() -> None:
    values = [0.5 + 0.01 * (index % 3) for index in range(30)] + [0.05] * 5
    verdict = (await score(values)).verdicts[0]
    assert verdict.anomalous is False


async def test_verdicts_keep_input_order() -> None:
    result = await score([0.01] * 35, step_change(), [None] * 3)
    assert [verdict.key for verdict in result.verdicts] == ["s0", "s1", "s2"]
    assert [verdict.anomalous for verdict in result.verdicts] == [False, True, False]


async def test_series_of_different_lengths() -> None:
    result = await score(step_change(), step_change()[10:])
    assert result.verdicts[0].sustained_seconds == 5 * STEP
    assert result.verdicts[1].sustained_seconds == 5 * STEP


async def test_invalid_threshold_not_retryable() -> None:
    with pytest.raises(ApplicationError) as raised:
        await score([0.01] * 35, threshold=1.5)
    assert raised.value.non_retryable is True


def test_score_uses_only_earlier_points() -> None:
    values = np.array([step_change()])
    full = score_batch(values).scores
    prefix = score_batch(values[:, :32]).scores
    np.testing.assert_array_equal(full[:, :32], prefix)


def test_scores_in_unit_interval() -> None:
    rng = np.random.default_rng(5)
    values = rng.lognormal(0.0, 2.0, (20, 100))
    values[:, 50:] *= 1000.0
    scores = score_batch(values).scores
    finite = scores[~np.isnan(scores)]
    assert finite.size > 0
    assert np.all(finite >= 0.0)
    assert np.all(finite <= 1.0)


def test_noise_crossings_are_short() -> None:
    # Novelty flags each new record of the series, so on noise some points
    # cross the threshold, but one crossing is not sustained.
    rng = np.random.default_rng(9)
    result = score_batch(rng.normal(0.01, 0.002, (50, 200)))
    assert np.nanmean(result.scores >= DEFAULT_THRESHOLD) < 0.12
    assert int(result.sustained_points.max()) < 3


@pytest.mark.parametrize("points", [20, 30, 120])
def test_few_healthy_windows_end_anomalous(points: int) -> None:
    # A small baseline needs more novelty, so new records of noise in a
    # short window rarely make its last point anomalous.
    rng = np.random.default_rng(21)
    result = score_batch(rng.normal(0.01, 0.002, (400, points)))
    assert np.mean(result.anomalous) < 0.05
    assert np.mean(result.sustained_points >= 3) < 0.01


@pytest.mark.parametrize("level", [0.0, 0.01])
def test_step_from_constant_baseline_sustained(level: float) -> None:
    # An error ratio that sat at one value has a range of 0, and leaving it is
    # novel.
    values = np.array([[level] * 40 + [0.4] * 10, [level] * 50])
    result = score_batch(values)
    assert result.anomalous.tolist() == [True, False]
    assert result.sustained_points.tolist() == [10, 0]


def test_latency_doubling_is_sustained() -> None:
    rng = np.random.default_rng(22)
    latency = rng.lognormal(np.log(0.05), 0.1, (20, 30))
    latency[:, 22:] *= 2.0
    result = score_batch(latency)
    assert result.anomalous.all()
    assert int(result.sustained_points.min()) >= 5


@pytest.mark.parametrize("points", [30, 120])
@pytest.mark.parametrize("seed", range(5))
def test_healthy_noise_not_sustained(points: int, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    error_ratio = np.clip(rng.normal(0.01, 0.003, points), 0.0, None)
    latency = rng.lognormal(np.log(0.05), 0.15, points)
    result = score_batch(np.stack([error_ratio, latency]))
    assert int(result.sustained_points.max()) < 3


@pytest.mark.parametrize("seed", range(5))
def test_step_at_20_of_30_sustained(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    error_ratio = np.clip(rng.normal(0.005, 0.002, 30), 0.0, None)
    error_ratio[20:] = 0.35 + rng.normal(0.0, 0.02, 10)
    result = score_batch(error_ratio[None, :])
    assert bool(result.anomalous[0])
    assert int(result.sustained_points[0]) >= 5


def test_lasting_shift_joins_the_baseline() -> None:
    # After EPISODE_POINTS points, a level shift is the new normal.
    rng = np.random.default_rng(4)
    values = np.concatenate(
        [rng.normal(1.0, 0.01, 50), rng.normal(2.0, 0.01, EPISODE_POINTS + 60)]
    )
    scores = score_batch(values[None, :]).scores[0]
    assert (scores[50:60] >= 0.8).all()
    assert (scores[-20:] < 0.8).all()


def test_pack_series_pads_at_start() -> None:
    packed = pack_series([[1.0, None, 3.0], [4.0]])
    assert packed.shape == (2, 3)
    assert np.isnan(packed[0, 1])
    assert np.isnan(packed[1, 0])
    assert packed[1, 2] == 4.0


def test_score_batch_rejects_one_dimension() -> None:
    with pytest.raises(ValueError, match="2 dimensions"):
        score_batch(np.array([1.0, 2.0]))


def test_earlier_incidents_stay_out_of_baseline() -> None:
    # Two earlier error bursts fill a third of the history; the third burst
    # must still stand out, because flagged points leave the baseline.
    rng = np.random.default_rng(1)

    def good(n: int) -> np.ndarray:
        return 0.005 + np.clip(rng.normal(0, 0.01, n), -0.005, None)

    def bad(n: int) -> np.ndarray:
        return 0.35 + rng.normal(0, 0.05, n)

    series = np.concatenate([good(8), bad(5), good(5), bad(5), good(5), bad(4)])
    result = score_batch(series[None, :])
    assert bool(result.anomalous[0])
    assert int(result.sustained_points[0]) == 4


def test_anomaly_scores_use_only_earlier_points() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(5.0, 1.0, (4, 700))
    values[1, 500:] += 4.0
    values[2, rng.choice(700, 50, replace=False)] = np.nan
    full = anomaly_scores(values)
    for end in (10, 299, 301, 600):
        np.testing.assert_array_equal(full[:, :end], anomaly_scores(values[:, :end]))


def test_anomaly_scores_in_unit_interval() -> None:
    rng = np.random.default_rng(5)
    values = rng.lognormal(0.0, 2.0, (20, 400))
    values[:, 200:] *= 1000.0
    values[3, :50] = np.nan
    scores = anomaly_scores(values)
    assert np.all(np.isnan(scores[3, :50]))
    finite = scores[~np.isnan(scores)]
    assert np.all(finite >= 0.0)
    assert np.all(finite < 1.0)


def test_anomaly_scores_flag_step_at_threshold() -> None:
    rng = np.random.default_rng(8)
    values = rng.normal(10.0, 0.5, (1, 800))
    values[0, 700:] += 20.0
    scores = anomaly_scores(values)[0]
    assert scores[700] >= DEFAULT_THRESHOLD
    assert np.mean(scores[100:700] >= DEFAULT_THRESHOLD) < 0.01


def test_anomaly_scores_direction() -> None:
    values = np.concatenate([np.tile([1.0, 2.0], 100), [-50.0]])[None, :]
    assert anomaly_scores(values, "up")[0, -1] == 0.0
    assert anomaly_scores(values, "down")[0, -1] >= DEFAULT_THRESHOLD
    assert anomaly_scores(values, "both")[0, -1] >= DEFAULT_THRESHOLD


def test_alarm_scores_keep_new_highs_only() -> None:
    scores = np.array([[0.1, 0.9, 0.85, 0.95, np.nan, 0.2]])
    np.testing.assert_array_equal(
        alarm_scores(scores, hold_points=3), [[0.1, 0.9, 0.0, 0.95, 0.0, 0.0]]
    )
    # After hold_points rows, a lower score is an alarm again.
    np.testing.assert_array_equal(
        alarm_scores(scores, hold_points=1), [[0.1, 0.9, 0.0, 0.95, 0.0, 0.2]]
    )


def daily_pattern(days: int = 5, noise: float = 0.1) -> np.ndarray:
    """A daily sine at NAB's 5-minute step (288 points a day) with noise."""
    rng = np.random.default_rng(12)
    t = np.arange(288 * days)
    return 10.0 + 5.0 * np.sin(2 * np.pi * t / 288) + rng.normal(0.0, noise, t.size)


def test_missing_daily_peak_is_flagged() -> None:
    clean = daily_pattern()
    values = clean.copy()
    # On the last day the peak stays at the mean level: every value lies
    # inside the range of earlier days, so only the seasonal change shows it.
    peak = slice(288 * 4 + 20, 288 * 4 + 120)
    values[peak] = 10.0 + np.random.default_rng(13).normal(0.0, 0.1, 100)
    assert values[peak].max() < clean[: peak.start].max()
    assert values[peak].min() > clean[: peak.start].min()

    for scores in (
        anomaly_scores(values[None])[0],
        score_batch(values[None], direction="both").scores[0],
    ):
        assert np.any(scores[peak] >= DEFAULT_THRESHOLD)
        assert not np.any(scores[400 : peak.start] >= DEFAULT_THRESHOLD)


def test_regular_daily_pattern_is_not_flagged() -> None:
    scores = anomaly_scores(daily_pattern()[None])[0]
    assert not np.any(scores[400:] >= DEFAULT_THRESHOLD)
