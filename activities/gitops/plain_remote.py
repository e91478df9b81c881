"""Rollbacks pushed straight to a plain git remote, with no forge and no pull request.

`GitOpsActivities` uses `PlainRemoteProvider` when `REMEDIATOR_GIT_PROVIDER=git`.
Any URL that git can push to works: ssh, https, or a `file://` path. The
provider keeps a work clone under `REMEDIATOR_GIT_WORK_DIR`, the same clone
that `GitOpsRepository` reads, and holds that clone's file lock for the whole
of each operation.

- `open` builds the rollback commit (strategy pin) on the remote's target
  branch and stores it on the local branch `remediation/<incident id>` of the
  work clone. Nothing reaches the remote yet.
- `merge` pushes that commit to the target branch. When the target moved
  since, the commit is cherry-picked onto the new head first, and a push
  rejected because someone pushed meanwhile is retried the same way after a
  fetch, so the target gets exactly one rollback commit.
- `close` deletes the local branch, and for a draft also the pushed branch.
- With `draft=True` (shadow mode), `open` pushes only the branch
  `remediation/<incident id>` to the remote and never touches the target.

No pull request exists, so every method returns a `PullRequest` record with
`provider="git"`, `number=0`, the remote URL without credentials, and the
target branch as `branch` (the remediation branch for a draft). Every method
is idempotent: `open`, `merge` and `close` first look for a commit on the
target branch whose `Remediation-Incident:` trailer names the incident, and
return it as merged when they find one.

Credentials: for an http(s) URL, `GitSettings.token` travels as HTTPS basic
auth in an `http.<url>.extraHeader` setting. Only the environment of the git
subprocesses carries that setting (`GIT_CONFIG_COUNT`), so the token is never
written to the clone's config, a URL, a record, a log line or a commit
message. The user name
is the one in the URL, or `x-access-token` (GitHub's name for token logins;
GitLab and Gitea accept any name with a token). ssh URLs use the worker's ssh
keys and agent.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import git
from pydantic import SecretStr

from activities.gitops.forge import (
    commit_message,
    describe,
    has_incident_trailer,
    pin_edits,
    skipped_note,
    validate_open,
)
from activities.gitops.local_provider import (
    _BRANCH_NAME,
    INCIDENT_TRAILER,
    InvalidInputError,
    NothingToRollBackError,
    PermanentGitOpsError,
    PullRequestStateError,
    RollbackConflictError,
    _reset_worktree,
    branch_for,
    scrub,
)
from activities.gitops.repository import (
    GitOpsRepository,
    read_blob,
    redact_url,
    resolve_commit,
    write_commit,
)
from workflows.models import (
    ClosePullRequestInput,
    MergeInput,
    PullRequest,
    PullRequestInput,
)

logger = logging.getLogger(__name__)

PROVIDER_NAME = "git"
PUSH_ATTEMPTS = 4
# A push or fetch that hangs on a dead server must end inside the activity's
# 30 s start-to-close timeout.
NETWORK_TIMEOUT_SECONDS = 25.0
DEFAULT_TOKEN_USER = "x-access-token"


class PushRejectedError(PermanentGitOpsError):
    """The remote refused the push for a reason other than a race (a hook, a rule)."""

    error_type = "PushRejected"


def credential_env(url: str, token: SecretStr | str | None) -> dict[str, str]:
    """Return the environment that makes git send `token` to the remote at `url`.

    The token becomes an `Authorization: Basic` header scoped to the URL's
    scheme, host and port, passed as `GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`
    after any that the worker's environment already sets. Only http and https
    URLs get a header. `GIT_TERMINAL_PROMPT=0` makes git fail instead of
    waiting for a password.
    """
    env = {"GIT_TERMINAL_PROMPT": "0"}
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    parts = urlsplit(url)
    if not secret or parts.scheme not in ("http", "https"):
        return env
    user = parts.username or DEFAULT_TOKEN_USER
    credentials = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
    host = parts.netloc.rsplit("@", 1)[-1]
    try:
        index = int(os.environ.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        index = 0
    env[f"GIT_CONFIG_KEY_{index}"] = f"http.{parts.scheme}://{host}/.extraHeader"
    env[f"GIT_CONFIG_VALUE_{index}"] = f"Authorization: Basic {credentials}"
    env["GIT_CONFIG_COUNT"] = str(index + 1)
    return env


class AuthenticatedClone(GitOpsRepository):
    """A work clone of a remote that clones and fetches with `credential_env`.

    It shares the clone directory and lock of a `GitOpsRepository` of the same
    URL, so readers and the git provider see one clone.
    """

    def __init__(
        self, url: str, work_dir: Path, env: Mapping[str, str], **identity: str
    ) -> None:
        super().__init__(url, work_dir, use_clone=True, **identity)
        self.env = dict(env)

    def _sync(self) -> git.Repo:
        if not (self.clone_dir / ".git").is_dir():
            logger.info(
                "Cloning GitOps repository %s into %s.",
                redact_url(self.url),
                self.clone_dir,
            )
            if self.clone_dir.exists():
                # A clone interrupted half-way; start again from nothing.
                shutil.rmtree(self.clone_dir)
            git.Repo.clone_from(
                self.url, self.clone_dir, no_checkout=True, env=self.env
            )
        repo = git.Repo(self.clone_dir)
        repo.git.update_environment(**self.env)
        with repo.config_writer() as config:
            config.set_value("user", "name", self.author_name)
            config.set_value("user", "email", self.author_email)
            config.set_value("core", "autocrlf", "false")
        repo.git.fetch(
            "--prune", "--force", "origin", "+refs/heads/*:refs/remotes/origin/*"
        )
        return repo


class PlainRemoteProvider:
    """Rollback commits pushed to a plain git remote; see the module docstring."""

    def __init__(
        self,
        repo_url: str,
        work_dir: Path,
        *,
        token: SecretStr | str | None = None,
        author_name: str = "Remediator",
        author_email: str = "remediator@localhost",
    ) -> None:
        if not repo_url:
            raise InvalidInputError(
                "the git provider needs a remote URL; set REMEDIATOR_GIT_REPO_URL"
            )
        self.repo_url = repo_url
        self.public_url = redact_url(repo_url)
        self.env = credential_env(repo_url, token)
        self.clone = AuthenticatedClone(
            repo_url,
            work_dir,
            self.env,
            author_name=author_name,
            author_email=author_email,
        )
        self.author_name = author_name
        self.author_email = author_email

    # --- public operations --------------------------------------------------

    def open(self, request: PullRequestInput) -> PullRequest:
        """Prepare the rollback commit, or push the draft branch in shadow mode.

        Returns the merged record when the target already has this incident's
        commit. Raises InvalidInputError, NothingToRollBackError or
        UnsupportedStrategyError (revert) for inputs that cannot work.
        """
        branch = branch_for(request.incident_id)
        validate_open(request, PROVIDER_NAME)
        target = request.change.target_branch
        with self._session() as repo:
            if request.draft:
                return self._open_draft(repo, request, branch)
            title = describe(request)[0]
            merged = self._find_on_target(repo, target, request.incident_id)
            if merged is not None:
                logger.info(
                    "Rollback of incident %s is already on %s of %s as %s.",
                    request.incident_id,
                    target,
                    self.public_url,
                    merged,
                )
                return self._record(target, target, merged, title, merge_commit=merged)
            head = self._prepared_head(repo, branch, request.incident_id)
            if head is None:
                head = self._build_commit(repo, request)
                repo.git.update_ref(f"refs/heads/{branch}", head)
                logger.info(
                    "Prepared rollback commit %s for incident %s on local branch %s.",
                    head,
                    request.incident_id,
                    branch,
                )
            return self._record(target, target, head, title)

    def merge(self, request: MergeInput) -> PullRequest:
        """Push the prepared commit to the target branch and return it as merged.

        Raises PullRequestStateError for a draft, RollbackConflictError when
        the commit no longer applies to the moved target, and
        PushRejectedError when the remote refuses the push.
        """
        pull = request.pull_request
        branch = branch_for(request.incident_id)
        target = _check_branch(pull.target_branch)
        with self._session() as repo:
            merged = self._find_on_target(repo, target, request.incident_id)
            if merged is not None:
                return self._record(
                    target, target, merged, pull.title, merge_commit=merged
                )
            if pull.draft:
                raise PullRequestStateError(
                    f"the rollback of incident {request.incident_id} is a draft "
                    f"(shadow mode) on branch {branch}; it is never pushed to {target}"
                )
            head = self._prepared_head(repo, branch, request.incident_id)
            if head is None:
                head = self._commit_in_clone(repo, pull.head_commit)
            pushed = self._push_to_target(repo, head, target, branch, request)
            return self._record(target, target, pushed, pull.title, merge_commit=pushed)

    def close(self, request: ClosePullRequestInput) -> PullRequest:
        """Delete the local branch, and the remote branch of a draft.

        A rollback already on the target branch cannot be closed; it is
        returned as merged.
        """
        pull = request.pull_request
        branch = branch_for(request.incident_id)
        target = _check_branch(pull.target_branch)
        with self._session() as repo:
            merged = self._find_on_target(repo, target, request.incident_id)
            if merged is not None:
                logger.warning(
                    "Rollback of incident %s is already on %s as %s; not closing it.",
                    request.incident_id,
                    target,
                    merged,
                )
                return self._record(
                    target, target, merged, pull.title, merge_commit=merged
                )
            if resolve_commit(repo, f"refs/heads/{branch}^{{commit}}") is not None:
                repo.git.update_ref("-d", f"refs/heads/{branch}")
            if pull.draft:
                self._delete_remote_branch(repo, branch, request.incident_id)
            logger.info(
                "Closed the rollback of incident %s (%s).",
                request.incident_id,
                scrub(request.reason) or "no reason given",
            )
            closed = self._record(
                pull.branch or target,
                target,
                pull.head_commit,
                pull.title,
                draft=pull.draft,
            )
            closed.state = "closed"
            return closed

    # --- work clone ---------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[git.Repo]:
        try:
            with self.clone.session() as repo:
                yield repo
        except git.GitCommandError as error:
            # GitPython's message lists the command line, which may hold the
            # remote URL, so only the subcommand and git's own error output go on.
            command = error.command if isinstance(error.command, list) else []
            subcommand = command[1] if len(command) > 1 else "command"
            raise RuntimeError(
                f"git {subcommand} on {self.public_url} failed: {_stderr(error)}"
            ) from None

    def _git(self, repo: git.Repo, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a network git command in the clone with the credential env."""
        try:
            return subprocess.run(
                ["git", "-C", str(repo.working_tree_dir), *args],
                env={**os.environ, **self.env},
                capture_output=True,
                text=True,
                check=False,
                timeout=NETWORK_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"git {args[0]} to {self.public_url} timed out after "
                f"{NETWORK_TIMEOUT_SECONDS:.0f} s"
            ) from None

    def _fetch(self, repo: git.Repo) -> None:
        process = self._git(
            repo,
            "fetch",
            "--prune",
            "--force",
            "origin",
            "+refs/heads/*:refs/remotes/origin/*",
        )
        if process.returncode != 0:
            raise RuntimeError(
                f"fetch from {self.public_url} failed: {scrub(process.stderr)}"
            )

    # --- finding and building -----------------------------------------------

    def _find_on_target(
        self, repo: git.Repo, target: str, incident_id: str
    ) -> str | None:
        """Return the newest commit on the remote target with the incident trailer."""
        ref = f"refs/remotes/origin/{target}"
        self._target_head(repo, target)
        # --grep matches substrings, so incident-1 also finds incident-10;
        # has_incident_trailer keeps only whole trailer lines.
        output = repo.git.rev_list(
            "--fixed-strings", f"--grep={INCIDENT_TRAILER}: {incident_id}", ref
        )
        for sha in output.split():
            if has_incident_trailer(repo.commit(sha).message, incident_id):
                return sha
        return None

    def _target_head(self, repo: git.Repo, target: str) -> str:
        """Return the head of the remote's target branch as last fetched."""
        head = resolve_commit(repo, f"refs/remotes/origin/{target}")
        if head is None:
            raise InvalidInputError(
                f"target branch {target!r} not found on {self.public_url}"
            )
        return head

    def _prepared_head(
        self, repo: git.Repo, branch: str, incident_id: str, ref: str = ""
    ) -> str | None:
        """Return the head of `ref` (the local branch) if this incident made it."""
        ref = ref or f"refs/heads/{branch}"
        head = resolve_commit(repo, f"{ref}^{{commit}}")
        if head is None:
            return None
        if not has_incident_trailer(repo.commit(head).message, incident_id):
            raise InvalidInputError(
                f"branch {branch} exists but its head {head} was not made for "
                f"incident {incident_id}; delete the branch or use another incident id"
            )
        return head

    def _build_commit(self, repo: git.Repo, request: PullRequestInput) -> str:
        """Write the pin rollback commit on the remote target head; move no ref."""
        base = self._target_head(repo, request.change.target_branch)

        def read_file(path: str) -> str | None:
            content = read_blob(repo, base, path)
            if content is None:
                return None
            try:
                return content.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInputError(f"cannot edit {path}: not UTF-8 text") from None

        edited, skipped = pin_edits(
            read_file, request.change.image_changes, revision=base
        )
        if skipped:
            logger.warning("Pin rollback left out: %s.", "; ".join(skipped))
        title, body = describe(request)
        message = commit_message(request, title, body + skipped_note(skipped))
        return write_commit(
            repo,
            base,
            {path: text.encode("utf-8") for path, text in edited.items()},
            message,
            author_name=self.author_name,
            author_email=self.author_email,
        )

    def _commit_in_clone(self, repo: git.Repo, head: str) -> str:
        """Return `head` if the clone has it; the local branch of `open` is gone."""
        sha = resolve_commit(repo, head) if head else None
        if sha is None:
            # NOTE: open and merge must run on workers that share
            # REMEDIATOR_GIT_WORK_DIR, because the prepared commit lives
            # only in the work clone. A retry may land on the worker that has it.
            raise RuntimeError(
                f"prepared rollback commit {head or '(none)'} not found in the work "
                f"clone {self.clone.clone_dir}; open and merge need workers that "
                "share REMEDIATOR_GIT_WORK_DIR"
            )
        return sha

    # --- pushing ------------------------------------------------------------

    def _push_to_target(
        self,
        repo: git.Repo,
        head: str,
        target: str,
        branch: str,
        request: MergeInput,
    ) -> str:
        """Push `head` to the target, rebasing it onto each new target head first."""
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            if attempt > 1:
                self._fetch(repo)
                merged = self._find_on_target(repo, target, request.incident_id)
                if merged is not None:
                    # An earlier attempt's push landed after all.
                    return merged
            target_head = self._target_head(repo, target)
            parents = repo.commit(head).parents
            if not parents or parents[0].hexsha != target_head:
                head = self._rebase(repo, head, target_head, target)
                repo.git.update_ref(f"refs/heads/{branch}", head)
            if self._push(repo, head, target):
                # Record the push, so readers of the clone see it before a fetch.
                repo.git.update_ref(f"refs/remotes/origin/{target}", head)
                logger.info(
                    "Pushed rollback commit %s of incident %s to %s of %s.",
                    head,
                    request.incident_id,
                    target,
                    self.public_url,
                )
                return head
            logger.warning(
                "Push of %s to %s was rejected because the branch moved "
                "(attempt %d of %d); fetching and rebasing.",
                head,
                target,
                attempt,
                PUSH_ATTEMPTS,
            )
        raise RuntimeError(
            f"target branch {target} of {self.public_url} kept moving; "
            f"the rollback was not pushed after {PUSH_ATTEMPTS} attempts"
        )

    def _rebase(self, repo: git.Repo, head: str, onto: str, target: str) -> str:
        """Cherry-pick the single rollback commit `head` onto `onto` in the clone."""
        _reset_worktree(repo)
        repo.git.checkout("-f", "--detach", onto)
        try:
            repo.git.cherry_pick("--allow-empty", "--keep-redundant-commits", head)
        except git.GitCommandError as error:
            _reset_worktree(repo)
            raise RollbackConflictError(
                f"the rollback commit {head[:12]} no longer applies to {target} at "
                f"{onto[:12]}: {_stderr(error)}"
            ) from None
        rebased = repo.head.commit
        if rebased.tree.hexsha == repo.commit(onto).tree.hexsha:
            raise NothingToRollBackError(
                f"{target} at {onto[:12]} already has the rolled back values"
            )
        logger.info("Rebased rollback commit %s onto %s as %s.", head, onto, rebased)
        return rebased.hexsha

    def _push(self, repo: git.Repo, head: str, branch: str) -> bool:
        """Push `head` to `branch` without force; False when the branch moved.

        Raises PushRejectedError when the remote refuses it (a hook or a
        protection rule) and RuntimeError when the push fails otherwise.
        """
        process = self._git(
            repo, "push", "--porcelain", "origin", f"{head}:refs/heads/{branch}"
        )
        if process.returncode == 0:
            return True
        status = [line for line in process.stdout.splitlines() if line[:1] == "!"]
        detail = scrub(" ".join(status) or process.stderr)
        if any("[remote rejected]" in line for line in status):
            raise PushRejectedError(
                f"{self.public_url} rejected the push to {branch}: {detail}"
            )
        if any("[rejected]" in line for line in status):
            return False
        raise RuntimeError(
            f"push to {branch} of {self.public_url} failed: "
            f"{scrub(process.stderr) or detail}"
        )

    # --- shadow mode --------------------------------------------------------

    def _open_draft(
        self, repo: git.Repo, request: PullRequestInput, branch: str
    ) -> PullRequest:
        """Push the rollback commit to the remote branch `branch` only."""
        target = request.change.target_branch
        self._target_head(repo, target)
        title = describe(request)[0]
        remote_ref = f"refs/remotes/origin/{branch}"
        for _ in range(2):
            head = self._prepared_head(repo, branch, request.incident_id, remote_ref)
            if head is not None:
                return self._record(branch, target, head, title, draft=True)
            head = self._prepared_head(repo, branch, request.incident_id)
            if head is None:
                head = self._build_commit(repo, request)
                repo.git.update_ref(f"refs/heads/{branch}", head)
            if self._push(repo, head, branch):
                repo.git.update_ref(remote_ref, head)
                logger.info(
                    "Pushed draft branch %s (%s) of incident %s to %s; %s untouched.",
                    branch,
                    head,
                    request.incident_id,
                    self.public_url,
                    target,
                )
                return self._record(branch, target, head, title, draft=True)
            # The branch appeared on the remote since the fetch: read it.
            self._fetch(repo)
        raise RuntimeError(f"branch {branch} of {self.public_url} kept moving")

    def _delete_remote_branch(
        self, repo: git.Repo, branch: str, incident_id: str
    ) -> None:
        remote_ref = f"refs/remotes/origin/{branch}"
        if self._prepared_head(repo, branch, incident_id, remote_ref) is None:
            return
        process = self._git(repo, "push", "--porcelain", "origin", f":{branch}")
        if process.returncode != 0:
            raise RuntimeError(
                f"deleting branch {branch} of {self.public_url} failed: "
                f"{scrub(process.stderr)}"
            )
        repo.git.update_ref("-d", remote_ref)

    # --- records ------------------------------------------------------------

    def _record(
        self,
        branch: str,
        target: str,
        head: str,
        title: str,
        *,
        draft: bool = False,
        merge_commit: str = "",
    ) -> PullRequest:
        return PullRequest(
            provider=PROVIDER_NAME,
            number=0,
            url=self.public_url,
            branch=branch,
            target_branch=target,
            head_commit=head,
            title=title,
            draft=draft,
            state="merged" if merge_commit else "open",
            merge_commit=merge_commit,
        )


def _check_branch(name: str) -> str:
    if not _BRANCH_NAME.match(name) or ".." in name or name.endswith((".lock", "/")):
        raise InvalidInputError(f"invalid target branch {name!r}")
    return name


def _stderr(error: git.GitCommandError) -> str:
    text = error.stderr if isinstance(error.stderr, str) else str(error.stderr)
    # GitPython wraps stderr as "\n  stderr: '...'".
    text = text.strip().removeprefix("stderr:").strip().strip("'")
    return scrub(text)
