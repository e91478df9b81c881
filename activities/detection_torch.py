"""A torch version of `activities.detection.score_batch`, for CUDA or CPU.

`score_batch_torch` takes the same arguments and returns the same
`BatchScores` as the numpy scorer: the same two-pass robust z-score (trailing
median and MAD, flagged points dropped from the second pass's baselines), the
same scale floors, the same mapping to [0, 1) and the same verdict fields. It
runs on CUDA when available and on the CPU otherwise, in float64 by
default so that it matches the numpy scores to rounding.

The median follows numpy's `nanmedian`: the mean of the two middle values for
an even count (torch's own `nanmedian` returns the lower one). Series are
processed in chunks so that the (series, points, baseline) windows fit in
memory. torch is an optional dependency (the `gpu` extra).

`anomaly_scores_torch` and `alarm_scores_torch` run the NAB-tuned scorer of
`activities.detection` through the same code with torch operations.
"""

from __future__ import annotations

import numpy as np
import torch

from activities.detection import (
    _Z_RATE,
    ABSOLUTE_SCALE_FLOOR,
    ALARM_HOLD_POINTS,
    BASELINE_POINTS,
    DEFAULT_THRESHOLD,
    MAD_TO_SIGMA,
    MIN_BASELINE_POINTS,
    RELATIVE_SCALE_FLOOR,
    ArrayOps,
    BatchScores,
    _anomaly_scores,
    _shift,
    _sliding_max,
    batch_verdicts,
)

# Elements of the (series, points, baseline) window tensor in one chunk.
CHUNK_ELEMENTS = 1 << 26


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def score_batch_torch(
    values: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    direction: str = "up",
    baseline_points: int = BASELINE_POINTS,
    min_baseline_points: int = MIN_BASELINE_POINTS,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> BatchScores:
    """Score every point of every series against the points before it.

    Same semantics as `activities.detection.score_batch`; see there. The
    result holds numpy arrays.
    """
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction {direction!r} is not up, down or both")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must have 2 dimensions, not {values.ndim}")
    device = torch.device(device) if device is not None else default_device()
    n_series, n_points = values.shape
    scores = np.full((n_series, n_points), np.nan)
    scored = np.zeros((n_series, n_points), dtype=bool)
    if n_series and n_points:
        chunk = max(1, CHUNK_ELEMENTS // max(1, n_points * baseline_points))
        for start in range(0, n_series, chunk):
            part = torch.as_tensor(values[start : start + chunk], dtype=dtype)
            part_scores, part_scored = _score_tensor(
                part.to(device),
                threshold,
                direction,
                baseline_points,
                min_baseline_points,
            )
            scores[start : start + chunk] = part_scores.cpu().double().numpy()
            scored[start : start + chunk] = part_scored.cpu().numpy()
    return batch_verdicts(scores, scored, threshold)


def _z_to_score(z: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.exp(-_Z_RATE * z)


def _score_tensor(
    values: torch.Tensor,
    threshold: float,
    direction: str,
    baseline_points: int,
    min_baseline_points: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.where(torch.isfinite(values), values, torch.nan)
    present = ~torch.isnan(values)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    z, count = _robust_z(values, values, direction, baseline_points)
    first = present & (count >= min_baseline_points)
    flagged = first & (_z_to_score(torch.where(first, z, zero)) >= threshold)
    clean = torch.where(flagged, torch.nan, values)
    z, count = _robust_z(values, clean, direction, baseline_points)
    scored = present & (count >= min_baseline_points)
    scores = torch.where(scored, _z_to_score(torch.where(scored, z, zero)), torch.nan)
    return scores, scored


def _nanmedian_last(windows: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """numpy-style nanmedian over the last axis; NaN where count is 0."""
    # sort puts NaN last, so the count non-NaN values come first.
    ordered = torch.sort(windows, dim=-1).values
    low = ((count - 1).clamp(min=0) // 2).unsqueeze(-1)
    high = (count // 2).clamp(max=windows.shape[-1] - 1).unsqueeze(-1)
    median = (ordered.gather(-1, low) + ordered.gather(-1, high)).squeeze(-1) / 2
    return torch.where(count > 0, median, torch.nan)


def _robust_z(
    values: torch.Tensor, baseline: torch.Tensor, direction: str, baseline_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_series, n_points = values.shape
    pad = torch.full(
        (n_series, baseline_points), torch.nan, dtype=values.dtype, device=values.device
    )
    padded = torch.cat([pad, baseline], dim=1)
    # windows[s, t] is baseline[s, t - baseline_points : t].
    windows = padded.unfold(1, baseline_points, 1)[:, :n_points]
    count = (~torch.isnan(windows)).sum(dim=-1)
    median = _nanmedian_last(windows, count)
    mad = _nanmedian_last((windows - median.unsqueeze(-1)).abs(), count)
    scale = torch.maximum(
        MAD_TO_SIGMA * mad,
        torch.clamp(RELATIVE_SCALE_FLOOR * median.abs(), min=ABSOLUTE_SCALE_FLOOR),
    )
    deviation = (values - median) / scale
    if direction == "up":
        z = deviation.clamp(min=0.0)
    elif direction == "down":
        z = (-deviation).clamp(min=0.0)
    else:
        z = deviation.abs()
    return z, count


def _torch_first_present(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    index = torch.argmax(present.to(torch.int8), dim=1, keepdim=True)
    first = values.gather(1, index)
    return torch.where(torch.isnan(first), torch.zeros_like(first), first)


_TORCH_OPS = ArrayOps(
    full=lambda like, shape, fill: torch.full(
        shape, fill, dtype=like.dtype, device=like.device
    ),
    cat=lambda parts: torch.cat(parts, dim=1),
    cumsum=lambda a: torch.cumsum(a, dim=1),
    cummax=lambda a: torch.cummax(a, dim=1).values,
    first_present=_torch_first_present,
    isnan=torch.isnan,
    where=torch.where,
    maximum=torch.maximum,
    sqrt=torch.sqrt,
)


def anomaly_scores_torch(
    values: np.ndarray,
    direction: str = "both",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """`activities.detection.anomaly_scores` in torch; returns a numpy array.

    In float64 it matches the numpy scores within 1e-9, which the unit tests
    check on the CPU. On CUDA the rolling-window sums may round differently.
    """
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction {direction!r} is not up, down or both")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must have 2 dimensions, not {values.ndim}")
    device = torch.device(device) if device is not None else default_device()
    tensor = torch.as_tensor(values, dtype=dtype).to(device)
    tensor = torch.where(torch.isfinite(tensor), tensor, torch.nan)
    scores = _anomaly_scores(tensor, direction, _TORCH_OPS)
    return scores.cpu().double().numpy()


def alarm_scores_torch(
    scores: np.ndarray,
    hold_points: int = ALARM_HOLD_POINTS,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """`activities.detection.alarm_scores` in torch; returns a numpy array."""
    device = torch.device(device) if device is not None else default_device()
    tensor = torch.as_tensor(np.asarray(scores, dtype=np.float64)).to(device)
    tensor = torch.nan_to_num(tensor, nan=0.0)
    previous = _shift(
        _sliding_max(tensor, hold_points, _TORCH_OPS), 1, -np.inf, _TORCH_OPS
    )
    kept = torch.where(tensor > previous, tensor, torch.zeros_like(tensor))
    return kept.cpu().numpy()
