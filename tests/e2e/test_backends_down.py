"""Fail closed: with a backend unreachable the demo escalates and merges nothing.

Each case points one production backend at a closed loopback port; the three
demos run side by side because they mostly wait on retries.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from remediator.devserver import free_port
from tests.e2e.helpers import DemoRun, run_demo

pytestmark = pytest.mark.e2e


def closed_url(path: str = "") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


BACKENDS = {
    "prometheus": (
        {
            "REMEDIATOR_SIGNALS_BACKEND": "prometheus",
            "REMEDIATOR_PROMETHEUS_URL": closed_url(),
        },
        "metric source did not answer",
    ),
    "opa": (
        {"REMEDIATOR_POLICY_ENGINE": "opa", "REMEDIATOR_POLICY_OPA_URL": closed_url()},
        "no decision",
    ),
    "git": (
        {"REMEDIATOR_GIT_REPO_URL": closed_url("/gitops.git")},
        "could not find the suspect change",
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoRun]:
    def play(backend: str) -> DemoRun:
        environment, _ = BACKENDS[backend]
        work_dir = tmp_path_factory.mktemp(f"down-{backend}")
        return run_demo(work_dir, environment=environment)

    with ThreadPoolExecutor(max_workers=len(BACKENDS)) as pool:
        return dict(zip(BACKENDS, pool.map(play, BACKENDS), strict=True))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unreachable_backend_escalates(runs, backend: str) -> None:
    run = runs[backend]
    _, reason = BACKENDS[backend]
    assert run.status == 1, run.stderr[-3000:]
    assert run.report["outcome"] == "escalated"
    assert reason in " ".join(run.report["reasons"])
    assert run.merges_on_main() == []
