"""A scorer for the Numenta Anomaly Benchmark, written from its SCORING.md.

The rules, as SCORING.md states them:

- Each row of a file has an anomaly score in [0, 1]; a row is a detection when
  its score is at or above the threshold. One threshold per profile is chosen
  for the whole corpus, the one that maximises the total score.
- The first min(floor(0.15 n), 750) rows of a file of n rows are a probation
  period and are not scored.
- s(y) = 2 / (1 + e^(5y)) - 1 for y <= 3, and -1 for y > 3.
- The earliest detection in a window of width w with right edge r, at row i,
  scores TP_weight * s(y) / s(-1) with y = -(r - i + 1) / w. A window without
  a detection scores -FN_weight. Later detections in a window add nothing.
- A detection outside every window scores FP_weight * s(y) with
  y = |r_prev - i| / (w_prev - 1), from the previous window's right edge and
  width, or -FP_weight when no window precedes it in the file.
- Normalised score = 100 * (S - S_null) / (S_perfect - S_null), where
  S_perfect = n_windows * TP_weight and S_null = -n_windows * FN_weight.

The threshold search is exact: the total score is a step function of the
threshold that changes only at row scores, so `optimise_threshold` turns each
file into (threshold, score change) events and takes the best prefix sum.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750


@dataclass(frozen=True)
class Profile:
    """Weights of one NAB cost profile."""

    name: str
    tp: float
    fn: float
    fp: float


PROFILES: tuple[Profile, ...] = (
    Profile("standard", tp=1.0, fn=1.0, fp=0.11),
    Profile("reward_low_FP_rate", tp=1.0, fn=1.0, fp=0.22),
    Profile("reward_low_FN_rate", tp=1.0, fn=2.0, fp=0.11),
)


@dataclass(frozen=True)
class Window:
    """A labelled anomaly window as row indices, both edges inclusive."""

    left: int
    right: int

    @property
    def width(self) -> int:
        return self.right - self.left + 1


@dataclass(frozen=True)
class FileResult:
    """Anomaly scores of one data file and its labelled windows."""

    name: str
    scores: np.ndarray
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class ProfileScore:
    """Outcome of scoring a corpus under one profile."""

    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    normalised: float


def sigmoid(y: float) -> float:
    """The scaled sigmoid s(y): 2 / (1 + e^(5y)) - 1, and -1 for y > 3."""
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def probation_rows(n_rows: int) -> int:
    """Rows at the start of a file of `n_rows` rows that are not scored."""
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_MAX_ROWS)


def tp_value(window: Window, row: int, profile: Profile) -> float:
    """Score of the earliest detection of `window` at `row`."""
    y = -(window.right - row + 1) / window.width
    return profile.tp * sigmoid(y) / sigmoid(-1.0)


def fp_value(previous: Window | None, row: int, profile: Profile) -> float:
    """Score (negative) of a detection at `row` outside every window."""
    if previous is None:
        return -profile.fp
    y = abs(previous.right - row) / max(previous.width - 1, 1)
    return profile.fp * sigmoid(y)


def score_detections(
    detections: np.ndarray, windows: Sequence[Window], profile: Profile
) -> float:
    """Raw score of one file for a boolean detection per row."""
    detections = np.asarray(detections, dtype=bool).copy()
    detections[: probation_rows(len(detections))] = False
    windows = sorted(windows, key=lambda window: window.left)
    total = 0.0
    in_window = np.zeros(len(detections), dtype=bool)
    for window in windows:
        in_window[window.left : window.right + 1] = True
        hits = np.flatnonzero(detections[window.left : window.right + 1])
        if hits.size:
            total += tp_value(window, window.left + int(hits[0]), profile)
        else:
            total -= profile.fn
    for row in np.flatnonzero(detections & ~in_window):
        total += fp_value(_previous_window(windows, int(row)), int(row), profile)
    return total


def _previous_window(windows: Sequence[Window], row: int) -> Window | None:
    previous = None
    for window in windows:
        if window.right < row:
            previous = window
    return previous


def threshold_events(
    scores: np.ndarray, windows: Sequence[Window], profile: Profile
) -> tuple[np.ndarray, np.ndarray]:
    """Events (threshold, change) of one file's score as the threshold falls.

    The file scores -FN for every window when the threshold is above every
    row score; lowering the threshold to an event's value adds its change.
    """
    scores = np.asarray(scores, dtype=np.float64).copy()
    scores[: probation_rows(len(scores))] = np.nan
    windows = sorted(windows, key=lambda window: window.left)
    values: list[float] = []
    changes: list[float] = []
    in_window = np.zeros(len(scores), dtype=bool)
    for window in windows:
        in_window[window.left : window.right + 1] = True
        # The earliest detection is the first row whose score reaches the
        # threshold: the running maximum's records, from the left, are the
        # thresholds at which it moves, and the highest record comes first.
        best = -math.inf
        records: list[tuple[float, int]] = []
        for offset, value in enumerate(scores[window.left : window.right + 1]):
            if not math.isnan(value) and value > best:
                best = float(value)
                records.append((best, window.left + offset))
        previous_value = -profile.fn
        for value, row in reversed(records):
            current = tp_value(window, row, profile)
            values.append(value)
            changes.append(current - previous_value)
            previous_value = current
    outside = np.flatnonzero(~in_window & ~np.isnan(scores))
    for row in outside:
        values.append(float(scores[row]))
        changes.append(fp_value(_previous_window(windows, int(row)), int(row), profile))
    return np.asarray(values, dtype=np.float64), np.asarray(changes, dtype=np.float64)


def optimise_threshold(
    files: Iterable[FileResult], profile: Profile
) -> tuple[float, float]:
    """The corpus threshold that maximises the raw score, and that score.

    With no detection better than none, the threshold is above 1 (no row is
    a detection) and the score is the null score.
    """
    files = list(files)
    base = -profile.fn * sum(len(file.windows) for file in files)
    all_values = []
    all_changes = []
    for file in files:
        values, changes = threshold_events(file.scores, file.windows, profile)
        all_values.append(values)
        all_changes.append(changes)
    values = np.concatenate(all_values) if all_values else np.zeros(0)
    changes = np.concatenate(all_changes) if all_changes else np.zeros(0)
    if values.size == 0:
        return math.inf, base
    order = np.argsort(-values, kind="stable")
    values = values[order]
    totals = base + np.cumsum(changes[order])
    # A threshold admits every event at or above it, so only the last event
    # of a run of equal values is a reachable total.
    last_of_value = np.append(values[1:] != values[:-1], True)
    candidates = np.flatnonzero(last_of_value)
    best = candidates[np.argmax(totals[candidates])]
    if totals[best] <= base:
        return math.inf, base
    return float(values[best]), float(totals[best])


def score_corpus(
    files: Sequence[FileResult], profiles: Sequence[Profile] = PROFILES
) -> list[ProfileScore]:
    """Optimise the threshold and normalise the score for each profile."""
    n_windows = sum(len(file.windows) for file in files)
    results = []
    for profile in profiles:
        threshold, raw = optimise_threshold(files, profile)
        null = -n_windows * profile.fn
        perfect = n_windows * profile.tp
        results.append(
            ProfileScore(
                profile=profile.name,
                threshold=threshold,
                raw=raw,
                null=null,
                perfect=perfect,
                normalised=100.0 * (raw - null) / (perfect - null),
            )
        )
    return results


def parse_timestamp(text: str) -> datetime:
    """Parse NAB timestamps, with or without fractional seconds."""
    return datetime.fromisoformat(text.strip())


def windows_to_rows(
    timestamps: Sequence[datetime], windows: Iterable[Sequence[str]]
) -> tuple[Window, ...]:
    """Row windows of labelled (start, end) timestamp pairs, edges inclusive."""
    stamps = np.array(timestamps, dtype="datetime64[us]")
    rows = []
    for start, end in windows:
        left = int(np.searchsorted(stamps, np.datetime64(parse_timestamp(start))))
        right = (
            int(np.searchsorted(stamps, np.datetime64(parse_timestamp(end)), "right"))
            - 1
        )
        if right >= left:
            rows.append(Window(left, right))
    return tuple(rows)


def read_results(
    results_dir: Path, detector: str, labels_path: Path
) -> list[FileResult]:
    """Read result files in NAB's layout and attach the labelled windows.

    `results_dir/<detector>/<category>/<detector>_<file>.csv` must exist for
    every file in the labels, with an `anomaly_score` column.
    """
    labels = json.loads(Path(labels_path).read_text())
    files = []
    for name, windows in sorted(labels.items()):
        category, file_name = name.split("/")
        path = Path(results_dir) / detector / category / f"{detector}_{file_name}"
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        timestamps = [parse_timestamp(row["timestamp"]) for row in rows]
        scores = np.array([float(row["anomaly_score"]) for row in rows])
        files.append(FileResult(name, scores, windows_to_rows(timestamps, windows)))
    return files


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results folder")
    parser.add_argument("detector", help="detector name (its sub-folder)")
    parser.add_argument("labels", type=Path, help="combined_windows.json")
    args = parser.parse_args()
    for result in score_corpus(read_results(args.results, args.detector, args.labels)):
        print(
            f"{result.profile:20s} normalised {result.normalised:6.1f}"
            f"  raw {result.raw:8.2f}  threshold {result.threshold:.4f}"
        )


if __name__ == "__main__":
    main()
