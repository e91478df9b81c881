"""The detection worker's choice of device and its batch sizing."""

from __future__ import annotations

import numpy as np
import pytest

from activities import detection_backend
from activities.detection import score_batch
from activities.detection_backend import (
    DetectionBackend,
    DeviceUnavailableError,
    describe,
    select_backend,
)


def test_cpu_backend_measures_memory_per_point() -> None:
    backend = select_backend("cpu", memory_fraction=0.5)
    assert backend.name == "numpy"
    assert backend.device == "cpu"
    # Scoring allocates at least the float64 scores and the values' copy.
    assert backend.bytes_per_point >= 16
    assert backend.memory_budget_bytes > 0
    line = describe(backend)
    assert "on the CPU" in line
    assert "series of 1440 points per batch" in line


def test_batches_follow_the_budget() -> None:
    backend = DetectionBackend(
        name="numpy",
        device="cpu",
        description="test",
        score=lambda values, threshold: score_batch(values, threshold),
        memory_budget_bytes=1000 * 100 * 10,
        bytes_per_point=100,
        max_batch_series=50,
    )
    # 10 series of 1,000 points fit the budget; the cap is 50.
    assert backend.batch_series(1000) == 10
    assert backend.batch_series(10) == 50
    # A series larger than the budget is still scored, one at a time.
    assert backend.batch_series(10**9) == 1


def test_batched_scores_equal_one_batch() -> None:
    generator = np.random.default_rng(3)
    values = 1 + generator.random((23, 200))
    values[5, 150:] += 4.0
    values[0, :40] = np.nan
    calls: list[int] = []

    def score(part: np.ndarray, threshold: float):
        calls.append(len(part))
        return score_batch(part, threshold)

    backend = DetectionBackend(
        name="numpy",
        device="cpu",
        description="test",
        score=score,
        memory_budget_bytes=200 * 8 * 5,
        bytes_per_point=8,
    )
    batched = backend.score_batched(values, 0.8)
    whole = score_batch(values, 0.8)
    assert calls == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(batched.scores, whole.scores)
    np.testing.assert_array_equal(batched.anomalous, whole.anomalous)
    np.testing.assert_array_equal(batched.sustained_points, whole.sustained_points)
    np.testing.assert_array_equal(batched.points_scored, whole.points_scored)


def test_cuda_without_a_gpu_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detection_backend, "_cuda_backend", lambda fraction: None)
    with pytest.raises(DeviceUnavailableError, match="gpu extra"):
        select_backend("cuda")
    assert select_backend("auto").device == "cpu"


@pytest.mark.parametrize(
    ("device", "fraction", "message"),
    [("tpu", 0.25, "auto, cpu or cuda"), ("cpu", 0.0, "MEMORY_FRACTION")],
)
def test_bad_settings_are_refused(device: str, fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_backend(device, memory_fraction=fraction)


def test_cgroup_limit_caps_the_cpu_budget(tmp_path, monkeypatch) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("73741824\n")
    monkeypatch.setattr(detection_backend, "CGROUP_ROOT", tmp_path)
    assert detection_backend.cpu_available_bytes() <= 1_000_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert detection_backend._cgroup_remaining() is None
