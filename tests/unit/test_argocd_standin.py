"""Tests of the Argo CD stand-in against real bare Git repositories.

Each test seeds a bare repository under tmp_path, serves the stand-in with
uvicorn on 127.0.0.1 and reads it through `ArgoCDClient`, the same client that
`wait_for_sync` uses.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from pydantic import SecretStr

from activities.argocd import (
    ArgoCDApplicationNotFoundError,
    ArgoCDClient,
    SyncState,
    evaluate_sync,
)
from remediator.demo.argocd_standin import ArgoCDStandIn

TOKEN = "stand-in-token"

DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: checkout
spec:
  template:
    spec:
      containers:
        - name: checkout
          image: {image}
"""


def render_image(files: dict[str, str], layout: str) -> str:
    """Return the first `image:` value of deployment.yaml, or raise if it has none."""
    match = re.search(r"image:\s*(\S+)", files["deployment.yaml"])
    if match is None:
        raise ValueError("deployment.yaml has no image")
    return match.group(1)


class GitOpsRepo:
    """A bare repository and a working clone that commits to its main branch."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "gitops.git"
        self.work = root / "work"
        self.git("init", "--bare", "-b", "main", str(self.bare), cwd=root)
        self.git("clone", str(self.bare), str(self.work), cwd=root)
        self.git("checkout", "-b", "main")

    def git(self, *args: str, cwd: Path | None = None) -> str:
        command = [
            "git",
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@localhost",
            *args,
        ]
        result = subprocess.run(
            command, cwd=cwd or self.work, capture_output=True, text=True, check=True
        )
        return result.stdout.strip()

    def commit(self, files: dict[str, str], message: str) -> str:
        for path, content in files.items():
            target = self.work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "-m", message)
        self.git("push", "origin", "main")
        return self.git("rev-parse", "HEAD")

    def commit_image(self, image: str, app_path: str = "apps/checkout") -> str:
        content = DEPLOYMENT.format(image=image)
        return self.commit({f"{app_path}/deployment.yaml": content}, f"Deploy {image}")


@dataclass
class Served:
    standin: ArgoCDStandIn
    client: ArgoCDClient
    http: httpx.AsyncClient
    repo: GitOpsRepo
    synced: list[tuple[str, str, str]]


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    repo = GitOpsRepo(tmp_path)
    repo.commit_image("registry.local/checkout:1.0.0")
    synced: list[tuple[str, str, str]] = []
    standin = ArgoCDStandIn(
        token=TOKEN,
        poll_seconds=0.05,
        sync_delay_seconds=0.3,
        on_sync=lambda *event: synced.append(event),
    )
    standin.register(
        "checkout",
        namespace="shop",
        repo_path=repo.bare,
        app_path="apps/checkout",
        render_image=render_image,
    )

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(standin.app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)

    base_url = f"http://127.0.0.1:{port}"
    client = ArgoCDClient(base_url, SecretStr(TOKEN))
    http = httpx.AsyncClient(base_url=base_url, trust_env=False)
    try:
        yield Served(standin, client, http, repo, synced)
    finally:
        await client.aclose()
        await http.aclose()
        server.should_exit = True
        await serving
        sock.close()


async def wait_until(
    read: Callable[[], Any], condition: Callable[[Any], bool], timeout: float = 10.0
) -> Any:
    """Call `read` until `condition` holds on its result, and return that result."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = read()
        if asyncio.iscoroutine(value):
            value = await value
        if condition(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {value!r}")
        await asyncio.sleep(0.02)


def verdict_of(revision: str) -> Callable[[dict[str, Any]], SyncState]:
    return lambda app: evaluate_sync(app, revision).state


async def test_standin_initial_sync(served: Served) -> None:
    head = served.repo.git("rev-parse", "HEAD")

    app = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: evaluate_sync(app, head).state is SyncState.DONE,
    )

    assert app["metadata"] == {
        "name": "checkout",
        "namespace": "argocd",
        "uid": app["metadata"]["uid"],
        "creationTimestamp": app["metadata"]["creationTimestamp"],
    }
    assert app["spec"]["source"]["repoURL"] == str(served.repo.bare.resolve())
    assert app["spec"]["source"]["path"] == "apps/checkout"
    assert app["spec"]["source"]["targetRevision"] == "main"
    assert app["spec"]["destination"]["namespace"] == "shop"
    assert "automated" in app["spec"]["syncPolicy"]
    status = app["status"]
    assert status["sync"]["revision"] == head
    assert status["sync"]["comparedTo"]["source"]["path"] == "apps/checkout"
    assert status["operationState"]["phase"] == "Succeeded"
    assert status["operationState"]["syncResult"]["revision"] == head
    assert status["operationState"]["operation"]["sync"]["revision"] == head
    assert status["operationState"]["finishedAt"]
    assert status["summary"]["images"] == ["registry.local/checkout:1.0.0"]
    assert status["reconciledAt"]
    assert [entry["revision"] for entry in status["history"]] == [head]
    assert served.standin.live_image("checkout") == "registry.local/checkout:1.0.0"
    assert served.synced == [("checkout", head, "registry.local/checkout:1.0.0")]


async def test_standin_syncs_new_commit(served: Served) -> None:
    first = served.repo.git("rev-parse", "HEAD")
    await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(first)(app) is SyncState.DONE,
    )

    second = served.repo.commit_image("registry.local/checkout:2.0.0")
    running = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: app["status"]["operationState"]["syncResult"]["revision"] == second,
    )
    app = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(second)(app) is SyncState.DONE,
    )

    assert running["status"]["operationState"]["phase"] == "Running"
    assert running["status"]["health"]["status"] == "Progressing"
    assert evaluate_sync(running, second).state is SyncState.PENDING
    status = app["status"]
    assert status["sync"] == {
        "status": "Synced",
        "revision": second,
        "comparedTo": status["sync"]["comparedTo"],
    }
    assert status["health"]["status"] == "Healthy"
    history = status["history"]
    assert [entry["revision"] for entry in history] == [first, second]
    assert [entry["id"] for entry in history] == [0, 1]
    assert history[1]["deployStartedAt"] <= history[1]["deployedAt"]
    assert history[1]["source"]["path"] == "apps/checkout"
    assert status["summary"]["images"] == ["registry.local/checkout:2.0.0"]
    assert served.standin.live_image("checkout") == "registry.local/checkout:2.0.0"
    assert served.synced[-1] == ("checkout", second, "registry.local/checkout:2.0.0")


async def test_standin_unknown_app_404(served: Served) -> None:
    response = await served.http.get(
        "/api/v1/applications/nope", headers={"Authorization": f"Bearer {TOKEN}"}
    )

    assert response.status_code == 404
    assert response.json() == {
        "error": 'applications.argoproj.io "nope" not found',
        "code": 5,
        "message": 'applications.argoproj.io "nope" not found',
    }
    with pytest.raises(ArgoCDApplicationNotFoundError):
        await served.client.get_application("nope")


async def test_standin_rejects_missing_token(served: Served) -> None:
    missing = await served.http.get("/api/v1/applications/checkout")
    wrong = await served.http.get(
        "/api/v1/applications/checkout", headers={"Authorization": "Bearer wrong"}
    )

    assert missing.status_code == 401
    assert missing.json()["code"] == 16
    assert wrong.status_code == 401


async def test_standin_failed_operation_then_manual_sync(served: Served) -> None:
    first = served.repo.git("rev-parse", "HEAD")
    await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(first)(app) is SyncState.DONE,
    )
    # The stand-in reads the flag when the operation ends, 0.3 s after it
    # starts, so flagging right after the push is in time.
    second = served.repo.commit_image("registry.local/checkout:2.0.0")
    served.standin.fail_revision("checkout", second)

    failed = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(second)(app) is SyncState.FAILED,
    )
    await asyncio.sleep(0.3)
    after_polls = await served.client.get_application("checkout")

    operation = failed["status"]["operationState"]
    assert operation["phase"] == "Failed"
    assert failed["status"]["sync"]["status"] == "Synced"
    assert failed["status"]["health"]["status"] == "Healthy"
    hooks = [r for r in operation["syncResult"]["resources"] if r.get("hookPhase")]
    assert hooks[0]["hookPhase"] == "Failed"
    assert [e["revision"] for e in failed["status"]["history"]] == [first]
    assert after_polls["status"]["operationState"]["phase"] == "Failed"

    served.standin.clear_failures("checkout")
    response = await served.http.post(
        "/api/v1/applications/checkout/sync",
        json={"revision": "main"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200
    app = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(second)(app) is SyncState.DONE,
    )
    assert app["status"]["operationState"]["operation"]["initiatedBy"] == {
        "username": "admin"
    }
    assert [e["revision"] for e in app["status"]["history"]] == [first, second]


async def test_standin_sync_rejects_sha_revision(served: Served) -> None:
    head = served.repo.git("rev-parse", "HEAD")

    response = await served.http.post(
        "/api/v1/applications/checkout/sync",
        json={"revision": head},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )

    assert response.status_code == 400
    assert response.json()["code"] == 9
    assert response.json()["message"] == (
        f"Cannot sync to {head}: auto-sync currently set to main"
    )


async def test_standin_sync_without_body(served: Served) -> None:
    head = served.repo.git("rev-parse", "HEAD")
    await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(head)(app) is SyncState.DONE,
    )

    response = await served.http.post(
        "/api/v1/applications/checkout/sync",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    busy = await served.http.post(
        "/api/v1/applications/checkout/sync",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    app = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: len(app["status"]["history"]) == 2,
    )

    assert response.status_code == 200
    assert response.json()["status"]["operationState"]["phase"] == "Running"
    assert busy.status_code == 400
    assert "already in progress" in busy.json()["message"]
    assert [e["revision"] for e in app["status"]["history"]] == [head, head]


async def test_standin_render_error_comparison_error(served: Served) -> None:
    first = served.repo.git("rev-parse", "HEAD")
    await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(first)(app) is SyncState.DONE,
    )

    broken = served.repo.commit(
        {"apps/checkout/deployment.yaml": "kind: Deployment\n"}, "Drop the image"
    )
    app = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: app["status"]["sync"]["status"] == "Unknown",
    )

    assert evaluate_sync(app, broken).state is SyncState.FAILED
    assert app["status"]["conditions"][0]["type"] == "ComparisonError"
    assert "deployment.yaml has no image" in app["status"]["conditions"][0]["message"]
    assert "revision" not in app["status"]["sync"]
    assert app["status"]["health"]["status"] == "Healthy"
    assert served.standin.live_image("checkout") == "registry.local/checkout:1.0.0"


async def test_standin_serves_two_applications(served: Served) -> None:
    served.repo.commit_image("registry.local/payments:3.1.0", app_path="apps/payments")
    served.standin.register(
        "payments",
        namespace="shop",
        repo_path=served.repo.bare,
        app_path="apps/payments",
        render_image=render_image,
    )
    head = served.repo.git("rev-parse", "HEAD")

    payments = await wait_until(
        lambda: served.client.get_application("payments"),
        lambda app: verdict_of(head)(app) is SyncState.DONE,
    )
    checkout = await wait_until(
        lambda: served.client.get_application("checkout"),
        lambda app: verdict_of(head)(app) is SyncState.DONE,
    )

    assert payments["status"]["summary"]["images"] == ["registry.local/payments:3.1.0"]
    assert checkout["status"]["summary"]["images"] == ["registry.local/checkout:1.0.0"]
    assert served.standin.live_image("payments") == "registry.local/payments:3.1.0"
    listing = await served.http.get(
        "/api/v1/applications", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    names = [item["metadata"]["name"] for item in listing.json()["items"]]
    assert names == ["checkout", "payments"]
