"""Run our anomaly detector over the NAB corpus and score it with our scorer.

    .venv/bin/python bench/nab_benchmark.py --data ../shared/data/nab \
        [--out DIR] [--variants NAME,NAME]

Each variant scores every series with streaming semantics (a row's score uses
only the rows before it), writes NAB result files to
`DIR/<variant>/<category>/<variant>_<file>.csv` (columns
timestamp,value,anomaly_score,label) and prints the normalised score of the
three profiles, with the corpus threshold the scorer chose. The scores are
reproducible from the result files with

    .venv/bin/python -m bench.nab.scorer DIR <variant> \
        /work/shared/data/nab/labels/combined_windows.json

Variants:

- `remediator`: the verdict scorer, `score_batch` with direction "both"
  (`anomaly_scores`' features, with points at or above the threshold kept out
  of the novelty baseline for `EPISODE_POINTS`), then `alarm_scores`.
- `onepass`: `anomaly_scores` alone, then `alarm_scores`.
- `medianup`: the former production detector (a two-pass robust median and
  MAD z-score over 60 baseline points, direction "up"), kept in this file.
- `medianboth`: the same with direction "both".
- `normmedianboth`: `medianboth` on the series mapped causally to
  (x - min) / (max - min) + 1 over the earlier rows.
- `gaussian`: a rolling-window mean and standard deviation z-score (300 rows),
  both directions, the classic "windowed Gaussian".
- `gaussian1000hold`: the same over 1,000 rows, with the hold rule below; the
  best variant measured (a sweep of windows 300 / 1,000 / 3,000 rows and holds
  of 100 / 300 / 1,000 rows picked it on the standard profile).
- `...hold`: the variant's scores, but a row keeps its score only when it is
  above every score of the previous 100 rows (otherwise 0). Only the first
  detection in a window counts, so repeats of an alarm are pure FP cost; the
  rule uses earlier scores only, so it is still streaming.

Series are passed to the detector as they are, except in `normmedian...`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.detection import (  # noqa: E402
    MIN_BASELINE_POINTS,
    alarm_scores,
    anomaly_scores,
    score_batch,
)
from bench.nab.scorer import (  # noqa: E402
    FileResult,
    parse_timestamp,
    score_corpus,
    windows_to_rows,
)

HOLD_ROWS = 100

# The former production scorer, kept here so that its rows of the table in
# docs/benchmarks.md can be reproduced: a robust z-score (distance from the
# median of the previous 60 points in units of their MAD, scaled by 1.4826)
# with floors of 5% of the median and 1e-6, mapped by 1 - exp(-0.46 z) so that
# z = 3.5 gives 0.8, in two passes that leave the first pass's flags out of
# the second pass's medians.
MEDIAN_Z_AT_THRESHOLD = 3.5
MEDIAN_THRESHOLD = 0.8
MEDIAN_RELATIVE_SCALE_FLOOR = 0.05
MEDIAN_ABSOLUTE_SCALE_FLOOR = 1e-6
MAD_TO_SIGMA = 1.4826


def median_z(
    values: np.ndarray, baseline: np.ndarray, direction: str, baseline_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's robust z-score against the previous `baseline_points`
    rows of `baseline`, and how many non-gap rows that baseline contains."""
    n = len(values)
    padded = np.concatenate([np.full(baseline_points, np.nan), baseline])
    windows = np.lib.stride_tricks.sliding_window_view(padded, baseline_points)[:n]
    count = np.sum(~np.isnan(windows), axis=-1)
    with warnings.catch_warnings():
        # All-NaN windows give NaN medians, and those rows are unscored.
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(windows, axis=-1)
        mad = np.nanmedian(np.abs(windows - median[:, None]), axis=-1)
    scale = np.maximum(
        MAD_TO_SIGMA * mad,
        np.maximum(
            MEDIAN_RELATIVE_SCALE_FLOOR * np.abs(median), MEDIAN_ABSOLUTE_SCALE_FLOOR
        ),
    )
    deviation = (values - median) / scale
    if direction == "up":
        z = np.maximum(deviation, 0.0)
    elif direction == "down":
        z = np.maximum(-deviation, 0.0)
    else:
        z = np.abs(deviation)
    return z, count


def two_pass_z(values: np.ndarray, direction: str, baseline_points: int) -> np.ndarray:
    """Return the former production robust z-score, both passes, unmapped.

    Its mapping 1 - exp(-0.46 z) is exactly 1.0 in float64 from z of about 80;
    NAB series often reach such z (MAD 0 on integer counts), and equal scores
    cannot be ranked by a threshold. So the benchmark maps z with z / (z + 10)
    instead, which keeps the order of the scores without saturating.
    """
    rate = -np.log(1.0 - MEDIAN_THRESHOLD) / MEDIAN_Z_AT_THRESHOLD
    z, count = median_z(values, values, direction, baseline_points)
    first = ~np.isnan(values) & (count >= MIN_BASELINE_POINTS)
    flagged = first & (
        1.0 - np.exp(-rate * np.where(first, z, 0.0)) >= MEDIAN_THRESHOLD
    )
    clean = np.where(flagged, np.nan, values)
    z, count = median_z(values, clean, direction, baseline_points)
    scored = ~np.isnan(values) & (count >= MIN_BASELINE_POINTS)
    return np.where(scored, z, 0.0)


def causal_range_normalise(values: np.ndarray) -> np.ndarray:
    """Map a row to (x - min) / (max - min) + 1 over the rows before it.

    The offset of 1 keeps the median away from 0, so the detector's relative
    scale floor (5% of the median) bounds z on series whose MAD is 0.
    """
    earlier = np.concatenate([values[:1], values[:-1]])
    low = np.minimum.accumulate(earlier)
    high = np.maximum.accumulate(earlier)
    return (values - low) / np.where(high > low, high - low, 1.0) + 1.0


def normalised(detect: Callable) -> Callable:
    return lambda values: detect(causal_range_normalise(values))


def median_detector(direction: str, baseline_points: int) -> Callable:
    def detect(values: np.ndarray) -> np.ndarray:
        z = two_pass_z(values, direction, baseline_points)
        return z / (z + 10.0)

    return detect


def gaussian_detector(window: int = 300, min_points: int = 8) -> Callable:
    def detect(values: np.ndarray) -> np.ndarray:
        n = len(values)
        padded = np.concatenate([np.full(window, np.nan), values])
        windows = np.lib.stride_tricks.sliding_window_view(padded, window)[:n]
        count = np.sum(~np.isnan(windows), axis=1)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(windows, axis=1)
            std = np.nanstd(windows, axis=1)
        scale = np.maximum(std, np.maximum(1e-6, 0.001 * np.abs(mean)))
        z = np.abs(values - mean) / scale
        # Same mapping as the production score: z = 3.5 gives 0.8.
        scores = z / (z + 10.0)
        return np.where(count >= min_points, np.nan_to_num(scores), 0.0)

    return detect


def hold(detect: Callable, rows: int = HOLD_ROWS) -> Callable:
    def detect_held(values: np.ndarray) -> np.ndarray:
        scores = detect(values)
        padded = np.concatenate([np.full(rows, -np.inf), scores])
        previous = np.lib.stride_tricks.sliding_window_view(padded, rows)[: len(scores)]
        return np.where(scores > previous.max(axis=1), scores, 0.0)

    return detect_held


def remediator_detector(values: np.ndarray) -> np.ndarray:
    """Score with the verdict scorer (`score_batch`), then the
    alarm step.

    Unscored rows (NaN: gaps and the first rows) score 0.
    """
    return alarm_scores(score_batch(values[None, :], direction="both").scores)[0]


def one_pass_detector(values: np.ndarray) -> np.ndarray:
    """Score with the first pass alone (`anomaly_scores`), then the alarm step."""
    return alarm_scores(anomaly_scores(values[None, :]))[0]


VARIANTS: dict[str, Callable] = {
    "remediator": remediator_detector,
    "onepass": one_pass_detector,
    "medianup": median_detector("up", 60),
    "medianboth": median_detector("both", 60),
    "medianbothhold": hold(median_detector("both", 60)),
    "normmedianboth": normalised(median_detector("both", 60)),
    "gaussian": gaussian_detector(300),
    "gaussianhold": hold(gaussian_detector(300)),
    "gaussian1000hold": hold(gaussian_detector(1000)),
}


def load_corpus(data: Path) -> list[tuple[str, list[str], np.ndarray, tuple]]:
    labels = json.loads((data / "labels" / "combined_windows.json").read_text())
    corpus = []
    for name, windows in sorted(labels.items()):
        with (data / "data" / name).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        stamps = [(row["timestamp"], row["value"]) for row in rows]
        values = np.array([float(row["value"]) for row in rows])
        row_windows = windows_to_rows(
            [parse_timestamp(stamp) for stamp, _ in stamps], windows
        )
        corpus.append((name, stamps, values, row_windows))
    return corpus


def write_results(out: Path, detector: str, corpus, all_scores) -> None:
    for (name, stamps, values, windows), scores in zip(corpus, all_scores, strict=True):
        category, file_name = name.split("/")
        path = out / detector / category / f"{detector}_{file_name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = np.zeros(len(values), dtype=int)
        for window in windows:
            labels[window.left : window.right + 1] = 1
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["timestamp", "value", "anomaly_score", "label"])
            # The data file's timestamp and value text, unchanged.
            for (stamp, value), score, label in zip(
                stamps, scores, labels, strict=True
            ):
                writer.writerow([stamp, value, f"{score:.9f}", label])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    corpus = load_corpus(args.data)
    n_windows = sum(len(item[3]) for item in corpus)
    n_points = sum(len(item[2]) for item in corpus)
    print(f"{len(corpus)} files, {n_points} points, {n_windows} windows")
    print(f"{'variant':20s} standard  low_FP  low_FN  thresholds  seconds")
    for variant in args.variants.split(","):
        detect = VARIANTS[variant]
        started = time.perf_counter()
        # Scores are written and scored at 9 decimals, as in the files.
        all_scores = [np.round(detect(item[2]), 9) for item in corpus]
        seconds = time.perf_counter() - started
        files = [
            FileResult(name, scores, windows)
            for (name, _, _, windows), scores in zip(corpus, all_scores, strict=True)
        ]
        results = score_corpus(files)
        print(
            f"{variant:20s} "
            + "  ".join(f"{result.normalised:6.1f}" for result in results)
            + "  "
            + ",".join(f"{result.threshold:.4f}" for result in results)
            + f"  {seconds:6.1f}",
            flush=True,
        )
        if args.out is not None:
            write_results(args.out, variant, corpus, all_scores)


if __name__ == "__main__":
    main()
