"""Tests of the git provider: rollback commits pushed to a plain git remote.

The remote is a real bare repository reached through a `file://` URL, so every
clone, fetch and push goes through git's transport, and the provider works in
its own work clone.
"""

from __future__ import annotations

import base64
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import git
import pytest
from pydantic import SecretStr

from activities.gitops.activities import GitOpsActivities
from activities.gitops.forge import UnsupportedStrategyError
from activities.gitops.local_provider import (
    InvalidInputError,
    NothingToRollBackError,
    PullRequestStateError,
    RollbackConflictError,
)
from activities.gitops.plain_remote import (
    PlainRemoteProvider,
    PushRejectedError,
    credential_env,
)
from activities.gitops.repository import GitOpsRepository, write_commit
from remediator.demo.seed import push_image, seed_repository
from remediator.settings import GitSettings
from workflows.models import (
    ChangeQuery,
    ChangeResult,
    ClosePullRequestInput,
    Decision,
    Evidence,
    MergeInput,
    PullRequest,
    PullRequestInput,
)

GOOD = "registry.example.test/shop/cart:1.10"
BAD = "registry.example.test/shop/cart:2.0.0"
OTHER = "registry.example.test/shop/cart:3.0.0"
INCIDENT = "incident-shop-cart-1"
BRANCH = f"remediation/{INCIDENT}"
TRAILER = f"Remediation-Incident: {INCIDENT}"


def _git(bare: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={bare}", *args], capture_output=True, text=True, check=True
    ).stdout


class Remote:
    """A seeded bare remote with one bad release on top of the good one."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        seed = seed_repository(tmp_path / "remote.git", "plain", "shop", "cart", GOOD)
        self.bare = seed.bare_path
        self.url = self.bare.as_uri()
        self.good = seed.commit
        self.bad = push_image(self.bare, "plain", "cart", BAD)
        reader = GitOpsRepository(str(self.bare), tmp_path / "reader")
        self.change = ChangeResult(
            found=True,
            repo_url=self.url,
            path="apps/cart",
            target_branch="main",
            suspect_revision=self.bad,
            last_good_revision=self.good,
            suspect_commits=[self.bad],
            image_changes=reader.image_changes("apps/cart", self.good, self.bad),
        )

    def provider(self, work: str = "work", **options) -> PlainRemoteProvider:
        return PlainRemoteProvider(self.url, self.tmp_path / work, **options)

    def main(self) -> str:
        return _git(self.bare, "rev-parse", "refs/heads/main").strip()

    def branches(self) -> list[str]:
        output = _git(self.bare, "for-each-ref", "--format=%(refname)", "refs/heads")
        return output.split()

    def rollback_commits(self) -> list[str]:
        output = _git(
            self.bare, "rev-list", "--fixed-strings", f"--grep={TRAILER}", "main"
        )
        return output.split()

    def image_on_main(self) -> str:
        text = _git(self.bare, "show", "main:apps/cart/deployment.yaml")
        return next(
            line.split("image:")[1].strip()
            for line in text.splitlines()
            if "image:" in line
        )

    def push_unrelated(self, path: str = "docs/NOTES.md") -> str:
        """Commit a file outside the application to main, as another user would."""
        repo = git.Repo(self.bare)
        head = self.main()
        commit = write_commit(
            repo,
            head,
            {path: b"someone else was here\n"},
            "Add notes\n",
            author_name="Someone",
            author_email="someone@example.test",
        )
        _git(self.bare, "update-ref", "refs/heads/main", commit, head)
        return commit


def _request(change: ChangeResult, **overrides) -> PullRequestInput:
    fields = {
        "incident_id": INCIDENT,
        "namespace": "shop",
        "app": "cart",
        "change": change,
        "decision": Decision(allow=True, action="rollback", engine="embedded"),
        "evidence": Evidence(
            namespace="shop", app="cart", has_data=True, error_ratio=0.31
        ),
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "strategy": "pin",
    }
    fields.update(overrides)
    return PullRequestInput(**fields)


def _merge(provider: PlainRemoteProvider, pull: PullRequest) -> PullRequest:
    return provider.merge(MergeInput(incident_id=INCIDENT, pull_request=pull))


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return Remote(tmp_path)


# --- open and merge ---


def test_open_prepares_local_commit_only(remote):
    before = remote.main()
    pull = remote.provider().open(_request(remote.change))
    assert pull.provider == "git"
    assert pull.number == 0
    assert pull.url == remote.url
    assert pull.branch == "main"
    assert pull.target_branch == "main"
    assert pull.state == "open"
    assert pull.merge_commit == ""
    assert remote.main() == before
    assert remote.branches() == ["refs/heads/main"]
    clone = git.Repo(remote.provider().clone.clone_dir)
    assert clone.commit(f"refs/heads/{BRANCH}").hexsha == pull.head_commit


def test_merge_pushes_one_commit(remote):
    provider = remote.provider()
    pull = provider.open(_request(remote.change))
    merged = _merge(provider, pull)
    assert merged.state == "merged"
    assert merged.merge_commit == pull.head_commit
    assert merged.branch == "main"
    assert remote.main() == merged.merge_commit
    assert remote.rollback_commits() == [merged.merge_commit]
    assert remote.image_on_main() == GOOD
    parent = _git(remote.bare, "rev-parse", f"{merged.merge_commit}^").strip()
    assert parent == remote.bad


def test_commit_message_has_trailers(remote):
    provider = remote.provider()
    merged = _merge(provider, provider.open(_request(remote.change)))
    message = _git(remote.bare, "log", "-1", "--format=%B", merged.merge_commit)
    assert message.startswith(f"Roll back shop/cart to {remote.good[:7]}\n")
    assert f"{TRAILER}\n" in message
    assert "Remediation-Trace-Id: 4bf92f3577b34da6a3ce929d0e0e4736" in message


def test_open_and_merge_twice_one_commit(remote):
    provider = remote.provider()
    first = _merge(provider, provider.open(_request(remote.change)))
    reopened = provider.open(_request(remote.change))
    assert reopened.state == "merged"
    assert reopened.merge_commit == first.merge_commit
    second = _merge(provider, reopened)
    assert second.merge_commit == first.merge_commit
    assert remote.rollback_commits() == [first.merge_commit]
    assert remote.main() == first.merge_commit


def test_open_twice_reuses_prepared_commit(remote):
    provider = remote.provider()
    first = provider.open(_request(remote.change))
    second = provider.open(_request(remote.change))
    assert second == first


def test_fresh_work_dir_finds_pushed_commit(remote):
    merged = _merge(remote.provider(), remote.provider().open(_request(remote.change)))
    other = remote.provider("other-work")
    again = _merge(other, merged)
    assert again.merge_commit == merged.merge_commit
    assert other.open(_request(remote.change)).state == "merged"


def test_similar_incident_id_not_matched(remote):
    provider = remote.provider()
    _merge(provider, provider.open(_request(remote.change)))
    with pytest.raises(NothingToRollBackError):
        # incident-shop-cart-1 is on main; incident-shop-cart-10 is not, and
        # main no longer has the bad image.
        provider.open(_request(remote.change, incident_id=f"{INCIDENT}0"))


# --- moved target and push races ---


def test_moved_target_rebases_commit(remote):
    provider = remote.provider()
    pull = provider.open(_request(remote.change))
    unrelated = remote.push_unrelated()
    merged = _merge(provider, pull)
    assert merged.merge_commit != pull.head_commit
    assert remote.rollback_commits() == [merged.merge_commit]
    parent = _git(remote.bare, "rev-parse", f"{merged.merge_commit}^").strip()
    assert parent == unrelated
    assert remote.image_on_main() == GOOD
    notes = _git(remote.bare, "show", "main:docs/NOTES.md")
    assert notes == "someone else was here\n"


def test_push_race_retried_once(remote, monkeypatch):
    provider = remote.provider()
    pull = provider.open(_request(remote.change))
    original = PlainRemoteProvider._push
    raced = []

    def push_after_someone_else(self, repo, head, branch):
        if not raced:
            raced.append(remote.push_unrelated(f"docs/race-{len(raced)}.md"))
        return original(self, repo, head, branch)

    monkeypatch.setattr(PlainRemoteProvider, "_push", push_after_someone_else)
    merged = _merge(provider, pull)
    assert remote.rollback_commits() == [merged.merge_commit]
    parent = _git(remote.bare, "rev-parse", f"{merged.merge_commit}^").strip()
    assert parent == raced[0]
    assert remote.main() == merged.merge_commit


def test_conflicting_target_change_rejected(remote):
    provider = remote.provider()
    pull = provider.open(_request(remote.change))
    push_image(remote.bare, "plain", "cart", OTHER)
    with pytest.raises(RollbackConflictError):
        _merge(provider, pull)
    assert remote.rollback_commits() == []
    assert remote.image_on_main() == OTHER


def test_remote_hook_rejection_is_permanent(remote):
    hook = remote.bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'main is protected' >&2\nexit 1\n")
    hook.chmod(0o755)
    provider = remote.provider()
    pull = provider.open(_request(remote.change))
    with pytest.raises(PushRejectedError):
        _merge(provider, pull)
    assert remote.rollback_commits() == []


# --- draft (shadow mode) ---


def test_draft_pushes_branch_only(remote):
    before = remote.main()
    provider = remote.provider()
    pull = provider.open(_request(remote.change, draft=True))
    assert pull.draft
    assert pull.state == "open"
    assert pull.branch == BRANCH
    assert pull.target_branch == "main"
    assert remote.main() == before
    assert remote.branches() == ["refs/heads/main", f"refs/heads/{BRANCH}"]
    head = _git(remote.bare, "rev-parse", f"refs/heads/{BRANCH}").strip()
    assert head == pull.head_commit
    assert remote.rollback_commits() == []


def test_draft_open_twice_same_branch(remote):
    first = remote.provider().open(_request(remote.change, draft=True))
    second = remote.provider("other-work").open(_request(remote.change, draft=True))
    assert second.head_commit == first.head_commit
    assert remote.branches() == ["refs/heads/main", f"refs/heads/{BRANCH}"]


def test_draft_merge_rejected(remote):
    provider = remote.provider()
    pull = provider.open(_request(remote.change, draft=True))
    with pytest.raises(PullRequestStateError):
        _merge(provider, pull)
    assert remote.rollback_commits() == []


def test_draft_close_deletes_remote_branch(remote):
    provider = remote.provider()
    pull = provider.open(_request(remote.change, draft=True))
    closed = provider.close(
        ClosePullRequestInput(incident_id=INCIDENT, pull_request=pull, reason="x")
    )
    assert closed.state == "closed"
    assert remote.branches() == ["refs/heads/main"]


# --- close ---


def test_close_deletes_local_branch(remote):
    provider = remote.provider()
    before = remote.main()
    pull = provider.open(_request(remote.change))
    closed = provider.close(
        ClosePullRequestInput(incident_id=INCIDENT, pull_request=pull, reason="abort")
    )
    assert closed.state == "closed"
    assert closed.provider == "git"
    assert remote.main() == before
    clone = git.Repo(provider.clone.clone_dir)
    assert f"refs/heads/{BRANCH}" not in [ref.path for ref in clone.references]
    again = provider.close(
        ClosePullRequestInput(incident_id=INCIDENT, pull_request=pull, reason="abort")
    )
    assert again.state == "closed"


def test_close_after_merge_keeps_merged(remote):
    provider = remote.provider()
    merged = _merge(provider, provider.open(_request(remote.change)))
    closed = provider.close(
        ClosePullRequestInput(incident_id=INCIDENT, pull_request=merged)
    )
    assert closed.state == "merged"
    assert closed.merge_commit == merged.merge_commit


# --- input checks ---


def test_revert_strategy_unsupported(remote):
    with pytest.raises(UnsupportedStrategyError):
        remote.provider().open(_request(remote.change, strategy="revert"))


def test_missing_target_branch(remote):
    change = remote.change.model_copy(update={"target_branch": "release"})
    with pytest.raises(InvalidInputError, match="release"):
        remote.provider().open(_request(change))


def test_empty_url_rejected(tmp_path):
    with pytest.raises(InvalidInputError, match="REMEDIATOR_GIT_REPO_URL"):
        PlainRemoteProvider("", tmp_path)


# --- credentials ---


def test_credential_env_header():
    env = credential_env("https://git.example.test/org/repo.git", SecretStr("t0k"))
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_CONFIG_COUNT"] == "1"
    assert env["GIT_CONFIG_KEY_0"] == "http.https://git.example.test/.extraHeader"
    expected = base64.b64encode(b"x-access-token:t0k").decode()
    assert env["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {expected}"


def test_credential_env_user_from_url():
    env = credential_env("https://oauth2@gitlab.example.test:8443/g/r.git", "t0k")
    assert (
        env["GIT_CONFIG_KEY_0"] == "http.https://gitlab.example.test:8443/.extraHeader"
    )
    expected = base64.b64encode(b"oauth2:t0k").decode()
    assert env["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {expected}"


def test_credential_env_appends_to_existing(monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_COUNT", "2")
    env = credential_env("https://git.example.test/r.git", "t0k")
    assert env["GIT_CONFIG_COUNT"] == "3"
    assert "GIT_CONFIG_KEY_2" in env


@pytest.mark.parametrize(
    "url", ["ssh://git@git.example.test/r.git", "git@host:r.git", "file:///srv/r.git"]
)
def test_credential_env_not_for_ssh_or_file(url):
    assert credential_env(url, "t0k") == {"GIT_TERMINAL_PROMPT": "0"}


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        type(self).seen.append(self.headers.get("Authorization", ""))
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[str]:
    _RecordingHandler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/org/repo.git"
    server.shutdown()
    server.server_close()


def test_token_sent_as_header_not_in_errors(recording_server, tmp_path, remote, caplog):
    token = "s3cr3t-token-value"
    provider = PlainRemoteProvider(recording_server, tmp_path / "w", token=token)
    change = remote.change.model_copy(update={"repo_url": recording_server})
    with pytest.raises(RuntimeError) as raised:
        provider.open(_request(change))
    expected = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    assert f"Basic {expected}" in _RecordingHandler.seen
    assert token not in str(raised.value)
    assert expected not in str(raised.value)
    assert token not in caplog.text
    config = provider.clone.clone_dir / ".git" / "config"
    assert not config.exists() or token not in config.read_text()


def test_record_url_has_no_credentials(remote, tmp_path):
    url = "https://user:pw@git.example.test/org/repo.git"
    provider = PlainRemoteProvider(url, tmp_path / "w")
    assert provider.public_url == "https://git.example.test/org/repo.git"
    record = provider._record("main", "main", "0" * 40, "t")
    assert "pw" not in record.url


# --- activity wiring ---


def test_activities_pick_git_provider(remote, tmp_path):
    settings = GitSettings(
        provider="git", repo_url=remote.url, work_dir=tmp_path / "activity-work"
    )

    async def no_application(name: str) -> dict:
        return {}

    activities = GitOpsActivities(settings, no_application)
    provider = activities._provider(remote.url)
    assert isinstance(provider, PlainRemoteProvider)
    assert provider.repo_url == remote.url


def test_activities_repo_url_from_record(remote, tmp_path):
    settings = GitSettings(provider="git", work_dir=tmp_path / "activity-work")

    async def no_application(name: str) -> dict:
        return {}

    activities = GitOpsActivities(settings, no_application)
    pull = remote.provider().open(_request(remote.change))
    assert activities._repo_url_of(pull) == remote.url


async def test_activities_open_and_merge(remote, tmp_path):
    settings = GitSettings(
        provider="git", repo_url=remote.url, work_dir=tmp_path / "activity-work"
    )

    async def no_application(name: str) -> dict:
        return {}

    activities = GitOpsActivities(settings, no_application)
    pull = await activities.open_pull_request(_request(remote.change))
    merged = await activities.merge_pull_request(
        MergeInput(incident_id=INCIDENT, pull_request=pull)
    )
    assert merged.merge_commit == remote.main()
    assert remote.rollback_commits() == [merged.merge_commit]


# --- reading over authenticated HTTP ---


class _BasicAuthStaticHandler(http.server.SimpleHTTPRequestHandler):
    """Serve a bare repository over git's dumb HTTP protocol behind basic auth."""

    expected = ""

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        if self.headers.get("Authorization", "") != type(self).expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_remote(remote) -> Iterator[str]:
    _git(remote.bare, "update-server-info")
    credentials = base64.b64encode(b"x-access-token:read-token").decode()
    _BasicAuthStaticHandler.expected = f"Basic {credentials}"

    def handler(*args):
        return _BasicAuthStaticHandler(*args, directory=str(remote.bare))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


async def test_find_change_uses_token(remote, http_remote, tmp_path):
    application = {
        "spec": {
            "source": {
                "repoURL": http_remote,
                "path": "apps/cart",
                "targetRevision": "main",
            }
        },
        "status": {
            "sync": {"revision": remote.bad},
            "history": [
                {"id": 1, "revision": remote.good},
                {"id": 2, "revision": remote.bad},
            ],
        },
    }

    async def get_application(name: str) -> dict:
        return application

    settings = GitSettings(
        provider="git",
        work_dir=tmp_path / "activity-work",
        token=SecretStr("read-token"),
    )
    activities = GitOpsActivities(settings, get_application)
    change = await activities.find_change(
        ChangeQuery(incident_id=INCIDENT, argocd_application="cart")
    )
    assert change.found, change.reason
    assert change.suspect_revision == remote.bad
    assert change.last_good_revision == remote.good
    assert change.repo_url == http_remote


def test_http_clone_without_token_fails(http_remote, tmp_path):
    provider = PlainRemoteProvider(http_remote, tmp_path / "w")
    with pytest.raises(RuntimeError, match="clone"):
        with provider._session():
            pass
