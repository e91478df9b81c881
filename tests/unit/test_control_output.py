"""Width of the operator commands' output outside a terminal."""

from __future__ import annotations

from datetime import UTC, datetime

from remediator import control
from remediator.control_cli import PIPE_WIDTH, output_console, render_rows


def row(index: int) -> control.IncidentRow:
    return control.IncidentRow(
        workflow_id=f"incident-demo-guestbook-{index}",
        run_id="0123456789abcdef",
        app_key="demo/guestbook",
        stage="close",
        outcome="recovered",
        status="Completed",
        start_time=datetime(2026, 12, 4, 20, 0, tzinfo=UTC),
        close_time=datetime(2026, 12, 4, 20, 1, tzinfo=UTC),
    )


def test_pipe_output_is_not_cut(monkeypatch, capsys) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    console = output_console()
    assert console.width == PIPE_WIDTH
    console.print(render_rows([row(1), row(2)]))
    out = capsys.readouterr().out
    assert "…" not in out
    assert "demo/guestbook" in out
    assert "recovered" in out


def test_columns_variable_sets_width(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert output_console().width == 120
