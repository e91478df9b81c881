"""Run `remediator demo` as a subprocess and read what it leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import git


@dataclass
class DemoRun:
    """Exit status, JSON report and output of one `remediator demo` run."""

    status: int
    report: dict
    stdout: str
    stderr: str
    work_dir: Path

    @property
    def repo(self) -> git.Repo:
        return git.Repo(self.work_dir / "gitops.git")

    def merges_on_main(self) -> list[str]:
        return [c.hexsha for c in self.repo.iter_commits("main") if len(c.parents) > 1]


def run_demo(
    work_dir: Path,
    *args: str,
    environment: dict[str, str] | None = None,
    timeout: float = 300,
) -> DemoRun:
    """Run the demo with `--json --work-dir work_dir` and the given arguments."""
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "remediator",
            "demo",
            "--json",
            "--work-dir",
            str(work_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(environment or {})},
    )
    report = json.loads(process.stdout) if process.stdout.strip() else {}
    return DemoRun(process.returncode, report, process.stdout, process.stderr, work_dir)
