"""The sweep's settings, start input and command line, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from rich.console import Console

from activities.incidents import SWEEP_ALERT_NAME, sweep_alert
from remediator.cli import build_parser
from remediator.settings import Settings, SettingsError, SweepSettings, load_settings
from remediator.sweep import (
    SweepSettingsError,
    parse_applications,
    print_result,
    sweep_input,
)
from workflows.models import OpenIncidentInput, SweepFinding, SweepResult


def test_applications_sorted_and_deduplicated() -> None:
    keys = parse_applications(" shop/cart,web/front,,shop/cart ", "X")
    assert keys == ["shop/cart", "web/front"]


@pytest.mark.parametrize("bad", ["cart", "Shop/cart", "shop/", "shop/cart/x", "a b/c"])
def test_invalid_application_is_rejected(bad: str) -> None:
    with pytest.raises(SweepSettingsError, match="namespace/app") as raised:
        parse_applications(bad, "REMEDIATOR_SWEEP_APPLICATIONS")
    assert "REMEDIATOR_SWEEP_APPLICATIONS" in str(raised.value)


def test_input_comes_from_settings() -> None:
    settings = Settings(
        sweep=SweepSettings(applications="shop/cart", min_sustained_seconds=90)
    )
    input = sweep_input(settings)
    assert input.applications == ["shop/cart"]
    assert not input.discover
    assert input.min_sustained_seconds == 90
    # Step 0 takes the signal step, so sweep and incident see the same points.
    assert input.step_seconds == settings.signals.step_seconds
    assert input.threshold == settings.detection.threshold
    assert input.detection_task_queue == settings.temporal.detection_task_queue


def test_app_flags_replace_settings() -> None:
    settings = Settings(sweep=SweepSettings(applications="shop/cart", discover=True))
    input = sweep_input(settings, applications=["web/front"], open_incidents=False)
    assert input.applications == ["web/front"]
    assert not input.discover
    assert not input.open_incidents


def test_empty_opt_in_is_rejected() -> None:
    with pytest.raises(SweepSettingsError, match="REMEDIATOR_SWEEP_APPLICATIONS"):
        sweep_input(Settings(sweep=SweepSettings()))
    assert sweep_input(Settings(sweep=SweepSettings(discover=True))).discover


def test_command_line_parses_actions() -> None:
    parser = build_parser()
    args = parser.parse_args(["sweep"])
    assert args.action == "now"
    args = parser.parse_args(["sweep", "--app", "shop/cart", "--dry-run", "--json"])
    assert args.app == ["shop/cart"]
    assert args.dry_run
    assert args.json
    assert parser.parse_args(["sweep", "schedule"]).action == "schedule"
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "later"])


def test_printed_result_lists_findings() -> None:
    console = Console(record=True, width=200)
    result = SweepResult(
        applications=2,
        series_scored=3,
        detection_calls=1,
        device="cpu",
        findings=[
            SweepFinding(
                application="shop/cart",
                series="shop/cart:error_ratio",
                score=0.97,
                sustained_seconds=120,
                incident_workflow_id="incident-shop-cart",
            )
        ],
        skipped={"shop/quiet": "no data in the window"},
    )
    print_result(console, result)
    text = console.export_text()
    assert "Swept 2 applications: 3 series in 1 detection call on cpu." in text
    assert "shop/cart:error_ratio scored 0.97" in text
    assert "incident incident-shop-cart" in text
    assert "shop/quiet skipped: no data in the window" in text


def test_sweep_alert_fingerprint_is_stable() -> None:
    finding = SweepFinding(
        application="shop/cart",
        series="shop/cart:latency_p99_seconds",
        score=0.91,
        sustained_seconds=75,
    )
    input = OpenIncidentInput(
        namespace="shop", app="cart", finding=finding, sweep_id="sweep-1"
    )
    alert = sweep_alert(input, datetime(2026, 12, 4, tzinfo=UTC))
    again = sweep_alert(
        input.model_copy(update={"sweep_id": "sweep-2"}), datetime.now(UTC)
    )
    assert alert.fingerprint == again.fingerprint == "sweep-shop-cart"
    assert alert.alertname == SWEEP_ALERT_NAME
    assert alert.labels["namespace"] == "shop"
    assert alert.labels["app"] == "cart"
    assert "latency_p99_seconds scored 0.91" in alert.annotations["summary"]
    assert alert.status == "firing"


def test_bad_environment_value_names_variable(monkeypatch) -> None:
    monkeypatch.setenv("REMEDIATOR_SWEEP_INTERVAL_SECONDS", "abc")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value).startswith("REMEDIATOR_SWEEP_INTERVAL_SECONDS is 'abc':")
