"""The demo's JSON report when it stops before its incidents end."""

from __future__ import annotations

import json

from rich.console import Console

from remediator.demo.run import SCENARIOS, _print_failure


def test_failure_prints_json_report(capsys) -> None:
    console = Console(stderr=True)
    story = SCENARIOS["rollback"]
    error = TimeoutError("the error ratio never stayed above the alert threshold")

    _print_failure(console, "rollback", "plain", story, [], error, as_json=True)

    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["outcome"] == "error"
    assert report["error"].startswith("TimeoutError: the error ratio")
    assert report["expected_outcomes"] == story.expected
    assert report["outcomes"] == []
    assert "The demo stopped" in captured.err


def test_failure_without_json_prints_nothing(capsys) -> None:
    story = SCENARIOS["rollback"]
    _print_failure(
        Console(stderr=True), "rollback", "plain", story, [], RuntimeError("x"), False
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "RuntimeError: x" in captured.err
