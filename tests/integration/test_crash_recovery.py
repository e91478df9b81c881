"""Crash recovery of IncidentWorkflow on the embedded stack.

Each case starts its own `EmbeddedStack`, deploys the bad image, posts the
alert and follows the incident through its `status` query every 20 ms. When the
incident enters the case's stage, the case either kills the orchestrator worker
with SIGKILL and starts a new one, or restarts the Temporal dev server on the
same database file. The incident must still end `recovered`, with exactly one
pull request, one merge commit on main and one budget entry.

A worker killed while an activity runs leaves that activity to its
start-to-close timeout (or its heartbeat timeout), so some cases wait up to
two minutes for the retry. To keep the file short, a module-scoped fixture runs
the selected cases side by side, at most `CONCURRENCY` stacks at a time, and
each test awaits the report of its own case.

Three stages need help before a query returns them:

- `decide` runs a local activity, usually inside the workflow task that also
  leaves the stage, so a query rarely returns it. The decide case evaluates the
  policy on a slow OPA stand-in in this process, so that the local activity
  outlasts 80% of the 10 s workflow task timeout and the worker heartbeats
  the task, which makes the stage visible.
- `open-pull-request` and `merge-pull-request` last about 50 ms. The workers
  run git through a wrapper that delays `update-ref` and `merge-tree` by
  `GIT_DELAY_SECONDS`, so that the 20 ms poll returns these stages.
- `wait-for-sync` lasts as long as the Argo CD stand-in's sync delay, which
  each case raises.

A case whose poll still saw a later stage first starts again on a new stack,
up to `ATTEMPTS` times, and `collect-evidence` (about 50 ms) up to
`COLLECT_EVIDENCE_ATTEMPTS` times.

The `awaiting-approval` stage is not covered: the demo policy never asks for
approval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from temporalio.service import RPCError, RPCStatusCode

from activities.policy import EmbeddedRegoEngine
from remediator.demo.run import ALERT_FOR_SECONDS, ALERT_THRESHOLD, alertmanager_body
from remediator.demo.seed import push_image
from remediator.demo.stack import (
    BAD_IMAGE,
    DEMO_APP,
    DEMO_NAMESPACE,
    GOOD_IMAGE,
    EmbeddedStack,
)
from remediator.settings import REPO_ROOT
from workflows.models import (
    BudgetEntry,
    BudgetState,
    IncidentStatus,
    Outcome,
    Stage,
    budget_workflow_id,
    incident_workflow_id,
)

pytestmark = pytest.mark.integration

WORKFLOW_ID = incident_workflow_id(DEMO_NAMESPACE, DEMO_APP)
BUDGET_ID = budget_workflow_id(DEMO_NAMESPACE, DEMO_APP)

# Stacks running at once. Most of a case is spent waiting for an activity
# timeout, so a few stacks share two cores without slowing each other much.
CONCURRENCY = int(os.environ.get("REMEDIATOR_TEST_CRASH_CONCURRENCY", "4"))
POLL_SECONDS = 0.02
QUERY_TIMEOUT_SECONDS = 2.0
# The new worker collects the evidence again about 10 s later (the workflow
# task timeout), with a window that ends later and so contains more bad points.
# The detector's trailing baseline needs more good points than bad ones, so
# the collect-evidence case serves a longer baseline in a longer window.
COLLECT_EVIDENCE_BASELINE_SECONDS = 20.0
COLLECT_EVIDENCE_WINDOW_SECONDS = "60"
# Longest wait for the outcome after the alert: the longest start-to-close
# timeout of an interrupted activity (120 s) plus retries and verification.
INCIDENT_TIMEOUT_SECONDS = 240.0
GIT_DELAY_SECONDS = 0.3
# Attempts of a case whose poll missed its stage (it saw a later one first).
ATTEMPTS = 5
# collect-evidence lasts about 50 ms, and on an idle machine the poll missed
# it 5 times in a row in one CI run. A missed attempt costs one fresh stack.
COLLECT_EVIDENCE_ATTEMPTS = 12
# Above 80% of the default workflow task timeout (10 s), below the policy
# timeout set for the decide case and the local activity's 15 s.
POLICY_DELAY_SECONDS = 12.0
# Long enough that the 20 ms poll and a server restart both land inside it.
SERVER_RESTART_SYNC_DELAY_SECONDS = 3.0
KILL_SYNC_DELAY_SECONDS = 1.0

ENVIRONMENT = {
    "REMEDIATOR_VERIFY_INTERVAL_SECONDS": "2",
    "REMEDIATOR_VERIFY_CONSECUTIVE_INTERVALS": "3",
    "REMEDIATOR_VERIFY_MAX_INTERVALS": "15",
}


@dataclass(frozen=True)
class Case:
    """One interruption: `action` at the first sight of `stage`."""

    name: str
    stage: Stage
    action: str  # "kill-worker" or "restart-server"
    slow_policy: bool = False
    baseline_seconds: float = 6.0
    attempts: int = ATTEMPTS


# Slowest cases first, so that they start in the first batch.
KILL_CASES = [
    Case("open-pull-request", Stage.OPEN_PULL_REQUEST, "kill-worker"),
    Case("merge-pull-request", Stage.MERGE_PULL_REQUEST, "kill-worker"),
    Case(
        "collect-evidence",
        Stage.COLLECT_EVIDENCE,
        "kill-worker",
        baseline_seconds=COLLECT_EVIDENCE_BASELINE_SECONDS,
        attempts=COLLECT_EVIDENCE_ATTEMPTS,
    ),
    Case("wait-for-sync", Stage.WAIT_FOR_SYNC, "kill-worker"),
    Case("reserve-budget", Stage.RESERVE_BUDGET, "kill-worker"),
    Case("decide", Stage.DECIDE, "kill-worker", slow_policy=True),
    Case("verify", Stage.VERIFY, "kill-worker"),
]
SERVER_CASE = Case("dev-server-at-wait-for-sync", Stage.WAIT_FOR_SYNC, "restart-server")
ALL_CASES = {case.name: case for case in [*KILL_CASES, SERVER_CASE]}


class StageMissedError(Exception):
    """The poll returned a later stage before it returned the case's stage."""


@dataclass
class Report:
    """What one case observed; the tests assert on it."""

    case: Case
    status: IncidentStatus | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)
    interrupted_at: str = ""
    interrupted_after_seconds: float = 0.0
    incident_seconds: float = 0.0
    pull_records: list[dict] = field(default_factory=list)
    remediation_branches: list[str] = field(default_factory=list)
    merges_on_main: list[str] = field(default_factory=list)
    budget_entries: list[BudgetEntry] = field(default_factory=list)
    live_image: str = ""
    work_dir: Path | None = None
    attempts: int = 0

    def describe(self) -> str:
        stages = ", ".join(f"{stage}@{at:.2f}s" for at, stage in self.timeline)
        return (
            f"case {self.case.name}: stages seen {stages}; interrupted at "
            f"{self.interrupted_at or 'nothing'} after "
            f"{self.interrupted_after_seconds:.2f} s (attempt {self.attempts}); "
            f"logs in "
            f"{self.work_dir / 'logs' if self.work_dir else '?'}"
        )


# --- A slow OPA stand-in for the decide case --------------------------------


class SlowPolicyServer:
    """OPA's Data API on 127.0.0.1: evaluates the repository's policy after a delay."""

    def __init__(self, delay_seconds: float) -> None:
        engine = EmbeddedRegoEngine(REPO_ROOT / "policies")
        delay = delay_seconds

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                document = json.loads(self.rfile.read(length) or b"{}")
                time.sleep(delay)
                query = "data." + self.path.removeprefix("/v1/data/").replace("/", ".")
                result = engine.evaluate(query, document.get("input") or {})
                body = json.dumps({} if result is None else {"result": result})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller was the worker killed by the case

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SlowPolicyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- One case ------------------------------------------------------------------


def _git(bare: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(bare), *args], check=True, capture_output=True, text=True
    ).stdout


def slow_git_directory(base: Path) -> Path:
    """Write a `git` that delays the ref writes of the workers, then runs git."""
    real = shutil.which("git")
    assert real is not None, "git is not on PATH"
    directory = base / "slow-git"
    directory.mkdir()
    wrapper = directory / "git"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in\n'
        f'*" update-ref "*|*" merge-tree "*) sleep {GIT_DELAY_SECONDS} ;;\n'
        "esac\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return directory


async def _wait_for_alert_condition(http: httpx.AsyncClient) -> datetime:
    """Wait until the error ratio stays above the demo's alert threshold."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await http.get(
            f"/v1/signals/{DEMO_NAMESPACE}/{DEMO_APP}",
            params={"window_seconds": ALERT_FOR_SECONDS, "step_seconds": 1},
        )
        response.raise_for_status()
        ratios = [p.get("error_ratio") for p in response.json().get("points", [])]
        if (
            len(ratios) >= ALERT_FOR_SECONDS
            and all(r is not None for r in ratios)
            and min(ratios) > ALERT_THRESHOLD
        ):
            return datetime.now(UTC)
        await asyncio.sleep(0.25)
    raise TimeoutError("the error ratio never crossed the alert threshold")


async def _query_status(stack: EmbeddedStack) -> IncidentStatus | None:
    handle = stack.client.get_workflow_handle(WORKFLOW_ID)
    try:
        return await asyncio.wait_for(
            handle.query("status", result_type=IncidentStatus),
            QUERY_TIMEOUT_SECONDS,
        )
    except Exception:  # noqa: BLE001 - no worker, no server or not started yet
        return None


async def _interrupt(stack: EmbeddedStack, case: Case) -> None:
    if case.action == "kill-worker":
        await stack.restart_worker("orchestrator")
    else:
        await stack.restart_dev_server()


async def _follow(stack: EmbeddedStack, case: Case, report: Report) -> None:
    """Poll the status query, interrupt at the case's stage, wait for the outcome."""
    started = time.monotonic()
    deadline = started + INCIDENT_TIMEOUT_SECONDS
    seen = ""
    order = list(Stage)
    while True:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(
                f"no outcome within {INCIDENT_TIMEOUT_SECONDS:.0f} s; "
                + report.describe()
            )
        status = await _query_status(stack)
        if status is not None:
            if status.stage != seen:
                seen = status.stage
                report.timeline.append((round(now - started, 2), seen))
            if not report.interrupted_at and status.stage:
                position = order.index(Stage(status.stage))
                if position > order.index(case.stage):
                    raise StageMissedError(report.describe())
                if status.stage == case.stage:
                    report.interrupted_at = status.stage
                    report.interrupted_after_seconds = round(now - started, 2)
                    await _interrupt(stack, case)
                    continue
            if status.outcome:
                break
        await asyncio.sleep(POLL_SECONDS)
    # The outcome is set inside the last workflow task; wait for the close.
    handle = stack.client.get_workflow_handle(WORKFLOW_ID, result_type=IncidentStatus)
    report.status = await asyncio.wait_for(handle.result(), 60)
    report.incident_seconds = round(time.monotonic() - started, 2)


async def _collect(stack: EmbeddedStack, report: Report) -> None:
    bare = stack.bare_path
    pulls = bare / "remediator" / "pulls"
    report.pull_records = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(pulls.glob("*.json"))
    ]
    report.remediation_branches = _git(
        bare, "for-each-ref", "--format=%(refname)", "refs/heads/remediation/"
    ).split()
    report.merges_on_main = _git(bare, "rev-list", "--merges", "main").split()
    try:
        budget = await stack.client.get_workflow_handle(BUDGET_ID).query(
            "state", result_type=BudgetState
        )
    except RPCError as err:
        # No budget workflow: no slot was ever reserved.
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    else:
        report.budget_entries = budget.entries
    report.live_image = stack.standin.live_image(DEMO_APP)


async def run_case(case: Case, base: Path, policy_url: str, git_dir: Path) -> Report:
    """Run the case until its poll observes its stage, at most `case.attempts` times."""
    for attempt in range(1, case.attempts + 1):
        work_dir = base / f"{case.name}-{attempt}"
        try:
            report = await run_attempt(case, work_dir, policy_url, git_dir)
        except StageMissedError:
            if attempt == case.attempts:
                raise
            shutil.rmtree(work_dir, ignore_errors=True)
            continue
        report.attempts = attempt
        return report
    raise AssertionError("unreachable")


async def run_attempt(
    case: Case, work_dir: Path, policy_url: str, git_dir: Path
) -> Report:
    """Run one incident with the case's interruption on a stack of its own."""
    environment = {**ENVIRONMENT, "PATH": f"{git_dir}{os.pathsep}{os.environ['PATH']}"}
    if case.slow_policy:
        environment.update(
            {
                "REMEDIATOR_POLICY_ENGINE": "opa",
                "REMEDIATOR_POLICY_OPA_URL": policy_url,
                "REMEDIATOR_POLICY_TIMEOUT_SECONDS": str(POLICY_DELAY_SECONDS + 2.5),
            }
        )
    if case.stage is Stage.COLLECT_EVIDENCE:
        environment["REMEDIATOR_SIGNALS_WINDOW_SECONDS"] = (
            COLLECT_EVIDENCE_WINDOW_SECONDS
        )
    report = Report(case=case, work_dir=work_dir)
    stack = EmbeddedStack(work_dir=work_dir, environment=environment)
    try:
        await stack.start()
        stack.standin.sync_delay_seconds = (
            SERVER_RESTART_SYNC_DELAY_SECONDS
            if case.action == "restart-server"
            else KILL_SYNC_DELAY_SECONDS
        )
        await asyncio.sleep(case.baseline_seconds)
        await asyncio.to_thread(
            push_image, stack.bare_path, stack.layout, DEMO_APP, BAD_IMAGE
        )
        await stack.wait_for_live_image(BAD_IMAGE)
        async with httpx.AsyncClient(
            base_url=stack.intake_url,
            timeout=10,
            headers={"Authorization": f"Bearer {stack.intake_token}"},
        ) as http:
            fired_at = await _wait_for_alert_condition(http)
            response = await http.post(
                "/v1/alerts",
                json=alertmanager_body(DEMO_NAMESPACE, DEMO_APP, fired_at),
            )
        assert response.status_code == 202, response.text
        await _follow(stack, case, report)
        await _collect(stack, report)
    finally:
        await stack.stop()
    return report


# --- The fixture that runs the selected cases side by side -------------------


class CaseRunner:
    """Runs every selected case in the background; `report` awaits one."""

    def __init__(self, names: list[str], base: Path, policy_url: str) -> None:
        self._limit = asyncio.Semaphore(CONCURRENCY)
        git_dir = slow_git_directory(base)
        self._tasks = {
            name: asyncio.create_task(
                self._run(ALL_CASES[name], base, policy_url, git_dir), name=name
            )
            for name in names
        }

    async def _run(self, *args) -> Report:
        async with self._limit:
            return await run_case(*args)

    async def report(self, name: str) -> Report:
        return await self._tasks[name]

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _selected_cases(session: pytest.Session) -> list[str]:
    names = []
    for item in session.items:
        if Path(item.path) != Path(__file__):
            continue
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec else SERVER_CASE
        if case is not None and case.name not in names:
            names.append(case.name)
    order = list(ALL_CASES)
    return sorted(names, key=order.index)


@pytest_asyncio.fixture(scope="module")
async def cases(request: pytest.FixtureRequest) -> AsyncIterator[CaseRunner]:
    # Not under pytest's numbered temporary directories: another pytest session
    # on this machine may prune those while these stacks still use them.
    base = Path(tempfile.mkdtemp(prefix="remediator-crash-recovery-"))
    with SlowPolicyServer(POLICY_DELAY_SECONDS) as policy:
        runner = CaseRunner(_selected_cases(request.session), base, policy.url)
        try:
            yield runner
        finally:
            await runner.close()
    # The directories of failed cases stay for their logs; see Report.describe.
    shutil.rmtree(base / "slow-git", ignore_errors=True)
    with contextlib.suppress(OSError):
        base.rmdir()


# --- Assertions ------------------------------------------------------------------


def assert_recovered_once(report: Report) -> None:
    context = report.describe()
    assert report.interrupted_at == report.case.stage.value, context
    assert report.status is not None, context
    assert report.status.outcome == Outcome.RECOVERED, (
        f"{report.status.outcome}: {report.status.reasons}; {context}"
    )

    assert len(report.pull_records) == 1, (report.pull_records, context)
    record = report.pull_records[0]
    assert record["state"] == "merged", (record, context)
    incident_id = report.status.incident_id
    branch = f"refs/heads/remediation/{incident_id}"
    assert report.remediation_branches == [branch], context

    assert len(report.merges_on_main) == 1, (report.merges_on_main, context)
    assert report.merges_on_main == [report.status.merge_commit], context
    assert record["merge_commit"] == report.status.merge_commit, context
    assert report.status.pull_request is not None, context
    assert report.status.pull_request.number == record["number"], context

    budget_ids = [entry.incident_id for entry in report.budget_entries]
    assert budget_ids == [incident_id], (report.budget_entries, context)
    assert report.budget_entries[0].committed, (report.budget_entries, context)
    assert report.live_image == GOOD_IMAGE, context


@pytest.mark.parametrize("case", KILL_CASES, ids=[case.name for case in KILL_CASES])
async def test_worker_killed_at_stage_recovers_once(
    case: Case, cases: CaseRunner
) -> None:
    report = await cases.report(case.name)
    print(report.describe(), f"incident took {report.incident_seconds} s")
    assert_recovered_once(report)
    shutil.rmtree(report.work_dir)


async def test_dev_server_restarted_during_sync_recovers_once(
    cases: CaseRunner,
) -> None:
    report = await cases.report(SERVER_CASE.name)
    print(report.describe(), f"incident took {report.incident_seconds} s")
    assert_recovered_once(report)
    shutil.rmtree(report.work_dir)
