"""Tests of the demo repository seeder, image releases and image rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from activities.gitops.repository import GitOpsRepository
from remediator.demo.seed import (
    push_image,
    render_image,
    seed_repository,
    split_image,
)

GOOD = "ghcr.io/example/cart:1.10"
BAD = "ghcr.io/example/cart:2.0.0-rc1"


def _git(bare: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={bare}", *args], capture_output=True, text=True, check=True
    ).stdout


def _files(bare: Path, rev: str, tmp_path: Path) -> dict[str, str]:
    return GitOpsRepository(str(bare), tmp_path / "work").read_files(rev, "apps/cart")


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("plain", ["deployment.yaml"]),
        ("kustomize", ["deployment.yaml", "kustomization.yaml", "service.yaml"]),
        (
            "helm",
            [
                "Chart.yaml",
                "templates/deployment.yaml",
                "templates/service.yaml",
                "values.yaml",
            ],
        ),
    ],
)
def test_seed_layout_files(tmp_path, layout, expected):
    seed = seed_repository(tmp_path / "gitops.git", layout, "shop", "cart", GOOD)
    assert seed.branch == "main"
    assert seed.app_path == "apps/cart"
    assert _git(seed.bare_path, "rev-parse", "main").strip() == seed.commit
    assert _git(seed.bare_path, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    listing = _git(seed.bare_path, "ls-tree", "-r", "--name-only", "main", "apps/cart/")
    assert (
        sorted(path.removeprefix("apps/cart/") for path in listing.split()) == expected
    )


@pytest.mark.parametrize("layout", ["plain", "kustomize", "helm"])
def test_render_seeded_image(tmp_path, layout):
    seed = seed_repository(tmp_path / "gitops.git", layout, "shop", "cart", GOOD)
    assert render_image(_files(seed.bare_path, seed.commit, tmp_path), layout) == GOOD


@pytest.mark.parametrize("layout", ["plain", "kustomize", "helm"])
def test_push_image_changes_only_image(tmp_path, layout):
    seed = seed_repository(tmp_path / "gitops.git", layout, "shop", "cart", GOOD)
    commit = push_image(seed.bare_path, layout, "cart", BAD)
    assert _git(seed.bare_path, "rev-parse", "main").strip() == commit
    assert (
        _git(seed.bare_path, "log", "-1", "--format=%s", commit).strip()
        == f"Deploy {BAD}"
    )
    diff = _git(seed.bare_path, "diff", "--unified=0", seed.commit, commit)
    changed = [
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 2, diff
    assert "1.10" in changed[0]
    assert "2.0.0-rc1" in changed[1]
    assert render_image(_files(seed.bare_path, commit, tmp_path), layout) == BAD


def test_plain_layout_shape(tmp_path):
    seed = seed_repository(tmp_path / "gitops.git", "plain", "shop", "cart", GOOD)
    text = _git(seed.bare_path, "show", "main:apps/cart/deployment.yaml")
    documents = list(yaml.safe_load_all(text))
    assert [doc["kind"] for doc in documents] == ["Deployment", "Service"]
    assert documents[0]["metadata"]["namespace"] == "shop"
    assert documents[0]["spec"]["template"]["spec"]["containers"][0]["image"] == GOOD
    assert text.startswith("# cart: the demo service")


def test_numeric_tag_seeded_as_string(tmp_path):
    seed = seed_repository(tmp_path / "gitops.git", "helm", "shop", "cart", GOOD)
    values = yaml.safe_load(_git(seed.bare_path, "show", "main:apps/cart/values.yaml"))
    assert values["image"]["tag"] == "1.10"


def test_kustomize_override_applied(tmp_path):
    files = {
        "kustomization.yaml": (
            "resources:\n- app.yaml\nimages:\n- name: other\n  newTag: x\n"
            "- name: example/app\n  newName: mirror.test/app\n  newTag: v2\n"
        ),
        "app.yaml": "kind: Deployment\nspec:\n  template:\n    spec:\n"
        "      containers:\n      - image: example/app:v1\n",
    }
    assert render_image(files, "kustomize") == "mirror.test/app:v2"


def test_render_rejects_missing_parts():
    with pytest.raises(ValueError, match="values.yaml"):
        render_image({"Chart.yaml": "name: x\n"}, "helm")
    with pytest.raises(ValueError, match="not found"):
        render_image({"kustomization.yaml": "resources:\n- gone.yaml\n"}, "kustomize")
    with pytest.raises(ValueError, match="no container image"):
        render_image({"svc.yaml": "kind: Service\n"}, "plain")
    with pytest.raises(ValueError, match="invalid layout"):
        render_image({}, "jsonnet")


def test_seed_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="invalid layout"):
        seed_repository(tmp_path / "a.git", "jsonnet", "shop", "cart", GOOD)
    with pytest.raises(ValueError, match="invalid app"):
        seed_repository(tmp_path / "b.git", "plain", "shop", "Cart/..", GOOD)
    with pytest.raises(ValueError, match="repository:tag"):
        seed_repository(
            tmp_path / "c.git", "helm", "shop", "cart", "ghcr.io/example/cart"
        )
    seed_repository(tmp_path / "d.git", "plain", "shop", "cart", GOOD)
    with pytest.raises(FileExistsError):
        seed_repository(tmp_path / "d.git", "plain", "shop", "cart", GOOD)


def test_push_image_kustomize_needs_same_repository(tmp_path):
    seed = seed_repository(tmp_path / "gitops.git", "kustomize", "shop", "cart", GOOD)
    with pytest.raises(ValueError, match="no images entry"):
        push_image(seed.bare_path, "kustomize", "cart", "ghcr.io/other/cart:2.0.0")


@pytest.mark.parametrize(
    ("reference", "parts"),
    [
        ("nginx", ("nginx", "", "")),
        ("nginx:1.25", ("nginx", "1.25", "")),
        ("localhost:5000/app", ("localhost:5000/app", "", "")),
        ("localhost:5000/app:v1@sha256:ab", ("localhost:5000/app", "v1", "sha256:ab")),
    ],
)
def test_split_image(reference, parts):
    assert split_image(reference) == parts
