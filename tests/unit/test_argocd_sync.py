"""Tests of the Argo CD client, `evaluate_sync` and the `wait_for_sync` activity.

Application documents are written here in the shapes Argo CD reports: sync
`Unknown` with a ComparisonError, a failed operation next to Synced/Healthy,
and multi-source `revisions`. HTTP goes through `httpx.MockTransport`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.argocd import (
    ArgoCDActivities,
    ArgoCDApplicationNotFoundError,
    ArgoCDClient,
    ArgoCDPermissionError,
    ArgoCDUnavailableError,
    SyncState,
    evaluate_sync,
    normalize_repo_url,
)
from remediator.settings import ArgoCDSettings
from workflows.models import SyncInput

OURS = "5dd95b4efd7e9b668c361bbddb8d7f1e56c32ac1"
OLDER = "7092c17b0b89fefcfc7b705bc94bf44d5fc4e368"
TOKEN = "s3cr3t-argocd-token"


def application(
    *,
    sync_status: str = "Synced",
    revision: str | None = OURS,
    health: str = "Healthy",
    operation: dict[str, Any] | None = None,
    conditions: list[dict[str, str]] | None = None,
    reconciled_at: str = "2025-02-12T09:54:00Z",
) -> dict[str, Any]:
    """Build a single-source Application document."""
    sync: dict[str, Any] = {"status": sync_status}
    if revision is not None:
        sync["revision"] = revision
    status: dict[str, Any] = {
        "sync": sync,
        "health": {"status": health},
        "reconciledAt": reconciled_at,
    }
    if operation is not None:
        status["operationState"] = operation
    if conditions is not None:
        status["conditions"] = conditions
    return {
        "metadata": {"name": "example-app", "namespace": "argocd"},
        "spec": {
            "source": {
                "repoURL": "https://git.example.com/example-org/deploy.git",
                "path": "apps/example",
                "targetRevision": "main",
            }
        },
        "status": status,
    }


def operation(phase: str, revision: str, **extra: Any) -> dict[str, Any]:
    """Build an operationState on `revision`."""
    state = {
        "phase": phase,
        "message": extra.pop("message", ""),
        "startedAt": "2025-02-12T09:53:40Z",
        "operation": {
            "initiatedBy": {"automated": True},
            "sync": {"revision": revision},
        },
        "syncResult": {"revision": revision},
    }
    state.update(extra)
    return state


COMPARISON_ERROR = {
    "type": "ComparisonError",
    "message": "rpc error: code = Unknown desc = Manifest generation error (cached): "
    "apps/example: app path does not exist",
    "lastTransitionTime": "2025-02-12T09:54:00Z",
}

FAILED_HOOK_OPERATION = operation(
    "Failed",
    OURS,
    message="one or more synchronization tasks completed unsuccessfully "
    "(retried 5 times).",
    retryCount=5,
    finishedAt="2025-02-12T09:53:57Z",
)
FAILED_HOOK_OPERATION["syncResult"]["resources"] = [
    {
        "kind": "Deployment",
        "name": "example-app",
        "status": "Synced",
        "hookPhase": "Running",
    },
    {
        "kind": "Job",
        "name": "smoke-test",
        "status": "Synced",
        "hookType": "PostSync",
        "hookPhase": "Failed",
        "message": "Job has reached the specified backoff limit",
    },
]


def multi_source(revisions: list[str], sync_status: str = "Synced") -> dict[str, Any]:
    """Build a multi-source Application: a Helm chart plus a values repository."""
    return {
        "metadata": {"name": "example-app"},
        "spec": {
            "sources": [
                {
                    "repoURL": "gs://charts-example/infra/stable",
                    "chart": "generic-service",
                    "targetRevision": "2.6.2",
                },
                {
                    "repoURL": "https://git.example.com/example-org/service-values",
                    "targetRevision": "main",
                    "ref": "values",
                },
            ]
        },
        "status": {
            "sync": {"status": sync_status, "revisions": revisions},
            "health": {"status": "Healthy"},
            "operationState": {
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "syncResult": {"revisions": revisions},
            },
        },
    }


VERDICT_CASES = [
    pytest.param(application(), SyncState.DONE, id="healthy-at-ours"),
    pytest.param(
        application(operation=operation("Succeeded", OURS)),
        SyncState.DONE,
        id="operation-succeeded-at-ours",
    ),
    pytest.param(
        application(
            sync_status="Unknown", revision=None, conditions=[COMPARISON_ERROR]
        ),
        SyncState.FAILED,
        id="unknown-comparison-error-no-revision",
    ),
    pytest.param(
        application(sync_status="Unknown", conditions=[COMPARISON_ERROR]),
        SyncState.FAILED,
        id="unknown-comparison-error-at-ours",
    ),
    pytest.param(
        application(sync_status="Unknown", revision=OURS),
        SyncState.FAILED,
        id="unknown-without-condition-at-ours",
    ),
    pytest.param(
        application(
            sync_status="Unknown", revision=OLDER, conditions=[COMPARISON_ERROR]
        ),
        SyncState.PENDING,
        id="comparison-error-at-older-revision",
    ),
    pytest.param(
        application(operation=FAILED_HOOK_OPERATION),
        SyncState.FAILED,
        id="operation-failed-though-synced-healthy",
    ),
    pytest.param(
        application(operation=operation("Error", OURS, message="hook deadline")),
        SyncState.FAILED,
        id="operation-error-at-ours",
    ),
    pytest.param(
        application(
            sync_status="OutOfSync",
            revision=OLDER,
            health="Degraded",
            operation=operation("Running", OLDER, retryCount=3),
        ),
        SyncState.PENDING,
        id="older-revision-still-retrying",
    ),
    pytest.param(
        application(
            revision=OLDER, operation=operation("Failed", OLDER, message="hook failed")
        ),
        SyncState.PENDING,
        id="older-revision-failed",
    ),
    pytest.param(
        application(
            revision=OURS,
            health="Degraded",
            operation=operation("Failed", OLDER, message="hook failed"),
        ),
        SyncState.PENDING,
        id="older-failure-ours-degraded",
    ),
    pytest.param(
        application(
            sync_status="OutOfSync",
            health="Progressing",
            operation=operation("Running", OURS, retryCount=1),
        ),
        SyncState.PENDING,
        id="operation-running-at-ours",
    ),
    pytest.param(
        application(operation=operation("Running", OURS)),
        SyncState.PENDING,
        id="synced-healthy-operation-running",
    ),
    pytest.param(
        application(sync_status="OutOfSync"), SyncState.PENDING, id="out-of-sync"
    ),
    pytest.param(
        application(health="Progressing"), SyncState.PENDING, id="progressing"
    ),
    pytest.param(application(revision=OLDER), SyncState.PENDING, id="older-revision"),
    pytest.param(
        application(revision=None, sync_status="OutOfSync"),
        SyncState.PENDING,
        id="no-revision",
    ),
    pytest.param({}, SyncState.PENDING, id="empty-document"),
    pytest.param(multi_source(["2.6.2", OURS]), SyncState.DONE, id="multi-source"),
    pytest.param(
        multi_source(["2.6.2", OLDER]), SyncState.PENDING, id="multi-source-older"
    ),
    pytest.param(
        multi_source(["2.6.2", OURS], sync_status="OutOfSync"),
        SyncState.PENDING,
        id="multi-source-out-of-sync",
    ),
]


@pytest.mark.parametrize(("app", "expected"), VERDICT_CASES)
def test_evaluate_sync_table(app: dict[str, Any], expected: SyncState) -> None:
    verdict = evaluate_sync(app, OURS)
    assert verdict.state is expected, verdict.message


def test_evaluate_sync_failed_operation_message() -> None:
    verdict = evaluate_sync(application(operation=FAILED_HOOK_OPERATION), OURS)
    assert "retried 5 times" in verdict.message
    assert "Job/smoke-test: Job has reached the specified backoff limit" in (
        verdict.message
    )
    assert verdict.operation_phase == "Failed"
    assert verdict.sync_status == "Synced"
    assert verdict.health_status == "Healthy"


def test_evaluate_sync_comparison_error_message() -> None:
    app = application(
        sync_status="Unknown", revision=None, conditions=[COMPARISON_ERROR]
    )
    verdict = evaluate_sync(app, OURS)
    assert "app path does not exist" in verdict.message
    assert verdict.revision == ""


def test_evaluate_sync_stale_comparison_error_pending() -> None:
    app = application(
        sync_status="Unknown",
        revision=None,
        conditions=[COMPARISON_ERROR],
        reconciled_at="2025-02-12T09:54:00Z",
    )
    merged_later = datetime(2025, 2, 12, 10, 0, tzinfo=UTC)
    merged_earlier = datetime(2025, 2, 12, 9, 50, tzinfo=UTC)

    stale = evaluate_sync(app, OURS, compared_after=merged_later)
    fresh = evaluate_sync(app, OURS, compared_after=merged_earlier)

    assert stale.state is SyncState.PENDING
    assert fresh.state is SyncState.FAILED


def test_evaluate_sync_multi_source_by_repo_url() -> None:
    # The chart version happens to equal the wanted revision, but only the
    # values source counts. Its repoURL differs in `.git` and case.
    app = multi_source(["abc123", OLDER])
    values_repo = "HTTPS://git.example.com/example-org/service-values.git/"

    by_repo = evaluate_sync(app, "abc123", repo_url=values_repo)
    any_source = evaluate_sync(app, "abc123")

    assert by_repo.state is SyncState.PENDING
    assert any_source.state is SyncState.DONE


def test_normalize_repo_url_forms() -> None:
    expected = "git.example.com/org/repo"
    assert normalize_repo_url("https://git.example.com/org/repo.git") == expected
    assert normalize_repo_url("git@git.example.com:org/repo.git") == expected
    assert normalize_repo_url("ssh://git@git.example.com/org/repo/") == expected
    assert normalize_repo_url("HTTPS://Git.Example.com/org/repo") == expected


# --- Client ---


def json_response(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


def argocd_error(message: str, code: int) -> dict[str, Any]:
    return {"error": message, "code": code, "message": message}


async def test_client_sends_bearer_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return json_response(200, application())

    client = ArgoCDClient(
        "http://argocd.test/", SecretStr(TOKEN), transport=httpx.MockTransport(handler)
    )
    async with client:
        document = await client.get_application("example-app", refresh="normal")

    assert document["metadata"]["name"] == "example-app"
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert seen[0].url.path == "/api/v1/applications/example-app"
    assert seen[0].url.params["refresh"] == "normal"


async def test_client_not_found_names_application() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        message = 'applications.argoproj.io "missing-app" not found'
        return json_response(404, argocd_error(message, 5))

    client = ArgoCDClient(
        "http://argocd.test", None, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(ArgoCDApplicationNotFoundError) as caught:
        await client.get_application("missing-app")

    assert caught.value.non_retryable
    assert "'missing-app'" in caught.value.message
    assert caught.value.type == "ArgoCDApplicationNotFound"


async def test_client_permission_denied_not_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return json_response(403, argocd_error("permission denied", 7))

    client = ArgoCDClient(
        "http://argocd.test", None, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(ArgoCDPermissionError) as caught:
        await client.get_application("example-app")

    assert caught.value.non_retryable
    assert caught.value.status_code == 403


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_client_server_errors_retryable(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text="upstream connect error")

    client = ArgoCDClient(
        "http://argocd.test", None, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(ArgoCDUnavailableError) as caught:
        await client.get_application("example-app")

    assert not caught.value.non_retryable
    assert caught.value.status_code == status


async def test_client_connection_error_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = ArgoCDClient(
        "http://argocd.test", None, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(ArgoCDUnavailableError) as caught:
        await client.get_application("example-app")

    assert not caught.value.non_retryable
    assert "connection failed" in caught.value.message


# --- wait_for_sync ---


class ScriptedArgoCD:
    """A MockTransport handler that returns scripted responses, repeating the last."""

    def __init__(self, responses: list[httpx.Response]) -> None:
        self.responses = responses
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        index = min(len(self.requests) - 1, len(self.responses) - 1)
        response = self.responses[index]
        return httpx.Response(
            response.status_code,
            content=response.content,
            headers=response.headers,
        )


def make_activities(
    script: ScriptedArgoCD, sync_timeout_seconds: float = 30.0
) -> ArgoCDActivities:
    settings = ArgoCDSettings(
        url="http://argocd.test",
        token=SecretStr(TOKEN),
        sync_timeout_seconds=sync_timeout_seconds,
    )
    client = ArgoCDClient(
        settings.url, settings.token, transport=httpx.MockTransport(script)
    )
    return ArgoCDActivities(settings, client=client)


def recording_environment() -> tuple[ActivityEnvironment, list[Any]]:
    env = ActivityEnvironment()
    heartbeats: list[Any] = []
    env.on_heartbeat = lambda *details: heartbeats.append(copy.deepcopy(details[0]))
    return env, heartbeats


SYNC_INPUT = SyncInput(
    argocd_application="example-app", revision=OURS, poll_seconds=0.01
)


async def test_wait_for_sync_through_transient_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = ScriptedArgoCD(
        [
            json_response(
                200,
                application(
                    sync_status="OutOfSync",
                    revision=OLDER,
                    health="Degraded",
                    operation=operation("Running", OLDER, retryCount=2),
                ),
            ),
            httpx.Response(503, text="no healthy upstream"),
            json_response(
                200,
                application(
                    sync_status="OutOfSync",
                    health="Progressing",
                    operation=operation("Running", OURS),
                ),
            ),
            json_response(200, application(operation=operation("Succeeded", OURS))),
        ]
    )
    activities = make_activities(script)
    env, heartbeats = recording_environment()

    with caplog.at_level(logging.DEBUG):
        result = await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert result.synced
    assert result.revision == OURS
    assert result.sync_status == "Synced"
    assert result.health_status == "Healthy"
    assert result.operation_phase == "Succeeded"
    assert result.polls == 3
    assert len(script.requests) == 4
    assert [h["polls"] for h in heartbeats] == [1, 1, 2]
    assert heartbeats[1]["errors"] == 1
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text


async def test_wait_for_sync_failed_operation_raises() -> None:
    script = ScriptedArgoCD(
        [json_response(200, application(operation=FAILED_HOOK_OPERATION))]
    )
    activities = make_activities(script)
    env, _ = recording_environment()

    with pytest.raises(ApplicationError) as caught:
        await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert caught.value.type == "SyncFailed"
    assert caught.value.non_retryable
    assert "retried 5 times" in caught.value.message
    assert caught.value.details[0]["operation_phase"] == "Failed"


async def test_wait_for_sync_comparison_error_raises() -> None:
    app = application(
        sync_status="Unknown", revision=None, conditions=[COMPARISON_ERROR]
    )
    # Argo CD compared after the wait began, so the error is about our revision.
    reconciled = datetime.now(UTC) + timedelta(minutes=1)
    app["status"]["reconciledAt"] = reconciled.strftime("%Y-%m-%dT%H:%M:%SZ")
    script = ScriptedArgoCD([json_response(200, app)])
    activities = make_activities(script)
    env, _ = recording_environment()

    with pytest.raises(ApplicationError) as caught:
        await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert caught.value.type == "SyncFailed"
    assert "ComparisonError" in caught.value.message


async def test_wait_for_sync_not_found_raises() -> None:
    message = 'applications.argoproj.io "example-app" not found'
    script = ScriptedArgoCD([json_response(404, argocd_error(message, 5))])
    activities = make_activities(script)
    env, _ = recording_environment()

    with pytest.raises(ArgoCDApplicationNotFoundError) as caught:
        await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert caught.value.non_retryable
    assert len(script.requests) == 1


async def test_wait_for_sync_resumes_from_heartbeat() -> None:
    script = ScriptedArgoCD([json_response(200, application())])
    activities = make_activities(script)
    env, _ = recording_environment()
    earlier = {"revision": OURS, "started_at": time.time() - 5, "polls": 7, "errors": 2}
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[earlier])

    result = await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert result.synced
    assert result.polls == 8
    assert "refresh" not in script.requests[0].url.params


async def test_wait_for_sync_ignores_other_revision_heartbeat() -> None:
    script = ScriptedArgoCD([json_response(200, application())])
    activities = make_activities(script)
    env, _ = recording_environment()
    earlier = {"revision": OLDER, "started_at": 1.0, "polls": 7}
    env.info = dataclasses.replace(env.info, heartbeat_details=[earlier])

    result = await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert result.synced
    assert result.polls == 1
    assert script.requests[0].url.params["refresh"] == "normal"


async def test_wait_for_sync_times_out_unsynced() -> None:
    pending = application(
        sync_status="OutOfSync",
        revision=OLDER,
        operation=operation("Running", OLDER, retryCount=4),
    )
    script = ScriptedArgoCD([json_response(200, pending)])
    activities = make_activities(script, sync_timeout_seconds=0.1)
    env, heartbeats = recording_environment()

    result = await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert not result.synced
    assert result.polls >= 2
    assert "did not report revision" in result.message
    assert OLDER in result.message
    assert heartbeats[-1]["sync_status"] == "OutOfSync"


async def test_wait_for_sync_timeout_through_outage() -> None:
    script = ScriptedArgoCD([httpx.Response(502, text="bad gateway")])
    activities = make_activities(script, sync_timeout_seconds=0.1)
    env, heartbeats = recording_environment()

    result = await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert not result.synced
    assert result.polls == 0
    assert "no status read" in result.message
    assert heartbeats[-1]["errors"] >= 1


async def test_wait_for_sync_resumed_clock_times_out() -> None:
    pending = application(sync_status="OutOfSync", revision=OLDER)
    script = ScriptedArgoCD([json_response(200, pending)])
    activities = make_activities(script, sync_timeout_seconds=30.0)
    env, _ = recording_environment()
    earlier = {"revision": OURS, "started_at": time.time() - 60, "polls": 20}
    env.info = dataclasses.replace(env.info, attempt=3, heartbeat_details=[earlier])

    result = await env.run(activities.wait_for_sync, SYNC_INPUT)

    assert not result.synced
    assert result.polls == 21
    assert len(script.requests) == 1
