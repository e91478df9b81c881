"""Parity of the embedded Rego engine and the OPA REST engine.

An OPA-shaped HTTP server on 127.0.0.1 serves `POST /v1/data/<path>` with
`{"result": ...}`, or `{}` when the query is undefined, by evaluating the
real policy with `EmbeddedRegoEngine`. Every case of a systematic table runs
through `PolicyActivities.decide` twice, once per engine, and both decisions
must be equal except for the engine's name. The server also records what it
receives, so the tests check the wire format that a real OPA would parse.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.policy import EmbeddedRegoEngine, PolicyActivities, PolicyError
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
QUERY = "data.remediation.decision"
TOKEN = "opa-test-token"


@dataclass
class OpaState:
    """What the fake OPA evaluates with, and what it received."""

    engine: EmbeddedRegoEngine
    bodies: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    delay_seconds: float = 0.0


class OpaHandler(BaseHTTPRequestHandler):
    """`POST /v1/data/<path>` of OPA's REST Data API, backed by regopy."""

    state: OpaState

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length).decode("utf-8")
        self.state.bodies.append(raw)
        self.state.authorizations.append(self.headers.get("Authorization"))
        if self.state.delay_seconds:
            time.sleep(self.state.delay_seconds)
        if not self.path.startswith("/v1/data/"):
            self.reply(404, {"code": "not_found", "message": "unknown path"})
            return
        query = "data." + self.path.removeprefix("/v1/data/").replace("/", ".")

        def reject_constant(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            document = json.loads(raw, parse_constant=reject_constant)
        except ValueError as error:
            self.reply(400, {"code": "invalid_parameter", "message": str(error)})
            return
        try:
            result = self.state.engine.evaluate(query, document.get("input"))
        except PolicyError as error:
            self.reply(500, {"code": "internal_error", "message": str(error)})
            return
        self.reply(200, {} if result is None else {"result": result})

    def reply(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def opa() -> Iterator[tuple[str, OpaState]]:
    state = OpaState(engine=EmbeddedRegoEngine(POLICY_DIR))
    handler = type("BoundOpaHandler", (OpaHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


# --- the case table ---------------------------------------------------------------

EVIDENCE = {
    "breaching": {"has_data": True, "request_rate": 20.0, "error_ratio": 0.4},
    "healthy": {
        "has_data": True,
        "request_rate": 20.0,
        "error_ratio": 0.01,
        "latency_p99_seconds": 0.2,
    },
    "slow": {
        "has_data": True,
        "request_rate": 20.0,
        "error_ratio": 0.0,
        "latency_p99_seconds": 2.5,
    },
    "no data": {"has_data": False},
    "no traffic": {"has_data": True, "no_traffic": True, "request_rate": 0.0},
    "nan": {"has_data": True, "request_rate": 20.0, "error_ratio": float("nan")},
}
ANOMALY = {
    "confirmed": {"anomalous": True, "score": 0.97, "sustained_seconds": 75.0},
    "not anomalous": {"anomalous": False, "score": 0.3, "sustained_seconds": 0.0},
    "none": None,
}
CHANGE = {"found": True, "not found": False}
BUDGET_REMAINING = (0, 1, 2)
DATA: dict[str, dict | None] = {
    "no data": None,
    "app override": {
        "remediation": {
            "applications": {
                "shop/cart": {
                    "max_error_ratio": 0.5,
                    "require_approval": True,
                    "max_rollbacks": 1,
                }
            }
        }
    },
    "global shadow": {
        "remediation": {"config": {"shadow": True, "min_sustained_seconds": 60}}
    },
    "invalid setting": {"remediation": {"config": {"max_error_ratio": "high"}}},
}


def build_input(
    evidence: str, anomaly: str, change: str, remaining: int, shadow: bool
) -> DecisionInput:
    verdict = ANOMALY[anomaly]
    return DecisionInput(
        incident_id="incident-shop-cart",
        namespace="shop",
        app="cart",
        alerts_firing=1,
        evidence=Evidence(namespace="shop", app="cart", **EVIDENCE[evidence]),
        anomaly=None
        if verdict is None
        else SeriesVerdict(key="error_ratio", **verdict),
        change=ChangeResult(
            found=CHANGE[change],
            reason="" if CHANGE[change] else "Argo CD reports no synced revision",
            suspect_revision="bad1234",
            last_good_revision="good567",
        ),
        budget=BudgetState(
            key="shop/cart",
            max_rollbacks=2,
            window_seconds=1800.0,
            used=2 - remaining,
            remaining=remaining,
            next_free_at=None if remaining else "2026-01-01T00:30:00Z",
        ),
        shadow=shadow,
    )


def build_cases() -> list[tuple[str, DecisionInput, str]]:
    """Return (case id, input, data key) for each evidence, anomaly and change.

    The budget, the data document and the shadow flag rotate with the index.
    3 budgets and 4 documents are coprime, so all 12 pairs of them occur.
    """
    cases = []
    combinations = itertools.product(EVIDENCE, ANOMALY, CHANGE)
    data_keys = list(DATA)
    for index, (evidence, anomaly, change) in enumerate(combinations):
        remaining = BUDGET_REMAINING[index % len(BUDGET_REMAINING)]
        data_key = data_keys[index % len(data_keys)]
        shadow = (index // len(data_keys)) % 2 == 1
        case_id = (
            f"{evidence}|{anomaly}|change {change}|budget {remaining}|"
            f"{data_key}|shadow {shadow}"
        )
        cases.append(
            (
                case_id,
                build_input(evidence, anomaly, change, remaining, shadow),
                data_key,
            )
        )
    # The rotation above rarely meets a rollback, so every data document and
    # shadow flag also gets the inputs that the default policy rolls back.
    for data_key, shadow, evidence in itertools.product(
        data_keys, (False, True), ("breaching", "slow")
    ):
        case_id = (
            f"{evidence}|confirmed|change found|budget 2|{data_key}|shadow {shadow}"
        )
        input = build_input(evidence, "confirmed", "found", 2, shadow)
        cases.append((case_id, input, data_key))
    return cases


CASES = build_cases()


def test_case_table_is_varied() -> None:
    actions = set()
    for _, input, data_key in CASES:
        actions.add((input.evidence.has_data, data_key, input.shadow))
    assert len(CASES) >= 30
    assert len(actions) >= 10


@pytest.fixture(scope="module")
def embedded_engines() -> dict[str, EmbeddedRegoEngine]:
    return {key: EmbeddedRegoEngine(POLICY_DIR, data) for key, data in DATA.items()}


async def decide_both(
    input: DecisionInput,
    embedded: EmbeddedRegoEngine,
    url: str,
    state: OpaState,
    **settings: Any,
) -> tuple[Decision, Decision]:
    state.engine = embedded
    local = PolicyActivities(
        PolicySettings(engine="embedded", directory=POLICY_DIR, **settings), embedded
    )
    remote = PolicyActivities(
        PolicySettings(engine="opa", opa_url=url, opa_token=TOKEN, **settings)
    )
    environment = ActivityEnvironment()
    return (
        await environment.run(local.decide, input),
        await environment.run(remote.decide, input),
    )


@pytest.mark.parametrize(
    ("input", "data_key"),
    [(input, data_key) for _, input, data_key in CASES],
    ids=[case_id for case_id, _, _ in CASES],
)
async def test_engines_agree(
    opa: tuple[str, OpaState],
    embedded_engines: dict[str, EmbeddedRegoEngine],
    input: DecisionInput,
    data_key: str,
) -> None:
    url, state = opa
    local, remote = await decide_both(input, embedded_engines[data_key], url, state)

    assert local.engine == "embedded"
    assert remote.engine == "opa"
    assert remote.evaluated == local.evaluated
    assert remote.model_dump(exclude={"engine"}) == local.model_dump(exclude={"engine"})


def test_table_reaches_every_action(
    embedded_engines: dict[str, EmbeddedRegoEngine],
) -> None:
    seen = set()
    for _, input, data_key in CASES:
        document = json.loads(input.model_dump_json())
        result = embedded_engines[data_key].evaluate(QUERY, document)
        seen.add((result["action"], result["require_approval"], result["shadow"]))
    assert ("rollback", False, False) in seen
    assert ("rollback", True, False) in seen
    assert any(action == "rollback" and shadow for action, _, shadow in seen)
    assert any(action == "escalate" for action, _, _ in seen)
    assert any(action == "none" for action, _, _ in seen)


async def test_undefined_query_agrees(
    opa: tuple[str, OpaState], embedded_engines: dict[str, EmbeddedRegoEngine]
) -> None:
    url, state = opa
    _, input, _ = CASES[0]
    local, remote = await decide_both(
        input, embedded_engines["no data"], url, state, query="data.remediation.other"
    )

    assert local.evaluated is False
    assert remote.evaluated is False
    assert remote.model_dump(exclude={"engine"}) == local.model_dump(exclude={"engine"})


async def test_input_numbers_stay_numbers(
    opa: tuple[str, OpaState], embedded_engines: dict[str, EmbeddedRegoEngine]
) -> None:
    url, state = opa
    input = build_input("slow", "confirmed", "found", 1, False)
    state.bodies.clear()
    await decide_both(input, embedded_engines["no data"], url, state)

    sent = json.loads(state.bodies[-1])["input"]
    assert sent["evidence"]["error_ratio"] == 0.0
    assert type(sent["evidence"]["error_ratio"]) is float
    assert type(sent["evidence"]["latency_p99_seconds"]) is float
    assert type(sent["budget"]["remaining"]) is int
    assert type(sent["budget"]["used"]) is int
    assert type(sent["anomaly"]["score"]) is float
    assert type(sent["alerts_firing"]) is int
    assert sent["shadow"] is False


async def test_nan_sent_as_null(
    opa: tuple[str, OpaState], embedded_engines: dict[str, EmbeddedRegoEngine]
) -> None:
    url, state = opa
    input = build_input("nan", "confirmed", "found", 2, False)
    state.bodies.clear()
    local, remote = await decide_both(input, embedded_engines["no data"], url, state)

    assert "NaN" not in state.bodies[-1]
    assert json.loads(state.bodies[-1])["input"]["evidence"]["error_ratio"] is None
    assert remote.action == "escalate"
    assert local.action == "escalate"


async def test_bearer_token_sent(
    opa: tuple[str, OpaState], embedded_engines: dict[str, EmbeddedRegoEngine]
) -> None:
    url, state = opa
    state.authorizations.clear()
    _, input, _ = CASES[0]
    await decide_both(input, embedded_engines["no data"], url, state)

    assert state.authorizations == [f"Bearer {TOKEN}"]


async def test_timeout_fails_closed(
    opa: tuple[str, OpaState], embedded_engines: dict[str, EmbeddedRegoEngine]
) -> None:
    url, state = opa
    input = build_input("breaching", "confirmed", "found", 2, False)
    state.engine = embedded_engines["no data"]
    state.delay_seconds = 1.0
    try:
        remote = PolicyActivities(
            PolicySettings(engine="opa", opa_url=url, timeout_seconds=0.2)
        )
        decision = await ActivityEnvironment().run(remote.decide, input)
    finally:
        state.delay_seconds = 0.0

    assert decision.action == "escalate"
    assert decision.allow is False
    assert decision.evaluated is False
    assert decision.engine == "opa"
    assert decision.reasons[0].startswith("no decision: ")
