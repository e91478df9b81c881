"""Tests of the local pull-request provider and the pull-request activities."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import git
import pytest
from temporalio.exceptions import ApplicationError

from activities.gitops.activities import GitOpsActivities
from activities.gitops.local_provider import (
    InvalidInputError,
    LocalProvider,
    NothingToRollBackError,
    PullRequestStateError,
    RollbackConflictError,
    branch_for,
    scrub,
)
from activities.gitops.repository import GitOpsRepository, write_commit
from remediator.demo.seed import push_image, seed_repository
from remediator.settings import GitSettings
from workflows.models import (
    ChangeResult,
    ClosePullRequestInput,
    Decision,
    Evidence,
    MergeInput,
    PullRequestInput,
)

GOOD = "registry.example.test/shop/cart:1.10"
BAD = "registry.example.test/shop/cart:2.0.0"


def _git(bare: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={bare}", *args], capture_output=True, text=True, check=True
    ).stdout


def _change(
    bare: Path, layout: str, tmp_path: Path, good: str, bad: str
) -> ChangeResult:
    repository = GitOpsRepository(str(bare), tmp_path / "reader")
    return ChangeResult(
        found=True,
        repo_url=str(bare),
        path="apps/cart",
        target_branch="main",
        suspect_revision=bad,
        last_good_revision=good,
        suspect_commits=repository.commits_touching("apps/cart", good, bad),
        image_changes=repository.image_changes("apps/cart", good, bad),
    )


def _request(change: ChangeResult, **overrides) -> PullRequestInput:
    fields = {
        "incident_id": "incident-shop-cart-1",
        "namespace": "shop",
        "app": "cart",
        "change": change,
        "decision": Decision(
            allow=True,
            action="rollback",
            reasons=["error ratio 0.31 above 0.05 for 120 s", "token=hunter2 leaked"],
            engine="embedded",
        ),
        "evidence": Evidence(
            namespace="shop",
            app="cart",
            has_data=True,
            request_rate=12.5,
            error_ratio=0.31,
        ),
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "web_ui_url": "http://admin:secret@127.0.0.1:8233/namespaces/default/workflows/x",
        "strategy": "pin",
    }
    fields.update(overrides)
    return PullRequestInput(**fields)


class Setup:
    """A seeded bare repository with one bad release on top of the good one."""

    def __init__(self, tmp_path: Path, layout: str = "plain") -> None:
        self.tmp_path = tmp_path
        self.layout = layout
        self.seed = seed_repository(
            tmp_path / f"{layout}.git", layout, "shop", "cart", GOOD
        )
        self.good = self.seed.commit
        self.bad = push_image(self.seed.bare_path, layout, "cart", BAD)
        self.bare = self.seed.bare_path
        self.change = _change(self.bare, layout, tmp_path, self.good, self.bad)
        self.provider = LocalProvider(self.bare, tmp_path / "work")

    def main(self) -> str:
        return _git(self.bare, "rev-parse", "refs/heads/main").strip()

    def branches(self) -> list[str]:
        return _git(
            self.bare, "for-each-ref", "--format=%(refname)", "refs/heads"
        ).split()

    def records(self) -> list[Path]:
        return sorted((self.bare / "remediator" / "pulls").glob("*.json"))


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# --- open ---


def test_open_pin_creates_branch_record_and_ref(setup):
    pull = setup.provider.open(_request(setup.change))
    assert pull.provider == "local"
    assert pull.number == 1
    assert pull.branch == "remediation/incident-shop-cart-1"
    assert pull.state == "open"
    assert pull.title == f"Roll back shop/cart to {setup.good[:7]}"
    assert "refs/heads/remediation/incident-shop-cart-1" in setup.branches()
    assert _git(setup.bare, "rev-parse", "refs/pull/1/head").strip() == pull.head_commit
    record = json.loads(setup.records()[0].read_text())
    assert record["head_commit"] == pull.head_commit
    assert pull.url == setup.records()[0].as_uri()


def test_open_pin_restores_good_image(setup):
    pull = setup.provider.open(_request(setup.change))
    content = _git(setup.bare, "show", f"{pull.head_commit}:apps/cart/deployment.yaml")
    original = _git(setup.bare, "show", f"{setup.good}:apps/cart/deployment.yaml")
    assert content == original


def test_open_commit_message(setup):
    pull = setup.provider.open(_request(setup.change))
    message = _git(setup.bare, "log", "-1", "--format=%B", pull.head_commit)
    assert message.startswith(f"Roll back shop/cart to {setup.good[:7]}\n\n")
    assert "Remediation-Incident: incident-shop-cart-1\n" in message
    assert "Remediation-Trace-Id: 4bf92f3577b34da6a3ce929d0e0e4736\n" in message
    assert "error ratio 0.31 above 0.05 for 120 s" in message
    assert "Workflow: http://127.0.0.1:8233/namespaces/default/workflows/x" in message
    assert "secret" not in message
    assert "hunter2" not in message
    trailers = _git(
        setup.bare,
        "log",
        "-1",
        "--format=%(trailers:key=Remediation-Incident)",
        pull.head_commit,
    )
    assert trailers.strip() == "Remediation-Incident: incident-shop-cart-1"


def test_open_twice_returns_same_pull_request(setup):
    first = setup.provider.open(_request(setup.change))
    second = setup.provider.open(_request(setup.change))
    assert second == first
    assert len(setup.records()) == 1
    assert setup.branches() == [
        "refs/heads/main",
        "refs/heads/remediation/incident-shop-cart-1",
    ]
    assert _git(setup.bare, "rev-list", "--count", first.head_commit).strip() == "3"


def test_open_reuses_branch_pushed_without_record(setup):
    first = setup.provider.open(_request(setup.change))
    # An attempt that pushed the branch and crashed before writing its record.
    setup.records()[0].unlink()
    _git(setup.bare, "update-ref", "-d", "refs/pull/1/head")
    again = setup.provider.open(_request(setup.change))
    assert again.head_commit == first.head_commit
    assert len(setup.records()) == 1


def test_open_concurrently_creates_one_pull_request(setup):
    results = []
    errors = []

    def worker(work: str) -> None:
        try:
            provider = LocalProvider(setup.bare, setup.tmp_path / work)
            results.append(provider.open(_request(setup.change)))
        except BaseException as error:  # collected for the assert below
            errors.append(error)

    threads = [
        threading.Thread(target=worker, args=(f"work-{i % 2}",)) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({pull.number for pull in results}) == 1
    assert len({pull.head_commit for pull in results}) == 1
    assert len(setup.records()) == 1


def test_open_draft_flag(setup):
    pull = setup.provider.open(_request(setup.change, draft=True))
    assert pull.draft
    with pytest.raises(PullRequestStateError, match="draft"):
        setup.provider.merge(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )


def test_open_skips_values_changed_since(setup):
    push_image(setup.bare, "plain", "cart", "registry.example.test/shop/cart:3.0.0")
    with pytest.raises(NothingToRollBackError, match="3.0.0"):
        setup.provider.open(_request(setup.change))
    assert setup.branches() == ["refs/heads/main"]


def test_open_rejects_unsafe_incident_id(setup):
    for incident_id in ("../etc", "a b", "x..y", "-lead", "a/b", "x.lock", ""):
        with pytest.raises(InvalidInputError, match="invalid incident id"):
            setup.provider.open(_request(setup.change, incident_id=incident_id))
    assert setup.branches() == ["refs/heads/main"]


def test_open_rejects_unknown_strategy(setup):
    with pytest.raises(InvalidInputError, match="strategy"):
        setup.provider.open(_request(setup.change, strategy="delete"))


def test_open_revert_strategy(setup):
    pull = setup.provider.open(_request(setup.change, strategy="revert"))
    content = _git(setup.bare, "show", f"{pull.head_commit}:apps/cart/deployment.yaml")
    assert content == _git(
        setup.bare, "show", f"{setup.good}:apps/cart/deployment.yaml"
    )
    message = _git(setup.bare, "log", "-1", "--format=%B", pull.head_commit)
    assert "Remediation-Incident: incident-shop-cart-1" in message
    assert setup.bad in message


def test_open_revert_conflict(setup):
    push_image(setup.bare, "plain", "cart", "registry.example.test/shop/cart:3.0.0")
    with pytest.raises(RollbackConflictError):
        setup.provider.open(_request(setup.change, strategy="revert"))


def test_open_branch_of_someone_else_rejected(setup):
    _git(
        setup.bare,
        "update-ref",
        "refs/heads/remediation/incident-shop-cart-1",
        setup.bad,
    )
    with pytest.raises(InvalidInputError, match="was not made for incident"):
        setup.provider.open(_request(setup.change))


# --- merge and close ---


def test_merge_twice_one_merge_commit(setup):
    pull = setup.provider.open(_request(setup.change))
    request = MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    merged = setup.provider.merge(request)
    again = setup.provider.merge(request)
    assert again == merged
    assert merged.state == "merged"
    assert merged.merge_commit == setup.main()
    parents = _git(setup.bare, "log", "-1", "--format=%P", merged.merge_commit).split()
    assert parents == [setup.bad, pull.head_commit]
    assert _git(setup.bare, "rev-list", "--merges", "--count", "main").strip() == "1"


def test_merge_recovers_unrecorded_merge(setup):
    pull = setup.provider.open(_request(setup.change))
    request = MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    merged = setup.provider.merge(request)
    # An attempt that pushed the merge and crashed before updating the record.
    record_path = setup.records()[0]
    record = json.loads(record_path.read_text())
    record.update(state="open", merge_commit="")
    record_path.write_text(json.dumps(record))
    again = setup.provider.merge(request)
    assert again.merge_commit == merged.merge_commit
    assert _git(setup.bare, "rev-list", "--merges", "--count", "main").strip() == "1"


def test_merge_after_target_moved(setup):
    pull = setup.provider.open(_request(setup.change))
    repo = git.Repo(setup.bare)
    other = write_commit(
        repo,
        setup.bad,
        {"apps/other/configmap.yaml": b"kind: ConfigMap\n"},
        "Unrelated change\n",
        author_name="Someone",
        author_email="someone@localhost",
    )
    repo.git.update_ref("refs/heads/main", other)
    merged = setup.provider.merge(
        MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    parents = _git(setup.bare, "log", "-1", "--format=%P", merged.merge_commit).split()
    assert parents == [other, pull.head_commit]
    assert setup.main() == merged.merge_commit
    tree = _git(setup.bare, "ls-tree", "-r", "--name-only", "main").split()
    assert "apps/other/configmap.yaml" in tree


def test_merge_closed_rejected(setup):
    pull = setup.provider.open(_request(setup.change))
    setup.provider.close(
        ClosePullRequestInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    with pytest.raises(PullRequestStateError, match="closed"):
        setup.provider.merge(
            MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
        )


def test_merge_wrong_incident_rejected(setup):
    pull = setup.provider.open(_request(setup.change))
    with pytest.raises(InvalidInputError, match="belongs to branch"):
        setup.provider.merge(
            MergeInput(incident_id="incident-other", pull_request=pull)
        )


def test_close_twice_deletes_branch_once(setup):
    pull = setup.provider.open(_request(setup.change))
    request = ClosePullRequestInput(
        incident_id="incident-shop-cart-1", pull_request=pull, reason="aborted by alice"
    )
    closed = setup.provider.close(request)
    again = setup.provider.close(request)
    assert closed.state == "closed"
    assert again == closed
    assert setup.branches() == ["refs/heads/main"]
    assert _git(setup.bare, "rev-parse", "refs/pull/1/head").strip() == pull.head_commit
    assert setup.main() == setup.bad


def test_close_merged_keeps_it_merged(setup):
    pull = setup.provider.open(_request(setup.change))
    merged = setup.provider.merge(
        MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    closed = setup.provider.close(
        ClosePullRequestInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    assert closed == merged


def test_open_after_close_opens_new_pull_request(setup):
    pull = setup.provider.open(_request(setup.change))
    setup.provider.close(
        ClosePullRequestInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    reopened = setup.provider.open(_request(setup.change))
    assert reopened.number == 2
    assert reopened.state == "open"


@pytest.mark.parametrize("layout", ["plain", "kustomize", "helm"])
def test_merge_diff_changes_only_image_line(tmp_path, layout):
    setup = Setup(tmp_path, layout)
    pull = setup.provider.open(_request(setup.change))
    merged = setup.provider.merge(
        MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    diff = _git(setup.bare, "diff", "--unified=0", setup.bad, merged.merge_commit)
    changed = [
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 2, diff
    assert "2.0.0" in changed[0]
    assert "1.10" in changed[1]
    assert _git(setup.bare, "diff", setup.good, merged.merge_commit) == ""


def test_crlf_file_rolled_back_byte_exact(tmp_path):
    bare = tmp_path / "crlf.git"
    repo = git.Repo.init(bare, bare=True, initial_branch="main")
    text = "kind: Deployment\r\nspec:\r\n  containers:\r\n  - image:  app:{}\r\n"
    good = write_commit(
        repo,
        None,
        {"apps/cart/app.yaml": text.format("1").encode()},
        "good\n",
        author_name="t",
        author_email="t@localhost",
    )
    bad = write_commit(
        repo,
        good,
        {"apps/cart/app.yaml": text.format("2").encode()},
        "bad\n",
        author_name="t",
        author_email="t@localhost",
    )
    repo.git.update_ref("refs/heads/main", bad)
    change = _change(bare, "plain", tmp_path, good, bad)
    pull = LocalProvider(bare, tmp_path / "work").open(_request(change))
    blob = subprocess.run(
        ["git", f"--git-dir={bare}", "show", f"{pull.head_commit}:apps/cart/app.yaml"],
        capture_output=True,
        check=True,
    ).stdout
    assert blob == text.format("1").encode()


def test_scrub_removes_secrets_and_control_characters():
    assert (
        scrub("see https://u:p@example.test/x\nnext")
        == "see https://example.test/x next"
    )
    assert scrub("password: swordfish ok") == "password: *** ok"
    assert branch_for("inc-1") == "remediation/inc-1"


# --- activities ---


def _activities(tmp_path: Path, **settings) -> GitOpsActivities:
    async def get_application(name: str) -> dict:
        raise AssertionError("not used by the pull-request activities")

    return GitOpsActivities(
        GitSettings(work_dir=tmp_path / "act", **settings), get_application
    )


async def test_activities_open_merge_close_idempotent(setup):
    activities = _activities(setup.tmp_path)
    pull = await activities.open_pull_request(_request(setup.change))
    assert await activities.open_pull_request(_request(setup.change)) == pull
    merge = MergeInput(incident_id="incident-shop-cart-1", pull_request=pull)
    merged = await activities.merge_pull_request(merge)
    assert await activities.merge_pull_request(merge) == merged
    assert merged.merge_commit == setup.main()


async def test_activities_close_finds_repo_from_url(setup):
    activities = _activities(setup.tmp_path)
    pull = await activities.open_pull_request(_request(setup.change))
    closed = await activities.close_pull_request(
        ClosePullRequestInput(incident_id="incident-shop-cart-1", pull_request=pull)
    )
    assert closed.state == "closed"


async def test_activities_permanent_errors_non_retryable(setup):
    activities = _activities(setup.tmp_path)
    with pytest.raises(ApplicationError) as raised:
        await activities.open_pull_request(_request(setup.change, incident_id="bad id"))
    assert raised.value.non_retryable
    assert raised.value.type == "InvalidInput"

    no_changes = setup.change.model_copy(update={"image_changes": []})
    with pytest.raises(ApplicationError) as raised:
        await activities.open_pull_request(_request(no_changes))
    assert raised.value.type == "NothingToRollBack"


async def test_activities_reject_remote_url_for_local_provider(setup):
    activities = _activities(
        setup.tmp_path, repo_url="https://git.example.test/org/gitops.git"
    )
    with pytest.raises(ApplicationError) as raised:
        await activities.open_pull_request(_request(setup.change))
    assert raised.value.non_retryable
    assert "local bare repository" in str(raised.value)


async def test_activities_reject_unknown_provider(setup):
    activities = _activities(setup.tmp_path, provider="bitbucket")
    with pytest.raises(ApplicationError) as raised:
        await activities.open_pull_request(_request(setup.change))
    assert raised.value.type == "UnsupportedProvider"


def test_open_pin_reports_skipped_changes(setup):
    extra = setup.change.image_changes[0].model_copy(
        update={"location": "1.spec.containers.0.image", "bad": "x:1", "good": "x:0"}
    )
    change = setup.change.model_copy(
        update={"image_changes": [*setup.change.image_changes, extra]}
    )
    pull = setup.provider.open(_request(change))
    message = _git(setup.bare, "log", "-1", "--format=%B", pull.head_commit)
    assert "Left unchanged" in message
    assert "1.spec.containers.0.image: head has None" in message
    record = json.loads(setup.records()[0].read_text())
    assert "Left unchanged" in record["body"]


def test_open_revert_content_merge_uses_work_clone(setup):
    repo = git.Repo(setup.bare)
    path = "apps/cart/deployment.yaml"
    text = _git(setup.bare, "show", f"{setup.bad}:{path}")
    edited = write_commit(
        repo,
        setup.bad,
        {path: text.replace("replicas: 2", "replicas: 3").encode()},
        "Scale cart\n",
        author_name="Someone",
        author_email="someone@localhost",
    )
    repo.git.update_ref("refs/heads/main", edited)
    pull = setup.provider.open(_request(setup.change, strategy="revert"))
    content = _git(setup.bare, "show", f"{pull.head_commit}:{path}")
    assert "replicas: 3" in content
    assert GOOD in content
    assert BAD not in content
    assert (setup.tmp_path / "work").is_dir()
