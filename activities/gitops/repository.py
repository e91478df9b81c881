"""Working clone of the GitOps repository, shared by the GitOps activities.

`GitOpsActivities` and `LocalProvider` use `GitOpsRepository` to read history
and files at given revisions and to build rollback commits. The repository is
cloned once under the work directory and fetched before each use. A file lock
next to the clone serialises its users, whether they are two activity attempts
in one worker or two worker processes sharing the work directory.

The seeder of the demo repository also uses `write_commit`, which creates a
commit from file contents without touching a work tree, so the bytes stored are
exactly the bytes given (no line-ending filters).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import git
import yaml
from gitdb.base import IStream

from activities.gitops.yaml_edit import image_scalars
from workflows.models import ImageChange

logger = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
LOCK_TIMEOUT_SECONDS = 300.0
_HEX_SHA = re.compile(r"^[0-9a-f]{40}$")


class LockTimeoutError(TimeoutError):
    """Raised when the lock of a clone or bare repository stays taken too long."""


@contextlib.contextmanager
def file_lock(
    path: Path, timeout_seconds: float = LOCK_TIMEOUT_SECONDS
) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`, waiting up to `timeout_seconds`.

    Each call opens its own file description, so the lock also excludes other
    threads of this process. NOTE: `fcntl.flock` is POSIX only, and it is not
    reliable on NFS work directories.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_seconds
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"lock {path} still taken after {timeout_seconds:.0f} s; "
                        "another worker may be stuck on this repository"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def redact_url(url: str) -> str:
    """Return `url` without a user name or password, for logs and results."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def local_path_of(url: str) -> Path | None:
    """Return the filesystem path of a local repository URL, or None for a remote."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme == "" and ":" not in url.split("/", 1)[0]:
        # scp-like `host:path` is remote, anything else without a scheme is a path.
        return Path(url)
    return None


def clean_app_path(path: str) -> str:
    """Normalise an Argo CD source path to a repo-relative POSIX path ('' = root).

    Raises ValueError for an absolute path or one that climbs out with `..`.
    """
    posix = PurePosixPath(path.strip() or ".")
    if posix.is_absolute() or ".." in posix.parts:
        raise ValueError(
            f"invalid application path {path!r}: must stay inside the repo"
        )
    text = str(posix)
    return "" if text == "." else text


def write_commit(
    repo: git.Repo,
    parent: str | None,
    files: dict[str, bytes],
    message: str,
    *,
    author_name: str,
    author_email: str,
) -> str:
    """Create a commit that changes `files` (repo-relative path to content) on `parent`.

    The blobs are written straight to the object database and the tree is built
    in a temporary index, so no work tree, checkout or line-ending filter is
    involved. Returns the new commit's sha; no ref is moved.
    """
    with tempfile.TemporaryDirectory(prefix="remediator-index-") as tmp:
        env = {
            "GIT_INDEX_FILE": str(Path(tmp) / "index"),
            "GIT_AUTHOR_NAME": author_name,
            "GIT_AUTHOR_EMAIL": author_email,
            "GIT_COMMITTER_NAME": author_name,
            "GIT_COMMITTER_EMAIL": author_email,
        }
        if parent is not None:
            repo.git.read_tree(parent, env=env)
        for path, content in sorted(files.items()):
            stream = repo.odb.store(IStream("blob", len(content), BytesIO(content)))
            repo.git.update_index(
                "--add",
                "--cacheinfo",
                f"100644,{stream.hexsha.decode()},{path}",
                env=env,
            )
        tree = repo.git.write_tree(env=env)
        message_file = Path(tmp) / "message"
        message_file.write_text(message, encoding="utf-8")
        args = [tree]
        if parent is not None:
            args += ["-p", parent]
        return repo.git.commit_tree(*args, "-F", str(message_file), env=env)


def read_blob(repo: git.Repo, rev: str, path: str) -> bytes | None:
    """Return the bytes of `path` at `rev`, or None when the file is absent there."""
    try:
        blob = repo.commit(rev).tree / path
    except KeyError:
        return None
    if blob.type != "blob":
        return None
    return blob.data_stream.read()


class GitOpsRepository:
    """A remote GitOps repository and its working clone under `work_dir`.

    Call the public methods from a worker thread: they block on git and on the
    clone's file lock. Each public method takes the lock and fetches first.
    """

    def __init__(
        self,
        url: str,
        work_dir: Path,
        *,
        author_name: str = "Remediator",
        author_email: str = "remediator@localhost",
    ) -> None:
        if not url:
            raise ValueError(
                "missing GitOps repository URL; set REMEDIATOR_GIT_REPO_URL"
            )
        self.url = url
        self.author_name = author_name
        self.author_email = author_email
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", redact_url(url).rstrip("/"))[-48:]
        self.clone_dir = Path(work_dir).resolve() / f"{stem.strip('-.')}-{digest}"
        self.lock_path = self.clone_dir.with_name(self.clone_dir.name + ".lock")

    # --- clone and lock ---------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[git.Repo]:
        """Lock the clone, clone or fetch it, and yield the GitPython repo."""
        with file_lock(self.lock_path):
            yield self._sync()

    def _sync(self) -> git.Repo:
        if (self.clone_dir / ".git").is_dir():
            repo = git.Repo(self.clone_dir)
        else:
            logger.info(
                "Cloning GitOps repository %s into %s.",
                redact_url(self.url),
                self.clone_dir,
            )
            if self.clone_dir.exists():
                # A clone interrupted half-way; start again from nothing.
                shutil.rmtree(self.clone_dir)
            # No checkout: autocrlf is switched off below, before any file is written.
            repo = git.Repo.clone_from(self.url, self.clone_dir, no_checkout=True)
        with repo.config_writer() as config:
            config.set_value("user", "name", self.author_name)
            config.set_value("user", "email", self.author_email)
            config.set_value("core", "autocrlf", "false")
        repo.git.fetch(
            "--prune", "--force", "origin", "+refs/heads/*:refs/remotes/origin/*"
        )
        return repo

    # --- reading -------------------------------------------------------------

    def resolve(self, rev: str) -> str | None:
        """Return the commit sha of `rev` (sha, or branch on the remote), or None."""
        with self.session() as repo:
            return resolve_commit(repo, rev)

    def commits_touching(self, path: str, since_rev: str, until_rev: str) -> list[str]:
        """Return the commits in `since_rev..until_rev` that touch `path`, newest first.

        An empty `since_rev` means all history up to `until_rev`.
        """
        app_path = clean_app_path(path)
        with self.session() as repo:
            return commits_between(repo, app_path, since_rev, until_rev)

    def read_files(self, rev: str, path: str) -> dict[str, str]:
        """Return the YAML files under `path` at `rev`, keyed by relative path.

        Contents are decoded as UTF-8 and kept byte for byte (line endings and
        a byte order mark included).
        """
        app_path = clean_app_path(path)
        with self.session() as repo:
            return read_tree_files(repo, rev, app_path)

    def image_changes(
        self, path: str, good_rev: str, bad_rev: str
    ) -> list[ImageChange]:
        """Return the image scalars under `path` that differ between two revisions.

        See `image_changes_between`.
        """
        app_path = clean_app_path(path)
        with self.session() as repo:
            return image_changes_between(repo, app_path, good_rev, bad_rev)


def image_changes_between(
    repo: git.Repo, app_path: str, good_rev: str, bad_rev: str
) -> list[ImageChange]:
    """Return the image scalars under `app_path` that differ between two revisions.

    File paths in the result are repo-relative. A location present in only one
    revision is not a value that a rollback can write back, so it is left out.
    Files that are not valid YAML (Helm templates) are skipped.
    """
    good_files = read_tree_files(repo, good_rev, app_path)
    bad_files = read_tree_files(repo, bad_rev, app_path)
    changes: list[ImageChange] = []
    for relative in sorted(set(good_files) & set(bad_files)):
        file = str(PurePosixPath(app_path) / relative) if app_path else relative
        good = _image_scalars_or_none(good_files[relative], file, good_rev)
        bad = _image_scalars_or_none(bad_files[relative], file, bad_rev)
        if good is None or bad is None:
            continue
        for location in sorted(set(good) & set(bad)):
            if good[location] != bad[location]:
                changes.append(
                    ImageChange(
                        file=file,
                        location=location,
                        good=good[location],
                        bad=bad[location],
                    )
                )
    return changes


def resolve_commit(repo: git.Repo, rev: str) -> str | None:
    if not rev:
        return None
    candidates = [rev] if _HEX_SHA.match(rev) else [f"refs/remotes/origin/{rev}", rev]
    for candidate in candidates:
        try:
            return repo.git.rev_parse("--verify", "--quiet", f"{candidate}^{{commit}}")
        except git.GitCommandError:
            continue
    return None


def _require_commit(repo: git.Repo, rev: str) -> str:
    sha = resolve_commit(repo, rev)
    if sha is None:
        raise ValueError(f"revision {rev!r} not found in the GitOps repository")
    return sha


def commits_between(
    repo: git.Repo, app_path: str, since_rev: str, until_rev: str
) -> list[str]:
    """Return the commits in `since_rev..until_rev` touching `app_path`, newest first.

    Raises ValueError when a revision is not a commit of the repository.
    """
    until = _require_commit(repo, until_rev)
    revision_range = (
        f"{_require_commit(repo, since_rev)}..{until}" if since_rev else until
    )
    output = repo.git.log("--format=%H", revision_range, "--", app_path or ".")
    return [line for line in output.splitlines() if line]


def read_tree_files(repo: git.Repo, rev: str, app_path: str) -> dict[str, str]:
    """Return the YAML files under `app_path` at `rev`, keyed by relative path.

    A branch name means the remote's branch. Raises ValueError when `rev` is
    not a commit of the repository.
    """
    commit = repo.commit(_require_commit(repo, rev))
    try:
        root = commit.tree / app_path if app_path else commit.tree
    except KeyError:
        return {}
    if root.type == "blob":
        return {PurePosixPath(app_path).name: root.data_stream.read().decode("utf-8")}
    files: dict[str, str] = {}
    for item in root.traverse():
        if item.type == "blob" and item.path.endswith(YAML_SUFFIXES):
            relative = os.path.relpath(item.path, app_path) if app_path else item.path
            files[relative] = item.data_stream.read().decode("utf-8")
    return files


def _image_scalars_or_none(text: str, file: str, rev: str) -> dict[str, str] | None:
    try:
        return image_scalars(text)
    except yaml.YAMLError as error:
        # Helm templates and other non-YAML files hold no image values to restore.
        logger.debug("Skipping %s at %s: not valid YAML (%s).", file, rev, error)
        return None
