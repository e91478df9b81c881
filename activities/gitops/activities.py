"""Temporal activities of the incident's GitOps steps: find the change, open,
merge and close the rollback pull request.

The worker of the `remediation` task queue registers the bound methods of one
`GitOpsActivities` instance. Git work blocks, so it runs in a thread. Errors
that a retry cannot fix (invalid input, nothing to roll back, conflicts, a
pull request in the wrong state, an unsupported provider) are raised as
non-retryable `ApplicationError`s whose `type` is the error class's
`error_type`. Every other exception is left to the activity's retry policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import git
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.gitops.forges import FORGE_PROVIDERS, forge_provider
from activities.gitops.local_provider import (
    InvalidInputError,
    LocalProvider,
    PermanentGitOpsError,
)
from activities.gitops.plain_remote import (
    AuthenticatedClone,
    PlainRemoteProvider,
    credential_env,
)
from activities.gitops.repository import (
    GitOpsRepository,
    branch_ref,
    clean_app_path,
    commits_between,
    image_changes_between,
    local_path_of,
    redact_url,
    resolve_commit,
)
from remediator.settings import GitSettings
from workflows.models import (
    ChangeQuery,
    ChangeResult,
    ClosePullRequestInput,
    MergeInput,
    PullRequest,
    PullRequestInput,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _normalise_repo_url(url: str) -> str:
    """Reduce a repository URL to host and path, for matching Argo CD sources."""
    parts = urlsplit(redact_url(url.strip()))
    path = parts.path.rstrip("/").removesuffix(".git")
    return f"{parts.netloc.lower()}{path.lower()}"


def _pick_source(application: dict, repo_url: str) -> tuple[int, dict] | None:
    """Return (index, source) of the git source with the application's manifests.

    A multi-source application lists `spec.sources`. The source whose repoURL
    matches `repo_url` wins, and otherwise the first one with a `path`.
    Returns None when no source fits (index -1 means `spec.source`).
    """
    spec = application.get("spec") or {}
    sources = spec.get("sources") or []
    if not sources:
        source = spec.get("source") or {}
        return (-1, source) if source.get("repoURL") or repo_url else None
    if repo_url:
        expected = _normalise_repo_url(repo_url)
        for index, source in enumerate(sources):
            if _normalise_repo_url(source.get("repoURL", "")) == expected:
                return index, source
    for index, source in enumerate(sources):
        if source.get("path"):
            return index, source
    return None


def _revision_of(entry: dict, index: int) -> str:
    """Read the revision of `spec.source` (index -1) or of `spec.sources[index]`."""
    if index < 0:
        return entry.get("revision") or ""
    revisions = entry.get("revisions") or []
    return revisions[index] if index < len(revisions) else ""


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class GitOpsActivities:
    """The GitOps activities, bound to the Git settings and an Argo CD reader."""

    def __init__(
        self,
        settings: GitSettings,
        get_application: Callable[[str], Awaitable[dict]],
    ) -> None:
        self.settings = settings
        self.get_application = get_application

    # --- find the change ----------------------------------------------------

    @activity.defn(name="find_change")
    async def find_change(self, query: ChangeQuery) -> ChangeResult:
        """Find the suspect revision, the last good one and the changes between them.

        Returns found=False with a reason when Argo CD or git cannot tell.
        """
        application = await self.get_application(query.argocd_application)
        picked = _pick_source(application, self.settings.repo_url)
        if picked is None:
            return ChangeResult(
                found=False,
                reason=f"application {query.argocd_application} has no git source",
            )
        index, source = picked
        repo_url = self.settings.repo_url or source.get("repoURL", "")
        if not repo_url:
            return ChangeResult(
                found=False, reason="no repository URL in settings or Argo CD"
            )
        try:
            app_path = clean_app_path(source.get("path", ""))
        except ValueError as error:
            return ChangeResult(
                found=False, reason=str(error), repo_url=redact_url(repo_url)
            )

        status = application.get("status") or {}
        sync = status.get("sync") or {}
        suspect = _revision_of(sync, index)
        history = sorted(
            (entry for entry in status.get("history") or [] if isinstance(entry, dict)),
            key=lambda entry: entry.get("id", 0),
        )
        result = ChangeResult(
            found=False,
            repo_url=redact_url(repo_url),
            path=app_path,
            target_branch=self.settings.target_branch,
        )
        if not suspect:
            result.reason = "Argo CD reports no synced revision"
            return result
        return await asyncio.to_thread(
            self._find_change_in_git,
            query,
            result,
            repo_url,
            source.get("targetRevision", ""),
            suspect,
            [(_revision_of(entry, index), entry) for entry in history],
        )

    def _find_change_in_git(
        self,
        query: ChangeQuery,
        result: ChangeResult,
        repo_url: str,
        target_revision: str,
        suspect: str,
        history: list[tuple[str, dict]],
    ) -> ChangeResult:
        identity = {
            "author_name": self.settings.author_name,
            "author_email": self.settings.author_email,
        }
        if self.settings.provider == "git" and local_path_of(repo_url) is None:
            # The git provider's token must reach the remote for reads too.
            repository: GitOpsRepository = AuthenticatedClone(
                repo_url,
                self.settings.work_dir,
                credential_env(repo_url, self.settings.token),
                **identity,
            )
        else:
            repository = GitOpsRepository(repo_url, self.settings.work_dir, **identity)
        with repository.session() as repo:
            suspect_sha = resolve_commit(repo, suspect)
            if suspect_sha is None:
                result.reason = f"synced revision {suspect} not found in the repository"
                return result
            result.suspect_revision = suspect_sha
            if target_revision not in ("", "HEAD") and resolve_commit(
                repo, branch_ref(repo, target_revision)
            ):
                result.target_branch = target_revision

            suspect_positions = [
                i for i, (rev, _) in enumerate(history) if rev == suspect
            ]
            if suspect_positions:
                result.deployed_at = _parse_time(
                    history[suspect_positions[-1]][1].get("deployedAt")
                )
            last_good = self._last_good_from_history(
                repo, history, suspect, suspect_positions
            )
            if last_good is None:
                last_good = self._last_good_from_git(repo, result.path, suspect_sha)
            if last_good is None:
                result.reason = (
                    "no earlier revision in the Argo CD history and no parent of a "
                    f"commit touching {result.path or '.'} before {suspect_sha[:12]}"
                )
                return result
            result.last_good_revision = last_good

            result.suspect_commits = commits_between(
                repo, result.path, last_good, suspect_sha
            )
            result.image_changes = image_changes_between(
                repo, result.path, last_good, suspect_sha
            )

        strategy = self.settings.strategy
        if strategy == "pin" and not result.image_changes:
            result.reason = (
                f"no image value under {result.path or '.'} differs between "
                f"{last_good[:12]} and {suspect_sha[:12]}"
            )
        elif strategy == "revert" and not result.suspect_commits:
            result.reason = (
                f"no commit between {last_good[:12]} and {suspect_sha[:12]} "
                f"touches {result.path or '.'}"
            )
        else:
            result.found = True
        logger.info(
            "Change of %s (incident %s): suspect %s, last good %s, %d commits, "
            "%d image changes, found=%s.",
            query.argocd_application,
            query.incident_id,
            suspect_sha,
            last_good,
            len(result.suspect_commits),
            len(result.image_changes),
            result.found,
        )
        return result

    @staticmethod
    def _last_good_from_history(
        repo: git.Repo,
        history: list[tuple[str, dict]],
        suspect: str,
        suspect_positions: list[int],
    ) -> str | None:
        """Return the latest earlier history revision other than the suspect."""
        end = suspect_positions[-1] if suspect_positions else len(history)
        for revision, _ in reversed(history[:end]):
            if revision and revision != suspect:
                sha = resolve_commit(repo, revision)
                if sha is not None:
                    return sha
                logger.warning(
                    "History revision %s not found in the repository.", revision
                )
        return None

    @staticmethod
    def _last_good_from_git(
        repo: git.Repo, app_path: str, suspect_sha: str
    ) -> str | None:
        """Fall back to the parent of the newest commit touching the path.

        Used when Argo CD's history has no earlier revision (history limit,
        a fresh application): the last change to the path is the suspect.
        """
        commits = commits_between(repo, app_path, "", suspect_sha)
        if not commits:
            return None
        parents = repo.commit(commits[0]).parents
        return parents[0].hexsha if parents else None

    # --- pull requests --------------------------------------------------------

    @activity.defn(name="open_pull_request")
    async def open_pull_request(self, request: PullRequestInput) -> PullRequest:
        """Open the incident's rollback pull request, or return the one already open."""
        provider = self._provider(self.settings.repo_url or request.change.repo_url)
        return await self._call(provider.open, request)

    @activity.defn(name="merge_pull_request")
    async def merge_pull_request(self, request: MergeInput) -> PullRequest:
        """Merge the incident's rollback pull request (a no-op once merged)."""
        provider = self._provider(self._repo_url_of(request.pull_request))
        return await self._call(provider.merge, request)

    @activity.defn(name="close_pull_request")
    async def close_pull_request(self, request: ClosePullRequestInput) -> PullRequest:
        """Close the incident's rollback pull request and delete its branch."""
        provider = self._provider(self._repo_url_of(request.pull_request))
        return await self._call(provider.close, request)

    def _repo_url_of(self, pull_request: PullRequest) -> str:
        if self.settings.repo_url:
            return self.settings.repo_url
        # A forge provider derives the repository from the pull request's URL,
        # and the git provider's URL is the remote's, without credentials.
        if pull_request.provider in (*FORGE_PROVIDERS, "git"):
            return pull_request.url
        # The local provider's URL is the record file <bare>/remediator/pulls/<n>.json.
        parts = urlsplit(pull_request.url)
        if pull_request.provider == "local" and parts.scheme == "file":
            return str(Path(parts.path).parents[2])
        raise ApplicationError(
            "cannot tell the repository of the pull request; "
            "set REMEDIATOR_GIT_REPO_URL",
            type="InvalidInput",
            non_retryable=True,
        )

    def _provider(self, repo_url: str) -> Any:
        if self.settings.provider in FORGE_PROVIDERS:
            try:
                return forge_provider(self.settings, repo_url)
            except InvalidInputError as error:
                raise ApplicationError(
                    str(error), type=error.error_type, non_retryable=True
                ) from error
        if self.settings.provider == "git":
            return self._plain_remote_provider(repo_url)
        if self.settings.provider != "local":
            raise ApplicationError(
                f"unsupported git provider {self.settings.provider!r}; "
                "expected local, git, github or gitlab",
                type="UnsupportedProvider",
                non_retryable=True,
            )
        bare_path = local_path_of(repo_url) if repo_url else None
        if bare_path is None:
            raise ApplicationError(
                f"the local provider needs a local bare repository path, got "
                f"{redact_url(repo_url)!r}; set REMEDIATOR_GIT_REPO_URL",
                type="InvalidInput",
                non_retryable=True,
            )
        try:
            return LocalProvider(
                bare_path,
                self.settings.work_dir,
                author_name=self.settings.author_name,
                author_email=self.settings.author_email,
            )
        except InvalidInputError as error:
            raise ApplicationError(
                str(error), type=error.error_type, non_retryable=True
            ) from error

    def _plain_remote_provider(self, repo_url: str) -> PlainRemoteProvider:
        try:
            return PlainRemoteProvider(
                repo_url,
                self.settings.work_dir,
                token=self.settings.token,
                author_name=self.settings.author_name,
                author_email=self.settings.author_email,
            )
        except InvalidInputError as error:
            raise ApplicationError(
                str(error), type=error.error_type, non_retryable=True
            ) from error

    @staticmethod
    async def _call(method: Callable[[Any], T], request: Any) -> T:
        try:
            return await asyncio.to_thread(method, request)
        except PermanentGitOpsError as error:
            # Retrying cannot help: the workflow must escalate instead.
            raise ApplicationError(
                str(error), type=error.error_type, non_retryable=True
            ) from error
