"""The `score_series` activity: confirm an anomaly in golden-signal series.

The detector worker runs it on the `remediation-detection` task queue, and the
incident workflow and the detection sweep call it with the evidence series.
Scoring is streaming: a point's score uses only that point and earlier ones.

`anomaly_scores` gives each point six causal features (described below),
each divided by its value at the threshold. The largest, u, maps to
u / (u + 0.25) in [0, 1), so scores of different series compare and u = 1
scores DEFAULT_THRESHOLD. `alarm_scores` turns those scores into alarms.
Together they are the detector measured on NAB (docs/benchmarks.md).

`score_batch`, which makes the verdicts, uses the same features with one
change: a point at or above the threshold stays out of the novelty baseline
(the range of earlier values) for the next EPISODE_POINTS points. So a
sustained step keeps scoring high for as long as it lasts, and an episode does
not hide a repeat of itself shortly after. Past EPISODE_POINTS the baseline
takes the episode's points in, so a lasting level shift stops alarming. The
same code runs on torch (`activities.detection_torch`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows.models import DetectionInput, DetectionResult, SeriesVerdict

logger = logging.getLogger(__name__)

# Minimum number of non-gap earlier points a point needs to be scored.
MIN_BASELINE_POINTS = 8
DEFAULT_THRESHOLD = 0.8
# Lower bound of a window's standard deviation, for series that sit at 0.
ABSOLUTE_SCALE_FLOOR = 1e-6


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


def score_batch(
    values: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    direction: str = "up",
) -> BatchScores:
    """Score every point of every series from the points up to it.

    `values` has shape (n_series, n_points) in time order; NaN and infinities
    are gaps, which are neither scored nor part of a baseline. Series of
    different lengths are padded with NaN at the start so that their last
    points align. `direction` is "up" (only increases are anomalous, right for
    error ratio and latency), "down" or "both".

    A point is scored once it has MIN_BASELINE_POINTS earlier non-gap points.
    The verdict of a series uses its last scored point, which is `anomalous`
    when its score is at or above `threshold`. `sustained_points` counts the
    trailing run of scored points at or above the threshold, and gaps neither
    extend nor end that run. A series with no scored point has score 0.
    """
    values = _check_values(values, direction)
    if values.size == 0:
        return batch_verdicts(values.copy(), np.zeros(values.shape, bool), threshold)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores, scored = _episode_scores(values, threshold, direction, _NUMPY_OPS)
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


# --- Streaming detector tuned on NAB -----------------------------------------
#
# `anomaly_scores` scores each point from six causal features, each divided by
# its value at the threshold, and takes the maximum u:
#
# - novelty: how far the value lies beyond the minimum or maximum of every
#   earlier point, as a fraction of that earlier range;
# - the same novelty for the mean of the last `SMOOTH_POINTS` points;
# - z-scores against the mean and standard deviation of the previous
#   `LONG_WINDOW` and of the previous `SHORT_WINDOW` points;
# - the seasonal change: the mean of the last `SEASON_MEAN_POINTS` points
#   minus that mean `SEASON_LAG` rows earlier (one day at NAB's usual 5-minute
#   step). It counts twice: as a z-score against the previous `LONG_WINDOW`
#   changes, and as a novelty against the range of every earlier change.
#
# u maps to u / (u + 0.25), so u = 1 scores DEFAULT_THRESHOLD (0.8). The
# windows and the values at the threshold were chosen by a search that
# maximised the NAB standard profile score on the NAB corpus itself. The
# seasonal features need SEASON_MEAN_POINTS + SEASON_LAG points, so they do
# not act on the service's default evidence windows (20 to 120 points).
LONG_WINDOW = 1000
SHORT_WINDOW = 300
SMOOTH_POINTS = 20
SEASON_LAG = 288
SEASON_MEAN_POINTS = 48
NOVELTY_AT_THRESHOLD = 0.0149
SMOOTH_NOVELTY_AT_THRESHOLD = 0.0657
LONG_Z_AT_THRESHOLD = 44.8
SHORT_Z_AT_THRESHOLD = 47.8
SEASON_Z_AT_THRESHOLD = 12.0
SEASON_NOVELTY_AT_THRESHOLD = 1.25
# Lower bound of a window's standard deviation, relative to its mean.
Z_RELATIVE_SCALE_FLOOR = 1e-3
# Lower bound of the earlier range in the novelties, relative to the largest
# absolute value in it.
RANGE_RELATIVE_FLOOR = 1e-3
# An alarm is a point whose score is above every score of the previous
# ALARM_HOLD_POINTS points.
ALARM_HOLD_POINTS = 100
# Below this many earlier points, the novelty needed grows in inverse
# proportion to their count (10 times at 30 points), because a small
# baseline's range is narrow and noise sets new records often. On 500
# 30-point windows of Gaussian noise, the last point scored anomalous in 18.6%
# of them with the threshold of a full baseline, and in 2.2% with this rule.
# A step of an error ratio from 1% to 30% exceeds such a range many times over
# and still scores high.
SMALL_BASELINE_POINTS = 300
# Points after which a flagged point joins the novelty baseline of
# `score_batch`. Longer than the service's evidence windows (20 to 120 points),
# so an episode inside a window never widens the baseline.
EPISODE_POINTS = 100


def anomaly_scores(values: np.ndarray, direction: str = "both") -> np.ndarray:
    """Score every point of every series from the points up to it.

    `values` has shape (n_series, n_points), NaN-padded at the start like
    `score_batch`; NaN and infinities are gaps, which are scored NaN and left
    out of every baseline. Scores are in [0, 1), and a point without a
    baseline yet scores 0. `direction` is as in `score_batch`.
    """
    values = _check_values(values, direction)
    with np.errstate(invalid="ignore"):
        return _anomaly_scores(values, direction, _NUMPY_OPS)


def alarm_scores(
    scores: np.ndarray, hold_points: int = ALARM_HOLD_POINTS
) -> np.ndarray:
    """Keep a point's score only when it exceeds the previous `hold_points`.

    Every other point scores 0, and gaps (NaN) score 0. An anomaly keeps
    scoring high for many points and only its first alarm is useful, so this
    step turns an episode into a few alarms. It uses earlier scores only.
    """
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    previous = _shift(
        _sliding_max(scores, hold_points, _NUMPY_OPS), 1, -np.inf, _NUMPY_OPS
    )
    return np.where(scores > previous, scores, 0.0)


def _check_values(values: np.ndarray, direction: str) -> np.ndarray:
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction {direction!r} is not up, down or both")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must have 2 dimensions, not {values.ndim}")
    return np.where(np.isfinite(values), values, np.nan)


@dataclass(frozen=True)
class ArrayOps:
    """The array functions of `anomaly_scores`, so that numpy and torch share
    one implementation. Every array is (n_series, n_points)."""

    full: Callable  # (like, shape, fill) -> array of like's dtype and device
    cat: Callable  # list of arrays -> one array, joined along time
    cumsum: Callable  # along time
    cummax: Callable  # running maximum along time
    first_present: Callable  # (values, present) -> (n_series, 1) first value
    isnan: Callable
    where: Callable
    maximum: Callable
    minimum: Callable
    amax: Callable  # maximum over time, one value per series
    sqrt: Callable


def _numpy_first_present(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    first = values[np.arange(values.shape[0]), np.argmax(present, axis=1)]
    return np.where(np.isnan(first), 0.0, first)[:, None]


_NUMPY_OPS = ArrayOps(
    full=lambda like, shape, fill: np.full(shape, fill, dtype=like.dtype),
    cat=lambda parts: np.concatenate(parts, axis=1),
    cumsum=lambda a: np.cumsum(a, axis=1),
    cummax=lambda a: np.maximum.accumulate(a, axis=1),
    first_present=_numpy_first_present,
    isnan=np.isnan,
    where=np.where,
    maximum=np.maximum,
    minimum=np.minimum,
    amax=lambda a: np.max(a, axis=1),
    sqrt=np.sqrt,
)


def _anomaly_scores(values, direction: str, ops: ArrayOps):
    """`anomaly_scores` for arrays of either library; gaps must be NaN."""
    nan = ops.full(values, (), np.nan)
    novelty_needed = NOVELTY_AT_THRESHOLD * _small_baseline_factor(values, ops)
    u = ops.maximum(
        _novelty(values, direction, ops, floored=True) / novelty_needed,
        _context_features(values, direction, ops),
    )
    u = ops.where(ops.isnan(u), ops.full(values, (), 0.0), u)
    return ops.where(ops.isnan(values), nan, u / (u + 0.25))


def _context_features(values, direction: str, ops: ArrayOps):
    """Return the largest of the five features other than the value's novelty,
    each divided by its value at the threshold; 0 where none has a baseline."""
    nan = ops.full(values, (), np.nan)
    smooth_mean, _, smooth_count = _rolling_mean_std(values, SMOOTH_POINTS, True, ops)
    smooth = ops.where(smooth_count >= SMOOTH_POINTS, smooth_mean, nan)
    smooth_needed = SMOOTH_NOVELTY_AT_THRESHOLD * _small_baseline_factor(values, ops)
    u = _novelty(smooth, direction, ops) / smooth_needed
    u = ops.maximum(
        u, _window_z(values, LONG_WINDOW, direction, ops) / LONG_Z_AT_THRESHOLD
    )
    u = ops.maximum(
        u, _window_z(values, SHORT_WINDOW, direction, ops) / SHORT_Z_AT_THRESHOLD
    )
    u = ops.maximum(u, _seasonal_features(values, direction, ops))
    return ops.where(ops.isnan(u), ops.full(values, (), 0.0), u)


def _seasonal_features(values, direction: str, ops: ArrayOps):
    """Return the larger of the seasonal change's z-score and novelty, each
    divided by its value at the threshold. It is NaN until the change exists."""
    nan = ops.full(values, (), np.nan)
    mean, _, count = _rolling_mean_std(values, SEASON_MEAN_POINTS, True, ops)
    mean = ops.where(count >= SEASON_MEAN_POINTS, mean, nan)
    change = mean - _shift(mean, SEASON_LAG, np.nan, ops)
    z = _window_z(change, LONG_WINDOW, direction, ops) / SEASON_Z_AT_THRESHOLD
    novelty = _novelty(change, direction, ops) / SEASON_NOVELTY_AT_THRESHOLD
    return ops.maximum(z, novelty)


def _episode_scores(values, threshold: float, direction: str, ops: ArrayOps):
    """Return the scores and scored mask of `score_batch`; gaps must be NaN.

    The value's novelty needs the range of the earlier points that count:
    every point older than EPISODE_POINTS, and the recent points that scored
    under the threshold. Whether a point counts depends on its own score, so
    this walks the points in time order, all series at once.
    """
    # NOTE: the first MIN_BASELINE_POINTS points are never flagged, so an
    # episode already underway when the series starts stays in the baseline,
    # and a repeat of it later in the same series may not stand out.
    n_series, n_points = values.shape
    window = EPISODE_POINTS
    context = _context_features(values, direction, ops)
    novelty_needed = NOVELTY_AT_THRESHOLD * _small_baseline_factor(values, ops)
    # Column j of `history` is point j - window, NaN before the first point.
    history = ops.cat([ops.full(values, (n_series, window), np.nan), values])
    flagged = ops.full(values, (n_series, window + n_points), 0.0)
    old_high = ops.full(values, (n_series,), -np.inf)
    old_low = ops.full(values, (n_series,), np.inf)
    earlier = ops.full(values, (n_series,), 0.0)
    zero = ops.full(values, (n_series,), 0.0)
    one = ops.full(values, (n_series,), 1.0)
    columns = []
    for t in range(n_points):
        if t > 0:
            # Point t - window - 1 leaves the recent points and always counts.
            leaving = history[:, t - 1]
            missing = ops.isnan(leaving)
            old_high = ops.where(missing, old_high, ops.maximum(old_high, leaving))
            old_low = ops.where(missing, old_low, ops.minimum(old_low, leaving))
        recent = history[:, t : t + window]
        left_out = ops.isnan(recent) | (flagged[:, t : t + window] > 0)
        high = ops.maximum(old_high, ops.amax(ops.where(left_out, -np.inf, recent)))
        low = ops.minimum(old_low, -ops.amax(ops.where(left_out, -np.inf, -recent)))

        value = history[:, t + window]
        present = ~ops.isnan(value)
        novelty = _beyond_range(value, high, low, direction, ops, floored=True)
        u = ops.maximum(novelty / novelty_needed[:, t], context[:, t])
        score = u / (u + 0.25)
        hit = present & (earlier >= MIN_BASELINE_POINTS) & (score >= threshold)
        flagged[:, t + window] = ops.where(hit, one, zero)
        columns.append(ops.where(present, score, value)[:, None])
        earlier = earlier + ops.where(present, one, zero)

    present = ~ops.isnan(values)
    counts = ops.cumsum(
        ops.where(present, ops.full(values, (), 1.0), ops.full(values, (), 0.0))
    )
    scored = present & (_shift(counts, 1, 0.0, ops) >= MIN_BASELINE_POINTS)
    if not columns:
        return values, scored
    scores = ops.cat(columns)
    return ops.where(scored, scores, ops.full(values, (), np.nan)), scored


def _small_baseline_factor(values, ops: ArrayOps):
    """Return how many times more novelty each point needs than with a full
    baseline: SMALL_BASELINE_POINTS over its count of earlier non-gap points,
    at least 1."""
    present = ops.where(
        ops.isnan(values), ops.full(values, (), 0.0), ops.full(values, (), 1.0)
    )
    earlier = _shift(ops.cumsum(present), 1, 0.0, ops)
    one = ops.full(values, (), 1.0)
    return ops.maximum(one, SMALL_BASELINE_POINTS / ops.maximum(earlier, one))


def _shift(a, rows: int, fill: float, ops: ArrayOps):
    """`a` moved `rows` points later in time, with `fill` in front."""
    if rows <= 0:
        return a
    rows = min(rows, a.shape[1])
    return ops.cat([ops.full(a, (a.shape[0], rows), fill), a[:, : a.shape[1] - rows]])


def _sliding_max(a, window: int, ops: ArrayOps):
    """Maximum over each point and the `window - 1` points before it."""
    # Doubling: after each step, `out` covers `span` points.
    out, span = a, 1
    while span * 2 <= window:
        out = ops.maximum(out, _shift(out, span, -np.inf, ops))
        span *= 2
    if span < window:
        out = ops.maximum(out, _shift(out, window - span, -np.inf, ops))
    return out


def _signed(deviation, direction: str, ops: ArrayOps):
    """Return the part of `deviation` (positive is up) that `direction` counts."""
    zero = ops.full(deviation, (), 0.0)
    if direction == "up":
        return ops.maximum(deviation, zero)
    if direction == "down":
        return ops.maximum(-deviation, zero)
    return ops.maximum(deviation, -deviation)


def _novelty(values, direction: str, ops: ArrayOps, floored: bool = False):
    """Return the distance beyond the range of every earlier point, over that
    range. It is 0 at a gap, while the earlier range is empty, or while it is 0
    and not `floored` (see `_beyond_range`)."""
    missing = ops.isnan(values)
    high = _shift(ops.cummax(ops.where(missing, -np.inf, values)), 1, -np.inf, ops)
    low = -_shift(ops.cummax(ops.where(missing, -np.inf, -values)), 1, -np.inf, ops)
    return _beyond_range(values, high, low, direction, ops, floored)


def _beyond_range(
    values, high, low, direction: str, ops: ArrayOps, floored: bool = False
):
    """Return the distance of `values` beyond [low, high], over high - low.
    It is 0 at a gap or while that range is empty.

    Without `floored`, a range of 0 gives 0 too. With it, the range counts as
    at least RANGE_RELATIVE_FLOOR of its largest absolute value (and at least
    ABSOLUTE_SCALE_FLOOR), so a departure from a constant baseline, such as an
    error ratio that was 0, is novel.
    """
    spread = high - low
    known = (spread >= 0) if floored else (spread > 0)
    valid = ~ops.isnan(values) & known & (spread < np.inf)
    one = ops.full(values, (), 1.0)
    if floored:
        level = ops.maximum(ops.maximum(high, -high), ops.maximum(low, -low))
        floor = ops.maximum(
            RANGE_RELATIVE_FLOOR * ops.where(valid, level, one),
            ops.full(values, (), ABSOLUTE_SCALE_FLOOR),
        )
        spread = ops.maximum(spread, floor)
    spread = ops.where(valid, spread, one)
    above = _signed(ops.where(valid, values - high, -one), "up", ops)
    below = _signed(ops.where(valid, low - values, -one), "up", ops)
    if direction == "up":
        excess = above
    elif direction == "down":
        excess = below
    else:
        excess = ops.maximum(above, below)
    return excess / spread


def _rolling_mean_std(values, window: int, include_current: bool, ops: ArrayOps):
    """Mean, standard deviation and count of the non-gap points among the
    `window` points before each point, or ending at it."""
    present = ~ops.isnan(values)
    zero = ops.full(values, (), 0.0)
    # Sums run relative to each series' first value, to keep them small.
    reference = ops.first_present(values, present)
    relative = ops.where(present, values - reference, zero)
    sums = []
    for part in (relative, relative * relative, ops.where(present, zero + 1.0, zero)):
        cumulative = ops.cumsum(part)
        if not include_current:
            cumulative = _shift(cumulative, 1, 0.0, ops)
        sums.append(cumulative - _shift(cumulative, window, 0.0, ops))
    total, squares, count = sums
    safe_count = ops.maximum(count, zero + 1.0)
    mean = total / safe_count
    variance = ops.maximum(squares / safe_count - mean * mean, zero)
    mean = ops.where(count > 0, mean + reference, ops.full(values, (), np.nan))
    return mean, ops.sqrt(variance), count


def _window_z(values, window: int, direction: str, ops: ArrayOps):
    """z-score against the previous `window` points; 0 with fewer than
    MIN_BASELINE_POINTS of them, or at a gap."""
    mean, std, count = _rolling_mean_std(values, window, False, ops)
    zero = ops.full(values, (), 0.0)
    valid = ~ops.isnan(values) & (count >= MIN_BASELINE_POINTS)
    mean = ops.where(valid, mean, zero)
    floor = ops.maximum(
        Z_RELATIVE_SCALE_FLOOR * ops.maximum(mean, -mean), zero + ABSOLUTE_SCALE_FLOOR
    )
    deviation = (ops.where(valid, values, zero) - mean) / ops.maximum(std, floor)
    return _signed(deviation, direction, ops)


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


def score_detection_input(input: DetectionInput, backend=None) -> DetectionResult:
    """Score every series of `input` and build one verdict per series.

    `backend` is an `activities.detection_backend.DetectionBackend`. It picks
    the device and splits the series into batches that fit its memory. Without
    one, numpy scores the whole input at once on the CPU.
    """
    if not 0.0 < input.threshold <= 1.0:
        raise ValueError(f"threshold {input.threshold} is not in (0, 1]")
    values = pack_series([series.values for series in input.series])
    if backend is None:
        batch = score_batch(values, input.threshold)
    else:
        batch = backend.score_batched(values, input.threshold)
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
    device = "cpu" if backend is None else backend.device
    return DetectionResult(verdicts=verdicts, device=device)


class DetectionActivities:
    """Anomaly scoring activities of the detector worker.

    `backend` is passed on to `score_detection_input`; the detection worker
    gives the one `select_backend` chose.
    """

    def __init__(self, backend=None) -> None:
        self._backend = backend

    @activity.defn(name="score_series")
    async def score_series(self, input: DetectionInput) -> DetectionResult:
        """Score each series and return its verdict, in input order.

        Raises a non-retryable ApplicationError when the threshold is not in
        (0, 1], because a retry cannot fix the input.
        """
        try:
            result = await asyncio.to_thread(
                score_detection_input, input, self._backend
            )
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
