"""Rollback merge requests on GitLab through its REST API (v4).

`GitOpsActivities` uses `GitLabProvider` when `REMEDIATOR_GIT_PROVIDER=gitlab`.
It has the interface of `LocalProvider`: `open`, `merge` and `close` take the
models of `workflows.models` and return a `PullRequest`, whose number is the
merge request's project-level `iid`.

`open` reads the changed files at the target branch head through the
repository files API and applies the pin edit with `yaml_edit.set_scalars`.
It creates the branch `remediation/<incident id>` together with its single commit
through the commits API (`start_sha`), so the branch never exists without
the rollback. It then opens the merge request with labels, as a draft in
shadow mode. A repeated `open` finds the merge request by its source branch
and the branch by the incident trailer of its head commit.

`merge` merges with the configured method: `merge`, `squash` (the `squash`
parameter) or `rebase` (rebase the source branch, then merge, which
fast-forwards when the project's merge method is fast-forward). It raises
`MergeBlockedError` naming the pipeline jobs and external status checks that
block the merge. `close` closes the merge request and deletes its branch.

Endpoints: `GET /projects/:id/repository/files/:path`,
`GET|DELETE /projects/:id/repository/branches/:branch`,
`POST /projects/:id/repository/commits`, `GET|POST /projects/:id/merge_requests`,
`GET|PUT /projects/:id/merge_requests/:iid`,
`PUT /projects/:id/merge_requests/:iid/merge`,
`PUT /projects/:id/merge_requests/:iid/rebase`,
`POST /projects/:id/merge_requests/:iid/notes`,
`GET /projects/:id/merge_requests/:iid/status_checks` and
`GET /projects/:id/pipelines/:pipeline_id/jobs`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from activities.gitops.forge import (
    DEFAULT_TIMEOUT_SECONDS,
    ForgeClient,
    ForgeRequestError,
    ForgeUnavailableError,
    MergeBlockedError,
    commit_message,
    decode_base64_text,
    describe,
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

PROVIDER_NAME = "gitlab"
DEFAULT_API_URL = "https://gitlab.com/api/v4"
DRAFT_PREFIX = "Draft: "

_PROJECT = re.compile(r"^(?:[0-9]+|[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+)$")
# `detailed_merge_status` values (GitLab 15.6 and later) that mean pipelines or
# external status checks have not passed.
CHECK_STATUSES = frozenset(
    {"ci_must_pass", "ci_still_running", "external_status_checks", "status_checks"}
)
# Values that GitLab recomputes shortly: a retry may find the request mergeable.
PENDING_STATUSES = frozenset(
    {"checking", "unchecked", "preparing", "approvals_syncing"}
)
CONFLICT_STATUSES = frozenset({"conflict", "need_rebase"})
_SUCCESSFUL_JOB_STATUSES = frozenset({"success", "skipped", "manual"})
REBASE_POLLS = 20
REBASE_POLL_SECONDS = 0.5


class GitLabProvider:
    """Merge requests in one GitLab project, authenticated with a token."""

    def __init__(
        self,
        project: str,
        token: SecretStr | None,
        *,
        api_url: str = DEFAULT_API_URL,
        merge_method: str = "merge",
        author_name: str = "Remediator",
        author_email: str = "remediator@localhost",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
        rebase_poll_seconds: float = REBASE_POLL_SECONDS,
    ) -> None:
        if not _PROJECT.match(project) or ".." in project:
            raise InvalidInputError(
                f"invalid GitLab project {project!r}: expected a numeric id or a "
                "path like group/project; set REMEDIATOR_GIT_REPOSITORY"
            )
        self.project = project
        self.merge_method = validate_merge_method(merge_method)
        self.author_name = author_name
        self.author_email = author_email
        self.rebase_poll_seconds = rebase_poll_seconds
        headers = {"Accept": "application/json", "User-Agent": "remediator"}
        if token is not None and token.get_secret_value():
            headers["PRIVATE-TOKEN"] = token.get_secret_value()
        self.client = ForgeClient(
            api_url,
            headers,
            secret=token,
            forge="GitLab",
            timeout=timeout_seconds,
            transport=transport,
        )
        self.project_path = f"/projects/{quote(project, safe='')}"

    # --- public operations --------------------------------------------------

    def open(self, request: PullRequestInput) -> PullRequest:
        """Open the rollback merge request of an incident, or return the earlier one.

        Raises InvalidInputError, NothingToRollBackError or
        UnsupportedStrategyError (revert) for inputs that cannot work.
        """
        branch = branch_for(request.incident_id)
        validate_open(request, PROVIDER_NAME)
        target = request.change.target_branch
        with self.client.session():
            existing = self._find_merge_request(branch)
            if existing is not None:
                logger.info(
                    "Reusing merge request !%s for incident %s.",
                    existing["iid"],
                    request.incident_id,
                )
                return self._to_model(self._ensure_labels(existing, request.draft))

            title, body = describe(request)
            head, body = self._prepare_branch(request, branch, target, title, body)
            merge_request = self._create_merge_request(
                branch, target, title, body, request.draft
            )
            logger.info(
                "Opened merge request !%s (%s) for incident %s at %s.",
                merge_request["iid"],
                branch,
                request.incident_id,
                head,
            )
            return self._to_model(merge_request)

    def merge(self, request: MergeInput) -> PullRequest:
        """Merge the merge request with the configured merge method.

        Returns the merge request unchanged when it is merged already. Raises
        PullRequestStateError for a closed or draft merge request,
        MergeBlockedError when pipelines or status checks block the merge,
        RollbackConflictError on conflicts, and ForgeUnavailableError
        (retryable) while GitLab still computes mergeability.
        """
        branch = branch_for(request.incident_id)
        with self.client.session():
            merge_request = self._load(request.pull_request.number, branch)
            if merge_request["state"] == "merged":
                return self._to_model(merge_request)
            self._check_mergeable(merge_request)
            if self.merge_method == "rebase":
                merge_request = self._rebase(merge_request, branch)
            payload: dict[str, Any] = {
                "sha": merge_request["sha"],
                "squash": self.merge_method == "squash",
            }
            response = self.client.request(
                "PUT",
                f"{self._mr_path(merge_request['iid'])}/merge",
                json=payload,
                accept=(405, 406, 409, 422),
            )
            if response.status_code != 200:
                self._raise_merge_failure(merge_request["iid"], branch, response)
            merged = response.json()
            model = self._to_model(merged)
            logger.info(
                "Merged merge request !%s into %s as %s (%s) for incident %s.",
                model.number,
                model.target_branch,
                model.merge_commit,
                self.merge_method,
                request.incident_id,
            )
            return model

    def close(self, request: ClosePullRequestInput) -> PullRequest:
        """Close the merge request without merging and delete its branch.

        A merged merge request is returned unchanged. The reason, if any, is
        posted as a note.
        """
        branch = branch_for(request.incident_id)
        with self.client.session():
            merge_request = self._load(request.pull_request.number, branch)
            if merge_request["state"] == "merged":
                logger.warning(
                    "Merge request !%s of incident %s is merged; not closing it.",
                    merge_request["iid"],
                    request.incident_id,
                )
                return self._to_model(merge_request)
            if merge_request["state"] == "opened":
                path = self._mr_path(merge_request["iid"])
                if request.reason:
                    self.client.request(
                        "POST",
                        f"{path}/notes",
                        json={"body": f"Closed by Remediator: {scrub(request.reason)}"},
                    )
                merge_request = self.client.json(
                    "PUT", path, json={"state_event": "close"}
                )
                logger.info(
                    "Closed merge request !%s of incident %s.",
                    merge_request["iid"],
                    request.incident_id,
                )
            self._delete_branch(branch)
            return self._to_model(merge_request)

    # --- merge requests -------------------------------------------------------

    def _mr_path(self, iid: int) -> str:
        return f"{self.project_path}/merge_requests/{iid}"

    def _find_merge_request(self, branch: str) -> dict | None:
        """Return the newest opened or merged merge request from `branch`."""
        merge_requests = self.client.json(
            "GET",
            f"{self.project_path}/merge_requests",
            params={
                "source_branch": branch,
                "state": "all",
                "order_by": "created_at",
                "sort": "desc",
                "per_page": "100",
            },
        )
        for merge_request in merge_requests or []:
            if merge_request.get("source_branch") != branch:
                continue
            if merge_request["state"] in ("opened", "merged"):
                return merge_request
        return None

    def _load(self, iid: int, branch: str) -> dict:
        response = self.client.request("GET", self._mr_path(iid), accept=(404,))
        if response.status_code == 404:
            raise InvalidInputError(
                f"merge request !{iid} not found in project {self.project}"
            )
        merge_request = response.json()
        if merge_request.get("source_branch") != branch:
            raise InvalidInputError(
                f"merge request !{iid} belongs to branch "
                f"{merge_request.get('source_branch')}, not to {branch}"
            )
        return merge_request

    def _create_merge_request(
        self, branch: str, target: str, title: str, body: str, draft: bool
    ) -> dict:
        response = self.client.request(
            "POST",
            f"{self.project_path}/merge_requests",
            json={
                "source_branch": branch,
                "target_branch": target,
                "title": f"{DRAFT_PREFIX}{title}" if draft else title,
                "description": body,
                "labels": ",".join(labels_for(draft)),
                "remove_source_branch": True,
            },
            accept=(409,),
        )
        if response.status_code == 201:
            return response.json()
        # "Another open merge request already exists for this source branch".
        existing = self._find_merge_request(branch)
        if existing is not None:
            return existing
        raise ForgeRequestError(
            f"GitLab POST {self.project_path}/merge_requests returned HTTP 409 "
            f"({self.client.detail(response)})",
            409,
        )

    def _ensure_labels(self, merge_request: dict, draft: bool) -> dict:
        missing = [
            label
            for label in labels_for(draft)
            if label not in (merge_request.get("labels") or [])
        ]
        if not missing:
            return merge_request
        return self.client.json(
            "PUT",
            self._mr_path(merge_request["iid"]),
            json={"add_labels": ",".join(missing)},
        )

    def _to_model(self, merge_request: dict) -> PullRequest:
        state = {"opened": "open", "locked": "closed"}.get(
            merge_request["state"], merge_request["state"]
        )
        merge_commit = ""
        if state == "merged":
            merge_commit = (
                merge_request.get("merge_commit_sha")
                or merge_request.get("squash_commit_sha")
                or merge_request.get("sha")
                or ""
            )
        title = merge_request.get("title") or ""
        draft = bool(
            merge_request.get("draft") or merge_request.get("work_in_progress")
        )
        return PullRequest(
            provider=PROVIDER_NAME,
            number=merge_request["iid"],
            url=merge_request.get("web_url") or "",
            branch=merge_request["source_branch"],
            target_branch=merge_request["target_branch"],
            head_commit=merge_request.get("sha") or "",
            title=title.removeprefix(DRAFT_PREFIX),
            draft=draft,
            state=state,
            merge_commit=merge_commit,
        )

    # --- branch and commit ----------------------------------------------------

    def _prepare_branch(
        self,
        request: PullRequestInput,
        branch: str,
        target: str,
        title: str,
        body: str,
    ) -> tuple[str, str]:
        """Return the head of the remediation branch, creating it with its commit."""
        existing = self._branch(branch)
        if existing is not None:
            head = existing["commit"]
            if not has_incident_trailer(head.get("message", ""), request.incident_id):
                raise InvalidInputError(
                    f"branch {branch} exists but its head {head['id']} was not made "
                    f"for incident {request.incident_id}; delete the branch or use "
                    "another incident id"
                )
            # The commits API creates the branch and its commit at once.
            return head["id"], body

        base_branch = self._branch(target)
        if base_branch is None:
            raise InvalidInputError(
                f"target branch {target!r} not found in project {self.project}"
            )
        base = base_branch["commit"]["id"]
        edited, skipped = pin_edits(
            lambda path: self._read_file(path, base),
            request.change.image_changes,
            revision=base,
        )
        body += skipped_note(skipped)
        message = commit_message(request, title, body)
        # `start_sha` instead of `start_branch`, because the edit was computed
        # at `base`, and an `update` action on a newer target head would undo
        # whatever changed in that file since.
        response = self.client.request(
            "POST",
            f"{self.project_path}/repository/commits",
            json={
                "branch": branch,
                "start_sha": base,
                "commit_message": message,
                "author_name": self.author_name,
                "author_email": self.author_email,
                "actions": [
                    {"action": "update", "file_path": path, "content": text}
                    for path, text in sorted(edited.items())
                ],
            },
            accept=(400,),
        )
        if response.status_code == 400:
            # "A branch called ... already exists": a concurrent attempt won,
            # and this attempt fails so that the retry reads its branch.
            raise ForgeRequestError(
                f"GitLab could not create branch {branch}: "
                f"{self.client.detail(response)}",
                400,
            )
        return response.json()["id"], body

    def _branch(self, branch: str) -> dict | None:
        response = self.client.request(
            "GET",
            f"{self.project_path}/repository/branches/{quote(branch, safe='')}",
            accept=(404,),
        )
        return None if response.status_code == 404 else response.json()

    def _read_file(self, path: str, ref: str) -> str | None:
        response = self.client.request(
            "GET",
            f"{self.project_path}/repository/files/{quote(path, safe='')}",
            params={"ref": ref},
            accept=(404,),
        )
        if response.status_code == 404:
            return None
        entry = response.json()
        if entry.get("encoding", "base64") != "base64":
            raise InvalidInputError(
                f"{path} at {ref[:12]} has the unexpected encoding "
                f"{entry.get('encoding')!r}"
            )
        return decode_base64_text(entry.get("content", ""), path)

    def _delete_branch(self, branch: str) -> None:
        response = self.client.request(
            "DELETE",
            f"{self.project_path}/repository/branches/{quote(branch, safe='')}",
            accept=(404,),
        )
        if response.status_code == 204:
            logger.info("Deleted branch %s of project %s.", branch, self.project)

    # --- merging --------------------------------------------------------------

    def _check_mergeable(self, merge_request: dict) -> None:
        iid = merge_request["iid"]
        if merge_request["state"] != "opened":
            raise PullRequestStateError(
                f"merge request !{iid} is {merge_request['state']}, "
                "but only an open merge request can be merged"
            )
        if merge_request.get("draft") or merge_request.get("work_in_progress"):
            raise PullRequestStateError(
                f"merge request !{iid} is a draft (shadow mode). "
                "Mark it ready before merging"
            )
        status = merge_request.get("detailed_merge_status") or "mergeable"
        if status == "mergeable":
            return
        if status in PENDING_STATUSES:
            raise ForgeUnavailableError(
                f"GitLab is still checking whether merge request !{iid} can be "
                f"merged (detailed_merge_status {status}); retrying later"
            )
        if status in CHECK_STATUSES:
            checks = self._failing_checks(merge_request)
            listed = ", ".join(checks) if checks else "unknown checks"
            raise MergeBlockedError(
                f"merge of merge request !{iid} is blocked by required checks that "
                f"have not passed: {listed} (detailed_merge_status {status})",
                checks,
            )
        if status in CONFLICT_STATUSES:
            raise RollbackConflictError(
                f"merge request !{iid} conflicts with "
                f"{merge_request['target_branch']} (detailed_merge_status {status})"
            )
        raise PullRequestStateError(
            f"merge request !{iid} cannot be merged: detailed_merge_status {status}"
        )

    def _failing_checks(self, merge_request: dict) -> list[str]:
        """Name the head pipeline's jobs and the external status checks not passed."""
        names: list[str] = []
        pipeline = merge_request.get("head_pipeline") or merge_request.get("pipeline")
        if isinstance(pipeline, dict) and pipeline.get("id"):
            jobs = self.client.json(
                "GET",
                f"{self.project_path}/pipelines/{pipeline['id']}/jobs",
                params={"per_page": "100"},
            )
            for job in jobs or []:
                if job.get("status") not in _SUCCESSFUL_JOB_STATUSES:
                    names.append(f"{job.get('name')} ({job.get('status')})")
            if not names and pipeline.get("status") != "success":
                names.append(f"pipeline {pipeline['id']} ({pipeline.get('status')})")
        response = self.client.request(
            "GET",
            f"{self._mr_path(merge_request['iid'])}/status_checks",
            accept=(403, 404),
        )
        # External status checks are a GitLab Ultimate feature, hence 403/404.
        if response.status_code == 200:
            for check in response.json() or []:
                if check.get("status") != "passed":
                    names.append(f"{check.get('name')} ({check.get('status')})")
        return [scrub(name) for name in names]

    def _rebase(self, merge_request: dict, branch: str) -> dict:
        """Rebase the source branch onto the target and return the refreshed request."""
        iid = merge_request["iid"]
        self.client.request(
            "PUT", f"{self._mr_path(iid)}/rebase", json={"skip_ci": False}
        )
        for _ in range(REBASE_POLLS):
            response = self.client.json(
                "GET",
                self._mr_path(iid),
                params={"include_rebase_in_progress": "true"},
            )
            if not response.get("rebase_in_progress"):
                if response.get("merge_error"):
                    raise RollbackConflictError(
                        f"rebase of merge request !{iid} failed: "
                        f"{scrub(str(response['merge_error']))}"
                    )
                if response.get("source_branch") != branch:
                    raise InvalidInputError(
                        f"merge request !{iid} changed its source branch"
                    )
                return response
            time.sleep(self.rebase_poll_seconds)
        raise ForgeUnavailableError(
            f"rebase of merge request !{iid} still runs after {REBASE_POLLS} checks"
        )

    def _raise_merge_failure(
        self, iid: int, branch: str, response: httpx.Response
    ) -> None:
        detail = self.client.detail(response)
        if response.status_code == 409:
            raise PullRequestStateError(
                f"merge of merge request !{iid} rejected: {detail}. The source "
                "branch changed since the merge request was read"
            )
        # 405, 406 or 422: re-read the status, which names the blocker.
        merge_request = self._load(iid, branch)
        self._check_mergeable(merge_request)
        raise PullRequestStateError(
            f"merge request !{iid} cannot be merged: HTTP {response.status_code} "
            f"({detail})"
        )
