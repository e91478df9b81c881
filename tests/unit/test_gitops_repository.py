"""Tests of the GitOps working clone and of the find_change activity."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import git
import pytest

from activities.gitops.activities import GitOpsActivities
from activities.gitops.repository import (
    GitOpsRepository,
    clean_app_path,
    local_path_of,
    redact_url,
    write_commit,
)
from remediator.settings import GitSettings
from workflows.models import ChangeQuery

AUTHOR = {"author_name": "Test", "author_email": "test@localhost"}

DEPLOYMENT_CRLF = (
    "# api deployment\r\n"
    "apiVersion: apps/v1\r\n"
    "kind: Deployment\r\n"
    "spec:\r\n"
    "  template:\r\n"
    "    spec:\r\n"
    "      containers:\r\n"
    "      - name:  api\r\n"
    "        image:  registry.example.test/api:{tag}\r\n"
    "---\r\n"
    "apiVersion: v1\r\n"
    "kind: Service\r\n"
    "metadata:\r\n"
    "  name: api\r\n"
)
VALUES = "image:\n  repository: registry.example.test/web\n  tag: {tag}\n"
TEMPLATE = "metadata:\n  name: {{ .Release.Name }\n"  # not valid YAML


class History:
    """A bare repository built commit by commit, with the shas of each step."""

    def __init__(self, bare: Path) -> None:
        self.bare = bare
        self.repo = git.Repo.init(bare, bare=True, initial_branch="main")
        self.head: str | None = None

    def commit(self, files: dict[str, str], message: str) -> str:
        sha = write_commit(
            self.repo,
            self.head,
            {path: text.encode() for path, text in files.items()},
            message,
            **AUTHOR,
        )
        self.repo.git.update_ref("refs/heads/main", sha)
        self.head = sha
        return sha


@pytest.fixture
def history(tmp_path: Path) -> History:
    return History(tmp_path / "gitops.git")


@pytest.fixture
def shas(history: History) -> dict[str, str]:
    """Four commits: api at 1.0, web chart, other app, api at 1.1."""
    return {
        "base": history.commit(
            {"apps/api/deployment.yaml": DEPLOYMENT_CRLF.format(tag="1.0")}, "Add api"
        ),
        "web": history.commit(
            {
                "apps/web/values.yaml": VALUES.format(tag='"14.10"'),
                "apps/web/templates/deployment.yaml": TEMPLATE,
                "apps/web/README.md": "not yaml\n",
            },
            "Add web",
        ),
        "other": history.commit(
            {"apps/other/deployment.yaml": "image: x:1\n"}, "Add other"
        ),
        "bad": history.commit(
            {"apps/api/deployment.yaml": DEPLOYMENT_CRLF.format(tag="1.1")},
            "Deploy api 1.1",
        ),
    }


@pytest.mark.parametrize("use_clone", [False, True])
def test_commits_touching_newest_first(history, shas, tmp_path, use_clone):
    repository = GitOpsRepository(
        str(history.bare), tmp_path / "work", use_clone=use_clone
    )
    assert repository.commits_touching("apps/api", shas["base"], shas["bad"]) == [
        shas["bad"]
    ]
    assert repository.commits_touching("apps/api", "", shas["bad"]) == [
        shas["bad"],
        shas["base"],
    ]
    assert repository.commits_touching("apps/other/", "", shas["bad"]) == [
        shas["other"]
    ]


@pytest.mark.parametrize("use_clone", [False, True])
def test_read_files_relative_and_byte_exact(history, shas, tmp_path, use_clone):
    repository = GitOpsRepository(
        str(history.bare), tmp_path / "work", use_clone=use_clone
    )
    files = repository.read_files(shas["bad"], "apps/web")
    assert sorted(files) == ["templates/deployment.yaml", "values.yaml"]
    api = repository.read_files(shas["bad"], "apps/api")
    assert api == {"deployment.yaml": DEPLOYMENT_CRLF.format(tag="1.1")}


def test_read_files_missing_path_empty(history, shas, tmp_path):
    repository = GitOpsRepository(str(history.bare), tmp_path / "work")
    assert repository.read_files(shas["base"], "apps/web") == {}


def test_read_files_unknown_revision_raises(history, shas, tmp_path):
    repository = GitOpsRepository(str(history.bare), tmp_path / "work")
    with pytest.raises(ValueError, match="not found"):
        repository.read_files("f" * 40, "apps/api")


def test_image_changes_between_revisions(history, shas, tmp_path):
    repository = GitOpsRepository(str(history.bare), tmp_path / "work")
    changes = repository.image_changes("apps/api", shas["base"], shas["bad"])
    assert len(changes) == 1
    assert changes[0].file == "apps/api/deployment.yaml"
    assert changes[0].location == "0.spec.template.spec.containers.0.image"
    assert changes[0].good == "registry.example.test/api:1.0"
    assert changes[0].bad == "registry.example.test/api:1.1"


def test_image_changes_skip_invalid_yaml(history, shas, tmp_path):
    history.commit(
        {
            "apps/web/values.yaml": VALUES.format(tag="0362525"),
            "apps/web/templates/deployment.yaml": TEMPLATE + "# edited\n",
        },
        "Deploy web",
    )
    repository = GitOpsRepository(str(history.bare), tmp_path / "work")
    changes = repository.image_changes("apps/web", shas["bad"], history.head)
    assert [(c.file, c.location, c.good, c.bad) for c in changes] == [
        ("apps/web/values.yaml", "0.image.tag", "14.10", "0362525")
    ]


@pytest.mark.parametrize("use_clone", [False, True])
def test_fetch_sees_new_commits(history, shas, tmp_path, use_clone):
    repository = GitOpsRepository(
        str(history.bare), tmp_path / "work", use_clone=use_clone
    )
    assert repository.resolve("main") == shas["bad"]
    newer = history.commit({"apps/api/extra.yaml": "kind: ConfigMap\n"}, "More")
    assert repository.resolve("main") == newer
    assert repository.commits_touching("apps/api", shas["bad"], "main") == [newer]


def test_concurrent_sessions_share_one_clone(history, shas, tmp_path):
    repository = GitOpsRepository(str(history.bare), tmp_path / "work", use_clone=True)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            clone = GitOpsRepository(
                str(history.bare), tmp_path / "work", use_clone=True
            )
            results.append(clone.commits_touching("apps/api", "", "main"))
        except BaseException as error:  # collected for the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [[shas["bad"], shas["base"]]] * 4
    assert len([p for p in (tmp_path / "work").iterdir() if p.is_dir()]) == 1
    assert repository.clone_dir.is_dir()


def test_local_bare_repository_read_in_place(history, shas, tmp_path):
    results: list[str | None] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            repository = GitOpsRepository(f"file://{history.bare}", tmp_path / "work")
            for _ in range(5):
                results.append(repository.resolve("main"))
        except BaseException as error:  # collected for the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [shas["bad"]] * 20
    assert not (tmp_path / "work").exists()


def test_resolve_rejects_revisions_that_break_the_batch_protocol(
    history, shas, tmp_path
):
    repository = GitOpsRepository(str(history.bare), tmp_path / "work")
    for revision in ("main\nmain", "main main", "", "\x00"):
        assert repository.resolve(revision) is None
    assert repository.resolve("main") == shas["bad"]
    assert repository.resolve(shas["base"][:12]) == shas["base"]
    assert repository.resolve("main~3") == shas["base"]
    assert repository.resolve("f" * 40) is None


def test_repository_recreated_at_same_path_is_read_afresh(tmp_path):
    first = History(tmp_path / "gitops.git")
    first_head = first.commit({"a.yaml": "image: x:1\n"}, "first")
    repository = GitOpsRepository(str(first.bare), tmp_path / "work")
    assert repository.resolve("main") == first_head
    shutil.rmtree(first.bare)
    second = History(tmp_path / "gitops.git")
    second_head = second.commit({"b.yaml": "image: x:2\n"}, "second")
    assert repository.resolve("main") == second_head
    assert repository.read_files("main", "") == {"b.yaml": "image: x:2\n"}


def test_write_commit_matches_git_index_and_commit_tree(history, shas, tmp_path):
    files = {
        "apps/api/deployment.yaml": b"image: x:2\r\n",
        "apps/new/nested/values.yaml": b"tag: '1'\n",
        "apps/a-b.yaml": b"x\n",
        "top.yaml": b"y\n",
    }
    sha = write_commit(history.repo, shas["bad"], files, "Edit\n\n", **AUTHOR)
    env = {"GIT_INDEX_FILE": str(tmp_path / "index")}
    history.repo.git.read_tree(shas["bad"], env=env)
    for path, content in files.items():
        (tmp_path / "blob").write_bytes(content)
        blob = history.repo.git.hash_object("-w", str(tmp_path / "blob"))
        history.repo.git.update_index(
            "--add", "--cacheinfo", f"100644,{blob},{path}", env=env
        )
    expected_tree = history.repo.git.write_tree(env=env)
    commit = history.repo.commit(sha)
    assert commit.tree.hexsha == expected_tree
    assert commit.parents[0].hexsha == shas["bad"]
    assert commit.message == "Edit\n\n"
    assert commit.author.name == "Test"
    assert commit.committer.email == "test@localhost"
    raw = history.repo.git.cat_file("commit", sha)
    assert raw.count("\nparent ") == 1


def test_write_commit_rejects_file_directory_collisions(history, shas):
    with pytest.raises(ValueError, match="not a directory"):
        write_commit(
            history.repo,
            shas["bad"],
            {"apps/api/deployment.yaml/x.yaml": b"x\n"},
            "m\n",
            **AUTHOR,
        )
    with pytest.raises(ValueError, match="directory"):
        write_commit(history.repo, shas["bad"], {"apps/api": b"x\n"}, "m\n", **AUTHOR)
    with pytest.raises(ValueError, match="invalid repository path"):
        write_commit(history.repo, shas["bad"], {"apps/../x": b"x\n"}, "m\n", **AUTHOR)


def test_path_helpers():
    assert clean_app_path("./apps/api/") == "apps/api"
    assert clean_app_path(".") == ""
    with pytest.raises(ValueError):
        clean_app_path("../etc")
    assert redact_url("https://user:token@git.example.test/org/repo.git") == (
        "https://git.example.test/org/repo.git"
    )
    assert local_path_of("file:///srv/gitops.git") == Path("/srv/gitops.git")
    assert local_path_of("/srv/gitops.git") == Path("/srv/gitops.git")
    assert local_path_of("git@github.com:org/repo.git") is None
    assert local_path_of("https://github.com/org/repo.git") is None


# --- find_change ---


def _application(repo_url: str, revision: str, history: list[str]) -> dict:
    return {
        "metadata": {"name": "api"},
        "spec": {
            "source": {
                "repoURL": repo_url,
                "path": "apps/api",
                "targetRevision": "HEAD",
            }
        },
        "status": {
            "sync": {"status": "Synced", "revision": revision},
            "history": [
                {
                    "id": index,
                    "revision": rev,
                    "deployedAt": f"2026-01-01T00:0{index}:00Z",
                }
                for index, rev in enumerate(history)
            ],
        },
    }


def _activities(tmp_path: Path, application: dict, **settings) -> GitOpsActivities:
    async def get_application(name: str) -> dict:
        assert name == "api"
        return application

    git_settings = GitSettings(work_dir=tmp_path / "work", **settings)
    return GitOpsActivities(git_settings, get_application)


async def test_find_change_from_history(history, shas, tmp_path):
    application = _application(
        str(history.bare), shas["bad"], [shas["base"], shas["web"], shas["bad"]]
    )
    activities = _activities(tmp_path, application)
    result = await activities.find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert result.found, result.reason
    assert result.suspect_revision == shas["bad"]
    assert result.last_good_revision == shas["web"]
    assert result.suspect_commits == [shas["bad"]]
    assert [c.good for c in result.image_changes] == ["registry.example.test/api:1.0"]
    assert result.path == "apps/api"
    assert result.target_branch == "main"
    assert result.deployed_at is not None
    assert result.deployed_at.minute == 2


async def test_find_change_skips_same_revision_entries(history, shas, tmp_path):
    application = _application(
        str(history.bare), shas["bad"], [shas["base"], shas["bad"], shas["bad"]]
    )
    result = await _activities(tmp_path, application).find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert result.last_good_revision == shas["base"]


async def test_find_change_short_history_falls_back_to_git(history, shas, tmp_path):
    application = _application(str(history.bare), shas["bad"], [shas["bad"]])
    result = await _activities(tmp_path, application).find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert result.found, result.reason
    assert result.last_good_revision == shas["other"]
    assert result.suspect_commits == [shas["bad"]]


async def test_find_change_no_image_change_not_found(history, shas, tmp_path):
    application = _application(
        str(history.bare), shas["other"], [shas["web"], shas["other"]]
    )
    result = await _activities(tmp_path, application).find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert not result.found
    assert "no image value" in result.reason


async def test_find_change_revert_strategy_needs_commits(history, shas, tmp_path):
    application = _application(
        str(history.bare), shas["bad"], [shas["base"], shas["bad"]]
    )
    result = await _activities(tmp_path, application, strategy="revert").find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert result.found
    assert result.suspect_commits == [shas["bad"]]


async def test_find_change_without_sync_revision(history, shas, tmp_path):
    application = _application(str(history.bare), "", [])
    result = await _activities(tmp_path, application).find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert not result.found
    assert result.reason == "Argo CD reports no synced revision"


async def test_find_change_unknown_revision(history, shas, tmp_path):
    application = _application(str(history.bare), "e" * 40, [shas["base"]])
    result = await _activities(tmp_path, application).find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert not result.found
    assert "not found in the repository" in result.reason


async def test_find_change_multi_source(history, shas, tmp_path):
    application = {
        "spec": {
            "sources": [
                {"repoURL": "https://charts.example.test", "chart": "base"},
                {
                    "repoURL": str(history.bare),
                    "path": "apps/api",
                    "targetRevision": "main",
                },
            ]
        },
        "status": {
            "sync": {"status": "Synced", "revisions": ["1.2.0", shas["bad"]]},
            "history": [
                {"id": 1, "revision": "", "revisions": ["1.2.0", shas["base"]]},
                {"id": 2, "revisions": ["1.2.0", shas["bad"]]},
            ],
        },
    }
    result = await _activities(tmp_path, application).find_change(
        ChangeQuery(incident_id="i-1", argocd_application="api")
    )
    assert result.found, result.reason
    assert result.suspect_revision == shas["bad"]
    assert result.last_good_revision == shas["base"]
    assert result.target_branch == "main"
