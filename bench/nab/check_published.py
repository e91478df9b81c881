"""Compare our NAB scores with those of NAB's published scorer.

    .venv/bin/python -m bench.nab.check_published --nab /path/to/NAB \
        --results /tmp/nabresults --detector gaussian1000hold \
        --data ../shared/data/nab --python /path/to/nab-venv/bin/python

The script contains none of NAB's code. It runs NAB's own `run.py` from the
checkout given with --nab. In a scratch folder it copies each detector's
result files (NAB's scoring step adds columns to them), runs NAB's null
detector (`run.py --detect -d null`), then `run.py --optimize --score
--normalize` for the null detector and ours, and reads NAB's
`final_results.json`. Our scorer (`bench.nab.scorer`) scores the same files.
It prints both normalised scores per profile with the corpus thresholds, and
exits with status 1 when any score differs by more than --tolerance. When
NAB fails, the scratch folder and NAB's logs in it are kept.

NAB's `run.py` needs pandas older than 3: with pandas 3.1 its labeler fails
with "assignment destination is read-only" (copy-on-write), and with pandas
2.3.3 it runs unchanged. So --python names an interpreter with such a pandas,
for example a virtual environment made for NAB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.nab.scorer import read_results, score_corpus

DEFAULT_TOLERANCE = 0.5
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Comparison:
    """One detector and profile, scored by NAB and by our scorer."""

    detector: str
    profile: str
    nab_score: float
    nab_threshold: float
    our_score: float
    our_threshold: float

    @property
    def difference(self) -> float:
        return self.our_score - self.nab_score

    @property
    def shown_difference(self) -> float:
        # Adding 0.0 turns a rounded -0.0 into 0.0, so the table never shows -0.00.
        return round(self.difference, 2) + 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nab", type=Path, required=True, help="NAB checkout (contains run.py)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        required=True,
        help="our results folder, <results>/<detector>/<category>/<detector>_<file>",
    )
    parser.add_argument(
        "--detector",
        action="append",
        required=True,
        help="detector to compare, a sub-folder of --results (repeat for more)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="NAB corpus folder with data/ and labels/combined_windows.json",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python interpreter that runs NAB (default: this one)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=1,
        help="worker processes NAB may start (its --numCPUs, default 1)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted difference of normalised scores "
        f"(default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the scratch folder and print its path",
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not (args.nab / "run.py").is_file():
        parser.error(f"--nab {args.nab}: run.py not found, give a NAB checkout")
    if not (args.data / "data").is_dir():
        parser.error(f"--data {args.data}: data/ folder not found")
    if not (args.data / "labels" / "combined_windows.json").is_file():
        parser.error(f"--data {args.data}: labels/combined_windows.json not found")
    if args.cpus < 1:
        parser.error(f"--cpus {args.cpus}: must be at least 1")
    if args.tolerance < 0:
        parser.error(f"--tolerance {args.tolerance}: must not be negative")
    for detector in args.detector:
        # NAB reads the detector name back from file names up to the first "_",
        # and keeps "null" for its own baseline detector.
        if "_" in detector or detector == "null":
            parser.error(f"--detector {detector}: names must not contain _ or be null")
        if not (args.results / detector).is_dir():
            parser.error(f"--detector {detector}: {args.results / detector} not found")


def profiles_path(nab: Path, data: Path) -> Path:
    """Return NAB's cost profiles, or the corpus copy if the checkout lacks one."""
    published = nab / "config" / "profiles.json"
    return published if published.is_file() else data / "config" / "profiles.json"


def run_nab(args: argparse.Namespace, workspace: Path, nab_args: list[str]) -> None:
    """Run NAB's run.py in `workspace`, and exit with the end of its log if it fails."""
    command = [
        args.python,
        str((args.nab / "run.py").resolve()),
        *nab_args,
        "--skipConfirmation",
        "--numCPUs",
        str(args.cpus),
        "--dataDir",
        str((args.data / "data").resolve()),
        "--windowsFile",
        str((args.data / "labels" / "combined_windows.json").resolve()),
        "--resultsDir",
        str(workspace / "results"),
        "--profilesFile",
        str(profiles_path(args.nab, args.data).resolve()),
        "--thresholdsFile",
        str(workspace / "thresholds.json"),
    ]
    log_path = workspace / f"nab-{nab_args[0].lstrip('-')}.log"
    print("running:", " ".join(command), flush=True)
    with log_path.open("w") as log:
        completed = subprocess.run(
            command, cwd=workspace, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    if completed.returncode != 0:
        tail = log_path.read_text().splitlines()[-LOG_TAIL_LINES:]
        raise SystemExit(
            f"NAB run.py failed with exit status {completed.returncode}. "
            "Check that --python has pandas older than 3. "
            f"Last lines of {log_path}:\n" + "\n".join(tail)
        )


def score_with_nab(args: argparse.Namespace, workspace: Path) -> tuple[dict, dict]:
    """Return NAB's normalised scores and thresholds, keyed by detector and profile."""
    results = workspace / "results"
    results.mkdir()
    for detector in args.detector:
        shutil.copytree(args.results / detector, results / detector)
    run_nab(args, workspace, ["--detect", "--detectors", "null"])
    detectors = ",".join(["null", *args.detector])
    run_nab(args, workspace, ["--optimize", "--score", "--normalize", "-d", detectors])
    scores = json.loads((results / "final_results.json").read_text())
    thresholds = json.loads((workspace / "thresholds.json").read_text())
    return scores, thresholds


def compare(args: argparse.Namespace, workspace: Path) -> list[Comparison]:
    nab_scores, nab_thresholds = score_with_nab(args, workspace)
    labels = args.data / "labels" / "combined_windows.json"
    comparisons = []
    for detector in args.detector:
        for ours in score_corpus(read_results(args.results, detector, labels)):
            comparisons.append(
                Comparison(
                    detector=detector,
                    profile=ours.profile,
                    nab_score=nab_scores[detector][ours.profile],
                    nab_threshold=nab_thresholds[detector][ours.profile]["threshold"],
                    our_score=ours.normalised,
                    our_threshold=ours.threshold,
                )
            )
    return comparisons


def print_table(comparisons: list[Comparison]) -> None:
    # NAB's threshold 1.1 and our inf both mean "no row is a detection".
    print(
        f"{'detector':20s} {'profile':20s} {'NAB':>8s} {'ours':>8s} {'diff':>7s}"
        f"  {'NAB threshold':>13s} {'our threshold':>13s}"
    )
    for row in comparisons:
        print(
            f"{row.detector:20s} {row.profile:20s} {row.nab_score:8.2f}"
            f" {row.our_score:8.2f} {row.shown_difference:7.2f}"
            f"  {row.nab_threshold:13.9f} {row.our_threshold:13.9f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workspace = Path(tempfile.mkdtemp(prefix="nab-check-"))
    try:
        comparisons = compare(args, workspace)
    except BaseException:
        print(f"scratch folder kept: {workspace}", file=sys.stderr)
        raise
    if args.keep:
        print(f"scratch folder kept: {workspace}")
    else:
        shutil.rmtree(workspace)
    print_table(comparisons)
    failed = [row for row in comparisons if abs(row.difference) > args.tolerance]
    for row in failed:
        print(
            f"FAIL: {row.detector} {row.profile}: ours {row.our_score:.2f} vs "
            f"NAB {row.nab_score:.2f} differs by more than {args.tolerance}",
            file=sys.stderr,
        )
    if not failed:
        print(f"all {len(comparisons)} scores agree within {args.tolerance}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
