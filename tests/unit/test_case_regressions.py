"""Regression tests modelled on payloads from public bug reports.

The fixtures are written here in the shape of the reported payloads, and
nothing is read from outside the repository.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from temporalio import activity
from temporalio.client import WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer, Worker

from activities.argocd import SyncState, evaluate_sync
from activities.budget import BudgetActivities
from activities.detection import score_detection_input
from activities.gitops.yaml_edit import image_scalars, set_scalars
from activities.policy import PolicyActivities
from activities.signals import SignalActivities, judge_interval
from remediator.intake.alertmanager import PlanEntry
from remediator.intake.app import create_app
from remediator.settings import PolicySettings, Settings
from workflows.budget import RollbackBudgetWorkflow
from workflows.incident import IncidentWorkflow
from workflows.models import (
    AlertSignal,
    BudgetQuery,
    BudgetReservation,
    BudgetState,
    ChangeQuery,
    ChangeResult,
    DecisionInput,
    DetectionInput,
    EscalationInput,
    Evidence,
    IncidentConfig,
    IncidentInput,
    IncidentStatus,
    Outcome,
    Series,
    SeriesVerdict,
    SignalQuery,
    VerifyInput,
)

REPO = Path(__file__).resolve().parents[2]


# --- Alertmanager intake -------------------------------------------------------


class RecordingStarter:
    """A fake incident starter that records every call and tracks open incidents."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.started: list[PlanEntry] = []
        self.signalled: list[PlanEntry] = []

    async def signal_with_start(self, entry: PlanEntry) -> str:
        self.started.append(entry)
        self.open.add(entry.workflow_id)
        return entry.workflow_id

    async def signal_open(self, entry: PlanEntry) -> str | None:
        if entry.workflow_id not in self.open:
            return None
        self.signalled.append(entry)
        return entry.workflow_id


async def post_alerts(starter: RecordingStarter, *bodies: object) -> list:
    app = create_app(Settings(), starter)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [
            await client.post(
                "/v1/alerts",
                content=body if isinstance(body, bytes) else json.dumps(body),
                headers={"content-type": "application/json"},
            )
            for body in bodies
        ]


async def test_mixed_status_group_starts_nothing() -> None:
    # The group status is firing, but the firing member has an empty alertname
    # and the other member is resolved. The envelope fields are missing.
    body = {
        "receiver": "team-recv",
        "status": "firing",
        "alerts": [
            {"status": "firing", "labels": {"alertname": "", "namespace": "shop"}},
            {
                "status": "resolved",
                "labels": {"alertname": "Err", "namespace": "shop", "app": "web"},
            },
        ],
    }
    starter = RecordingStarter()
    (response,) = await post_alerts(starter, body)
    assert response.status_code == 202
    assert starter.started == []
    assert response.json()["unroutable"] == 1
    assert response.json()["ignored_resolved"] == 1


async def test_ha_duplicate_alert_one_incident() -> None:
    labels = {"alertname": "IngestDelay", "namespace": "obs", "app": "ingest"}

    def peer(group_key: str, receiver: str) -> dict:
        return {
            "version": "4",
            "groupKey": group_key,
            "status": "firing",
            "receiver": receiver,
            "alerts": [
                {
                    "status": "firing",
                    "labels": labels,
                    "startsAt": "2020-01-02T03:04:05Z",
                    "fingerprint": "a1b2c3d4e5f60718",
                }
            ],
        }

    first = peer('{}/{tier=~"^(?:obs)$"}/{sev=~"^(?:page)$"}:{a="b"}', "web\\.hook")
    second = peer('{}/{sev=~"^(?:page)$"}/{tier=~"^(?:obs)$"}:{a="b"}', "ns/c/x\\.y")
    starter = RecordingStarter()
    responses = await post_alerts(starter, first, second)
    assert responses[0].status_code == 202
    assert responses[1].status_code == 202
    assert {entry.workflow_id for entry in starter.started} == {"incident-obs-ingest"}
    fingerprints = {a.fingerprint for e in starter.started for a in e.alerts}
    assert fingerprints == {"a1b2c3d4e5f60718"}


async def test_empty_alerts_list_accepted() -> None:
    body = {"version": "4", "groupKey": '{}/{s="t"}:{g="p"}', "alerts": []}
    starter = RecordingStarter()
    (response,) = await post_alerts(starter, body)
    assert response.status_code == 202
    assert response.json()["incidents"] == []
    assert starter.started == starter.signalled == []


async def test_grafana_version1_body_rejected() -> None:
    body = {
        "version": "1",
        "status": "resolved",
        "state": "alerting",
        "orgId": 1,
        "truncatedAlerts": 1,
        "groupKey": '{a="T"}2024-01-01 00:00:00.1 +0000 UTC m=+1.5',
        "alerts": [
            {
                "status": "resolved",
                "labels": {"alertname": "T", "namespace": "shop", "app": "web"},
                "valueString": "[ value=1 ]",
            }
        ],
    }
    starter = RecordingStarter()
    (response,) = await post_alerts(starter, body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "version"]
    assert starter.started == starter.signalled == []


async def test_truncated_body_reports_truncation() -> None:
    body = {
        "version": "4",
        "truncatedAlerts": 1,
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "T", "namespace": "shop", "app": "web"},
                "extraField": "kept",
            }
        ],
    }
    starter = RecordingStarter()
    (response,) = await post_alerts(starter, body)
    assert response.status_code == 202
    assert response.json()["truncated_alerts"] == 1


async def test_alert_storm_one_incident() -> None:
    common = {
        "alertname": "pod_stuck_waiting",
        "namespace": "default",
        "app": "prometheus",
        "reason": "CrashLoopBackOff",
    }
    alerts = [
        {
            "status": "firing",
            "labels": {**common, "pod": f"storage-{i:04d}-6796975jf8zd"},
            "annotations": {"summary": f"Pod storage-{i:04d} is stuck. " + "x" * 800},
            "fingerprint": f"5a17c0de{i:08x}",
        }
        for i in range(2200)
    ]
    raw = json.dumps({"version": "4", "status": "firing", "alerts": alerts}).encode()
    assert len(raw) > 2 * 1024 * 1024
    starter = RecordingStarter()
    (response,) = await post_alerts(starter, raw)
    assert response.status_code == 202
    assert [entry.key for entry in starter.started] == ["default/prometheus"]
    assert len(starter.started[0].alerts) == 2200


# --- Argo CD sync evaluation ---------------------------------------------------

SHA = "7092c17b0b89fefcfc7b705bc94bf44d5fc4e368"
OLD_SHA = "1111111111111111111111111111111111111111"


@pytest.mark.parametrize(
    "message",
    [
        "rpc error: code = Unknown desc = Manifest generation error (cached): "
        "overlays/prod: app path does not exist",
        "Failed to load target state: failed to generate manifest for source 1 "
        "of 1: Manifest generation error (cached): open charts/Chart.yaml: no "
        "such file or directory",
    ],
)
def test_unknown_sync_comparison_error_fails(message: str) -> None:
    app = {
        "status": {
            "sync": {"status": "Unknown"},
            "health": {"status": "Healthy"},
            "conditions": [{"type": "ComparisonError", "message": message}],
        }
    }
    verdict = evaluate_sync(app, SHA)
    assert verdict.state is SyncState.FAILED
    assert "ComparisonError" in verdict.message


def _failed_operation_app() -> dict:
    return {
        "status": {
            "sync": {"status": "Synced", "revision": SHA},
            "health": {"status": "Healthy"},
            "operationState": {
                "phase": "Failed",
                "message": "one or more synchronization tasks completed "
                "unsuccessfully (retried 5 times).",
                "retryCount": 5,
                "operation": {"sync": {"revision": SHA}},
                "syncResult": {
                    "revision": SHA,
                    "resources": [
                        {
                            "kind": "Job",
                            "name": "smoke-test",
                            "status": "Synced",
                            "hookType": "PostSync",
                            "hookPhase": "Failed",
                            "message": "Job has reached the specified backoff limit",
                        }
                    ],
                },
            },
        }
    }


def test_failed_hook_on_revision_fails() -> None:
    verdict = evaluate_sync(_failed_operation_app(), SHA)
    assert verdict.state is SyncState.FAILED
    assert "Job/smoke-test" in verdict.message


def test_failed_operation_other_revision_pending() -> None:
    assert evaluate_sync(_failed_operation_app(), OLD_SHA).state is SyncState.PENDING


def _multisource_app() -> dict:
    values_sha = "5dd95b4efd7e9b668c361bbddb8d7f1e56c32ac1"
    return {
        "spec": {
            "sources": [
                {"repoURL": "oci://charts.example/stable", "chart": "svc"},
                {"repoURL": "https://git.example.com/org/values.git", "ref": "values"},
            ]
        },
        "status": {
            "sync": {"status": "Synced", "revisions": ["2.6.2", values_sha]},
            "health": {"status": "Healthy"},
            "history": [
                {"id": 41, "revision": "", "revisions": ["2.6.1", OLD_SHA]},
                {"id": 42, "source": {"repoURL": ""}, "revisions": ["2.6.2"]},
            ],
            "operationState": {
                "phase": "Succeeded",
                "syncResult": {"revisions": ["2.6.2", values_sha]},
            },
        },
    }


def test_multisource_revision_matches_values_source() -> None:
    app = _multisource_app()
    values_sha = app["status"]["sync"]["revisions"][1]
    repo = "HTTPS://git.example.com/org/values/"
    assert evaluate_sync(app, values_sha, repo_url=repo).state is SyncState.DONE
    assert evaluate_sync(app, values_sha).state is SyncState.DONE
    assert evaluate_sync(app, OLD_SHA, repo_url=repo).state is SyncState.PENDING
    # The chart version sits in the other source's slot.
    assert evaluate_sync(app, "2.6.2", repo_url=repo).state is SyncState.PENDING


# --- GitOps YAML edits ---------------------------------------------------------

OLD_DIGEST = "sha256:24a0c4b4a4c0eb97a1aabb8e29f18e917d05abfe1b7a7c07857230879ce7d3d3"
OLD_NAME = (
    "custom/name:v0.0.1@sha256:"
    "3eeba3e2caa30d2aba0fd78a34c1bbeebaa1b96c7aa3c95ec9bac44163c5ca4f"
)
KUSTOMIZATION = f"""\
# images[] shapes from kustomize and renovate reports
images:
- name: test
  newTag: 2.2-date@sha256:7890
- digest: sha256:digest
  name: org/repo:tag
- name: example/app
  newTag: v1.4.0
  digest: {OLD_DIGEST}
- name: image/name
  newName: {OLD_NAME}
- name: ghcr.io/org/guestbook
  newName: ghcr.io/org/guestbook
  newTag: 0.2.0
"""


def test_kustomize_digest_edits_exact() -> None:
    scalars = image_scalars(KUSTOMIZATION)
    assert scalars["0.images.0.newTag"] == "2.2-date@sha256:7890"
    assert scalars["0.images.1.name"] == "org/repo:tag"
    new_digest = "sha256:" + "a" * 64
    new_name = "custom/name:v0.0.0@sha256:" + "b" * 64
    changes = {
        "0.images.0.newTag": "2.1-date@sha256:1234",
        "0.images.2.newTag": "v1.3.0",
        "0.images.2.digest": new_digest,
        "0.images.3.newName": new_name,
        "0.images.4.newTag": "0.1.0",
    }
    edited = set_scalars(KUSTOMIZATION, changes)
    expected = (
        KUSTOMIZATION.replace("2.2-date@sha256:7890", "2.1-date@sha256:1234")
        .replace("v1.4.0", "v1.3.0")
        .replace(OLD_DIGEST, new_digest)
        .replace(OLD_NAME, new_name)
        .replace("newTag: 0.2.0", "newTag: 0.1.0")
    )
    assert edited == expected
    assert image_scalars(edited) == {**scalars, **changes}


VALUES = """\
image:
  repository: localhost/client
  tag: 1.0
init:
  image:
    repository: ghcr.io/org/postgres-init
    tag: 14.10
sidecar:
  image: {repository: registry.example.com/sidecar, tag: 87940363}
worker:
  image:
    repository: registry.example.com/worker
    tag: 0e1234
legacy:
  image:
    repository: registry.example.com/legacy
    tag: '0362525'
"""


def test_numeric_tags_stay_strings() -> None:
    scalars = image_scalars(VALUES)
    assert scalars["0.image.tag"] == "1.0"
    assert scalars["0.init.image.tag"] == "14.10"
    assert scalars["0.sidecar.image.tag"] == "87940363"
    assert scalars["0.worker.image.tag"] == "0e1234"
    assert scalars["0.legacy.image.tag"] == "0362525"
    changes = {
        "0.image.tag": "1.10",
        "0.init.image.tag": "14.9",
        "0.sidecar.image.tag": "87940362",
        "0.worker.image.tag": "1e3",
        "0.legacy.image.tag": "0362524",
    }
    edited = set_scalars(VALUES, changes)
    assert 'tag: "1.10"' in edited
    assert "tag: '0362524'" in edited
    loaded = yaml.safe_load(edited)
    assert loaded["image"]["tag"] == "1.10"
    assert loaded["init"]["image"]["tag"] == "14.9"
    assert loaded["sidecar"]["image"]["tag"] == "87940362"
    assert loaded["worker"]["image"]["tag"] == "1e3"
    assert loaded["legacy"]["image"]["tag"] == "0362524"


def test_crlf_multidoc_edit_exact() -> None:
    text = (
        "\ufeffapiVersion: apps/v1\r\nkind: Deployment\r\nmetadata:\r\n"
        "  name:  web\r\nspec:\r\n  template:\r\n    spec:\r\n      containers:\r\n"
        "      - name:  web\r\n        image:  nginx:1.25.3\r\n---\r\n"
        "apiVersion: v1\r\nkind: Service\r\nmetadata:\r\n  name: web\r\n"
        "  annotations:\r\n    image: nginx:1.25.3\r\n"
    )
    assert image_scalars(text) == {
        "0.spec.template.spec.containers.0.image": "nginx:1.25.3",
        "1.metadata.annotations.image": "nginx:1.25.3",
    }
    edited = set_scalars(
        text, {"0.spec.template.spec.containers.0.image": "nginx:1.25.2"}
    )
    assert edited.encode() == text.encode().replace(
        b"image:  nginx:1.25.3", b"image:  nginx:1.25.2"
    )


# --- OPA REST engine -----------------------------------------------------------


def decision_input(evidence: Evidence, anomalous: bool = True) -> DecisionInput:
    return DecisionInput(
        incident_id="incident-shop-web",
        namespace="shop",
        app="web",
        alerts_firing=1,
        evidence=evidence,
        anomaly=SeriesVerdict(
            key="shop/web:error_ratio",
            score=0.99,
            anomalous=anomalous,
            sustained_seconds=120,
        ),
        change=ChangeResult(found=True, suspect_revision="b" * 40),
        budget=BudgetState(
            key="shop/web", max_rollbacks=2, window_seconds=1800, used=0, remaining=2
        ),
    )


BREACHING = Evidence(
    namespace="shop", app="web", has_data=True, error_ratio=0.5, request_rate=3.0
)


class OpaLike:
    """A small HTTP server on 127.0.0.1 that returns one fixed OPA response."""

    def __init__(self, status: int, body: object, content_type: str) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OpaLike:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


async def decide_against(
    status: int, body: object, content_type: str = "application/json"
):
    with OpaLike(status, body, content_type) as opa:
        activities = PolicyActivities(PolicySettings(engine="opa", opa_url=opa.url))
        return await activities.decide(decision_input(BREACHING))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {}),
        (200, {"decision_id": "dece0d6d-d67d-478b-a500-46b4615b0a99"}),
        (200, {"result": {}}),
        (200, {"result": False}),
        (200, {"result": {"allow": "true", "action": "rollback", "reasons": []}}),
        (404, {"code": "undefined_document", "message": "document missing"}),
    ],
    ids=[
        "empty",
        "decision-id-only",
        "package-object",
        "bare-false",
        "string-allow",
        "v0-404",
    ],
)
async def test_opa_undefined_result_fails_closed(status: int, body: object) -> None:
    decision = await decide_against(status, body)
    assert decision.allow is False
    assert decision.action == "escalate"
    assert decision.evaluated is False
    assert decision.reasons[0].startswith("no decision:")


async def test_opa_eval_conflict_fails_closed() -> None:
    body = {
        "code": "internal_error",
        "message": "error(s) occurred while evaluating query",
        "errors": [
            {
                "code": "eval_conflict_error",
                "message": "complete rules must not produce multiple outputs",
                "location": {"file": "policy.rego", "row": 3, "col": 1},
            }
        ],
    }
    decision = await decide_against(500, body)
    assert decision.allow is False
    assert decision.action == "escalate"
    assert decision.evaluated is False
    assert "eval_conflict_error" in decision.reasons[0]


async def test_opa_parse_error_fails_closed() -> None:
    body = {
        "code": "invalid_parameter",
        "message": "error(s) occurred while compiling module(s)",
        "errors": [
            {
                "code": "rego_parse_error",
                "message": "`if` keyword is required before rule body",
                "location": {"file": "main", "row": 7, "col": 1},
            }
        ],
    }
    decision = await decide_against(400, body)
    assert decision.allow is False
    assert decision.action == "escalate"
    assert decision.evaluated is False
    assert "rego_parse_error" in decision.reasons[0]


async def test_opa_non_json_body_fails_closed() -> None:
    decision = await decide_against(200, b"<html>proxy</html>", "text/html")
    assert decision.allow is False
    assert decision.evaluated is False


# --- Non-finite values and metric-source errors --------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_signals_escalate(
    value: float,
) -> None:
    evidence = Evidence(
        namespace="shop",
        app="web",
        has_data=True,
        request_rate=value,
        error_ratio=value,
        latency_p99_seconds=value,
    )
    decision = await PolicyActivities(PolicySettings()).decide(decision_input(evidence))
    assert decision.allow is False
    assert decision.action == "escalate"
    assert "missing data is not evidence" in decision.reasons[0]


@pytest.mark.parametrize("value", [math.nan, math.inf])
async def test_non_finite_error_ratio_escalates(
    value: float,
) -> None:
    evidence = Evidence(
        namespace="shop",
        app="web",
        has_data=True,
        request_rate=2.0,
        error_ratio=value,
        latency_p99_seconds=0.1,
    )
    decision = await PolicyActivities(PolicySettings()).decide(decision_input(evidence))
    assert decision.action == "escalate"


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_non_finite_ratio_never_recovers(value: str) -> None:
    evidence = Evidence.model_validate_json(
        json.dumps(
            {
                "namespace": "shop",
                "app": "web",
                "has_data": True,
                "request_rate": 2.0,
                "error_ratio": value,
                "latency_p99_seconds": 0.1,
            }
        )
    )
    query = SignalQuery(namespace="shop", app="web", window_seconds=30, step_seconds=30)
    result = judge_interval(evidence, VerifyInput(query=query, max_error_ratio=0.05))
    assert result.healthy is False


def test_detector_skips_non_finite_points() -> None:
    series = [
        Series(key="nan", step_seconds=15, values=[math.nan] * 40),
        Series(key="inf", step_seconds=15, values=[0.01] * 30 + [math.inf] * 5),
    ]
    nan_verdict, inf_verdict = score_detection_input(
        DetectionInput(series=series)
    ).verdicts
    assert nan_verdict.anomalous is False
    assert nan_verdict.points_scored == 0
    (finite_only,) = score_detection_input(
        DetectionInput(series=[Series(key="f", step_seconds=15, values=[0.01] * 30)])
    ).verdicts
    assert inf_verdict.anomalous is False
    assert inf_verdict.points_scored == finite_only.points_scored


@pytest.mark.parametrize(
    ("status", "content_type", "body", "retryable"),
    [
        (503, "application/json", '{"status":"error","errorType":"timeout"}', True),
        (422, "application/json", '{"status":"error","errorType":"execution"}', False),
        (400, "text/plain", '1:78: parse error: unexpected identifier "xxx"', False),
        (200, "text/plain", 'cannot parse "" to a valid timestamp', False),
        (200, "application/json", '{"status":"success","data":{"result":[]}}', False),
    ],
    ids=["503-timeout", "422-execution", "400-text", "200-text", "200-foreign-json"],
)
async def test_signal_store_errors_raise(
    status: int, content_type: str, body: str, retryable: bool
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, content=body, headers={"content-type": content_type}
        )

    activities = SignalActivities(Settings(), transport=httpx.MockTransport(answer))
    query = SignalQuery(namespace="shop", app="web", window_seconds=30, step_seconds=30)
    with pytest.raises(ApplicationError) as raised:
        await activities.verify_interval(VerifyInput(query=query, max_error_ratio=0.05))
    assert raised.value.non_retryable is (not retryable)


# --- Temporal workflows --------------------------------------------------------

WORKFLOW_FILES = [REPO / "workflows" / "incident.py", REPO / "workflows" / "budget.py"]
FORBIDDEN_MODULES = {"random", "uuid", "os", "time", "secrets", "loguru"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_code_avoids_nondeterminism(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN_MODULES
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not calls & {"random", "uuid4", "utcnow", "today", "getenv"}
    now_owners = {
        ast.unparse(node.func.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "now"
    }
    assert now_owners <= {"workflow"}


def test_continue_as_new_only_from_run() -> None:
    tree = ast.parse(WORKFLOW_FILES[1].read_text(encoding="utf-8"))
    callers = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)]
        calls.sort(key=lambda node: (node.lineno, node.col_offset))
        called = [ast.unparse(node.func) for node in calls]
        if "workflow.continue_as_new" in called:
            callers.append(function.name)
            assert called.index("workflow.wait_condition") < called.index(
                "workflow.continue_as_new"
            )
            assert "workflow.all_handlers_finished" in ast.unparse(function)
    assert callers == ["run"]


class EscalatingWorld:
    """Fake activities that lead an incident to a fail-closed escalation."""

    def __init__(self) -> None:
        self.escalations: list[EscalationInput] = []

    def activities(self) -> list:
        @activity.defn(name="collect_evidence")
        async def collect_evidence(query: SignalQuery) -> Evidence:
            return Evidence(namespace=query.namespace, app=query.app)

        @activity.defn(name="find_change")
        async def find_change(query: ChangeQuery) -> ChangeResult:
            return ChangeResult(found=False, reason="no history")

        @activity.defn(name="read_budget")
        async def read_budget(query: BudgetQuery) -> BudgetState:
            return BudgetState(
                key=f"{query.namespace}/{query.app}",
                max_rollbacks=query.max_rollbacks,
                window_seconds=query.window_seconds,
                used=0,
                remaining=query.max_rollbacks,
            )

        @activity.defn(name="decide")
        async def decide(request: DecisionInput):
            return await PolicyActivities(PolicySettings()).decide(request)

        @activity.defn(name="escalate")
        async def escalate(request: EscalationInput) -> None:
            self.escalations.append(request)

        return [collect_evidence, find_change, read_budget, decide, escalate]


async def test_signal_first_incident_replays(time_skipping_env, task_queue) -> None:
    env = time_skipping_env
    incident_id = f"incident-shop-web-{uuid.uuid4().hex[:8]}"
    request = IncidentInput(
        incident_id=incident_id,
        namespace="shop",
        app="web",
        config=IncidentConfig(argocd_application="shop-web"),
    )
    world = EscalatingWorld()
    # The default runner is the sandbox. The first alert arrives before run().
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[IncidentWorkflow],
        activities=world.activities(),
    ):
        handle = await env.client.start_workflow(
            IncidentWorkflow.run,
            request,
            id=incident_id,
            task_queue=task_queue,
            start_signal="alert",
            start_signal_args=[
                AlertSignal(fingerprint="f1", status="firing", alertname="Err")
            ],
        )
        status: IncidentStatus = await handle.result()
    assert status.outcome == Outcome.ESCALATED.value
    assert [(a.fingerprint, a.count) for a in status.alerts] == [("f1", 1)]
    assert len(world.escalations) == 1

    history: WorkflowHistory = await handle.fetch_history()
    replay = await Replayer(
        workflows=[IncidentWorkflow], data_converter=env.client.data_converter
    ).replay_workflow(history, raise_on_replay_failure=False)
    assert replay.replay_failure is None


async def test_budget_update_with_start_sandboxed(
    time_skipping_env, task_queue
) -> None:
    env = time_skipping_env
    budget = BudgetQuery(
        namespace="shop",
        app=f"web-{uuid.uuid4().hex[:6]}",
        max_rollbacks=1,
        window_seconds=1800,
    )
    budgets = BudgetActivities(env.client, task_queue)
    async with Worker(
        env.client, task_queue=task_queue, workflows=[RollbackBudgetWorkflow]
    ):
        first, second = [
            await asyncio.wait_for(
                budgets.reserve_budget(
                    BudgetReservation(budget=budget, incident_id=incident)
                ),
                timeout=30,
            )
            for incident in ("incident-a", "incident-b")
        ]
    assert first.granted is True
    assert first.state.entries[0].reserved_at.tzinfo is not None
    assert second.granted is False
    assert "used up" in second.reason
