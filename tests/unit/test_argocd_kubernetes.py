"""Tests of the Argo CD backend that reads Application custom resources.

A small FastAPI app on 127.0.0.1 plays the Kubernetes API server for
`applications.argoproj.io/v1alpha1`: `GET` and merge `PATCH` of one object,
and the watch (`?watch=true`) as newline-delimited JSON events, held open
until `timeoutSeconds` like the real server. The `kubernetes` client talks to
it over HTTP through urllib3, unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from kubernetes import client as k8s
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.argocd import ArgoCDApplicationNotFoundError, ArgoCDPermissionError
from activities.argocd_kubernetes import (
    REFRESH_ANNOTATION,
    KubernetesArgoCDActivities,
    KubernetesArgoCDClient,
)
from remediator.settings import ArgoCDSettings
from workflows.models import SyncInput

OLD = "1111111111111111111111111111111111111111"
NEW = "2222222222222222222222222222222222222222"
BASE = "/apis/argoproj.io/v1alpha1/namespaces/{namespace}/applications"


def application(
    revision: str,
    sync: str = "Synced",
    health: str = "Healthy",
    phase: str | None = None,
    version: int = 1,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "sync": {"status": sync, "revision": revision},
        "health": {"status": health},
        "history": [{"id": 1, "revision": OLD}],
    }
    if phase:
        status["operationState"] = {
            "phase": phase,
            "message": "one or more objects failed to apply",
            "syncResult": {"revision": revision},
        }
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "cart",
            "namespace": "argocd",
            "resourceVersion": str(version),
            "annotations": {},
        },
        "spec": {
            "project": "default",
            "source": {"repoURL": "https://git.example/gitops.git", "path": "cart"},
        },
        "status": status,
    }


@dataclass
class FakeKubernetes:
    """State of the fake API server: one Application and the events to stream."""

    application: dict[str, Any] | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    patches: list[dict] = field(default_factory=list)
    forbid_patch: bool = False

    def push(self, document: dict[str, Any], kind: str = "MODIFIED") -> None:
        self.events.put({"type": kind, "object": document})


def build_app(fake: FakeKubernetes) -> FastAPI:
    app = FastAPI()

    def not_found(name: str) -> JSONResponse:
        return JSONResponse(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f'applications.argoproj.io "{name}" not found',
                "reason": "NotFound",
                "code": 404,
            },
            status_code=404,
        )

    @app.get(BASE + "/{name}")
    async def get_object(namespace: str, name: str, request: Request) -> Any:
        fake.requests.append(("GET", request.url.path, dict(request.query_params)))
        document = fake.application
        if namespace != "argocd" or document is None:
            return not_found(name)
        if document["metadata"]["name"] != name:
            return not_found(name)
        return document

    @app.patch(BASE + "/{name}")
    async def patch_object(namespace: str, name: str, request: Request) -> Any:
        fake.requests.append(("PATCH", request.url.path, dict(request.query_params)))
        if fake.forbid_patch:
            return JSONResponse(
                {"kind": "Status", "reason": "Forbidden", "code": 403},
                status_code=403,
            )
        body = await request.json()
        fake.patches.append({"content_type": request.headers["content-type"], **body})
        if fake.application is None:
            return not_found(name)
        annotations = body.get("metadata", {}).get("annotations", {})
        fake.application["metadata"]["annotations"].update(annotations)
        return fake.application

    @app.get(BASE)
    async def list_objects(namespace: str, request: Request) -> Any:
        params = dict(request.query_params)
        fake.requests.append(("LIST", request.url.path, params))
        if params.get("watch") not in ("true", "True", "1"):
            items = [fake.application] if fake.application else []
            return {"kind": "ApplicationList", "items": items}
        timeout = float(params.get("timeoutSeconds", "5"))

        async def stream() -> AsyncIterator[bytes]:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    event = fake.events.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.02)
                    continue
                if event["type"] != "ERROR":
                    fake.application = copy.deepcopy(event["object"])
                yield (json.dumps(event) + "\n").encode()

        return StreamingResponse(stream(), media_type="application/json")

    return app


@pytest.fixture
def fake() -> FakeKubernetes:
    return FakeKubernetes(application=application(OLD, version=1))


@pytest.fixture
def api_client(fake: FakeKubernetes) -> Iterator[k8s.ApiClient]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(fake), log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    configuration = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    api = k8s.ApiClient(configuration)
    yield api
    api.close()
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def make_activities(
    api_client: k8s.ApiClient, **settings: Any
) -> KubernetesArgoCDActivities:
    return KubernetesArgoCDActivities(
        ArgoCDSettings(poll_seconds=0.05, **settings),
        client=KubernetesArgoCDClient("argocd", api_client, request_timeout=5.0),
        watch_seconds=2,
        heartbeat_seconds=0.05,
    )


def recording_environment() -> tuple[ActivityEnvironment, list[Any]]:
    environment = ActivityEnvironment()
    heartbeats: list[Any] = []
    environment.on_heartbeat = lambda *details: heartbeats.append(
        copy.deepcopy(details[0])
    )
    return environment, heartbeats


# --- get_application --------------------------------------------------------------


async def test_get_application_returns_object(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    client = KubernetesArgoCDClient("argocd", api_client)

    document = await client.get_application("cart")

    assert document == fake.application
    assert document["status"]["sync"]["revision"] == OLD
    assert fake.requests[-1][1] == (
        "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/cart"
    )


async def test_get_application_refresh_annotates(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    client = KubernetesArgoCDClient("argocd", api_client)

    document = await client.get_application("cart", refresh="normal")

    assert fake.patches[0]["metadata"]["annotations"] == {REFRESH_ANNOTATION: "normal"}
    assert fake.patches[0]["content_type"] == "application/merge-patch+json"
    assert document["metadata"]["annotations"][REFRESH_ANNOTATION] == "normal"


async def test_refresh_forbidden_still_reads(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    fake.forbid_patch = True
    client = KubernetesArgoCDClient("argocd", api_client)

    document = await client.get_application("cart", refresh="normal")

    assert document["metadata"]["name"] == "cart"


async def test_get_application_not_found(api_client: k8s.ApiClient) -> None:
    client = KubernetesArgoCDClient("argocd", api_client)

    with pytest.raises(ArgoCDApplicationNotFoundError) as caught:
        await client.get_application("missing")

    assert caught.value.non_retryable is True


async def test_other_namespace_not_found(api_client: k8s.ApiClient) -> None:
    client = KubernetesArgoCDClient("other", api_client)

    with pytest.raises(ArgoCDApplicationNotFoundError):
        await client.get_application("cart")


def test_permission_error_maps(fake: FakeKubernetes) -> None:
    from activities.argocd_kubernetes import _api_error

    error = _api_error("cart", k8s.ApiException(status=403, reason="Forbidden"))

    assert isinstance(error, ArgoCDPermissionError)


async def test_unreachable_api_is_retryable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    configuration = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0
    client = KubernetesArgoCDClient(
        "argocd", k8s.ApiClient(configuration), request_timeout=2.0
    )

    with pytest.raises(ApplicationError) as caught:
        await client.get_application("cart")

    assert caught.value.type == "ArgoCDUnavailable"
    assert caught.value.non_retryable is False


# --- wait_for_sync ----------------------------------------------------------------


async def test_wait_follows_watch_to_synced(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    activities = make_activities(api_client)
    environment, heartbeats = recording_environment()

    def publish() -> None:
        time.sleep(0.3)
        fake.push(application(OLD, sync="OutOfSync", version=2))
        time.sleep(0.1)
        fake.push(application(NEW, health="Progressing", version=3))
        time.sleep(0.2)
        fake.push(application(NEW, version=4))

    publisher = threading.Thread(target=publish)
    publisher.start()
    result = await environment.run(
        activities.wait_for_sync,
        SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=20),
    )
    publisher.join()

    assert result.synced is True
    assert result.revision == NEW
    assert result.health_status == "Healthy"
    assert result.polls == 4
    assert heartbeats
    assert heartbeats[-1]["revision"] == NEW
    watches = [params for kind, _, params in fake.requests if kind == "LIST"]
    assert watches[0]["fieldSelector"] == "metadata.name=cart"
    assert watches[0]["watch"].lower() == "true"
    assert watches[0]["resourceVersion"] == "1"


async def test_wait_done_at_first_read(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    fake.application = application(NEW)
    activities = make_activities(api_client)

    result = await ActivityEnvironment().run(
        activities.wait_for_sync,
        SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=5),
    )

    assert result.synced is True
    assert result.polls == 1
    assert not [kind for kind, _, _ in fake.requests if kind == "LIST"]


async def test_wait_failed_operation_raises(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    activities = make_activities(api_client)
    fake.push(application(NEW, sync="OutOfSync", phase="Failed", version=2))

    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.wait_for_sync,
            SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=10),
        )

    assert caught.value.type == "SyncFailed"
    assert caught.value.non_retryable is True
    assert "Failed" in caught.value.message


async def test_wait_old_revision_failure_pending(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    """A failing retry of the older revision does not end the wait."""
    activities = make_activities(api_client)
    fake.push(application(OLD, sync="OutOfSync", phase="Failed", version=2))
    fake.push(application(NEW, version=3))

    result = await ActivityEnvironment().run(
        activities.wait_for_sync,
        SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=10),
    )

    assert result.synced is True


async def test_wait_times_out(fake: FakeKubernetes, api_client: k8s.ApiClient) -> None:
    activities = make_activities(api_client)
    environment, heartbeats = recording_environment()

    started = time.monotonic()
    result = await environment.run(
        activities.wait_for_sync,
        SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=1.5),
    )

    assert result.synced is False
    assert "did not report revision" in result.message
    assert time.monotonic() - started < 6
    assert len(heartbeats) >= 3


async def test_wait_recovers_from_expired_version(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    activities = make_activities(api_client)
    fake.events.put(
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "status": "Failure",
                "message": "too old resource version: 1 (5)",
                "reason": "Expired",
                "code": 410,
            },
        }
    )

    def publish() -> None:
        time.sleep(0.5)
        fake.push(application(NEW, version=6))

    publisher = threading.Thread(target=publish)
    publisher.start()
    result = await ActivityEnvironment().run(
        activities.wait_for_sync,
        SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=10),
    )
    publisher.join()

    assert result.synced is True
    reads = [kind for kind, _, _ in fake.requests if kind == "GET"]
    assert len(reads) >= 2


async def test_wait_deleted_application(
    fake: FakeKubernetes, api_client: k8s.ApiClient
) -> None:
    activities = make_activities(api_client)
    fake.push(application(OLD, version=2), kind="DELETED")

    with pytest.raises(ArgoCDApplicationNotFoundError):
        await ActivityEnvironment().run(
            activities.wait_for_sync,
            SyncInput(argocd_application="cart", revision=NEW, timeout_seconds=10),
        )
