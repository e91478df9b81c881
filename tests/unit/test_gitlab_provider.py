"""Tests of the GitLab merge-request provider against a stateful fake GitLab API.

`FakeGitLab` is an `httpx.MockTransport` handler that keeps commits,
branches, files, merge requests and pipeline jobs in memory and serves the
v4 REST endpoints that `GitLabProvider` calls with GitLab's documented shapes.
Path parameters arrive URL-encoded (`remediation%2Fincident-1`), as GitLab
requires, so the fake routes on the raw path.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from pydantic import SecretStr

from activities.gitops.forge import (
    ForgeRequestError,
    ForgeUnavailableError,
    MergeBlockedError,
    UnsupportedStrategyError,
)
from activities.gitops.gitlab import GitLabProvider
from activities.gitops.local_provider import (
    NothingToRollBackError,
    PullRequestStateError,
    RollbackConflictError,
)
from workflows.models import (
    ChangeResult,
    ClosePullRequestInput,
    Decision,
    Evidence,
    ImageChange,
    MergeInput,
    PullRequestInput,
)

TOKEN = "glpat-TESTTOKENdoNotLeak987654"
PROJECT = "platform/gitops"
PROJECT_ID = "platform%2Fgitops"
FILE = "apps/shop/cart/deployment.yaml"
LOCATION = "0.spec.template.spec.containers.0.image"
GOOD = "registry.example/cart:1.0"
BAD = "registry.example/cart:1.1"
MANIFEST = """# cart deployment
apiVersion: apps/v1
kind: Deployment
metadata:
  name: cart
spec:
  template:
    spec:
      containers:
        - name: cart
          image: {image}  # pinned by CI
"""
INCIDENT = "incident-shop-cart-1"
BRANCH = f"remediation/{INCIDENT}"


@dataclass
class Commit:
    id: str
    tree: dict[str, str]
    parents: list[str]
    message: str


@dataclass
class FakeGitLab:
    """In-memory GitLab project `platform/gitops` behind the v4 REST API."""

    token: str = TOKEN
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    merge_requests: list[dict] = field(default_factory=list)
    notes: dict[int, list[str]] = field(default_factory=dict)
    jobs: list[dict] = field(default_factory=list)
    merge_status: str = "mergeable"
    requests: list[httpx.Request] = field(default_factory=list)
    fail_next: list[tuple[str, str, int]] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.root = self.commit({FILE: MANIFEST.format(image=GOOD)}, [], "initial")
        self.bad = self.commit({FILE: MANIFEST.format(image=BAD)}, [self.root], "1.1")
        self.branches["main"] = self.bad

    def commit(self, tree: dict[str, str], parents: list[str], message: str) -> str:
        sha = hashlib.sha1(f"{next(self.counter)}{message}".encode()).hexdigest()
        self.commits[sha] = Commit(sha, dict(tree), list(parents), message)
        return sha

    def resolve(self, ref: str) -> str | None:
        if ref in self.branches:
            return self.branches[ref]
        return ref if ref in self.commits else None

    # --- HTTP -------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("PRIVATE-TOKEN") != self.token:
            return httpx.Response(401, json={"message": "401 Unauthorized"})
        raw = request.url.raw_path.decode().split("?", 1)[0]
        for index, (method, prefix, status) in enumerate(self.fail_next):
            if request.method == method and raw.startswith(prefix):
                del self.fail_next[index]
                return httpx.Response(status, json={"message": "500 Server Error"})
        base = f"/api/v4/projects/{PROJECT_ID}"
        if not raw.startswith(base):
            return _not_found("Project")
        body = json.loads(request.content) if request.content else {}
        routes = [
            ("GET", r"/repository/branches/([^/]+)", self.get_branch),
            ("DELETE", r"/repository/branches/([^/]+)", self.delete_branch),
            ("GET", r"/repository/files/([^/]+)", self.get_file),
            ("POST", r"/repository/commits", self.create_commit),
            ("GET", r"/merge_requests", self.list_mrs),
            ("POST", r"/merge_requests", self.create_mr),
            ("GET", r"/merge_requests/(\d+)", self.get_mr),
            ("PUT", r"/merge_requests/(\d+)", self.update_mr),
            ("PUT", r"/merge_requests/(\d+)/merge", self.merge_mr),
            ("PUT", r"/merge_requests/(\d+)/rebase", self.rebase_mr),
            ("POST", r"/merge_requests/(\d+)/notes", self.add_note),
            ("GET", r"/merge_requests/(\d+)/status_checks", self.status_checks),
            ("GET", r"/pipelines/(\d+)/jobs", self.pipeline_jobs),
        ]
        path = raw[len(base) :]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method == request.method:
                groups = [unquote(group) for group in match.groups()]
                return handler(*groups, params=request.url.params, body=body)
        return _not_found("Route")

    def branch_json(self, name: str) -> dict:
        commit = self.commits[self.branches[name]]
        return {
            "name": name,
            "commit": {"id": commit.id, "message": commit.message},
        }

    def get_branch(self, name: str, **_: Any) -> httpx.Response:
        if name not in self.branches:
            return _not_found("Branch")
        return httpx.Response(200, json=self.branch_json(name))

    def delete_branch(self, name: str, **_: Any) -> httpx.Response:
        if self.branches.pop(name, None) is None:
            return _not_found("Branch")
        return httpx.Response(204)

    def get_file(self, path: str, params: Any, **_: Any) -> httpx.Response:
        sha = self.resolve(params.get("ref", ""))
        if sha is None or path not in self.commits[sha].tree:
            return _not_found("File")
        text = self.commits[sha].tree[path]
        return httpx.Response(
            200,
            json={
                "file_path": path,
                "encoding": "base64",
                "content": base64.b64encode(text.encode()).decode(),
                "blob_id": hashlib.sha1(text.encode()).hexdigest(),
                "commit_id": sha,
            },
        )

    def create_commit(self, body: dict, **_: Any) -> httpx.Response:
        branch = body["branch"]
        start = body.get("start_sha") or body.get("start_branch")
        if start and branch in self.branches:
            return httpx.Response(
                400,
                json={"message": f"A branch called '{branch}' already exists."},
            )
        parent = self.resolve(start or branch)
        if parent is None:
            return httpx.Response(400, json={"message": "You can only create or edit"})
        tree = dict(self.commits[parent].tree)
        for action in body["actions"]:
            if action["action"] != "update" or action["file_path"] not in tree:
                return httpx.Response(400, json={"message": "A file with this name"})
            tree[action["file_path"]] = action["content"]
        sha = self.commit(tree, [parent], body["commit_message"])
        self.branches[branch] = sha
        return httpx.Response(
            201,
            json={"id": sha, "message": body["commit_message"], "parent_ids": [parent]},
        )

    def mr_json(self, mr: dict) -> dict:
        if mr["state"] == "opened" and mr["source_branch"] in self.branches:
            mr["sha"] = self.branches[mr["source_branch"]]
        status = "not_open" if mr["state"] != "opened" else self.merge_status
        if mr["state"] == "opened" and mr["title"].startswith("Draft: "):
            status = "draft_status"
        return {
            **mr,
            "draft": mr["title"].startswith("Draft: "),
            "detailed_merge_status": status,
            "web_url": f"https://gitlab.example/{PROJECT}/-/merge_requests/{mr['iid']}",
            "head_pipeline": {"id": 77, "status": "running"} if self.jobs else None,
            "rebase_in_progress": False,
        }

    def list_mrs(self, params: Any, **_: Any) -> httpx.Response:
        branch = params.get("source_branch")
        state = params.get("state", "all")
        found = [
            self.mr_json(mr)
            for mr in reversed(self.merge_requests)
            if (branch is None or mr["source_branch"] == branch)
            and (state == "all" or mr["state"] == state)
        ]
        return httpx.Response(200, json=found)

    def create_mr(self, body: dict, **_: Any) -> httpx.Response:
        branch = body["source_branch"]
        for mr in self.merge_requests:
            if mr["source_branch"] == branch and mr["state"] == "opened":
                message = "Another open merge request already exists for this "
                message += f"source branch: !{mr['iid']}"
                return httpx.Response(409, json={"message": [message]})
        mr = {
            "iid": len(self.merge_requests) + 1,
            "state": "opened",
            "title": body["title"],
            "description": body["description"],
            "source_branch": branch,
            "target_branch": body["target_branch"],
            "labels": body["labels"].split(","),
            "sha": self.branches[branch],
            "merge_commit_sha": None,
            "squash_commit_sha": None,
        }
        self.merge_requests.append(mr)
        return httpx.Response(201, json=self.mr_json(mr))

    def find(self, iid: str) -> dict | None:
        index = int(iid) - 1
        if 0 <= index < len(self.merge_requests):
            return self.merge_requests[index]
        return None

    def get_mr(self, iid: str, **_: Any) -> httpx.Response:
        mr = self.find(iid)
        if mr is None:
            return _not_found("Merge Request")
        return httpx.Response(200, json=self.mr_json(mr))

    def update_mr(self, iid: str, body: dict, **_: Any) -> httpx.Response:
        mr = self.find(iid)
        if mr is None:
            return _not_found("Merge Request")
        if body.get("state_event") == "close":
            mr["state"] = "closed"
        for label in (body.get("add_labels") or "").split(","):
            if label and label not in mr["labels"]:
                mr["labels"].append(label)
        return httpx.Response(200, json=self.mr_json(mr))

    def merge_mr(self, iid: str, body: dict, **_: Any) -> httpx.Response:
        mr = self.find(iid)
        if mr is None:
            return _not_found("Merge Request")
        current = self.mr_json(mr)
        if current["detailed_merge_status"] != "mergeable":
            return httpx.Response(405, json={"message": "405 Method Not Allowed"})
        if body.get("sha") and body["sha"] != current["sha"]:
            return httpx.Response(
                409, json={"message": "SHA does not match HEAD of source branch"}
            )
        target = self.branches[mr["target_branch"]]
        tree = self.commits[current["sha"]].tree
        if body.get("squash"):
            squash = self.commit(tree, [target], "squashed")
            merged = self.commit(tree, [target, squash], "Merge branch")
            mr["squash_commit_sha"] = squash
        else:
            merged = self.commit(tree, [target, current["sha"]], "Merge branch")
        self.branches[mr["target_branch"]] = merged
        mr.update(state="merged", merge_commit_sha=merged, squash=body.get("squash"))
        return httpx.Response(200, json=self.mr_json(mr))

    def rebase_mr(self, iid: str, **_: Any) -> httpx.Response:
        mr = self.find(iid)
        if mr is None:
            return _not_found("Merge Request")
        mr["rebased"] = True
        return httpx.Response(202, json={"rebase_in_progress": True})

    def add_note(self, iid: str, body: dict, **_: Any) -> httpx.Response:
        self.notes.setdefault(int(iid), []).append(body["body"])
        return httpx.Response(201, json={"id": 1, "body": body["body"]})

    def status_checks(self, iid: str, **_: Any) -> httpx.Response:
        return _not_found("Licensed feature")

    def pipeline_jobs(self, pipeline_id: str, **_: Any) -> httpx.Response:
        return httpx.Response(200, json=self.jobs)


def _not_found(what: str) -> httpx.Response:
    return httpx.Response(404, json={"message": f"404 {what} Not Found"})


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def fake() -> FakeGitLab:
    return FakeGitLab()


def make_provider(fake: FakeGitLab, merge_method: str = "merge") -> GitLabProvider:
    return GitLabProvider(
        PROJECT,
        SecretStr(TOKEN),
        api_url="https://gitlab.example/api/v4",
        merge_method=merge_method,
        transport=httpx.MockTransport(fake),
        rebase_poll_seconds=0.0,
    )


def make_request(fake: FakeGitLab, **fields: Any) -> PullRequestInput:
    return PullRequestInput(
        incident_id=INCIDENT,
        namespace="shop",
        app="cart",
        change=ChangeResult(
            found=True,
            repo_url=f"https://gitlab.example/{PROJECT}.git",
            path="apps/shop/cart",
            suspect_revision=fake.bad,
            last_good_revision=fake.root,
            image_changes=[
                ImageChange(file=FILE, location=LOCATION, good=GOOD, bad=BAD)
            ],
        ),
        decision=Decision(allow=True, action="rollback", reasons=["error ratio high"]),
        evidence=Evidence(namespace="shop", app="cart", has_data=True, error_ratio=0.4),
        **fields,
    )


def merge_input(pull: Any) -> MergeInput:
    return MergeInput(incident_id=INCIDENT, pull_request=pull)


# --- open -----------------------------------------------------------------------


def test_open_commits_pin_on_new_branch(fake: FakeGitLab) -> None:
    pull = make_provider(fake).open(make_request(fake))

    head = fake.branches[BRANCH]
    assert pull.provider == "gitlab"
    assert pull.number == 1
    assert pull.branch == BRANCH
    assert pull.state == "open"
    assert pull.head_commit == head
    assert pull.url.endswith("/-/merge_requests/1")
    assert fake.commits[head].tree[FILE] == MANIFEST.format(image=GOOD)
    assert fake.commits[head].parents == [fake.bad]
    assert f"Remediation-Incident: {INCIDENT}" in fake.commits[head].message
    assert fake.merge_requests[0]["labels"] == ["remediation"]


def test_open_twice_reuses_branch_and_mr(fake: FakeGitLab) -> None:
    provider = make_provider(fake)
    first = provider.open(make_request(fake))
    second = provider.open(make_request(fake))

    assert second == first
    assert len(fake.merge_requests) == 1
    commits = [r for r in fake.requests if r.url.path.endswith("/repository/commits")]
    assert len(commits) == 1


def test_open_reuses_branch_after_lost_mr(fake: FakeGitLab) -> None:
    fake.fail_next.append(
        ("POST", f"/api/v4/projects/{PROJECT_ID}/merge_requests", 502)
    )
    provider = make_provider(fake)

    with pytest.raises(ForgeUnavailableError):
        provider.open(make_request(fake))
    head = fake.branches[BRANCH]
    pull = provider.open(make_request(fake))

    assert pull.head_commit == head
    assert fake.branches[BRANCH] == head
    assert len(fake.merge_requests) == 1


def test_open_draft_is_labelled_shadow(fake: FakeGitLab) -> None:
    pull = make_provider(fake).open(make_request(fake, draft=True))

    assert pull.draft is True
    assert pull.title.startswith("Roll back shop/cart")
    assert fake.merge_requests[0]["title"].startswith("Draft: ")
    assert fake.merge_requests[0]["labels"] == ["remediation", "shadow"]


def test_open_rejects_foreign_branch(fake: FakeGitLab) -> None:
    fake.branches[BRANCH] = fake.commit({FILE: "x: 1\n"}, [fake.bad], "other work")

    with pytest.raises(Exception, match="was not made for incident"):
        make_provider(fake).open(make_request(fake))


def test_open_nothing_to_roll_back(fake: FakeGitLab) -> None:
    fake.branches["main"] = fake.root

    with pytest.raises(NothingToRollBackError):
        make_provider(fake).open(make_request(fake))
    assert BRANCH not in fake.branches


def test_open_revert_unsupported(fake: FakeGitLab) -> None:
    with pytest.raises(UnsupportedStrategyError):
        make_provider(fake).open(make_request(fake, strategy="revert"))


# --- merge ----------------------------------------------------------------------


def test_merge_creates_merge_commit(fake: FakeGitLab) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    merged = provider.merge(merge_input(pull))

    assert merged.state == "merged"
    assert merged.merge_commit == fake.branches["main"]
    assert fake.commits[fake.branches["main"]].tree[FILE] == MANIFEST.format(image=GOOD)


def test_merge_squash_sets_squash(fake: FakeGitLab) -> None:
    provider = make_provider(fake, merge_method="squash")
    pull = provider.open(make_request(fake))

    provider.merge(merge_input(pull))

    assert fake.merge_requests[0]["squash"] is True


def test_merge_rebase_rebases_first(fake: FakeGitLab) -> None:
    provider = make_provider(fake, merge_method="rebase")
    pull = provider.open(make_request(fake))

    merged = provider.merge(merge_input(pull))

    assert fake.merge_requests[0]["rebased"] is True
    assert merged.state == "merged"


def test_merge_twice_is_noop(fake: FakeGitLab) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    first = provider.merge(merge_input(pull))
    second = provider.merge(merge_input(pull))

    assert second.merge_commit == first.merge_commit
    merges = [r for r in fake.requests if r.url.path.endswith("/merge")]
    assert len(merges) == 1


def test_merge_blocked_by_pipeline(fake: FakeGitLab) -> None:
    fake.merge_status = "ci_still_running"
    fake.jobs = [
        {"id": 1, "name": "unit-tests", "status": "running"},
        {"id": 2, "name": "lint", "status": "success"},
    ]
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    with pytest.raises(MergeBlockedError) as caught:
        provider.merge(merge_input(pull))

    assert caught.value.checks == ["unit-tests (running)"]
    assert "unit-tests" in str(caught.value)
    assert caught.value.error_type == "MergeBlocked"
    assert fake.merge_requests[0]["state"] == "opened"


def test_merge_pending_status_is_retryable(fake: FakeGitLab) -> None:
    fake.merge_status = "checking"
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    with pytest.raises(ForgeUnavailableError, match="checking"):
        provider.merge(merge_input(pull))


def test_merge_conflict_reported(fake: FakeGitLab) -> None:
    fake.merge_status = "conflict"
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    with pytest.raises(RollbackConflictError):
        provider.merge(merge_input(pull))


def test_merge_rejects_draft(fake: FakeGitLab) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake, draft=True))

    with pytest.raises(PullRequestStateError, match="draft"):
        provider.merge(merge_input(pull))


# --- close ----------------------------------------------------------------------


def test_close_closes_and_deletes_branch(fake: FakeGitLab) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    request = ClosePullRequestInput(
        incident_id=INCIDENT, pull_request=pull, reason="aborted: token=abc"
    )

    closed = provider.close(request)
    again = provider.close(request)

    assert closed.state == "closed"
    assert again.state == "closed"
    assert BRANCH not in fake.branches
    assert fake.notes[1] == ["Closed by Remediator: aborted: token=***"]


def test_close_merged_changes_nothing(fake: FakeGitLab) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    provider.merge(merge_input(pull))

    result = provider.close(
        ClosePullRequestInput(incident_id=INCIDENT, pull_request=pull)
    )

    assert result.state == "merged"


# --- errors and secrets ---------------------------------------------------------


def test_server_error_is_retryable(fake: FakeGitLab) -> None:
    fake.fail_next.append(("GET", f"/api/v4/projects/{PROJECT_ID}/merge_requests", 500))

    with pytest.raises(ForgeUnavailableError, match="HTTP 500"):
        make_provider(fake).open(make_request(fake))


def test_bad_token_not_retryable(fake: FakeGitLab) -> None:
    fake.token = "another"

    with pytest.raises(ForgeRequestError) as caught:
        make_provider(fake).open(make_request(fake))

    assert caught.value.status_code == 401


def test_token_never_logged_or_committed(
    fake: FakeGitLab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.merge_status = "ci_must_pass"
    fake.jobs = [{"id": 1, "name": "unit-tests", "status": "failed"}]
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    with pytest.raises(MergeBlockedError) as caught:
        provider.merge(merge_input(pull))

    assert all(r.headers["PRIVATE-TOKEN"] == TOKEN for r in fake.requests)
    assert TOKEN not in caplog.text
    assert TOKEN not in str(caught.value)
    for commit in fake.commits.values():
        assert TOKEN not in commit.message
    for request in fake.requests:
        assert TOKEN not in str(request.url)
        assert TOKEN.encode() not in request.content
