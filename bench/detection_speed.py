"""Detection speed: points scored per second, numpy vs torch vs PyOD.

    .venv/bin/python bench/detection_speed.py [--series 10000] [--points 1440]
        [--repeats 3] [--chunk 500] [--peer-series 10000] [--json FILE]

One synthetic batch (a seeded random walk around 10 with noise, spikes, step
changes and 1% gaps) is scored by

- `numpy`: `activities.detection.score_batch`, the verdict scorer, on chunks
  of `--chunk` series;
- `torch-cpu` and, when CUDA is available, `torch-cuda`:
  `activities.detection_torch.score_batch_torch` on the same batch (it
  chunks by itself), float64;
- `pyod-mad`: PyOD's `MAD` detector (median absolute deviation, a robust
  statistic), fitted and scored on each series separately, gaps dropped. It
  is a batch detector (each point is scored against the whole series, not the
  points before it), so it does less work per point than the streaming
  scorers; with `--peer-series` below `--series` it runs on that many series
  and its rate is extrapolated to the batch, which the output says.

Each scorer runs `--repeats` times; the script prints the median seconds,
points per second and each rate as a ratio to numpy. Torch is optional; without
it the torch rows are skipped. PyOD is required: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.detection import score_batch  # noqa: E402


def make_batch(n_series: int, n_points: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0.0, 0.05, (n_series, n_points)), axis=1)
    values = 10.0 + walk + rng.normal(0.0, 0.5, (n_series, n_points))
    spikes = rng.random((n_series, n_points)) < 0.002
    values[spikes] += rng.normal(0.0, 10.0, spikes.sum())
    steps = rng.integers(n_points // 2, n_points, n_series)
    values[np.arange(n_points)[None, :] >= steps[:, None]] += 5.0
    values[rng.random((n_series, n_points)) < 0.01] = np.nan
    return values


def numpy_scorer(chunk: int) -> Callable[[np.ndarray], None]:
    def run(values: np.ndarray) -> None:
        for start in range(0, len(values), chunk):
            score_batch(values[start : start + chunk])

    return run


def torch_scorer(device: str) -> Callable[[np.ndarray], None]:
    import torch

    from activities.detection_torch import score_batch_torch

    def run(values: np.ndarray) -> None:
        score_batch_torch(values, device=device)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def pyod_scorer() -> Callable[[np.ndarray], None]:
    from pyod.models.mad import MAD

    def run(values: np.ndarray) -> None:
        for series in values:
            present = series[~np.isnan(series)].reshape(-1, 1)
            MAD(threshold=3.5).fit(present)

    return run


def measure(run: Callable[[np.ndarray], None], values: np.ndarray, repeats: int):
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(values)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=1_440)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--peer-series", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    values = make_batch(args.series, args.points)
    total_points = values.size
    scorers: list[tuple[str, Callable, np.ndarray]] = [
        ("numpy", numpy_scorer(args.chunk), values)
    ]
    try:
        import torch
    except ImportError:
        print("torch is not installed: torch rows skipped")
    else:
        scorers.append(("torch-cpu", torch_scorer("cpu"), values))
        if torch.cuda.is_available():
            scorers.append(("torch-cuda", torch_scorer("cuda"), values))
    peer_series = min(args.peer_series or args.series, args.series)
    try:
        peer = pyod_scorer()
    except ImportError:
        sys.exit(
            "PyOD, the peer library this benchmark compares with, is not "
            "installed: run .venv/bin/pip install -e '.[bench]'"
        )
    scorers.append(("pyod-mad", peer, values[:peer_series]))

    print(
        f"{args.series} series x {args.points} points, {args.repeats} repeats, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    rows = []
    for name, run, batch in scorers:
        seconds = measure(run, batch, args.repeats)
        median = statistics.median(seconds)
        rate = batch.size / median
        note = ""
        if batch.shape[0] != args.series:
            note = f"run on {batch.shape[0]} series, extrapolated"
        rows.append(
            {
                "scorer": name,
                "series": batch.shape[0],
                "seconds": seconds,
                "median_seconds": median,
                "points_per_second": rate,
                "seconds_for_batch": total_points / rate,
                "note": note,
            }
        )
        print(f"  {name}: {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)

    numpy_rate = rows[0]["points_per_second"]
    print(
        f"{'scorer':12s} {'median s':>9s} {'s / batch':>10s} "
        f"{'points/s':>12s} {'vs numpy':>9s}"
    )
    for row in rows:
        row["ratio_to_numpy"] = row["points_per_second"] / numpy_rate
        print(
            f"{row['scorer']:12s} {row['median_seconds']:9.2f} "
            f"{row['seconds_for_batch']:10.2f} {row['points_per_second']:12,.0f} "
            f"{row['ratio_to_numpy']:8.2f}x {row['note']}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
