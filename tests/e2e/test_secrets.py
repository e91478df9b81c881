"""Credentials never leak: every token set to a marker, then searched for.

One incident runs to `recovered` with every credential set to a distinct
marker; no marker may appear in a workflow history, a log line, the demo's
output, a commit, a pull request record or any other file the run wrote.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import run_demo

pytestmark = pytest.mark.e2e

MARKERS = {
    "REMEDIATOR_INTAKE_BEARER_TOKEN": "marker-intake-6d1f0c",
    "REMEDIATOR_ARGOCD_TOKEN": "marker-argocd-93be51",
    "REMEDIATOR_POLICY_OPA_TOKEN": "marker-opa-2a7e44",
    "REMEDIATOR_GIT_TOKEN": "marker-git-c05b19",
    "REMEDIATOR_PROMETHEUS_BEARER_TOKEN": "marker-prometheus-5f8d20",
}


def test_markers_appear_nowhere(tmp_path: Path) -> None:
    histories = tmp_path / "histories"
    run = run_demo(
        tmp_path / "work", "--save-histories", str(histories), environment=MARKERS
    )
    assert run.status == 0, run.stderr[-3000:]
    assert run.report["outcome"] == "recovered"

    git_text = run.repo.git.log("--all", "-p", "--format=%H%n%B")
    places = {"stdout": run.stdout, "stderr": run.stderr, "git log": git_text}
    for marker in MARKERS.values():
        for place, text in places.items():
            assert marker not in text, f"{marker} found in {place}"
        # Every file the run wrote: logs, the Temporal database, pull
        # request records, the repository's objects and the histories.
        found = subprocess.run(
            ["grep", "-r", "-a", "-l", "-F", marker, str(tmp_path)],
            capture_output=True,
            text=True,
        )
        assert found.stdout == "", f"{marker} found in {found.stdout}"
    assert any(histories.glob("*.json"))
