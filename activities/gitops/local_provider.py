"""Rollback pull requests inside a local bare repository, with no forge.

`GitOpsActivities` uses `LocalProvider` when `REMEDIATOR_GIT_PROVIDER=local`,
the default and the provider of `remediator demo`. A pull request here is

- the branch `remediation/<incident id>` in the bare repository,
- the ref `refs/pull/<number>/head`, as forges keep it,
- a JSON record at `<bare>/remediator/pulls/<number>.json` (git ignores
  unknown directories inside a bare repository).

Every method is idempotent:

- `open` finds an earlier attempt by its branch: the record first, then a
  branch whose head commit carries this incident's trailer.
- `merge` returns the recorded merge commit. When an earlier attempt pushed
  the merge but did not record it, `merge` finds it on the target branch.
- `close` of a closed pull request changes nothing.

Each method holds the bare repository's lock for its whole run, then the work
clone's lock, always in that order.

Errors: `PermanentGitOpsError` subclasses mean that a retry cannot succeed
(invalid input, nothing to roll back, conflicts, wrong pull request state).
Any other exception (git failures, lock timeouts) may succeed on retry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import git
import yaml

from activities.gitops.repository import (
    GitOpsRepository,
    file_lock,
    read_blob,
    redact_url,
    resolve_commit,
    write_commit,
)
from activities.gitops.yaml_edit import image_scalars, set_scalars
from workflows.models import (
    ClosePullRequestInput,
    Decision,
    Evidence,
    ImageChange,
    MergeInput,
    PullRequest,
    PullRequestInput,
)

logger = logging.getLogger(__name__)

PROVIDER_NAME = "local"
BRANCH_PREFIX = "remediation/"
INCIDENT_TRAILER = "Remediation-Incident"
TRACE_TRAILER = "Remediation-Trace-Id"
STRATEGIES = ("pin", "revert")
PUSH_ATTEMPTS = 3

# Git ref components may not start with `.` or `-`, contain `..` or end in
# `.lock`. This pattern is stricter, so ids are also safe in file names.
_INCIDENT_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
_K8S_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_BRANCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_TRACE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(password|passwd|token|secret|api[_-]?key|authorization)\b(\s*[:=]\s*)\S+"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_LINE_CHARS = 300


class PermanentGitOpsError(Exception):
    """A GitOps failure that a retry with the same input cannot fix."""

    error_type = "GitOpsError"


class InvalidInputError(PermanentGitOpsError):
    """The input names something invalid or absent (id, branch, revision, record)."""

    error_type = "InvalidInput"


class NothingToRollBackError(PermanentGitOpsError):
    """The target branch already contains the last good state."""

    error_type = "NothingToRollBack"


class RollbackConflictError(PermanentGitOpsError):
    """A revert or merge stopped on a conflict that needs a human."""

    error_type = "RollbackConflict"


class PullRequestStateError(PermanentGitOpsError):
    """The pull request is in a state that forbids the operation."""

    error_type = "PullRequestState"


def validate_incident_id(incident_id: str) -> str:
    """Return `incident_id` if it is safe in a branch name and a file path.

    Raises InvalidInputError otherwise.
    """
    if not _INCIDENT_ID.match(incident_id) or ".." in incident_id:
        raise InvalidInputError(
            f"invalid incident id {incident_id!r}: use 1-128 letters, digits, "
            "'.', '_' or '-', starting and ending with a letter or digit"
        )
    if incident_id.endswith(".lock"):
        raise InvalidInputError(
            f"invalid incident id {incident_id!r}: must not end in .lock"
        )
    return incident_id


def branch_for(incident_id: str) -> str:
    """Return the remediation branch of an incident, after validating its id."""
    return BRANCH_PREFIX + validate_incident_id(incident_id)


def scrub(text: str) -> str:
    """Make untrusted text one safe line: no control characters, no credentials."""
    line = _CONTROL.sub(" ", text).strip()
    line = _URL_CREDENTIALS.sub(r"\1", line)
    line = _SECRET_ASSIGNMENT.sub(r"\1\2***", line)
    if len(line) > MAX_LINE_CHARS:
        line = line[: MAX_LINE_CHARS - 3] + "..."
    return line


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class LocalProvider:
    """Pull requests as branches, refs and JSON records in a local bare repository."""

    def __init__(
        self,
        bare_path: Path,
        work_dir: Path,
        *,
        author_name: str = "Remediator",
        author_email: str = "remediator@localhost",
    ) -> None:
        self.bare_path = Path(bare_path).resolve()
        if (
            not (self.bare_path / "HEAD").is_file()
            or not (self.bare_path / "objects").is_dir()
        ):
            raise InvalidInputError(
                f"{self.bare_path} is not a bare git repository; the local provider "
                "needs REMEDIATOR_GIT_REPO_URL to be a local bare repository path"
            )
        self.author_name = author_name
        self.author_email = author_email
        self.repository = GitOpsRepository(
            str(self.bare_path),
            work_dir,
            author_name=author_name,
            author_email=author_email,
        )
        self.pulls_dir = self.bare_path / "remediator" / "pulls"
        self.lock_path = self.bare_path / "remediator" / "pulls.lock"

    # --- public operations --------------------------------------------------

    def open(self, request: PullRequestInput) -> PullRequest:
        """Open the rollback pull request of an incident, or return the earlier one.

        Raises InvalidInputError, NothingToRollBackError or
        RollbackConflictError for inputs that cannot work.
        """
        branch = branch_for(request.incident_id)
        self._validate_open(request)
        with self._locked() as repo:
            record = self._latest_record(branch)
            if record is not None and record["state"] in ("open", "merged"):
                logger.info(
                    "Reusing pull request #%s for incident %s.",
                    record["number"],
                    request.incident_id,
                )
                return self._to_model(record)

            title, body = self._describe(request)
            head = self._existing_branch_head(repo, branch, request.incident_id)
            if head is None:
                head, body = self._build_commit(repo, request, title, body)
                self._push(repo, head, branch)
            record = self._create_record(request, branch, head, title, body)
            logger.info(
                "Opened pull request #%s (%s) for incident %s at %s.",
                record["number"],
                branch,
                request.incident_id,
                head,
            )
            return self._to_model(record)

    def merge(self, request: MergeInput) -> PullRequest:
        """Merge the pull request with a merge commit on its target branch.

        Returns the recorded pull request when it was merged already. Raises
        PullRequestStateError for a closed or draft pull request and
        RollbackConflictError when the merge conflicts.
        """
        branch = branch_for(request.incident_id)
        with self._locked() as repo:
            record = self._load_for(request.pull_request, branch)
            if record["state"] == "merged":
                return self._to_model(record)
            if record["state"] != "open":
                raise PullRequestStateError(
                    f"pull request #{record['number']} is {record['state']}, "
                    "but only an open pull request can be merged"
                )
            if record["draft"]:
                raise PullRequestStateError(
                    f"pull request #{record['number']} is a draft (shadow mode). "
                    "Mark it ready before merging"
                )
            merge_commit = self._merge_into_target(repo, record, request.incident_id)
            record.update(state="merged", merge_commit=merge_commit, updated_at=_now())
            self._write_record(record)
            logger.info(
                "Merged pull request #%s into %s as %s for incident %s.",
                record["number"],
                record["target_branch"],
                merge_commit,
                request.incident_id,
            )
            return self._to_model(record)

    def close(self, request: ClosePullRequestInput) -> PullRequest:
        """Close the pull request without merging and delete its branch.

        A merged pull request cannot be closed; it is returned unchanged.
        """
        branch = branch_for(request.incident_id)
        with self._locked():
            record = self._load_for(request.pull_request, branch)
            if record["state"] == "merged":
                logger.warning(
                    "Pull request #%s of incident %s is merged; not closing it.",
                    record["number"],
                    request.incident_id,
                )
                return self._to_model(record)
            if record["state"] != "closed":
                bare = git.Repo(self.bare_path)
                if resolve_commit(bare, f"refs/heads/{branch}"):
                    bare.git.update_ref("-d", f"refs/heads/{branch}")
                record.update(
                    state="closed",
                    closed_reason=scrub(request.reason),
                    updated_at=_now(),
                )
                self._write_record(record)
                logger.info(
                    "Closed pull request #%s of incident %s.",
                    record["number"],
                    request.incident_id,
                )
            return self._to_model(record)

    # --- locking and records ------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[git.Repo]:
        with file_lock(self.lock_path), self.repository.session() as repo:
            yield repo

    def _record_path(self, number: int) -> Path:
        return self.pulls_dir / f"{number}.json"

    def _records(self) -> list[dict]:
        if not self.pulls_dir.is_dir():
            return []
        records = []
        for path in self.pulls_dir.glob("*.json"):
            records.append(json.loads(path.read_text(encoding="utf-8")))
        return sorted(records, key=lambda record: record["number"])

    def _latest_record(self, branch: str) -> dict | None:
        matching = [record for record in self._records() if record["branch"] == branch]
        return matching[-1] if matching else None

    def _write_record(self, record: dict) -> None:
        self.pulls_dir.mkdir(parents=True, exist_ok=True)
        path = self._record_path(record["number"])
        # Write then rename, so a crash never leaves a half-written record.
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=self.pulls_dir, suffix=".tmp", delete=False
        ) as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(handle.name, path)

    def _create_record(
        self, request: PullRequestInput, branch: str, head: str, title: str, body: str
    ) -> dict:
        numbers = [record["number"] for record in self._records()]
        number = max(numbers, default=0) + 1
        git.Repo(self.bare_path).git.update_ref(f"refs/pull/{number}/head", head)
        record = {
            "number": number,
            "incident_id": request.incident_id,
            "namespace": request.namespace,
            "app": request.app,
            "branch": branch,
            "target_branch": request.change.target_branch,
            "head_commit": head,
            "title": title,
            "body": body,
            "strategy": request.strategy,
            "draft": request.draft,
            "state": "open",
            "merge_commit": "",
            "closed_reason": "",
            "created_at": _now(),
            "updated_at": _now(),
        }
        self._write_record(record)
        return record

    def _load_for(self, pull_request: PullRequest, branch: str) -> dict:
        path = self._record_path(pull_request.number)
        if not path.is_file():
            raise InvalidInputError(
                f"pull request #{pull_request.number} not found in {self.pulls_dir}"
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["branch"] != branch:
            raise InvalidInputError(
                f"pull request #{pull_request.number} belongs to branch "
                f"{record['branch']}, not to {branch}"
            )
        return record

    def _to_model(self, record: dict) -> PullRequest:
        return PullRequest(
            provider=PROVIDER_NAME,
            number=record["number"],
            url=self._record_path(record["number"]).as_uri(),
            branch=record["branch"],
            target_branch=record["target_branch"],
            head_commit=record["head_commit"],
            title=record["title"],
            draft=record["draft"],
            state=record["state"],
            merge_commit=record["merge_commit"],
        )

    # --- opening ------------------------------------------------------------

    def _validate_open(self, request: PullRequestInput) -> None:
        for label, value in (("namespace", request.namespace), ("app", request.app)):
            if not _K8S_NAME.match(value):
                raise InvalidInputError(
                    f"invalid {label} {value!r}: expected a Kubernetes name"
                )
        target = request.change.target_branch
        if (
            not _BRANCH_NAME.match(target)
            or ".." in target
            or target.endswith((".lock", "/"))
        ):
            raise InvalidInputError(f"invalid target branch {target!r}")
        if request.strategy not in STRATEGIES:
            raise InvalidInputError(
                f"invalid strategy {request.strategy!r}: "
                f"expected one of {', '.join(STRATEGIES)}"
            )
        if not request.change.last_good_revision:
            raise InvalidInputError(
                "the change has no last good revision to roll back to"
            )
        if request.strategy == "pin" and not request.change.image_changes:
            raise NothingToRollBackError(
                "strategy pin needs image changes, and the change has none"
            )
        if request.strategy == "revert" and not request.change.suspect_commits:
            raise NothingToRollBackError(
                "strategy revert needs suspect commits, and the change has none"
            )

    def _existing_branch_head(
        self, repo: git.Repo, branch: str, incident_id: str
    ) -> str | None:
        """Return the branch head an earlier attempt pushed, if the branch exists."""
        head = resolve_commit(repo, f"refs/remotes/origin/{branch}")
        if head is None:
            return None
        message = repo.commit(head).message
        if f"{INCIDENT_TRAILER}: {incident_id}" not in message:
            raise InvalidInputError(
                f"branch {branch} exists but its head {head} was not made for incident "
                f"{incident_id}; delete the branch or use another incident id"
            )
        return head

    def _build_commit(
        self, repo: git.Repo, request: PullRequestInput, title: str, body: str
    ) -> tuple[str, str]:
        """Create the rollback commit and return its sha and the final body."""
        target = request.change.target_branch
        base = resolve_commit(repo, f"refs/remotes/origin/{target}")
        if base is None:
            raise InvalidInputError(
                f"target branch {target!r} not found in {self.bare_path}"
            )
        if request.strategy == "revert":
            message = self._commit_message(request, title, body)
            commits = request.change.suspect_commits
            return self._revert_commit(repo, base, commits, message), body

        edited, skipped = self._pin_edits(repo, base, request.change.image_changes)
        if skipped:
            logger.warning("Pin rollback left out: %s.", "; ".join(skipped))
            body += "\nLeft unchanged, because the target branch changed them since:\n"
            body += "".join(f"- {scrub(line)}\n" for line in skipped)
        message = self._commit_message(request, title, body)
        head = write_commit(
            repo,
            base,
            edited,
            message,
            author_name=self.author_name,
            author_email=self.author_email,
        )
        return head, body

    def _pin_edits(
        self, repo: git.Repo, base: str, changes: list[ImageChange]
    ) -> tuple[dict[str, bytes], list[str]]:
        """Write each change's good value where the target head has the bad one.

        Returns the edited files (repo-relative path to content) and a line for
        each change left out. Raises NothingToRollBackError when nothing is left.
        """
        by_file: dict[str, list[ImageChange]] = {}
        for change in changes:
            by_file.setdefault(change.file, []).append(change)

        edited: dict[str, bytes] = {}
        skipped: list[str] = []
        for file, file_changes in sorted(by_file.items()):
            content = read_blob(repo, base, file)
            if content is None:
                skipped.append(f"{file}: not found at {base[:12]}")
                continue
            try:
                text = content.decode("utf-8")
                current = image_scalars(text)
            except (UnicodeDecodeError, yaml.YAMLError) as error:
                raise InvalidInputError(f"cannot edit {file}: {error}") from error
            updates: dict[str, str] = {}
            for change in file_changes:
                value = current.get(change.location)
                if value == change.bad:
                    updates[change.location] = change.good
                else:
                    skipped.append(
                        f"{file} {change.location}: head has {value!r}, "
                        f"not the bad {change.bad!r}"
                    )
            if updates:
                edited[file] = set_scalars(text, updates).encode("utf-8")
        if not edited:
            raise NothingToRollBackError(
                "the target branch no longer has any bad value: " + "; ".join(skipped)
            )
        return edited, skipped

    def _revert_commit(
        self, repo: git.Repo, base: str, suspect_commits: list[str], message: str
    ) -> str:
        """Revert the suspect commits (newest first) on top of the target head."""
        commits = []
        for commit in suspect_commits:
            sha = resolve_commit(repo, commit)
            if sha is None:
                raise InvalidInputError(f"suspect commit {commit!r} not found")
            if not repo.is_ancestor(sha, base):
                raise InvalidInputError(
                    f"suspect commit {sha} is not on the target branch, "
                    "so it cannot be reverted there"
                )
            commits.append(sha)
        _reset_worktree(repo)
        repo.git.checkout("-f", "--detach", base)
        for sha in commits:
            # A merge commit is reverted against its first parent, the branch it
            # merged into.
            mainline = ["-m", "1"] if len(repo.commit(sha).parents) > 1 else []
            try:
                repo.git.revert("--no-commit", *mainline, sha)
            except git.GitCommandError as error:
                _reset_worktree(repo)
                raise RollbackConflictError(
                    f"revert of {sha[:12]} failed with a conflict: "
                    f"{error.stderr.strip()}"
                ) from error
        if not repo.git.diff("--cached", "--name-only", base).strip():
            _reset_worktree(repo)
            raise NothingToRollBackError(
                "reverting the suspect commits changes nothing on the target branch"
            )
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", suffix=".msg"
        ) as handle:
            handle.write(message)
            handle.flush()
            repo.git.commit("--no-verify", "-F", handle.name)
        return repo.head.commit.hexsha

    def _push(self, repo: git.Repo, head: str, branch: str) -> None:
        try:
            repo.git.push("origin", f"{head}:refs/heads/{branch}")
        except git.GitCommandError as error:
            raise RuntimeError(
                f"pushing {branch} to {self.bare_path} failed: {error.stderr.strip()}"
            ) from error

    # --- merging ------------------------------------------------------------

    def _merge_into_target(self, repo: git.Repo, record: dict, incident_id: str) -> str:
        head = record["head_commit"]
        target = record["target_branch"]
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            target_head = resolve_commit(repo, f"refs/remotes/origin/{target}")
            if target_head is None:
                raise InvalidInputError(f"target branch {target!r} not found")
            if repo.is_ancestor(head, target_head):
                # An earlier attempt pushed the merge but did not record it.
                return self._find_merge_commit(repo, head, target_head, incident_id)

            _reset_worktree(repo)
            repo.git.checkout("-f", "--detach", target_head)
            message = (
                f"Merge pull request #{record['number']} from {record['branch']}\n\n"
                f"{record['title']}\n\n{INCIDENT_TRAILER}: {incident_id}\n"
            )
            try:
                repo.git.merge("--no-ff", "--no-edit", "-m", message, head)
            except git.GitCommandError as error:
                _reset_worktree(repo)
                raise RollbackConflictError(
                    f"merge of {record['branch']} into {target} failed with a "
                    f"conflict: {error.stderr.strip()}"
                ) from error
            merge_commit = repo.head.commit.hexsha
            try:
                repo.git.push("origin", f"{merge_commit}:refs/heads/{target}")
                return merge_commit
            except git.GitCommandError as error:
                # The target moved between fetch and push: fetch and merge again.
                logger.warning(
                    "Push of merge %s to %s rejected (attempt %d of %d): %s",
                    merge_commit,
                    target,
                    attempt,
                    PUSH_ATTEMPTS,
                    error.stderr.strip(),
                )
                repo.git.fetch(
                    "--prune",
                    "--force",
                    "origin",
                    "+refs/heads/*:refs/remotes/origin/*",
                )
        raise RuntimeError(f"target branch {target} kept moving; merge not pushed")

    def _find_merge_commit(
        self, repo: git.Repo, head: str, target_head: str, incident_id: str
    ) -> str:
        output = repo.git.rev_list(
            "--merges",
            "--ancestry-path",
            "--fixed-strings",
            f"--grep={INCIDENT_TRAILER}: {incident_id}",
            f"{head}..{target_head}",
        )
        merges = [line for line in output.splitlines() if line]
        # rev-list lists newest first, so the first merge after the head is last.
        return merges[-1] if merges else head

    # --- messages -----------------------------------------------------------

    def _describe(self, request: PullRequestInput) -> tuple[str, str]:
        """Build the pull request title and body (also the commit message body)."""
        change = request.change
        short_good = change.last_good_revision[:7]
        title = f"Roll back {request.namespace}/{request.app} to {short_good}"
        lines = [
            f"Remediator opened this rollback for incident {request.incident_id}.",
            "",
            *_change_lines(request),
            "",
            "Evidence:",
            *_evidence_lines(request.evidence),
            "",
            *_decision_lines(request.decision),
            "",
        ]

        trace_id = _trace_id(request.trace_id)
        if trace_id:
            lines.append(f"Trace id: {trace_id}")
        web_ui_url = _web_ui_url(request.web_ui_url)
        if web_ui_url:
            lines.append(f"Workflow: {web_ui_url}")
        return title, "\n".join(lines).rstrip() + "\n"

    def _commit_message(self, request: PullRequestInput, title: str, body: str) -> str:
        trailers = [f"{INCIDENT_TRAILER}: {request.incident_id}"]
        trace_id = _trace_id(request.trace_id)
        if trace_id:
            trailers.append(f"{TRACE_TRAILER}: {trace_id}")
        return f"{title}\n\n{body}\n" + "\n".join(trailers) + "\n"


def _change_lines(request: PullRequestInput) -> list[str]:
    change = request.change
    lines = [
        f"- Strategy: {request.strategy}",
        f"- Suspect revision: {scrub(change.suspect_revision)}",
        f"- Last good revision: {scrub(change.last_good_revision)}",
        f"- Application path: {scrub(change.path) or '.'}",
        "",
    ]
    if request.strategy == "pin":
        lines.append("Image changes rolled back:")
        for image in change.image_changes:
            location = f"{scrub(image.file)} {scrub(image.location)}"
            lines.append(f"- {location}: {scrub(image.bad)} -> {scrub(image.good)}")
    else:
        lines.append("Suspect commits reverted:")
        lines.extend(f"- {scrub(commit)}" for commit in change.suspect_commits)
    return lines


def _decision_lines(decision: Decision) -> list[str]:
    lines = [
        f"Decision: action {scrub(decision.action)}, allow {decision.allow}, "
        f"engine {scrub(decision.engine) or 'unknown'}"
    ]
    if not decision.reasons:
        lines.append("- (no reasons)")
    lines.extend(f"- {scrub(reason)}" for reason in decision.reasons)
    return lines


def _evidence_lines(evidence: Evidence) -> list[str]:
    if not evidence.has_data:
        return [f"- no data from {scrub(evidence.source)}"]
    values = [
        ("request rate (1/s)", evidence.request_rate),
        ("error ratio", evidence.error_ratio),
        ("latency p99 (s)", evidence.latency_p99_seconds),
        ("restarts", evidence.restarts),
    ]
    lines = [f"- {name}: {value:.4g}" for name, value in values if value is not None]
    if evidence.no_traffic:
        lines.append("- no traffic in the window")
    lines.append(f"- source: {scrub(evidence.source)}, {len(evidence.points)} points")
    return lines


def _trace_id(trace_id: str) -> str:
    if trace_id and not _TRACE_ID.match(trace_id):
        logger.warning(
            "Dropping invalid trace id %r from the pull request.", trace_id[:80]
        )
        return ""
    return trace_id


def _web_ui_url(url: str) -> str:
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        logger.warning(
            "Dropping Web UI link with scheme %r from the pull request.", parts.scheme
        )
        return ""
    return scrub(redact_url(url))


def _reset_worktree(repo: git.Repo) -> None:
    """Clear a revert or merge that an interrupted attempt left in the work clone."""
    for command in (
        ("revert", "--abort"),
        ("merge", "--abort"),
        ("cherry-pick", "--abort"),
    ):
        with contextlib.suppress(git.GitCommandError):
            repo.git.execute(["git", *command])
    with contextlib.suppress(git.GitCommandError):
        repo.git.reset("--hard")
    repo.git.clean("-fdx")
