"""Rollback pull requests on GitHub through its REST API.

`GitOpsActivities` uses `GitHubProvider` when `REMEDIATOR_GIT_PROVIDER=github`.
It has the interface of `LocalProvider`: `open`, `merge` and `close` take the
models of `workflows.models` and return a `PullRequest`.

`open` reads the changed files at the target branch head through the contents
API and applies the pin edit with `yaml_edit.set_scalars`. It then creates the
branch `remediation/<incident id>` with the git refs API, commits each edited
file with the contents API and opens the pull request with labels. Each step finds
what an earlier attempt created: the pull request by its head branch, the
branch by its name, and the files already edited on the branch.

`merge` merges with the configured method (`merge`, `squash` or `rebase`) and
raises `MergeBlockedError` naming the required checks when they block it.
`close` closes the pull request and deletes its branch.

Endpoints (REST API version 2022-11-28): `GET /repos/{o}/{r}/contents/{path}`,
`PUT /repos/{o}/{r}/contents/{path}`, `GET /repos/{o}/{r}/git/ref/heads/{b}`,
`POST /repos/{o}/{r}/git/refs`, `DELETE /repos/{o}/{r}/git/refs/heads/{b}`,
`GET /repos/{o}/{r}/git/commits/{sha}`, `GET /repos/{o}/{r}/compare/{a}...{b}`,
`GET|POST /repos/{o}/{r}/pulls`, `GET|PATCH /repos/{o}/{r}/pulls/{n}`,
`PUT /repos/{o}/{r}/pulls/{n}/merge`, `POST /repos/{o}/{r}/issues/{n}/labels`,
`POST /repos/{o}/{r}/issues/{n}/comments`,
`GET /repos/{o}/{r}/commits/{sha}/check-runs` and
`GET /repos/{o}/{r}/commits/{sha}/status`.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from activities.gitops.forge import (
    DEFAULT_TIMEOUT_SECONDS,
    ForgeClient,
    ForgeRequestError,
    MergeBlockedError,
    commit_message,
    decode_base64_text,
    describe,
    encode_base64_text,
    has_incident_trailer,
    labels_for,
    pin_edits,
    skipped_note,
    validate_merge_method,
    validate_open,
)
from activities.gitops.local_provider import (
    InvalidInputError,
    PullRequestStateError,
    RollbackConflictError,
    branch_for,
    scrub,
)
from workflows.models import (
    ClosePullRequestInput,
    MergeInput,
    PullRequest,
    PullRequestInput,
)

logger = logging.getLogger(__name__)

PROVIDER_NAME = "github"
DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"

_REPOSITORY = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
# GitHub's 405 for one missing check: `Required status check "ci/test" is expected.`
_QUOTED_CHECK = re.compile(r'"([^"]+)"')
_SUCCESSFUL_CONCLUSIONS = frozenset({"success", "neutral", "skipped"})


class GitHubProvider:
    """Pull requests in one GitHub repository, authenticated with a token."""

    def __init__(
        self,
        repository: str,
        token: SecretStr | None,
        *,
        api_url: str = DEFAULT_API_URL,
        merge_method: str = "merge",
        author_name: str = "Remediator",
        author_email: str = "remediator@localhost",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not _REPOSITORY.match(repository) or ".." in repository:
            raise InvalidInputError(
                f"invalid GitHub repository {repository!r}: expected owner/name; "
                "set REMEDIATOR_GIT_REPOSITORY"
            )
        self.repository = repository
        self.owner = repository.split("/", 1)[0]
        self.merge_method = validate_merge_method(merge_method)
        self.author_name = author_name
        self.author_email = author_email
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": "remediator",
        }
        if token is not None and token.get_secret_value():
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        self.client = ForgeClient(
            api_url,
            headers,
            secret=token,
            forge="GitHub",
            timeout=timeout_seconds,
            transport=transport,
        )
        self.repo_path = f"/repos/{repository}"

    # --- public operations --------------------------------------------------

    def open(self, request: PullRequestInput) -> PullRequest:
        """Open the rollback pull request of an incident, or return the earlier one.

        Raises InvalidInputError, NothingToRollBackError or
        UnsupportedStrategyError (revert) for inputs that cannot work.
        """
        branch = branch_for(request.incident_id)
        validate_open(request, PROVIDER_NAME)
        target = request.change.target_branch
        with self.client.session():
            existing = self._find_pull(branch)
            if existing is not None:
                logger.info(
                    "Reusing pull request #%s for incident %s.",
                    existing["number"],
                    request.incident_id,
                )
                self._add_labels(existing["number"], request.draft)
                return self._to_model(existing)

            title, body = describe(request)
            head, body = self._prepare_branch(request, branch, target, title, body)
            pull = self._create_pull(branch, target, title, body, request.draft)
            self._add_labels(pull["number"], request.draft)
            logger.info(
                "Opened pull request #%s (%s) for incident %s at %s.",
                pull["number"],
                branch,
                request.incident_id,
                head,
            )
            return self._to_model(pull)

    def merge(self, request: MergeInput) -> PullRequest:
        """Merge the pull request with the configured merge method.

        Returns the pull request unchanged when it is merged already. Raises
        PullRequestStateError for a closed or draft pull request,
        MergeBlockedError when required checks block the merge, and
        RollbackConflictError when the branch conflicts with the target.
        """
        branch = branch_for(request.incident_id)
        with self.client.session():
            pull = self._load_pull(request.pull_request.number, branch)
            if pull.get("merged") or pull.get("merged_at"):
                return self._to_model(pull)
            if pull["state"] != "open":
                raise PullRequestStateError(
                    f"pull request #{pull['number']} is {pull['state']}, "
                    "but only an open pull request can be merged"
                )
            if pull.get("draft"):
                raise PullRequestStateError(
                    f"pull request #{pull['number']} is a draft (shadow mode). "
                    "Mark it ready before merging"
                )
            head = pull["head"]["sha"]
            response = self.client.request(
                "PUT",
                f"{self.repo_path}/pulls/{pull['number']}/merge",
                json={
                    "merge_method": self.merge_method,
                    "sha": head,
                    "commit_title": f"{pull['title']} (#{pull['number']})",
                },
                accept=(405, 409),
            )
            if response.status_code != 200:
                self._raise_merge_failure(pull, response)
            merge_commit = response.json().get("sha", "")
            logger.info(
                "Merged pull request #%s into %s as %s (%s) for incident %s.",
                pull["number"],
                pull["base"]["ref"],
                merge_commit,
                self.merge_method,
                request.incident_id,
            )
            pull = self._load_pull(pull["number"], branch)
            model = self._to_model(pull)
            return model.model_copy(
                update={"state": "merged", "merge_commit": merge_commit}
            )

    def close(self, request: ClosePullRequestInput) -> PullRequest:
        """Close the pull request without merging and delete its branch.

        A merged pull request is returned unchanged. The reason, if any, is
        posted as a comment.
        """
        branch = branch_for(request.incident_id)
        with self.client.session():
            pull = self._load_pull(request.pull_request.number, branch)
            if pull.get("merged") or pull.get("merged_at"):
                logger.warning(
                    "Pull request #%s of incident %s is merged; not closing it.",
                    pull["number"],
                    request.incident_id,
                )
                return self._to_model(pull)
            if pull["state"] == "open":
                if request.reason:
                    self.client.request(
                        "POST",
                        f"{self.repo_path}/issues/{pull['number']}/comments",
                        json={"body": f"Closed by Remediator: {scrub(request.reason)}"},
                    )
                pull = self.client.json(
                    "PATCH",
                    f"{self.repo_path}/pulls/{pull['number']}",
                    json={"state": "closed"},
                )
                logger.info(
                    "Closed pull request #%s of incident %s.",
                    pull["number"],
                    request.incident_id,
                )
            # A retry after a failed deletion deletes the branch of a closed PR.
            self._delete_branch(branch)
            return self._to_model(pull)

    # --- pull requests --------------------------------------------------------

    def _find_pull(self, branch: str) -> dict | None:
        """Return the newest open or merged pull request whose head is `branch`."""
        pulls = self.client.json(
            "GET",
            f"{self.repo_path}/pulls",
            params={
                "head": f"{self.owner}:{branch}",
                "state": "all",
                "sort": "created",
                "direction": "desc",
                "per_page": "100",
            },
        )
        for pull in pulls or []:
            if pull["head"]["ref"] != branch:
                continue
            if pull["state"] == "open" or pull.get("merged_at"):
                return pull
        return None

    def _load_pull(self, number: int, branch: str) -> dict:
        response = self.client.request(
            "GET", f"{self.repo_path}/pulls/{number}", accept=(404,)
        )
        if response.status_code == 404:
            raise InvalidInputError(
                f"pull request #{number} not found in {self.repository}"
            )
        pull = response.json()
        if pull["head"]["ref"] != branch:
            raise InvalidInputError(
                f"pull request #{number} belongs to branch {pull['head']['ref']}, "
                f"not to {branch}"
            )
        return pull

    def _create_pull(
        self, branch: str, target: str, title: str, body: str, draft: bool
    ) -> dict:
        response = self.client.request(
            "POST",
            f"{self.repo_path}/pulls",
            json={
                "title": title,
                "head": branch,
                "base": target,
                "body": body,
                "draft": draft,
                "maintainer_can_modify": False,
            },
            accept=(422,),
        )
        if response.status_code == 201:
            return response.json()
        # A concurrent attempt opened it first: "A pull request already exists".
        existing = self._find_pull(branch)
        if existing is not None:
            return existing
        raise ForgeRequestError(
            f"GitHub POST {self.repo_path}/pulls returned HTTP 422 "
            f"({self.client.detail(response)})",
            422,
        )

    def _add_labels(self, number: int, draft: bool) -> None:
        # Adding a label that the issue already has changes nothing.
        self.client.request(
            "POST",
            f"{self.repo_path}/issues/{number}/labels",
            json={"labels": labels_for(draft)},
        )

    def _to_model(self, pull: dict) -> PullRequest:
        merged = bool(pull.get("merged") or pull.get("merged_at"))
        return PullRequest(
            provider=PROVIDER_NAME,
            number=pull["number"],
            url=pull.get("html_url") or "",
            branch=pull["head"]["ref"],
            target_branch=pull["base"]["ref"],
            head_commit=pull["head"]["sha"],
            title=pull.get("title") or "",
            draft=bool(pull.get("draft")),
            state="merged" if merged else pull["state"],
            merge_commit=(pull.get("merge_commit_sha") or "") if merged else "",
        )

    # --- branch and commits -----------------------------------------------------

    def _prepare_branch(
        self,
        request: PullRequestInput,
        branch: str,
        target: str,
        title: str,
        body: str,
    ) -> tuple[str, str]:
        """Create or complete the remediation branch; return its head and the body."""
        existing = self._branch_head(branch)
        if existing is None:
            base = self._branch_head(target)
            if base is None:
                raise InvalidInputError(
                    f"target branch {target!r} not found in {self.repository}"
                )
            edited, skipped = pin_edits(
                lambda path: self._read_file(path, base),
                request.change.image_changes,
                revision=base,
            )
            body += skipped_note(skipped)
            self._create_branch(branch, base)
        else:
            self._check_branch_owner(branch, existing, target, request.incident_id)
            # An earlier attempt created the branch and may have committed some
            # files, so the edit starts from the branch head.
            edited, skipped = pin_edits(
                lambda path: self._read_file(path, existing),
                request.change.image_changes,
                revision=existing,
                good_counts_as_done=True,
            )
            body += skipped_note(skipped)

        message = commit_message(request, title, body)
        head = existing or ""
        for path, text in sorted(edited.items()):
            head = self._commit_file(branch, path, text, message)
        return head or self._branch_head(branch) or "", body

    def _branch_head(self, branch: str) -> str | None:
        response = self.client.request(
            "GET",
            f"{self.repo_path}/git/ref/heads/{quote(branch, safe='/')}",
            accept=(404,),
        )
        if response.status_code == 404:
            return None
        return response.json()["object"]["sha"]

    def _check_branch_owner(
        self, branch: str, head: str, target: str, incident_id: str
    ) -> None:
        """Accept a branch made for this incident, or one with no commits of its own."""
        commit = self.client.json("GET", f"{self.repo_path}/git/commits/{head}")
        if has_incident_trailer(commit.get("message", ""), incident_id):
            return
        compare = self.client.json(
            "GET",
            f"{self.repo_path}/compare/"
            f"{quote(target, safe='/')}...{quote(branch, safe='/')}",
        )
        if compare.get("ahead_by", 1) == 0:
            return
        raise InvalidInputError(
            f"branch {branch} exists but its head {head} was not made for incident "
            f"{incident_id}; delete the branch or use another incident id"
        )

    def _create_branch(self, branch: str, sha: str) -> None:
        response = self.client.request(
            "POST",
            f"{self.repo_path}/git/refs",
            json={"ref": f"refs/heads/{branch}", "sha": sha},
            accept=(422,),
        )
        if response.status_code == 422:
            # "Reference already exists": a concurrent attempt won, and this
            # attempt fails so that the retry reads its branch.
            raise ForgeRequestError(
                f"GitHub could not create branch {branch}: "
                f"{self.client.detail(response)}",
                422,
            )

    def _contents_path(self, path: str) -> str:
        return f"{self.repo_path}/contents/{quote(path, safe='/')}"

    def _read_file_entry(self, path: str, ref: str) -> dict | None:
        response = self.client.request(
            "GET", self._contents_path(path), params={"ref": ref}, accept=(404,)
        )
        if response.status_code == 404:
            return None
        entry = response.json()
        if not isinstance(entry, dict) or entry.get("type") != "file":
            raise InvalidInputError(f"{path} at {ref[:12]} is not a file")
        return entry

    def _read_file(self, path: str, ref: str) -> str | None:
        entry = self._read_file_entry(path, ref)
        if entry is None:
            return None
        return decode_base64_text(entry.get("content", ""), path)

    def _commit_file(self, branch: str, path: str, text: str, message: str) -> str:
        """Commit one file's new text to `branch`; return the new commit sha."""
        entry = self._read_file_entry(path, branch)
        payload: dict[str, Any] = {
            "message": message,
            "content": encode_base64_text(text),
            "branch": branch,
            "committer": {"name": self.author_name, "email": self.author_email},
        }
        if entry is not None:
            # GitHub rejects an update without the blob sha it replaces (409).
            payload["sha"] = entry["sha"]
        result = self.client.json("PUT", self._contents_path(path), json=payload)
        return result["commit"]["sha"]

    def _delete_branch(self, branch: str) -> None:
        response = self.client.request(
            "DELETE",
            f"{self.repo_path}/git/refs/heads/{quote(branch, safe='/')}",
            accept=(404, 422),
        )
        if response.status_code == 204:
            logger.info("Deleted branch %s of %s.", branch, self.repository)

    # --- merge failures ---------------------------------------------------------

    def _raise_merge_failure(self, pull: dict, response: httpx.Response) -> None:
        detail = self.client.detail(response)
        number = pull["number"]
        if response.status_code == 409:
            raise PullRequestStateError(
                f"merge of pull request #{number} rejected: {detail}. The head "
                "branch changed since the pull request was read"
            )
        # 405: GitHub re-reads mergeability; `blocked` means rules or checks.
        pull = self.client.json("GET", f"{self.repo_path}/pulls/{number}")
        state = pull.get("mergeable_state") or "unknown"
        if state == "dirty":
            raise RollbackConflictError(
                f"pull request #{number} conflicts with {pull['base']['ref']}: {detail}"
            )
        checks = self._failing_checks(pull["head"]["sha"])
        # Add the checks that GitHub names but that have not reported yet.
        for name in _QUOTED_CHECK.findall(detail):
            if not any(check.startswith(f"{name} (") for check in checks):
                checks.append(scrub(name))
        if "status check" in detail.lower() or (state == "blocked" and checks):
            listed = ", ".join(checks) if checks else "unknown checks"
            raise MergeBlockedError(
                f"merge of pull request #{number} is blocked by required checks "
                f"that have not passed: {listed} (GitHub: {detail})",
                checks,
            )
        raise PullRequestStateError(
            f"pull request #{number} cannot be merged (mergeable_state {state}): "
            f"{detail}"
        )

    def _failing_checks(self, sha: str) -> list[str]:
        """Name the check runs and commit statuses of `sha` that have not passed."""
        names: list[str] = []
        runs = self.client.json(
            "GET",
            f"{self.repo_path}/commits/{sha}/check-runs",
            params={"per_page": "100"},
        )
        for run in (runs or {}).get("check_runs", []):
            conclusion = run.get("conclusion")
            if run.get("status") != "completed":
                names.append(f"{run.get('name')} ({run.get('status')})")
            elif conclusion not in _SUCCESSFUL_CONCLUSIONS:
                names.append(f"{run.get('name')} ({conclusion})")
        status = self.client.json("GET", f"{self.repo_path}/commits/{sha}/status")
        for entry in (status or {}).get("statuses", []):
            if entry.get("state") != "success":
                names.append(f"{entry.get('context')} ({entry.get('state')})")
        return [scrub(name) for name in names]
