"""Loop latency: alert posted to rollback merged, on the embedded stack.

Runs N incidents one after another against one demo application: each one
deploys the bad image, waits until the error ratio has stayed above the alert
threshold, posts the Alertmanager body and measures the time until the GitOps
repository's main branch holds the rollback merge. Verification windows are
excluded from the figure (the clock stops at the merge). Prints p50, p99 and
the median seconds of each stage before the merge.

    .venv/bin/python bench/loop_latency.py [--incidents 50] [--json FILE]

Incidents are spaced by healthy periods (--gap-seconds) so that the anomaly
detector's baseline is mostly healthy when the next bad deploy lands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from remediator.demo.run import (
    alertmanager_body,
    post_alert,
    wait_for_error_ratio,
)
from remediator.demo.seed import push_image
from remediator.demo.stack import (
    BAD_IMAGE,
    DEMO_APP,
    DEMO_NAMESPACE,
    EmbeddedStack,
)
from workflows.models import IncidentStatus, incident_workflow_id

# Verification is outside the measured span, so it is kept short; the budget
# is raised so that every incident may roll back.
ENVIRONMENT = {
    "REMEDIATOR_BUDGET_MAX_ROLLBACKS": "1000",
    "REMEDIATOR_VERIFY_INTERVAL_SECONDS": "1",
    "REMEDIATOR_VERIFY_CONSECUTIVE_INTERVALS": "1",
    "REMEDIATOR_VERIFY_MAX_INTERVALS": "10",
}
PRE_MERGE_STAGES = (
    "collect-evidence",
    "confirm-anomaly",
    "find-change",
    "read-budget",
    "decide",
    "reserve-budget",
    "open-pull-request",
    "merge-pull-request",
)


def read_main(bare: Path) -> str:
    """Read the main branch's commit from the bare repository's files."""
    loose = bare / "refs" / "heads" / "main"
    if loose.exists():
        return loose.read_text().strip()
    for line in (bare / "packed-refs").read_text().splitlines():
        if line.endswith(" refs/heads/main"):
            return line.split()[0]
    raise RuntimeError(f"main not found in {bare}")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def one_incident(
    stack: EmbeddedStack, http: httpx.AsyncClient, gap_seconds: float
) -> tuple[float, IncidentStatus]:
    await asyncio.to_thread(
        push_image, stack.bare_path, stack.layout, DEMO_APP, BAD_IMAGE
    )
    await stack.wait_for_live_image(BAD_IMAGE)
    await wait_for_error_ratio(http, above=True)
    bad_head = read_main(stack.bare_path)
    body = alertmanager_body(DEMO_NAMESPACE, DEMO_APP, datetime.now(UTC))

    posted = time.perf_counter()
    await post_alert(http, body)
    while read_main(stack.bare_path) == bad_head:
        await asyncio.sleep(0.002)
    merged = time.perf_counter()

    handle = stack.client.get_workflow_handle(
        incident_workflow_id(DEMO_NAMESPACE, DEMO_APP), result_type=IncidentStatus
    )
    status = await handle.result()
    if status.outcome != "recovered":
        raise RuntimeError(f"incident ended {status.outcome}: {status.reasons}")
    await wait_for_error_ratio(http, above=False)
    # Healthy time between incidents, as between real deploys, so the
    # detector's baseline is mostly healthy again.
    await asyncio.sleep(gap_seconds)
    return merged - posted, status


async def run(incidents: int, gap_seconds: float) -> dict:
    work_dir = Path(tempfile.mkdtemp(prefix="remediator-bench-"))
    stack = EmbeddedStack(work_dir=work_dir, environment=dict(ENVIRONMENT))
    await stack.start()
    latencies: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name in PRE_MERGE_STAGES}
    try:
        async with httpx.AsyncClient(
            base_url=stack.intake_url,
            timeout=10,
            headers={"Authorization": f"Bearer {stack.intake_token}"},
        ) as http:
            await asyncio.sleep(6)
            for index in range(incidents):
                latency, status = await one_incident(stack, http, gap_seconds)
                latencies.append(latency)
                for stage in status.stages:
                    if stage.name in stages:
                        stages[stage.name].append(stage.seconds)
                print(f"incident {index + 1:>3}: {latency * 1000:7.1f} ms", flush=True)
    finally:
        await stack.stop()
    return {
        "incidents": incidents,
        "p50_seconds": round(statistics.median(latencies), 4),
        "p99_seconds": round(percentile(latencies, 0.99), 4),
        "mean_seconds": round(statistics.fmean(latencies), 4),
        "max_seconds": round(max(latencies), 4),
        "stage_median_seconds": {
            name: round(statistics.median(values), 4)
            for name, values in stages.items()
            if values
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incidents", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--gap-seconds",
        type=float,
        default=10.0,
        help="healthy seconds between one incident's end and the next bad deploy",
    )
    args = parser.parse_args()
    results = asyncio.run(run(args.incidents, args.gap_seconds))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
