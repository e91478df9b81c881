"""Choice of the detection worker's scorer, device and batch size.

`select_backend` picks torch on CUDA when a GPU is present and torch is
installed (the `gpu` extra), and numpy on the CPU otherwise;
`REMEDIATOR_DETECTION_DEVICE` forces one. Both scorers compute the same scores
(`tests/unit/test_detection_torch.py` states the tolerance).

Batches are sized to the device's memory, not to a fixed count. At start the
backend scores a sample batch and measures its peak memory per point
(tracemalloc for numpy, the CUDA allocator's peak for torch). A call then
scores at most `budget / (points per series * bytes per point)` series at a
time. The budget is `memory_fraction` of the memory free at start. On CUDA
that is the free device memory. On the CPU it is the smaller of MemAvailable
and the cgroup's remaining limit, which a Kubernetes memory limit sets.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from activities.detection import BatchScores, score_batch

logger = logging.getLogger(__name__)

# The sample that measures memory per point: a day of minutes for 16 series.
SAMPLE_SERIES = 16
SAMPLE_POINTS = 1440
# Used when the measurement cannot run.
FALLBACK_BYTES_PER_POINT = 4096
CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")

Scorer = Callable[[np.ndarray, float], BatchScores]


class DeviceUnavailableError(RuntimeError):
    """The device named by REMEDIATOR_DETECTION_DEVICE cannot be used here."""


@dataclass
class DetectionBackend:
    """A scorer bound to a device, with the batch size its memory allows."""

    name: str
    device: str
    description: str
    score: Scorer
    memory_budget_bytes: int
    bytes_per_point: float = float(FALLBACK_BYTES_PER_POINT)
    max_batch_series: int = 10_000

    def batch_series(self, points: int) -> int:
        """Series of `points` points that one batch may hold."""
        per_series = max(1.0, points * self.bytes_per_point)
        fit = int(self.memory_budget_bytes // per_series)
        return max(1, min(self.max_batch_series, fit))

    def score_batched(self, values: np.ndarray, threshold: float) -> BatchScores:
        """Score `values` in batches that fit the budget, and join the results."""
        n_series, n_points = values.shape
        rows = self.batch_series(n_points)
        if n_series <= rows:
            return self.score(values, threshold)
        parts = [
            self.score(values[start : start + rows], threshold)
            for start in range(0, n_series, rows)
        ]
        return BatchScores(
            scores=np.concatenate([p.scores for p in parts]),
            last_score=np.concatenate([p.last_score for p in parts]),
            anomalous=np.concatenate([p.anomalous for p in parts]),
            sustained_points=np.concatenate([p.sustained_points for p in parts]),
            points_scored=np.concatenate([p.points_scored for p in parts]),
        )


def select_backend(
    device: str = "auto", memory_fraction: float = 0.25, max_batch_series: int = 10_000
) -> DetectionBackend:
    """Choose the scorer and device, and measure its memory per point.

    `device` is "auto" (CUDA when present, else the CPU), "cpu" (numpy) or
    "cuda" (torch on the GPU; raises DeviceUnavailableError without one).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"REMEDIATOR_DETECTION_DEVICE is {device!r}; use auto, cpu or cuda"
        )
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(
            f"REMEDIATOR_DETECTION_MEMORY_FRACTION is {memory_fraction}; use a "
            "fraction in (0, 1]"
        )
    backend = None
    if device in ("auto", "cuda"):
        backend = _cuda_backend(memory_fraction)
        if backend is None and device == "cuda":
            raise DeviceUnavailableError(
                f"REMEDIATOR_DETECTION_DEVICE is cuda, but {_torch_state()}; run "
                "the worker on a GPU node with a CUDA build of torch (the gpu "
                "extra), or set REMEDIATOR_DETECTION_DEVICE to auto or cpu"
            )
    if backend is None:
        backend = DetectionBackend(
            name="numpy",
            device="cpu",
            description=f"numpy {np.__version__} on the CPU",
            score=_numpy_score,
            memory_budget_bytes=int(cpu_available_bytes() * memory_fraction),
        )
        backend.bytes_per_point = _measure_numpy(backend.score)
    backend.max_batch_series = max_batch_series
    return backend


def _numpy_score(values: np.ndarray, threshold: float) -> BatchScores:
    return score_batch(values, threshold)


def _torch_state() -> str:
    """Return why torch cannot use CUDA here, for the error message."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} finds no CUDA device"


def _cuda_backend(memory_fraction: float) -> DetectionBackend | None:
    # NOTE: no GPU was available where this was written, so this path has run
    # only with CUDA absent. The torch.cuda calls are the documented ones.
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from activities.detection_torch import score_batch_torch

    cuda = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(cuda)
    name = torch.cuda.get_device_name(cuda)

    def score(values: np.ndarray, threshold: float) -> BatchScores:
        return score_batch_torch(values, threshold, device=cuda)

    backend = DetectionBackend(
        name="torch",
        device=str(cuda),
        description=(
            f"torch {torch.__version__} on {cuda} ({name}, "
            f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free)"
        ),
        score=score,
        memory_budget_bytes=int(free * memory_fraction),
    )
    sample = _sample()
    torch.cuda.reset_peak_memory_stats(cuda)
    before = torch.cuda.memory_allocated(cuda)
    score(sample, 0.8)
    torch.cuda.synchronize(cuda)
    peak = torch.cuda.max_memory_allocated(cuda) - before
    backend.bytes_per_point = max(1.0, peak / sample.size)
    return backend


def _sample() -> np.ndarray:
    generator = np.random.default_rng(7)
    walk = np.cumsum(generator.normal(size=(SAMPLE_SERIES, SAMPLE_POINTS)), axis=1)
    return 100.0 + walk


def _measure_numpy(score: Scorer) -> float:
    """Peak bytes that numpy allocates per point while scoring the sample."""
    sample = _sample()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        score(sample, 0.8)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
    if peak <= 0:
        return float(FALLBACK_BYTES_PER_POINT)
    return peak / sample.size


def cpu_available_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by the cgroup."""
    available = _meminfo_available()
    limit = _cgroup_remaining()
    candidates = [value for value in (available, limit) if value is not None]
    if not candidates:
        return 1 << 30
    return min(candidates)


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_remaining() -> int | None:
    """Limit minus usage of the cgroup (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = (CGROUP_ROOT / limit_file).read_text().strip()
            usage = int((CGROUP_ROOT / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max":
            return None
        limit = int(limit_text)
        # cgroup v1 reports "no limit" as a number near 2**63.
        if limit >= 1 << 60:
            return None
        return max(0, limit - usage)
    return None


def describe(backend: DetectionBackend, points: int = SAMPLE_POINTS) -> str:
    """Describe the device, memory budget and batch size in one log line."""
    return (
        f"Detection worker scores with {backend.description}; "
        f"{backend.bytes_per_point:,.0f} bytes per point measured, "
        f"{backend.memory_budget_bytes / 2**20:,.0f} MiB budget, "
        f"{backend.batch_series(points):,} series of {points} points per batch"
    )
