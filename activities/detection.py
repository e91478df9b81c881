"""The `score_series` activity: confirm an anomaly in golden-signal series.

The detector worker runs it on the `remediation-detection` task queue, and the
incident workflow calls it with the evidence series before the decision step.
Scoring is streaming, so each point is scored only against points before it.
The score is a robust z-score (distance from the trailing median in units of
the trailing median absolute deviation) mapped to [0, 1], so scores of
different series compare. `score_batch` contains the numpy scorer as a pure
function over a (series, points) array, so that a GPU version can replace it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows.models import DetectionInput, DetectionResult, SeriesVerdict

logger = logging.getLogger(__name__)

# Earlier points that form a point's baseline. A baseline resists an anomaly
# until the anomaly fills half of it, because the median and MAD are robust up
# to 50% contamination.
BASELINE_POINTS = 60
# Minimum number of non-gap earlier points a point needs to be scored.
MIN_BASELINE_POINTS = 8
# Robust z-score that maps to a score of 0.8, the default threshold. 3.5 is the
# outlier cut-off commonly used with the modified (median and MAD) z-score.
Z_AT_DEFAULT_THRESHOLD = 3.5
DEFAULT_THRESHOLD = 0.8
# Lower bounds of the baseline scale, so that a flat baseline (MAD 0) does not
# turn the smallest change into an infinite z-score: a fraction of the median's
# magnitude, and an absolute floor for series that sit at 0.
RELATIVE_SCALE_FLOOR = 0.05
ABSOLUTE_SCALE_FLOOR = 1e-6
# Scale from MAD to the standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826

_Z_RATE = -math.log(1.0 - DEFAULT_THRESHOLD) / Z_AT_DEFAULT_THRESHOLD


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch of series, one row per series.

    `scores` is NaN where a point is a gap or has too short a baseline.
    """

    scores: np.ndarray
    last_score: np.ndarray
    anomalous: np.ndarray
    sustained_points: np.ndarray
    points_scored: np.ndarray


def z_to_score(z: np.ndarray) -> np.ndarray:
    """Map non-negative robust z-scores to [0, 1); z = 3.5 gives 0.8."""
    return 1.0 - np.exp(-_Z_RATE * z)


def score_batch(
    values: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    direction: str = "up",
    baseline_points: int = BASELINE_POINTS,
    min_baseline_points: int = MIN_BASELINE_POINTS,
) -> BatchScores:
    """Score every point of every series against the points before it.

    `values` has shape (n_series, n_points) in time order; NaN and infinities
    are gaps, which are neither scored nor part of a baseline. Series of
    different lengths are padded with NaN at the start so that their last
    points align. `direction` is "up" (only increases are anomalous, right for
    error ratio and latency), "down" or "both".

    The verdict of a series uses its last scored point, which is `anomalous`
    when its score is at or above `threshold`. `sustained_points` counts the
    trailing run of scored points at or above the threshold, and gaps neither
    extend nor end that run. A series with no scored point has score 0.
    """
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction {direction!r} is not up, down or both")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must have 2 dimensions, not {values.ndim}")
    n_series, n_points = values.shape
    values = np.where(np.isfinite(values), values, np.nan)

    # Pass one scores against every earlier point. Pass two drops the points
    # pass one flagged from the baselines, so an earlier incident does not
    # widen the baseline and hide the next one. Flags come from earlier points
    # only, so each score still uses only the points before it.
    z, baseline_count = _robust_z(values, values, direction, baseline_points)
    first_scored = ~np.isnan(values) & (baseline_count >= min_baseline_points)
    flagged = first_scored & (z_to_score(np.where(first_scored, z, 0.0)) >= threshold)
    clean = np.where(flagged, np.nan, values)
    z, baseline_count = _robust_z(values, clean, direction, baseline_points)

    scored = ~np.isnan(values) & (baseline_count >= min_baseline_points)
    scores = np.where(scored, z_to_score(np.where(scored, z, 0.0)), np.nan)

    return batch_verdicts(scores, scored, threshold)


def batch_verdicts(
    scores: np.ndarray, scored: np.ndarray, threshold: float
) -> BatchScores:
    """Build `BatchScores` from the scores and the mask of scored points."""
    n_series, n_points = scores.shape
    points_scored = scored.sum(axis=1)
    # Index of the last scored point of each row, or 0 for rows without one.
    last_index = n_points - 1 - np.argmax(scored[:, ::-1], axis=1) if n_points else 0
    has_score = points_scored > 0
    if n_points:
        last_score = np.where(has_score, scores[np.arange(n_series), last_index], 0.0)
    else:
        last_score = np.zeros(n_series)
    anomalous = has_score & (last_score >= threshold)

    # Trailing run: scored points at or above the threshold after the last
    # scored point below it.
    hits = scored & (scores >= threshold)
    misses = scored & ~hits
    if n_points:
        has_miss = misses.any(axis=1)
        last_miss = np.where(
            has_miss, n_points - 1 - np.argmax(misses[:, ::-1], axis=1), -1
        )
        positions = np.arange(n_points)[None, :]
        sustained_points = np.sum(hits & (positions > last_miss[:, None]), axis=1)
    else:
        sustained_points = np.zeros(n_series, dtype=np.int64)

    return BatchScores(
        scores=scores,
        last_score=last_score,
        anomalous=anomalous,
        sustained_points=sustained_points,
        points_scored=points_scored,
    )


def _robust_z(
    values: np.ndarray, baseline: np.ndarray, direction: str, baseline_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return each point's robust z-score against the earlier points of
    `baseline`, and how many non-gap points each baseline holds."""
    n_series, n_points = values.shape
    # windows[s, t] contains values[s, t - baseline_points : t], NaN before 0.
    padded = np.concatenate(
        [np.full((n_series, baseline_points), np.nan), baseline], axis=1
    )
    windows = np.lib.stride_tricks.sliding_window_view(padded, baseline_points, axis=1)[
        :, :n_points
    ]
    baseline_count = np.sum(~np.isnan(windows), axis=-1)

    with warnings.catch_warnings():
        # All-NaN windows give NaN medians, and those points are unscored.
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(windows, axis=-1)
        mad = np.nanmedian(np.abs(windows - median[..., None]), axis=-1)

    scale = np.maximum(
        MAD_TO_SIGMA * mad,
        np.maximum(RELATIVE_SCALE_FLOOR * np.abs(median), ABSOLUTE_SCALE_FLOOR),
    )
    deviation = (values - median) / scale
    if direction == "up":
        z = np.maximum(deviation, 0.0)
    elif direction == "down":
        z = np.maximum(-deviation, 0.0)
    else:
        z = np.abs(deviation)

    return z, baseline_count


def pack_series(series_values: list[list[float | None]]) -> np.ndarray:
    """Stack series of any length into one array, NaN-padded at the start."""
    width = max((len(values) for values in series_values), default=0)
    packed = np.full((len(series_values), width), np.nan)
    for row, values in enumerate(series_values):
        if values:
            packed[row, width - len(values) :] = [
                np.nan if value is None else value for value in values
            ]
    return packed


def score_detection_input(input: DetectionInput) -> DetectionResult:
    """Score every series of `input` and build one verdict per series."""
    if not 0.0 < input.threshold <= 1.0:
        raise ValueError(f"threshold {input.threshold} is not in (0, 1]")
    batch = score_batch(
        pack_series([series.values for series in input.series]), input.threshold
    )
    verdicts = []
    for row, series in enumerate(input.series):
        verdicts.append(
            SeriesVerdict(
                key=series.key,
                score=float(batch.last_score[row]),
                anomalous=bool(batch.anomalous[row]),
                sustained_seconds=float(batch.sustained_points[row])
                * series.step_seconds,
                points_scored=int(batch.points_scored[row]),
            )
        )
    return DetectionResult(verdicts=verdicts, device="cpu")


class DetectionActivities:
    """Anomaly scoring activities of the detector worker."""

    @activity.defn(name="score_series")
    async def score_series(self, input: DetectionInput) -> DetectionResult:
        """Score each series and return its verdict, in input order.

        Raises a non-retryable ApplicationError when the threshold is not in
        (0, 1], because a retry cannot fix the input.
        """
        try:
            result = await asyncio.to_thread(score_detection_input, input)
        except ValueError as error:
            logger.error("scoring %s series failed: %s", len(input.series), error)
            raise ApplicationError(
                str(error), type="InvalidDetectionInput", non_retryable=True
            ) from error
        if logger.isEnabledFor(logging.INFO):
            summary = ", ".join(
                f"{verdict.key}={verdict.score:.2f}"
                f"{' anomalous' if verdict.anomalous else ''}"
                for verdict in result.verdicts
            )
            logger.info("scored %s series: %s", len(input.series), summary)
        return result
