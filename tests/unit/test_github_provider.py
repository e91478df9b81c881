"""Tests of the GitHub pull-request provider against a stateful fake GitHub API.

`FakeGitHub` is an `httpx.MockTransport` handler that keeps commits, refs,
files, pull requests, labels and check runs in memory and serves the REST
endpoints that `GitHubProvider` calls with GitHub's documented shapes.
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

import httpx
import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from activities.gitops.activities import GitOpsActivities
from activities.gitops.forge import (
    ForgeRequestError,
    ForgeUnavailableError,
    MergeBlockedError,
    UnsupportedStrategyError,
)
from activities.gitops.github import GitHubProvider
from activities.gitops.local_provider import (
    NothingToRollBackError,
    PullRequestStateError,
)
from remediator.settings import GitSettings
from workflows.models import (
    ChangeResult,
    ClosePullRequestInput,
    Decision,
    Evidence,
    ImageChange,
    MergeInput,
    PullRequestInput,
)

TOKEN = "ghp_TESTTOKENdoNotLeak0123456789"
REPO = "acme/gitops"
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
VALUES_FILE = "apps/shop/cart/values.yaml"
VALUES = "image:\n  repository: registry.example/cart\n  tag: {tag}\n"


def _sha(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


@dataclass
class Commit:
    sha: str
    tree: dict[str, str]
    parents: list[str]
    message: str


@dataclass
class FakeGitHub:
    """In-memory GitHub repository `acme/gitops` behind the REST API."""

    token: str = TOKEN
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    pulls: list[dict] = field(default_factory=list)
    labels: dict[int, list[str]] = field(default_factory=dict)
    comments: dict[int, list[str]] = field(default_factory=dict)
    required_checks: list[str] = field(default_factory=list)
    check_runs: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    fail_next: list[tuple[str, str, int]] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        root = self.commit(
            {FILE: MANIFEST.format(image=GOOD), VALUES_FILE: VALUES.format(tag="v1.0")},
            [],
            "initial",
        )
        bad = self.commit(
            {FILE: MANIFEST.format(image=BAD), VALUES_FILE: VALUES.format(tag="v1.0")},
            [root],
            "bump cart to 1.1",
        )
        self.refs["main"] = bad
        self.root = root
        self.bad = bad

    # --- repository model -------------------------------------------------------

    def commit(self, tree: dict[str, str], parents: list[str], message: str) -> str:
        sha = _sha(str(next(self.counter)), message, *parents)
        self.commits[sha] = Commit(sha, dict(tree), list(parents), message)
        return sha

    def ancestors(self, sha: str) -> set[str]:
        seen: set[str] = set()
        stack = [sha]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.commits[current].parents)
        return seen

    def resolve(self, ref: str) -> str | None:
        if ref in self.refs:
            return self.refs[ref]
        return ref if ref in self.commits else None

    # --- HTTP -------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"message": "Bad credentials"})
        path = request.url.path
        for index, (method, prefix, status) in enumerate(self.fail_next):
            if request.method == method and path.startswith(prefix):
                del self.fail_next[index]
                return httpx.Response(status, json={"message": "Server Error"})
        body = json.loads(request.content) if request.content else {}
        base = f"/repos/{REPO}"
        if not path.startswith(base):
            return _not_found()
        return self.route(request.method, path[len(base) :], request.url.params, body)

    def route(self, method: str, path: str, params: Any, body: dict) -> httpx.Response:
        routes = [
            ("GET", r"/git/ref/heads/(.+)", self.get_ref),
            ("POST", r"/git/refs", self.create_ref),
            ("DELETE", r"/git/refs/heads/(.+)", self.delete_ref),
            ("GET", r"/git/commits/([0-9a-f]{40})", self.get_commit),
            ("GET", r"/compare/(.+)\.\.\.(.+)", self.compare),
            ("GET", r"/contents/(.+)", self.get_contents),
            ("PUT", r"/contents/(.+)", self.put_contents),
            ("GET", r"/pulls", self.list_pulls),
            ("POST", r"/pulls", self.create_pull),
            ("GET", r"/pulls/(\d+)", self.get_pull),
            ("PATCH", r"/pulls/(\d+)", self.update_pull),
            ("PUT", r"/pulls/(\d+)/merge", self.merge_pull),
            ("POST", r"/issues/(\d+)/labels", self.add_labels),
            ("POST", r"/issues/(\d+)/comments", self.add_comment),
            ("GET", r"/commits/([0-9a-f]{40})/check-runs", self.list_check_runs),
            ("GET", r"/commits/([0-9a-f]{40})/status", self.combined_status),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                return handler(*match.groups(), params=params, body=body)
        return _not_found()

    def get_ref(self, branch: str, **_: Any) -> httpx.Response:
        if branch not in self.refs:
            return _not_found()
        return httpx.Response(
            200,
            json={
                "ref": f"refs/heads/{branch}",
                "object": {"type": "commit", "sha": self.refs[branch]},
            },
        )

    def create_ref(self, body: dict, **_: Any) -> httpx.Response:
        branch = body["ref"].removeprefix("refs/heads/")
        if branch in self.refs:
            return _unprocessable("Reference already exists")
        if body["sha"] not in self.commits:
            return _unprocessable("Object does not exist")
        self.refs[branch] = body["sha"]
        return httpx.Response(
            201, json={"ref": body["ref"], "object": {"sha": body["sha"]}}
        )

    def delete_ref(self, branch: str, **_: Any) -> httpx.Response:
        if self.refs.pop(branch, None) is None:
            return _unprocessable("Reference does not exist")
        return httpx.Response(204)

    def get_commit(self, sha: str, **_: Any) -> httpx.Response:
        commit = self.commits.get(sha)
        if commit is None:
            return _not_found()
        parents = [{"sha": parent} for parent in commit.parents]
        return httpx.Response(
            200, json={"sha": sha, "message": commit.message, "parents": parents}
        )

    def compare(self, base: str, head: str, **_: Any) -> httpx.Response:
        base_sha, head_sha = self.resolve(base), self.resolve(head)
        if base_sha is None or head_sha is None:
            return _not_found()
        ahead = self.ancestors(head_sha) - self.ancestors(base_sha)
        behind = self.ancestors(base_sha) - self.ancestors(head_sha)
        status = "identical" if not ahead and not behind else "diverged"
        if ahead and not behind:
            status = "ahead"
        elif behind and not ahead:
            status = "behind"
        return httpx.Response(
            200,
            json={"status": status, "ahead_by": len(ahead), "behind_by": len(behind)},
        )

    def get_contents(self, path: str, params: Any, **_: Any) -> httpx.Response:
        sha = self.resolve(params.get("ref", "main"))
        if sha is None or path not in self.commits[sha].tree:
            return _not_found()
        text = self.commits[sha].tree[path]
        return httpx.Response(
            200,
            json={
                "type": "file",
                "encoding": "base64",
                "path": path,
                "sha": _sha("blob", text),
                "content": base64.encodebytes(text.encode()).decode(),
            },
        )

    def put_contents(self, path: str, body: dict, **_: Any) -> httpx.Response:
        branch = body["branch"]
        head = self.refs.get(branch)
        if head is None:
            return _not_found()
        tree = dict(self.commits[head].tree)
        if path in tree and body.get("sha") != _sha("blob", tree[path]):
            return httpx.Response(409, json={"message": f"{path} does not match"})
        if path not in tree and "sha" in body:
            return _unprocessable('"sha" was supplied for a new file')
        tree[path] = base64.b64decode(body["content"]).decode()
        sha = self.commit(tree, [head], body["message"])
        self.refs[branch] = sha
        return httpx.Response(
            200,
            json={
                "content": {"path": path, "sha": _sha("blob", tree[path])},
                "commit": {"sha": sha, "message": body["message"]},
            },
        )

    def pull_json(self, pull: dict) -> dict:
        head = self.refs.get(pull["head"], pull["head_sha"])
        if pull["state"] == "open":
            pull["head_sha"] = head
        blocked = bool(self.missing_checks(pull["head_sha"]))
        return {
            "number": pull["number"],
            "html_url": f"https://github.com/{REPO}/pull/{pull['number']}",
            "state": pull["state"],
            "title": pull["title"],
            "body": pull["body"],
            "draft": pull["draft"],
            "merged": pull["merged_at"] is not None,
            "merged_at": pull["merged_at"],
            "merge_commit_sha": pull["merge_commit_sha"],
            "mergeable_state": "blocked" if blocked else "clean",
            "head": {"ref": pull["head"], "sha": pull["head_sha"]},
            "base": {"ref": pull["base"]},
            "labels": [{"name": name} for name in self.labels.get(pull["number"], [])],
        }

    def list_pulls(self, params: Any, **_: Any) -> httpx.Response:
        owner, _, branch = params.get("head", ":").partition(":")
        state = params.get("state", "open")
        pulls = [
            self.pull_json(pull)
            for pull in reversed(self.pulls)
            if (not branch or (owner == "acme" and pull["head"] == branch))
            and (state == "all" or pull["state"] == state)
        ]
        return httpx.Response(200, json=pulls)

    def create_pull(self, body: dict, **_: Any) -> httpx.Response:
        branch = body["head"]
        if branch not in self.refs:
            return _unprocessable("Field head is invalid")
        if any(p["head"] == branch and p["state"] == "open" for p in self.pulls):
            return _unprocessable(f"A pull request already exists for acme:{branch}.")
        if self.refs[branch] in self.ancestors(self.refs[body["base"]]):
            return _unprocessable(f"No commits between {body['base']} and {branch}")
        pull = {
            "number": len(self.pulls) + 1,
            "state": "open",
            "title": body["title"],
            "body": body["body"],
            "draft": body.get("draft", False),
            "head": branch,
            "head_sha": self.refs[branch],
            "base": body["base"],
            "merged_at": None,
            "merge_commit_sha": None,
        }
        self.pulls.append(pull)
        return httpx.Response(201, json=self.pull_json(pull))

    def find(self, number: str) -> dict | None:
        index = int(number) - 1
        return self.pulls[index] if 0 <= index < len(self.pulls) else None

    def get_pull(self, number: str, **_: Any) -> httpx.Response:
        pull = self.find(number)
        return httpx.Response(200, json=self.pull_json(pull)) if pull else _not_found()

    def update_pull(self, number: str, body: dict, **_: Any) -> httpx.Response:
        pull = self.find(number)
        if pull is None:
            return _not_found()
        if "state" in body:
            pull["state"] = body["state"]
        return httpx.Response(200, json=self.pull_json(pull))

    def missing_checks(self, sha: str) -> list[str]:
        return [
            name
            for name in self.required_checks
            if self.check_runs.get(name, ("queued", None))[1] != "success"
        ]

    def merge_pull(self, number: str, body: dict, **_: Any) -> httpx.Response:
        pull = self.find(number)
        if pull is None:
            return _not_found()
        if pull["merged_at"] or pull["state"] != "open":
            return httpx.Response(
                405, json={"message": "Pull Request is not mergeable"}
            )
        head = self.refs[pull["head"]]
        if body.get("sha") and body["sha"] != head:
            return httpx.Response(
                409, json={"message": "Head branch was modified. Review and try again."}
            )
        missing = self.missing_checks(head)
        if len(missing) == 1:
            return httpx.Response(
                405,
                json={"message": f'Required status check "{missing[0]}" is expected.'},
            )
        if missing:
            count = len(self.required_checks)
            return httpx.Response(
                405,
                json={
                    "message": f"{len(missing)} of {count} required status checks "
                    "are expected."
                },
            )
        target = self.refs[pull["base"]]
        tree = self.commits[head].tree
        method = body.get("merge_method", "merge")
        parents = [target, head] if method == "merge" else [target]
        merged = self.commit(tree, parents, body.get("commit_title", "merge"))
        self.refs[pull["base"]] = merged
        pull.update(merged_at="2026-01-01T00:00:00Z", merge_commit_sha=merged)
        pull["state"] = "closed"
        pull["merge_method"] = method
        return httpx.Response(
            200,
            json={"sha": merged, "merged": True, "message": "Pull Request merged"},
        )

    def add_labels(self, number: str, body: dict, **_: Any) -> httpx.Response:
        labels = self.labels.setdefault(int(number), [])
        for name in body["labels"]:
            if name not in labels:
                labels.append(name)
        return httpx.Response(200, json=[{"name": name} for name in labels])

    def add_comment(self, number: str, body: dict, **_: Any) -> httpx.Response:
        self.comments.setdefault(int(number), []).append(body["body"])
        return httpx.Response(201, json={"id": 1, "body": body["body"]})

    def list_check_runs(self, sha: str, **_: Any) -> httpx.Response:
        runs = [
            {"name": name, "status": status, "conclusion": conclusion}
            for name, (status, conclusion) in self.check_runs.items()
        ]
        return httpx.Response(200, json={"total_count": len(runs), "check_runs": runs})

    def combined_status(self, sha: str, **_: Any) -> httpx.Response:
        return httpx.Response(200, json={"state": "success", "statuses": []})


def _not_found() -> httpx.Response:
    return httpx.Response(404, json={"message": "Not Found"})


def _unprocessable(message: str) -> httpx.Response:
    return httpx.Response(
        422, json={"message": "Validation Failed", "errors": [message]}
    )


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def fake() -> FakeGitHub:
    return FakeGitHub()


def make_provider(fake: FakeGitHub, merge_method: str = "merge") -> GitHubProvider:
    return GitHubProvider(
        REPO,
        SecretStr(TOKEN),
        api_url="https://api.github.test",
        merge_method=merge_method,
        transport=httpx.MockTransport(fake),
    )


def make_request(
    fake: FakeGitHub, incident: str = "incident-shop-cart-1", **fields: Any
) -> PullRequestInput:
    changes = fields.pop(
        "image_changes",
        [ImageChange(file=FILE, location=LOCATION, good=GOOD, bad=BAD)],
    )
    return PullRequestInput(
        incident_id=incident,
        namespace="shop",
        app="cart",
        change=ChangeResult(
            found=True,
            repo_url=f"https://github.com/{REPO}.git",
            path="apps/shop/cart",
            suspect_revision=fake.bad,
            last_good_revision=fake.root,
            image_changes=changes,
        ),
        decision=Decision(allow=True, action="rollback", reasons=["error ratio high"]),
        evidence=Evidence(namespace="shop", app="cart", has_data=True, error_ratio=0.4),
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        **fields,
    )


def file_on(fake: FakeGitHub, ref: str, path: str = FILE) -> str:
    return fake.commits[fake.resolve(ref)].tree[path]


# --- open -----------------------------------------------------------------------


def test_open_pins_image_on_branch(fake: FakeGitHub) -> None:
    pull = make_provider(fake).open(make_request(fake))

    branch = "remediation/incident-shop-cart-1"
    assert pull.provider == "github"
    assert pull.number == 1
    assert pull.branch == branch
    assert pull.target_branch == "main"
    assert pull.state == "open"
    assert pull.url == f"https://github.com/{REPO}/pull/1"
    assert pull.head_commit == fake.refs[branch]
    assert file_on(fake, branch) == MANIFEST.format(image=GOOD)
    assert fake.labels[1] == ["remediation"]
    message = fake.commits[fake.refs[branch]].message
    assert "Remediation-Incident: incident-shop-cart-1" in message
    assert "Remediation-Trace-Id: 4bf92f3577b34da6a3ce929d0e0e4736" in message


def test_open_twice_reuses_branch_and_pull(fake: FakeGitHub) -> None:
    provider = make_provider(fake)
    first = provider.open(make_request(fake))
    second = provider.open(make_request(fake))

    assert second == first
    assert len(fake.pulls) == 1
    branches = [name for name in fake.refs if name.startswith("remediation/")]
    assert branches == ["remediation/incident-shop-cart-1"]
    puts = [
        r for r in fake.requests if r.method == "PUT" and "/contents/" in r.url.path
    ]
    assert len(puts) == 1


def test_open_completes_interrupted_attempt(fake: FakeGitHub) -> None:
    """A branch with the first of two files committed gets only the second."""
    values = ImageChange(
        file=VALUES_FILE, location="0.image.tag", good="v0.9", bad="v1.0"
    )
    changes = [ImageChange(file=FILE, location=LOCATION, good=GOOD, bad=BAD), values]
    branch = "remediation/incident-shop-cart-1"
    fake.fail_next.append(("PUT", f"/repos/{REPO}/contents/{VALUES_FILE}", 502))
    provider = make_provider(fake)

    with pytest.raises(ForgeUnavailableError):
        provider.open(make_request(fake, image_changes=changes))
    assert branch in fake.refs
    assert fake.pulls == []

    pull = provider.open(make_request(fake, image_changes=changes))
    assert file_on(fake, branch) == MANIFEST.format(image=GOOD)
    assert file_on(fake, branch, VALUES_FILE) == VALUES.format(tag="v0.9")
    assert pull.head_commit == fake.refs[branch]
    assert len(fake.pulls) == 1


def test_open_draft_has_shadow_label(fake: FakeGitHub) -> None:
    pull = make_provider(fake).open(make_request(fake, draft=True))

    assert pull.draft is True
    assert fake.labels[1] == ["remediation", "shadow"]


def test_open_rejects_foreign_branch(fake: FakeGitHub) -> None:
    other = fake.commit({FILE: "x: 1\n"}, [fake.bad], "someone else")
    fake.refs["remediation/incident-shop-cart-1"] = other

    with pytest.raises(Exception, match="was not made for incident"):
        make_provider(fake).open(make_request(fake))


def test_open_nothing_to_roll_back(fake: FakeGitHub) -> None:
    fake.refs["main"] = fake.root

    with pytest.raises(NothingToRollBackError):
        make_provider(fake).open(make_request(fake))
    assert "remediation/incident-shop-cart-1" not in fake.refs


def test_open_revert_unsupported(fake: FakeGitHub) -> None:
    request = make_request(fake, strategy="revert")

    with pytest.raises(UnsupportedStrategyError, match="only the pin strategy"):
        make_provider(fake).open(request)


# --- merge ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["merge", "squash", "rebase"])
def test_merge_uses_configured_method(fake: FakeGitHub, method: str) -> None:
    provider = make_provider(fake, merge_method=method)
    pull = provider.open(make_request(fake))

    merged = provider.merge(
        MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )

    assert merged.state == "merged"
    assert merged.merge_commit == fake.refs["main"]
    assert fake.pulls[0]["merge_method"] == method
    assert file_on(fake, "main") == MANIFEST.format(image=GOOD)


def test_merge_twice_is_noop(fake: FakeGitHub) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    request = MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)

    first = provider.merge(request)
    second = provider.merge(request)

    assert second.merge_commit == first.merge_commit
    merges = [r for r in fake.requests if r.url.path.endswith("/merge")]
    assert len(merges) == 1


def test_merge_blocked_by_required_check(fake: FakeGitHub) -> None:
    fake.required_checks = ["ci/test"]
    fake.check_runs = {
        "ci/test": ("in_progress", None),
        "lint": ("completed", "success"),
    }
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    with pytest.raises(MergeBlockedError) as caught:
        provider.merge(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )

    assert "ci/test" in str(caught.value)
    assert caught.value.checks == ["ci/test (in_progress)"]
    assert caught.value.error_type == "MergeBlocked"
    assert fake.pulls[0]["merged_at"] is None


def test_merge_blocked_names_several_checks(fake: FakeGitHub) -> None:
    fake.required_checks = ["ci/test", "ci/build"]
    fake.check_runs = {
        "ci/test": ("completed", "failure"),
        "ci/build": ("queued", None),
    }
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    with pytest.raises(MergeBlockedError) as caught:
        provider.merge(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )

    assert "ci/test (failure)" in caught.value.checks
    assert "ci/build (queued)" in caught.value.checks


def test_merge_rejects_draft(fake: FakeGitHub) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake, draft=True))

    with pytest.raises(PullRequestStateError, match="draft"):
        provider.merge(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )


def test_merge_wrong_branch_rejected(fake: FakeGitHub) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))

    with pytest.raises(Exception, match="belongs to branch"):
        provider.merge(MergeInput(incident_id="incident-other", pull_request=pull))


# --- close ----------------------------------------------------------------------


def test_close_closes_and_deletes_branch(fake: FakeGitHub) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    request = ClosePullRequestInput(
        incident_id="incident-shop-cart-1", pull_request=pull, reason="aborted by sre"
    )

    closed = provider.close(request)
    again = provider.close(request)

    assert closed.state == "closed"
    assert again.state == "closed"
    assert "remediation/incident-shop-cart-1" not in fake.refs
    assert fake.comments[1] == ["Closed by Remediator: aborted by sre"]


def test_open_after_close_opens_new_pull(fake: FakeGitHub) -> None:
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    provider.close(
        ClosePullRequestInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )

    reopened = provider.open(make_request(fake))

    assert reopened.number == 2
    assert reopened.state == "open"


# --- errors and secrets ---------------------------------------------------------


def test_server_errors_are_retryable(fake: FakeGitHub) -> None:
    fake.fail_next.append(("GET", f"/repos/{REPO}/pulls", 503))

    with pytest.raises(ForgeUnavailableError, match="HTTP 503"):
        make_provider(fake).open(make_request(fake))


def test_rate_limit_is_retryable(fake: FakeGitHub) -> None:
    fake.fail_next.append(("GET", f"/repos/{REPO}/pulls", 429))

    with pytest.raises(ForgeUnavailableError, match="HTTP 429"):
        make_provider(fake).open(make_request(fake))


def test_timeout_is_retryable(fake: FakeGitHub) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    provider = GitHubProvider(
        REPO, SecretStr(TOKEN), transport=httpx.MockTransport(slow)
    )
    with pytest.raises(ForgeUnavailableError, match="timed out"):
        provider.open(make_request(fake))


def test_bad_token_not_retryable(fake: FakeGitHub) -> None:
    fake.token = "another"

    with pytest.raises(ForgeRequestError) as caught:
        make_provider(fake).open(make_request(fake))

    assert caught.value.status_code == 401
    assert "REMEDIATOR_GIT_TOKEN" in str(caught.value)


def test_token_never_logged_or_committed(
    fake: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.required_checks = ["ci/test"]
    provider = make_provider(fake)
    pull = provider.open(make_request(fake))
    with pytest.raises(MergeBlockedError) as caught:
        provider.merge(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )

    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in fake.requests)
    assert TOKEN not in caplog.text
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(provider.__dict__)
    for commit in fake.commits.values():
        assert TOKEN not in commit.message
    for pull_record in fake.pulls:
        assert TOKEN not in pull_record["body"]
    for request in fake.requests:
        assert TOKEN not in str(request.url)
        assert TOKEN.encode() not in request.content


def test_echoed_token_redacted_from_error(fake: FakeGitHub) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400, json={"message": f"bad header {request.headers['Authorization']}"}
        )

    provider = GitHubProvider(
        REPO, SecretStr(TOKEN), transport=httpx.MockTransport(echo)
    )
    with pytest.raises(ForgeRequestError) as caught:
        provider.open(make_request(fake))

    assert TOKEN not in str(caught.value)


# --- activity wiring ------------------------------------------------------------


async def test_activity_maps_merge_blocked(
    fake: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.required_checks = ["ci/test"]
    real_init = GitHubProvider.__init__

    def init(self: GitHubProvider, *args: Any, **kwargs: Any) -> None:
        kwargs["transport"] = httpx.MockTransport(fake)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(GitHubProvider, "__init__", init)
    settings = GitSettings(
        provider="github", repo_url=f"https://github.com/{REPO}", token=TOKEN
    )
    if "token" not in GitSettings.model_fields:
        # Until GitSettings has the field, the provider factory reads it by name.
        object.__setattr__(settings, "token", SecretStr(TOKEN))

    async def no_application(name: str) -> dict:
        return {}

    activities = GitOpsActivities(settings, no_application)
    pull = await activities.open_pull_request(make_request(fake))
    with pytest.raises(ApplicationError) as caught:
        await activities.merge_pull_request(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )

    assert caught.value.type == "MergeBlocked"
    assert caught.value.non_retryable is True
    assert "ci/test" in caught.value.message
