"""Tests of the `decide` activity with the real policy and the embedded engine.

Cases run `policies/remediation.rego` through regopy, so they check the policy
and the activity together. Broken policies live in temporary directories.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.policy import (
    EmbeddedRegoEngine,
    OpaRestEngine,
    PolicyActivities,
    PolicyError,
)
from remediator.settings import REPO_ROOT, PolicySettings
from workflows.models import (
    BudgetState,
    ChangeResult,
    Decision,
    DecisionInput,
    Evidence,
    SeriesVerdict,
)

POLICY_DIR = REPO_ROOT / "policies"


def make_input(
    evidence: dict[str, Any] | None = None,
    anomaly: dict[str, Any] | None | str = "default",
    change: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    **fields: Any,
) -> DecisionInput:
    """Build an input that the default policy rolls back, with overrides."""
    evidence_fields = {
        "namespace": "shop",
        "app": "cart",
        "has_data": True,
        "request_rate": 20.0,
        "error_ratio": 0.4,
        "latency_p99_seconds": 0.2,
    }
    evidence_fields.update(evidence or {})
    anomaly_model = None
    if anomaly == "default" or isinstance(anomaly, dict):
        anomaly_fields = {
            "key": "error_ratio",
            "score": 0.97,
            "anomalous": True,
            "sustained_seconds": 75.0,
            "points_scored": 35,
        }
        anomaly_fields.update(anomaly if isinstance(anomaly, dict) else {})
        anomaly_model = SeriesVerdict(**anomaly_fields)
    change_fields = {
        "found": True,
        "suspect_revision": "bad1234",
        "last_good_revision": "good567",
    }
    change_fields.update(change or {})
    budget_fields = {
        "key": "shop/cart",
        "max_rollbacks": 2,
        "window_seconds": 1800.0,
        "used": 0,
        "remaining": 2,
    }
    budget_fields.update(budget or {})
    return DecisionInput(
        incident_id="incident-shop-cart",
        namespace=fields.pop("namespace", "shop"),
        app=fields.pop("app", "cart"),
        alerts_firing=1,
        evidence=Evidence(**evidence_fields),
        anomaly=anomaly_model,
        change=ChangeResult(**change_fields),
        budget=BudgetState(**budget_fields),
        **fields,
    )


def settings_for(directory: Path, **fields: Any) -> PolicySettings:
    return PolicySettings(engine="embedded", directory=directory, **fields)


async def decide(
    input: DecisionInput, directory: Path = POLICY_DIR, **fields: Any
) -> Decision:
    activities = PolicyActivities(settings_for(directory, **fields))
    return await ActivityEnvironment().run(activities.decide, input)


def write_policy(directory: Path, source: str, name: str = "policy.rego") -> Path:
    (directory / name).write_text(source, encoding="utf-8")
    return directory


def assert_fail_closed(decision: Decision) -> None:
    assert decision.action == "escalate"
    assert decision.allow is False
    assert decision.evaluated is False
    assert decision.reasons
    assert decision.reasons[0].startswith("no decision: ")


# (case id, input, data document, expected action, expected allow,
#  text expected in some reason)
DECISION_CASES = [
    ("rollback", make_input(), None, "rollback", True, "error ratio 0.4"),
    (
        "no data",
        make_input(evidence={"has_data": False, "error_ratio": None}),
        None,
        "escalate",
        False,
        "missing data is not evidence",
    ),
    (
        "no traffic",
        make_input(evidence={"no_traffic": True, "error_ratio": None}),
        None,
        "escalate",
        False,
        "no traffic",
    ),
    (
        "under thresholds",
        make_input(evidence={"error_ratio": 0.01, "latency_p99_seconds": 0.3}),
        None,
        "none",
        False,
        "not breaching",
    ),
    (
        "latency breach",
        make_input(evidence={"error_ratio": 0.0, "latency_p99_seconds": 2.5}),
        None,
        "rollback",
        True,
        "p99 latency",
    ),
    (
        "no anomaly verdict",
        make_input(anomaly=None),
        None,
        "none",
        False,
        "anomaly not confirmed",
    ),
    (
        "anomaly not anomalous",
        make_input(anomaly={"anomalous": False, "score": 0.3}),
        None,
        "none",
        False,
        "anomaly not confirmed",
    ),
    (
        "no suspect change",
        make_input(change={"found": False, "reason": "no sync history"}),
        None,
        "escalate",
        False,
        "no suspect change found: no sync history",
    ),
    (
        "budget exhausted",
        make_input(
            budget={"used": 2, "remaining": 0, "next_free_at": "2025-01-01T10:30:00Z"}
        ),
        None,
        "escalate",
        False,
        "next slot frees at 2025-01-01T10:30:00Z",
    ),
    (
        "global threshold raised",
        make_input(),
        {"remediation": {"config": {"max_error_ratio": 0.5}}},
        "none",
        False,
        "not breaching",
    ),
    (
        "app threshold beats global",
        make_input(),
        {
            "remediation": {
                "config": {"max_error_ratio": 0.5},
                "applications": {"shop/cart": {"max_error_ratio": 0.1}},
            }
        },
        "rollback",
        True,
        "above the threshold 0.1",
    ),
    (
        "app rollback cap",
        make_input(budget={"used": 1, "remaining": 1}),
        {"remediation": {"applications": {"shop/cart": {"max_rollbacks": 1}}}},
        "escalate",
        False,
        "1 of 1 used",
    ),
    (
        "invalid setting",
        make_input(),
        {"remediation": {"config": {"max_error_ratio": "0.05"}}},
        "escalate",
        False,
        "invalid policy setting max_error_ratio",
    ),
]


@pytest.mark.parametrize(
    ("input", "data", "action", "allow", "reason"),
    [case[1:] for case in DECISION_CASES],
    ids=[case[0] for case in DECISION_CASES],
)
async def test_decision_table(
    tmp_path: Path,
    input: DecisionInput,
    data: dict[str, Any] | None,
    action: str,
    allow: bool,
    reason: str,
) -> None:
    fields: dict[str, Any] = {}
    if data is not None:
        data_file = tmp_path / "data.json"
        data_file.write_text(json.dumps(data), encoding="utf-8")
        fields["data_file"] = data_file
    decision = await decide(input, **fields)
    assert decision.action == action
    assert decision.allow is allow
    assert decision.evaluated is True
    assert decision.engine == "embedded"
    assert any(reason in text for text in decision.reasons), decision.reasons


async def test_decision_defaults_are_numbers() -> None:
    decision = await decide(make_input())
    assert decision.max_error_ratio == 0.05
    assert decision.max_latency_p99_seconds == 1.0
    assert decision.approval_timeout_seconds == 900.0
    assert decision.require_approval is False
    assert decision.shadow is False


async def test_app_override_sets_approval(tmp_path: Path) -> None:
    data = {
        "remediation": {
            "applications": {
                "shop/cart": {
                    "require_approval": True,
                    "approval_timeout_seconds": 60,
                    "shadow": True,
                }
            }
        }
    }
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(data), encoding="utf-8")
    decision = await decide(make_input(), data_file=data_file)
    assert decision.action == "rollback"
    assert decision.require_approval is True
    assert decision.approval_timeout_seconds == 60.0
    assert decision.shadow is True


async def test_app_override_other_app_unchanged(tmp_path: Path) -> None:
    data = {"remediation": {"applications": {"shop/cart": {"require_approval": True}}}}
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(data), encoding="utf-8")
    decision = await decide(make_input(app="checkout"), data_file=data_file)
    assert decision.action == "rollback"
    assert decision.require_approval is False


async def test_shadow_input_sets_shadow() -> None:
    decision = await decide(make_input(shadow=True))
    assert decision.action == "rollback"
    assert decision.shadow is True


async def test_nan_signal_is_missing_data() -> None:
    input = make_input(
        evidence={"error_ratio": float("nan"), "latency_p99_seconds": None}
    )
    decision = await decide(input)
    assert decision.action == "escalate"
    assert decision.evaluated is True
    assert any("missing data is not evidence" in text for text in decision.reasons)


async def test_input_numbers_reach_policy_as_numbers(tmp_path: Path) -> None:
    write_policy(
        tmp_path,
        """package remediation
import rego.v1
decision := {
  "allow": false,
  "action": "none",
  "reasons": [
    type_name(input.evidence.error_ratio),
    type_name(input.budget.remaining),
    type_name(input.alerts_firing),
    type_name(input.anomaly.sustained_seconds),
  ],
}
""",
    )
    decision = await decide(make_input(), tmp_path)
    assert decision.reasons == ["number", "number", "number", "number"]


async def test_fail_closed_undefined_decision(tmp_path: Path) -> None:
    write_policy(tmp_path, "package other\nimport rego.v1\ndecision := {}\n")
    decision = await decide(make_input(), tmp_path)
    assert_fail_closed(decision)
    assert "undefined" in decision.reasons[0]


async def test_fail_closed_empty_policy_dir(tmp_path: Path) -> None:
    decision = await decide(make_input(), tmp_path)
    assert_fail_closed(decision)
    assert "undefined" in decision.reasons[0]


async def test_fail_closed_missing_policy_dir(tmp_path: Path) -> None:
    decision = await decide(make_input(), tmp_path / "absent")
    assert_fail_closed(decision)
    assert "not found" in decision.reasons[0]


async def test_fail_closed_parse_error(tmp_path: Path) -> None:
    write_policy(tmp_path, "package remediation\nimport rego.v1\ndecision := if {\n")
    decision = await decide(make_input(), tmp_path)
    assert_fail_closed(decision)
    assert "policy.rego" in decision.reasons[0]


async def test_fail_closed_eval_conflict(tmp_path: Path) -> None:
    write_policy(
        tmp_path,
        """package remediation
import rego.v1
decision := {"allow": true, "action": "rollback"} if input.alerts_firing > 0
decision := {"allow": false, "action": "none"} if input.alerts_firing > 0
""",
    )
    decision = await decide(make_input(), tmp_path)
    assert_fail_closed(decision)
    assert "multiple outputs" in decision.reasons[0]


@pytest.mark.parametrize(
    "result",
    [
        '"rollback"',
        '{"action": "rollback", "reasons": []}',
        '{"allow": "true", "action": "rollback", "reasons": []}',
        '{"allow": true, "action": "delete", "reasons": []}',
        '{"allow": true, "action": "rollback", "reasons": "bad"}',
        '{"allow": true, "action": "rollback", "reasons": [], '
        '"max_error_ratio": "0.05"}',
    ],
    ids=[
        "string",
        "no allow",
        "allow string",
        "unknown action",
        "reasons string",
        "threshold string",
    ],
)
async def test_fail_closed_malformed_result(tmp_path: Path, result: str) -> None:
    write_policy(
        tmp_path, f"package remediation\nimport rego.v1\ndecision := {result}\n"
    )
    decision = await decide(make_input(), tmp_path)
    assert_fail_closed(decision)
    assert "invalid result" in decision.reasons[0]


async def test_fail_closed_timeout() -> None:
    class SlowEngine:
        name = "slow"

        def evaluate(self, query: str, input: dict[str, Any]) -> Any:
            time.sleep(0.5)
            return {"allow": True, "action": "rollback", "reasons": []}

    activities = PolicyActivities(
        PolicySettings(timeout_seconds=0.05), engine=SlowEngine()
    )
    decision = await ActivityEnvironment().run(activities.decide, make_input())
    assert_fail_closed(decision)
    assert "timed out" in decision.reasons[0]


async def test_fail_closed_invalid_data_file(tmp_path: Path) -> None:
    data_file = tmp_path / "data.json"
    data_file.write_text("{not json", encoding="utf-8")
    decision = await decide(make_input(), data_file=data_file)
    assert_fail_closed(decision)
    assert "data.json" in decision.reasons[0]


def test_engine_skips_test_modules(tmp_path: Path) -> None:
    write_policy(tmp_path, "package p\nimport rego.v1\nx := 1\n")
    write_policy(tmp_path, "package p_test\nbroken := if {\n", "p_test.rego")
    engine = EmbeddedRegoEngine(tmp_path)
    assert [name for name, _ in engine.modules] == ["policy.rego"]
    assert engine.evaluate("data.p.x", {}) == 1


def test_engine_undefined_is_none(tmp_path: Path) -> None:
    write_policy(tmp_path, "package p\nimport rego.v1\nx := 1 if input.a == 2\n")
    engine = EmbeddedRegoEngine(tmp_path)
    assert engine.evaluate("data.p.x", {"a": 1}) is None
    assert engine.evaluate("data.p.x", {"a": 2}) == 1


def test_engine_parse_error_raises(tmp_path: Path) -> None:
    write_policy(tmp_path, "package p\nx := if {\n")
    with pytest.raises(PolicyError, match="invalid Rego module policy.rego"):
        EmbeddedRegoEngine(tmp_path)


def test_engine_concurrent_threads() -> None:
    engine = EmbeddedRegoEngine(POLICY_DIR)
    document = make_input().model_dump(mode="json")
    results: list[Any] = []

    def evaluate() -> None:
        for _ in range(5):
            results.append(engine.evaluate("data.remediation.decision", document))

    threads = [threading.Thread(target=evaluate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20
    assert all(result["action"] == "rollback" for result in results)


class _FakeOpaHandler(BaseHTTPRequestHandler):
    """Return a canned decision for one path, and no result for others."""

    requests: list[tuple[str, dict[str, Any], str]] = []

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, body, self.headers.get("Authorization", "")))
        if self.path == "/v1/data/remediation/decision":
            answer = {"result": {"allow": False, "action": "none", "reasons": ["ok"]}}
        else:
            answer = {}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_opa() -> Iterator[str]:
    _FakeOpaHandler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _FakeOpaHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_opa_engine_posts_input(fake_opa: str) -> None:
    engine = OpaRestEngine(fake_opa, token="secret")
    result = engine.evaluate("data.remediation.decision", {"error_ratio": 0.4})
    assert result == {"allow": False, "action": "none", "reasons": ["ok"]}
    path, body, authorization = _FakeOpaHandler.requests[0]
    assert path == "/v1/data/remediation/decision"
    assert body == {"input": {"error_ratio": 0.4}}
    assert authorization == "Bearer secret"


def test_opa_engine_undefined_is_none(fake_opa: str) -> None:
    engine = OpaRestEngine(fake_opa)
    assert engine.evaluate("data.remediation.other", {}) is None


async def test_opa_engine_unreachable_fails_closed() -> None:
    settings = PolicySettings(
        engine="opa", opa_url="http://127.0.0.1:9", timeout_seconds=2.0
    )
    activities = PolicyActivities(settings)
    decision = await ActivityEnvironment().run(activities.decide, make_input())
    assert_fail_closed(decision)
    assert decision.engine == "opa"
