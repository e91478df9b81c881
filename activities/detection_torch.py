"""The scorers of `activities.detection` on torch, for CUDA or the CPU.

`score_batch_torch`, `anomaly_scores_torch` and `alarm_scores_torch` run the
same code as their numpy versions, through torch operations. They run on CUDA
when available and on the CPU otherwise, in float64 by default, so they match
the numpy scores to rounding (the unit tests check 1e-9 on the CPU). Series
are scored in chunks that bound the memory. torch is an optional dependency
(the `gpu` extra).
"""

from __future__ import annotations

import numpy as np
import torch

from activities.detection import (
    ALARM_HOLD_POINTS,
    DEFAULT_THRESHOLD,
    EPISODE_POINTS,
    ArrayOps,
    BatchScores,
    _anomaly_scores,
    _check_values,
    _episode_scores,
    _shift,
    _sliding_max,
    batch_verdicts,
)

# Points of one chunk of `score_batch_torch`. The numpy scorer peaks at about
# 150 bytes per point (tracemalloc), so 2**22 points take about 0.6 GiB there;
# torch is assumed to be close, which is an estimate.
CHUNK_POINTS = 1 << 22


def default_device() -> torch.device:
    """Return CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def score_batch_torch(
    values: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    direction: str = "up",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> BatchScores:
    """Score like `activities.detection.score_batch`; see there.

    The result holds numpy arrays.
    """
    values = _check_values(values, direction)
    device = torch.device(device) if device is not None else default_device()
    n_series, n_points = values.shape
    scores = np.full((n_series, n_points), np.nan)
    scored = np.zeros((n_series, n_points), dtype=bool)
    if n_series and n_points:
        chunk = max(1, CHUNK_POINTS // (n_points + EPISODE_POINTS))
        for start in range(0, n_series, chunk):
            part = torch.as_tensor(values[start : start + chunk], dtype=dtype)
            part_scores, part_scored = _episode_scores(
                part.to(device), threshold, direction, _TORCH_OPS
            )
            scores[start : start + chunk] = part_scores.cpu().double().numpy()
            scored[start : start + chunk] = part_scored.cpu().numpy()
    return batch_verdicts(scores, scored, threshold)


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
    minimum=torch.minimum,
    amax=lambda a: torch.amax(a, dim=1),
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
