"""Fail closed: with a backend unreachable the demo escalates and merges nothing.

Each case points one production backend at a loopback port that a socket of
this test keeps bound without listening. So connections to it are refused for
as long as the demo runs, and no server of the suite can take the port. The three
demos run side by side because they mostly wait on retries.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.helpers import DemoRun, run_demo

pytestmark = pytest.mark.e2e

# Each backend's settings, and the reason its escalation must give.
BACKENDS = {
    "prometheus": (
        {
            "REMEDIATOR_SIGNALS_BACKEND": "prometheus",
            "REMEDIATOR_PROMETHEUS_URL": "{url}",
        },
        "metric source did not answer",
    ),
    "opa": (
        {"REMEDIATOR_POLICY_ENGINE": "opa", "REMEDIATOR_POLICY_OPA_URL": "{url}"},
        "no decision",
    ),
    "git": (
        {"REMEDIATOR_GIT_REPO_URL": "{url}/gitops.git"},
        "could not find the suspect change",
    ),
}


@pytest.fixture(scope="module")
def closed_urls() -> Iterator[dict[str, str]]:
    """One refused URL per backend, each on a port held bound until the end."""
    sockets = {}
    try:
        for backend in BACKENDS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets[backend] = sock
        yield {
            backend: f"http://127.0.0.1:{sock.getsockname()[1]}"
            for backend, sock in sockets.items()
        }
    finally:
        for sock in sockets.values():
            sock.close()


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, closed_urls: dict[str, str]
) -> dict[str, DemoRun]:
    # mktemp is not thread-safe on its first call, which creates the base
    # folder, so every work folder is made here before the threads start.
    work_dirs = {
        backend: tmp_path_factory.mktemp(f"down-{backend}") for backend in BACKENDS
    }

    def play(backend: str) -> DemoRun:
        template, _ = BACKENDS[backend]
        environment = {
            name: value.format(url=closed_urls[backend])
            for name, value in template.items()
        }
        return run_demo(work_dirs[backend], environment=environment)

    with ThreadPoolExecutor(max_workers=len(BACKENDS)) as pool:
        return dict(zip(BACKENDS, pool.map(play, BACKENDS), strict=True))


def test_held_port_refuses_connections(closed_urls: dict[str, str]) -> None:
    port = int(closed_urls["opa"].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unreachable_backend_escalates(runs, backend: str) -> None:
    run = runs[backend]
    _, reason = BACKENDS[backend]
    assert run.status == 1, run.stderr[-3000:]
    assert run.report.get("outcome") == "escalated", run.stderr[-3000:]
    assert reason in " ".join(run.report["reasons"])
    assert run.merges_on_main() == []
