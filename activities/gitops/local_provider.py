"""Rollback pull requests inside a local bare repository, with no forge.

`GitOpsActivities` uses `LocalProvider` when `REMEDIATOR_GIT_PROVIDER=local`,
the default and the provider of `remediator demo`. A pull request here is

- the branch `remediation/<incident id>` in the bare repository,
- the ref `refs/pull/<number>/head`, as forges keep it,
- a JSON record at `<bare>/remediator/pulls/<number>.json` (git ignores
  unknown directories inside a bare repository),
- the file `<bare>/remediator/pulls/by-incident/<incident id>`, which contains
  the number of the incident's latest pull request, so that `open` reads one
  record instead of all of them. The first call on a repository without this
  index builds it from the records.

Every method is idempotent:

- `open` finds an earlier attempt by its branch: the record first, then a
  branch whose head commit carries this incident's trailer.
- `merge` returns the recorded merge commit. When an earlier attempt pushed
  the merge but did not record it, `merge` finds it on the target branch.
- `close` of a closed pull request changes nothing.

Each method works in the bare repository itself: it reads objects through
persistent `git cat-file` processes, writes blobs, trees and commits straight
into the object database, merges with `git merge-tree --write-tree` and moves
branches with a compare-and-swap `git update-ref`. Each method holds the bare
repository's lock for its whole run. Only a revert that needs a content merge
falls back to `git revert` in a work clone, whose lock it then takes second.

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
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import git
import yaml

from activities.gitops.repository import (
    TREE_MODE,
    GitOpsRepository,
    TreeConflictError,
    branch_ref,
    create_commit,
    edit_tree,
    file_lock,
    git_process,
    parse_tree,
    pooled_repo,
    read_blob,
    redact_url,
    resolve_commit,
    run_git,
    tree_sha,
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
_RECORD_NAME = re.compile(r"^([0-9]+)\.json$")
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
        # The work clone, used only by a revert that needs a content merge.
        self.repository = GitOpsRepository(
            str(self.bare_path),
            work_dir,
            author_name=author_name,
            author_email=author_email,
            use_clone=True,
        )
        self.pulls_dir = self.bare_path / "remediator" / "pulls"
        self.index_dir = self.pulls_dir / "by-incident"
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
            record = self._latest_record(request.incident_id, branch)
            if record is not None and record["state"] in ("open", "merged"):
                logger.info(
                    "Reusing pull request #%s for incident %s.",
                    record["number"],
                    request.incident_id,
                )
                return self._to_model(record)

            title, body = self._describe(request)
            number = self._next_number()
            head = self._existing_branch_head(repo, branch, request.incident_id)
            create_branch = False
            if head is None:
                head, body, pushed = self._build_commit(
                    repo, request, title, body, branch
                )
                create_branch = not pushed
            refs = [f"update refs/pull/{number}/head {head}"]
            if create_branch:
                # `create` fails, and so does the whole transaction, when the
                # branch appeared since the check above.
                refs.insert(0, f"create refs/heads/{branch} {head}")
            self._update_refs(refs)
            record = self._create_record(request, number, branch, head, title, body)
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
        with self._locked() as repo:
            record = self._load_for(request.pull_request, branch)
            if record["state"] == "merged":
                logger.warning(
                    "Pull request #%s of incident %s is merged; not closing it.",
                    record["number"],
                    request.incident_id,
                )
                return self._to_model(record)
            if record["state"] != "closed":
                head = resolve_commit(repo, f"refs/heads/{branch}")
                if head:
                    run_git(self.bare_path, "update-ref", "-d", f"refs/heads/{branch}")
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
        with file_lock(self.lock_path), pooled_repo(self.bare_path) as repo:
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

    def _next_number(self) -> int:
        """Return the number after the highest record's, reading file names only."""
        try:
            names = os.listdir(self.pulls_dir)
        except FileNotFoundError:
            return 1
        numbers = [
            int(match[1]) for name in names if (match := _RECORD_NAME.match(name))
        ]
        return max(numbers, default=0) + 1

    def _ensure_index(self) -> None:
        """Build the by-incident index from the records unless it exists."""
        if self.index_dir.is_dir():
            return
        self.pulls_dir.mkdir(parents=True, exist_ok=True)
        latest: dict[str, int] = {}
        for record in self._records():
            latest[record["branch"]] = record["number"]
        # Build aside, then rename, so a crash never leaves a partial index.
        building = Path(tempfile.mkdtemp(prefix=".by-incident-", dir=self.pulls_dir))
        for branch, number in latest.items():
            incident_id = branch.removeprefix(BRANCH_PREFIX)
            if branch.startswith(BRANCH_PREFIX) and _INCIDENT_ID.match(incident_id):
                (building / incident_id).write_text(f"{number}\n", encoding="utf-8")
        os.rename(building, self.index_dir)
        logger.info(
            "Indexed %d pull request branches in %s.", len(latest), self.index_dir
        )

    def _latest_record(self, incident_id: str, branch: str) -> dict | None:
        """Return the record of the incident's latest pull request, if any.

        The index entry is written before its record, so an entry whose record
        is missing, or whose number another branch took since, means no record.
        NOTE: a record written by a version of this provider without the index
        stays invisible here once the index exists.
        """
        self._ensure_index()
        try:
            number = int((self.index_dir / incident_id).read_text(encoding="utf-8"))
            text = self._record_path(number).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        record = json.loads(text)
        return record if record["branch"] == branch else None

    def _replace_file(self, path: Path, write: Callable[[IO[str]], None]) -> None:
        # Write then rename, so a crash never leaves a half-written file.
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False
        ) as handle:
            write(handle)
        os.replace(handle.name, path)

    def _write_record(self, record: dict) -> None:
        def write(handle: IO[str]) -> None:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.write("\n")

        self._replace_file(self._record_path(record["number"]), write)

    def _update_refs(self, commands: list[str]) -> None:
        """Apply `update-ref --stdin` commands in the bare repository, all or none."""
        process = git_process(
            self.bare_path, "update-ref", "--stdin", input="\n".join(commands) + "\n"
        )
        if process.returncode != 0:
            raise RuntimeError(
                f"updating refs in {self.bare_path} failed: {process.stderr.strip()}"
            )

    def _create_record(
        self,
        request: PullRequestInput,
        number: int,
        branch: str,
        head: str,
        title: str,
        body: str,
    ) -> dict:
        self._ensure_index()
        self._replace_file(
            self.index_dir / request.incident_id,
            lambda handle: handle.write(f"{number}\n"),
        )
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
        validate_names(request)
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
        head = resolve_commit(repo, branch_ref(repo, branch))
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
        self,
        repo: git.Repo,
        request: PullRequestInput,
        title: str,
        body: str,
        branch: str,
    ) -> tuple[str, str, bool]:
        """Create the rollback commit in the bare repository.

        Returns its sha, the final body, and whether `branch` already points
        at it (only after a revert in the work clone, which pushes it).
        """
        target = request.change.target_branch
        base = resolve_commit(repo, branch_ref(repo, target))
        if base is None:
            raise InvalidInputError(
                f"target branch {target!r} not found in {self.bare_path}"
            )
        if request.strategy == "revert":
            message = self._commit_message(request, title, body)
            commits = request.change.suspect_commits
            head, pushed = self._revert_commit(repo, base, commits, message, branch)
            return head, body, pushed

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
        return head, body, False

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
        self,
        repo: git.Repo,
        base: str,
        suspect_commits: list[str],
        message: str,
        branch: str,
    ) -> tuple[str, bool]:
        """Revert the suspect commits (newest first) on top of the target head.

        Returns the commit and whether `branch` already points at it. When each
        changed path still has the suspect's version on the target head, the
        revert takes each path's version from before the suspect, which is
        what `git revert` does there, and the commit is built in the bare
        repository. Otherwise (a content merge or a conflict) `git revert` runs
        in the work clone, which pushes the branch.
        """
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

        base_tree = repo.commit(base).tree.binsha
        tree = _revert_tree(repo, base_tree, commits)
        if tree is _CONTENT_MERGE:
            with self.repository.session() as clone:
                head = _revert_in_clone(clone, base, commits, message)
                self._push(clone, head, branch)
            return head, True
        if tree == base_tree:
            raise NothingToRollBackError(
                "reverting the suspect commits changes nothing on the target branch"
            )
        head = create_commit(
            repo,
            tree_sha(tree),
            [base],
            cleanup_whitespace(message),
            author_name=self.author_name,
            author_email=self.author_email,
        )
        return head, False

    def _push(self, repo: git.Repo, head: str, branch: str) -> None:
        try:
            repo.git.push("origin", f"{head}:refs/heads/{branch}")
        except git.GitCommandError as error:
            raise RuntimeError(
                f"pushing {branch} to {self.bare_path} failed: {error.stderr.strip()}"
            ) from error

    # --- merging ------------------------------------------------------------

    def _merge_into_target(self, repo: git.Repo, record: dict, incident_id: str) -> str:
        """Merge the head into the target branch and return the merge commit.

        `git merge-tree --write-tree` (git 2.38 or later) merges in the bare
        repository, and `update-ref <ref> <new> <old>` moves the branch only if
        it still points at the merged target head. When another push moved it
        in between, the merge starts again from the new target head.
        """
        head = record["head_commit"]
        target = record["target_branch"]
        message = cleanup_whitespace(
            f"Merge pull request #{record['number']} from {record['branch']}\n\n"
            f"{record['title']}\n\n{INCIDENT_TRAILER}: {incident_id}\n"
        )
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            target_head = resolve_commit(repo, branch_ref(repo, target))
            if target_head is None:
                raise InvalidInputError(f"target branch {target!r} not found")
            merged = git_process(
                self.bare_path, "merge-tree", "--write-tree", target_head, head
            )
            if merged.returncode != 0:
                # Status 1 means conflicts, listed on stdout; others are errors
                # such as unrelated histories.
                details = (merged.stdout + merged.stderr).strip()
                raise RollbackConflictError(
                    f"merge of {record['branch']} into {target} failed with a "
                    f"conflict: {details}"
                )
            tree = merged.stdout.split("\n", 1)[0].strip()
            # A head already in the target merges into the target's own tree,
            # so only then can it be an ancestor.
            if tree == repo.commit(target_head).tree.hexsha and repo.is_ancestor(
                head, target_head
            ):
                # An earlier attempt pushed the merge but did not record it.
                return self._find_merge_commit(repo, head, target_head, incident_id)
            merge_commit = create_commit(
                repo,
                tree,
                [target_head, head],
                message,
                author_name=self.author_name,
                author_email=self.author_email,
            )
            moved = git_process(
                self.bare_path,
                "update-ref",
                f"refs/heads/{target}",
                merge_commit,
                target_head,
            )
            if moved.returncode == 0:
                return merge_commit
            # The target moved since it was read: merge again on its new head.
            logger.warning(
                "Update of %s to merge %s rejected (attempt %d of %d): %s",
                target,
                merge_commit,
                attempt,
                PUSH_ATTEMPTS,
                moved.stderr.strip(),
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
        return describe_pull_request(request)

    def _commit_message(self, request: PullRequestInput, title: str, body: str) -> str:
        trailers = [f"{INCIDENT_TRAILER}: {request.incident_id}"]
        trace_id = _trace_id(request.trace_id)
        if trace_id:
            trailers.append(f"{TRACE_TRAILER}: {trace_id}")
        return f"{title}\n\n{body}\n" + "\n".join(trailers) + "\n"


def validate_names(request: PullRequestInput) -> None:
    """Raise InvalidInputError unless namespace, app and target branch are safe.

    These values end up in branch names, file paths and forge API paths.
    """
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


def describe_pull_request(request: PullRequestInput) -> tuple[str, str]:
    """Build the title and body every provider gives a rollback pull request."""
    short_good = request.change.last_good_revision[:7]
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


def cleanup_whitespace(message: str) -> str:
    """Clean a commit message as `git commit --cleanup=whitespace` does.

    Strips trailing whitespace from each line, drops leading and trailing
    empty lines, and merges runs of empty lines into one. `git commit -F` and
    `git merge -m` apply this cleanup by default when no editor runs.
    """
    lines: list[str] = []
    for line in message.split("\n"):
        line = line.rstrip(" \t\n\v\f\r")
        if line or (lines and lines[-1]):
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


# Returned by `_revert_tree` when a path needs a content merge.
_CONTENT_MERGE = object()

_Entry = tuple[int, bytes]


def _tree_entries(repo: git.Repo, tree: bytes | None) -> dict[bytes, _Entry]:
    return parse_tree(repo.odb.stream(tree).read()) if tree is not None else {}


def _changed_paths(
    repo: git.Repo, before: bytes | None, after: bytes | None, prefix: tuple = ()
) -> Iterable[tuple[tuple[bytes, ...], _Entry | None, _Entry | None]] | None:
    """List (path, entry before, entry after) for each path that differs.

    Directories that exist on both sides are compared entry by entry. Returns
    None when a path changes between a file and a directory.
    """
    old = _tree_entries(repo, before)
    new = _tree_entries(repo, after)
    changes = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        a_tree = a is not None and a[0] == TREE_MODE
        b_tree = b is not None and b[0] == TREE_MODE
        if a is not None and b is not None and a_tree != b_tree:
            return None
        if a_tree and b_tree:
            nested = _changed_paths(repo, a[1], b[1], (*prefix, name))
            if nested is None:
                return None
            changes.extend(nested)
        else:
            changes.append(((*prefix, name), a, b))
    return changes


def _entry_at(
    repo: git.Repo, tree: bytes | None, path: tuple[bytes, ...]
) -> _Entry | None:
    entry: _Entry | None = None
    for index, name in enumerate(path):
        if tree is None:
            return None
        entry = _tree_entries(repo, tree).get(name)
        if entry is None:
            return None
        if index < len(path) - 1:
            if entry[0] != TREE_MODE:
                return None
            tree = entry[1]
    return entry


def _revert_tree(
    repo: git.Repo, base_tree: bytes, commits: list[str]
) -> bytes | None | object:
    """Revert `commits` in order on `base_tree` without a content merge.

    A merge commit is reverted against its first parent. Returns the new
    tree (None for the empty tree), or `_CONTENT_MERGE` when a changed path
    no longer has the commit's version nor the one before it.
    """
    tree: bytes | None = base_tree
    for sha in commits:
        commit = repo.commit(sha)
        parent_tree = commit.parents[0].tree.binsha if commit.parents else None
        changes = _changed_paths(repo, parent_tree, commit.tree.binsha)
        if changes is None:
            return _CONTENT_MERGE
        edits: dict[tuple[bytes, ...], _Entry | None] = {}
        for path, before, after in changes:
            current = _entry_at(repo, tree, path)
            if current == after:
                edits[path] = before
            elif current != before:
                return _CONTENT_MERGE
        if edits:
            try:
                tree = edit_tree(repo, tree, edits)
            except TreeConflictError:
                return _CONTENT_MERGE
    return tree


def _revert_in_clone(
    repo: git.Repo, base: str, commits: list[str], message: str
) -> str:
    """Revert `commits` (newest first) on `base` with `git revert` in a work clone."""
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
                f"revert of {sha[:12]} failed with a conflict: {error.stderr.strip()}"
            ) from error
    if not repo.git.diff("--cached", "--name-only", base).strip():
        _reset_worktree(repo)
        raise NothingToRollBackError(
            "reverting the suspect commits changes nothing on the target branch"
        )
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".msg") as handle:
        handle.write(message)
        handle.flush()
        repo.git.commit("--no-verify", "-F", handle.name)
    return repo.head.commit.hexsha


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
