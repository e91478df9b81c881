"""Every demo scenario but the default, for real, with what it must leave behind.

The default `rollback` scenario runs once per layout in test_demo.py. Two
scenarios run at a time to keep the suite short on two cores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from remediator.cli import SCENARIOS as DEMO_SCENARIOS
from tests.e2e.helpers import DemoRun, run_demo

pytestmark = pytest.mark.e2e

# The default `rollback` runs in test_demo.py, once per layout.
SCENARIOS = [name for name in DEMO_SCENARIOS if name != "rollback"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoRun]:
    # mktemp is not thread-safe on its first call, so the folders come first.
    work_dirs = {
        name: tmp_path_factory.mktemp(f"scenario-{name}") for name in SCENARIOS
    }

    def play(scenario: str) -> DemoRun:
        return run_demo(work_dirs[scenario], "--scenario", scenario)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCENARIOS, pool.map(play, SCENARIOS), strict=True))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_reaches_expected_outcomes(runs, scenario: str) -> None:
    run = runs[scenario]
    assert run.status == 0, run.stderr[-3000:]
    assert run.report["scenario"] == scenario
    assert run.report["outcomes"] == run.report["expected_outcomes"]


def test_budget_rolls_back_twice_then_stops(runs) -> None:
    run = runs["budget"]
    assert run.report["outcomes"] == ["recovered", "recovered", "budget-exhausted"]
    assert len(run.merges_on_main()) == 2
    assert "budget" in " ".join(run.report["incidents"][2]["reasons"]).lower()


def test_approval_records_who_approved(runs) -> None:
    run = runs["approval"]
    stages = [stage["name"] for stage in run.report["stages"]]
    assert "awaiting-approval" in stages
    assert len(run.merges_on_main()) == 1


def test_abort_leaves_no_merge(runs) -> None:
    run = runs["abort"]
    assert run.report["outcome"] == "aborted"
    assert "demo-operator" in run.report["reasons"][0]
    assert run.merges_on_main() == []


def test_flapping_counts_repeats_and_opens_nothing(runs) -> None:
    run = runs["flapping"]
    assert run.report["outcome"] == "resolved"
    assert run.report["pull_request"] == ""
    assert run.report["alerts"][0]["count"] >= 3
    assert run.report["alerts"][0]["status"] == "resolved"
    assert run.merges_on_main() == []


def test_verify_fails_escalates_after_one_rollback(runs) -> None:
    run = runs["verify-fails"]
    assert run.report["outcome"] == "escalated"
    assert len(run.merges_on_main()) == 1
    assert "not recovered" in run.report["reasons"][0]


def test_shadow_opens_draft_without_merge(runs) -> None:
    run = runs["shadow"]
    assert run.report["outcome"] == "shadowed"
    assert run.report["pull_request_draft"] is True
    assert run.report["pull_request_state"] == "open"
    assert run.merges_on_main() == []


def test_sweep_opens_the_incident_without_an_alert(runs) -> None:
    run = runs["sweep"]
    assert run.report["outcome"] == "recovered"
    assert len(run.merges_on_main()) == 1
    alerts = run.report["alerts"]
    assert [alert["alertname"] for alert in alerts] == ["RemediatorSweepAnomaly"]
    assert "The sweep opened incident incident-demo-guestbook" in run.stderr
