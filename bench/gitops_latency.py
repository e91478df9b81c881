"""Time the GitOps activities of one incident: find_change, open and merge.

Seeds a demo repository (plain layout) with `seed_repository`, then runs
`--incidents` incidents one after another. Each incident first releases a bad
image with `push_image`, so the target branch moved since the last rollback.
It then calls the three activities of `GitOpsActivities` on its own incident
id, as the worker does: a fresh provider per call, one work directory for all.
A static dict replaces the Argo CD API. Its history lists the previous good
revision and the bad one.

Prints the median, minimum and maximum of each operation in milliseconds, and
with `--json` one JSON object instead. The first incident also clones the
repository, so its times count in the maximum but hardly move the median.

Run from the repository root:

    .venv/bin/python bench/gitops_latency.py --incidents 25
    .venv/bin/python bench/gitops_latency.py --incidents 25 --strategy revert
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.gitops.activities import GitOpsActivities  # noqa: E402
from remediator.demo.seed import push_image, seed_repository  # noqa: E402
from remediator.settings import GitSettings  # noqa: E402
from workflows.models import (  # noqa: E402
    ChangeQuery,
    Decision,
    Evidence,
    MergeInput,
    PullRequestInput,
)

IMAGE = "registry.example.test/shop/cart"
OPERATIONS = ("find_change", "open_pull_request", "merge_pull_request")


def _application(repo_url: str, good: str, bad: str, history_id: int) -> dict:
    return {
        "metadata": {"name": "cart"},
        "spec": {
            "source": {
                "repoURL": repo_url,
                "path": "apps/cart",
                "targetRevision": "main",
            }
        },
        "status": {
            "sync": {"status": "Synced", "revision": bad},
            "history": [
                {"id": history_id, "revision": good, "deployedAt": "2026-01-01T00:00Z"},
                {
                    "id": history_id + 1,
                    "revision": bad,
                    "deployedAt": "2026-01-01T00:01Z",
                },
            ],
        },
    }


async def run_incidents(root: Path, incidents: int, strategy: str) -> dict[str, list]:
    seed = seed_repository(root / "gitops.git", "plain", "shop", "cart", f"{IMAGE}:1")
    application: dict = {}

    async def get_application(name: str) -> dict:
        return application

    activities = GitOpsActivities(
        GitSettings(work_dir=root / "git-work", strategy=strategy), get_application
    )
    good = seed.commit
    timings: dict[str, list[float]] = {operation: [] for operation in OPERATIONS}
    for index in range(incidents):
        incident_id = f"incident-bench-{index}"
        bad = push_image(seed.bare_path, "plain", "cart", f"{IMAGE}:bad-{index}")
        application.clear()
        application.update(_application(str(seed.bare_path), good, bad, 2 * index))

        started = time.perf_counter()
        change = await activities.find_change(
            ChangeQuery(incident_id=incident_id, argocd_application="cart")
        )
        timings["find_change"].append(time.perf_counter() - started)
        if not change.found:
            raise RuntimeError(f"{incident_id}: no change found: {change.reason}")

        request = PullRequestInput(
            incident_id=incident_id,
            namespace="shop",
            app="cart",
            change=change,
            decision=Decision(allow=True, action="rollback", reasons=["bench"]),
            evidence=Evidence(namespace="shop", app="cart", has_data=False),
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            strategy=strategy,
        )
        started = time.perf_counter()
        pull = await activities.open_pull_request(request)
        timings["open_pull_request"].append(time.perf_counter() - started)

        started = time.perf_counter()
        merged = await activities.merge_pull_request(
            MergeInput(incident_id=incident_id, pull_request=pull)
        )
        timings["merge_pull_request"].append(time.perf_counter() - started)
        if merged.state != "merged":
            raise RuntimeError(f"{incident_id}: pull request not merged: {merged}")
        # The merge restored the good image, so the next bad release starts here.
        good = merged.merge_commit
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incidents", type=int, default=25)
    parser.add_argument("--strategy", choices=("pin", "revert"), default="pin")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.incidents < 1:
        parser.error("--incidents must be at least 1")

    with tempfile.TemporaryDirectory(prefix="remediator-bench-") as tmp:
        timings = asyncio.run(run_incidents(Path(tmp), args.incidents, args.strategy))

    summary = {
        operation: {
            "median_ms": round(statistics.median(values) * 1000, 1),
            "min_ms": round(min(values) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
        }
        for operation, values in timings.items()
    }
    if args.json:
        print(
            json.dumps(
                {
                    "incidents": args.incidents,
                    "strategy": args.strategy,
                    "operations": summary,
                }
            )
        )
        return
    print(f"{args.incidents} incidents, strategy {args.strategy}")
    for operation, stats in summary.items():
        print(
            f"{operation:<20} median {stats['median_ms']:7.1f} ms  "
            f"min {stats['min_ms']:7.1f} ms  max {stats['max_ms']:7.1f} ms"
        )


if __name__ == "__main__":
    main()
