"""`remediator demo --json` for real, once per layout, as a user runs it.

Each run starts the whole embedded stack in a subprocess, and the test reads the
GitOps repository the run left in its work directory: main must hold exactly
one rollback merge whose diff restores the previous image and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import git
import pytest

pytestmark = pytest.mark.e2e

GOOD_TAG = "1.10"
BAD_TAG = "1.11"


def run_demo(layout: str, work_dir: Path) -> tuple[int, dict, str]:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "remediator",
            "demo",
            "--json",
            "--layout",
            layout,
            "--work-dir",
            str(work_dir),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = json.loads(process.stdout) if process.stdout.strip() else {}
    return process.returncode, report, process.stderr


@pytest.mark.parametrize("layout", ["plain", "kustomize", "helm"])
def test_demo_recovers_with_one_image_merge(layout: str, tmp_path: Path) -> None:
    status, report, stderr = run_demo(layout, tmp_path)
    assert status == 0, stderr[-3000:]
    assert report["outcome"] == "recovered"
    assert report["layout"] == layout
    assert report["workflow_id"] == "incident-demo-guestbook"
    assert len(report["trace_id"]) == 32
    assert report["web_ui_url"].endswith("/workflows/incident-demo-guestbook")
    assert {stage["name"] for stage in report["stages"]} >= {
        "collect-evidence",
        "merge-pull-request",
        "wait-for-sync",
        "verify",
    }

    repo = git.Repo(tmp_path / "gitops.git")
    merges = [c for c in repo.iter_commits("main") if len(c.parents) > 1]
    assert [m.hexsha for m in merges] == [report["merge_commit"]]

    merge = merges[0]
    diff = repo.git.diff(merge.parents[0].hexsha, merge.hexsha, unified=0)
    changed = [
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 2, diff
    removed, added = changed
    assert removed.startswith("-"), diff
    assert BAD_TAG in removed, diff
    assert added == "+" + removed[1:].replace(BAD_TAG, GOOD_TAG), diff

    # The app's files at main are byte for byte those before the bad deploy.
    bad_commit = repo.commit(report["bad_commit"])
    before_bad = bad_commit.parents[0].hexsha
    assert repo.git.diff(before_bad, "main", "--", "apps/") == ""
    rollback = merge.parents[1]
    assert "Remediation-Incident: incident-demo-guestbook" in rollback.message
    assert f"Remediation-Trace-Id: {report['trace_id']}" in rollback.message
    assert report["live_image"].endswith(f":{GOOD_TAG}")
