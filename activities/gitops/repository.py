"""Access to the GitOps repository, shared by the GitOps activities.

`GitOpsActivities` and `LocalProvider` use `GitOpsRepository` to read history
and files at given revisions and to build rollback commits.

- A URL that is a local path to a bare repository is read in place. Git
  updates refs atomically and never changes an object, so readers take no lock.
  `pooled_repo` keeps the GitPython repositories of such paths, and with them
  their persistent `git cat-file` processes, for the next call.
- Any other URL is cloned once under the work directory and fetched before
  each use. A file lock next to the clone serialises its users, whether they
  are two activity attempts in one worker or two worker processes sharing the
  work directory.

A branch name given to the helpers below means the branch of the remote:
`refs/heads/<name>` in a bare repository and `refs/remotes/origin/<name>` in a
clone (see `branch_ref`).

The seeder of the demo repository also uses `write_commit`, which creates a
commit from file contents in the object database alone, so the bytes stored are
exactly the bytes given (no work tree, no line-ending filters).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from io import BytesIO
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import git
import yaml
from git.objects.util import altz_to_utctz_str, parse_date
from gitdb import LooseObjectDB
from gitdb.base import IStream

from activities.gitops.yaml_edit import image_scalars
from workflows.models import ImageChange

logger = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
LOCK_TIMEOUT_SECONDS = 300.0
_HEX_SHA = re.compile(r"^[0-9a-f]{40}$")
# Revisions go to `git cat-file --batch-check` one per line, so whitespace and
# control characters would split or corrupt a request.
_UNSAFE_REVISION = re.compile(r"[\x00-\x20\x7f]")
EMPTY_TREE_SHA = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
TREE_MODE = 0o040000
BLOB_MODE = 0o100644
# Idle repositories kept per path by `pooled_repo`. Each holds up to two
# `git cat-file` processes.
POOL_SIZE_PER_PATH = 4


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


def git_process(
    git_dir: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `git --git-dir=<git_dir> <args>` and return the finished process."""
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args],
        input=input,
        capture_output=True,
        text=True,
        check=False,
    )


def run_git(git_dir: Path, *args: str, input: str | None = None) -> str:
    """Run `git --git-dir=<git_dir> <args>` and return its standard output.

    Raises git.GitCommandError (with stderr) when git exits with a non-zero status.
    """
    process = git_process(git_dir, *args, input=input)
    if process.returncode != 0:
        raise git.GitCommandError(
            process.args, process.returncode, process.stderr, process.stdout
        )
    return process.stdout


def parse_tree(data: bytes) -> dict[bytes, tuple[int, bytes]]:
    """Parse a raw tree object into {name: (mode, binary sha)}."""
    entries: dict[bytes, tuple[int, bytes]] = {}
    position = 0
    while position < len(data):
        space = data.index(b" ", position)
        nul = data.index(b"\0", space)
        mode = int(data[position:space], 8)
        entries[data[space + 1 : nul]] = (mode, data[nul + 1 : nul + 21])
        position = nul + 21
    return entries


def _canonical_mode(mode: int) -> int:
    # The modes that git writes into trees, as `canonical_mode` in git's cache.h.
    if stat.S_ISREG(mode):
        return 0o100755 if mode & 0o100 else BLOB_MODE
    if stat.S_ISLNK(mode):
        return 0o120000
    if stat.S_ISDIR(mode):
        return TREE_MODE
    return 0o160000


def _serialize_tree(entries: dict[bytes, tuple[int, bytes]]) -> bytes:
    # Git sorts entries by name, comparing a tree's name as if it ended in "/".
    def sort_key(name: bytes) -> bytes:
        return name + b"/" if entries[name][0] == TREE_MODE else name

    return b"".join(
        b"%o %s\0%s" % (_canonical_mode(entries[name][0]), name, entries[name][1])
        for name in sorted(entries, key=sort_key)
    )


class TreeConflictError(ValueError):
    """Raised when a tree edit puts a file where a directory is, or the reverse."""


TreeEdits = Mapping[tuple[bytes, ...], tuple[int, bytes] | None]


def edit_tree(repo: git.Repo, tree: bytes | None, edits: TreeEdits) -> bytes | None:
    """Apply `edits` to the tree `tree` (binary sha, None = empty) and store the result.

    Each edit maps a path, as a tuple of name components, to the new entry
    (mode, binary sha) or to None to delete it. Directories left empty are
    dropped, as git's index drops them. Returns the new tree's binary sha, or
    None when nothing is left. Raises TreeConflictError for a path that runs
    through a file or that replaces a directory with a file or the reverse.
    """
    entries = parse_tree(repo.odb.stream(tree).read()) if tree is not None else {}
    original = dict(entries)
    nested: dict[bytes, dict[tuple[bytes, ...], tuple[int, bytes] | None]] = {}
    for path, entry in edits.items():
        name, rest = path[0], path[1:]
        current = entries.get(name)
        if rest:
            if current is not None and current[0] != TREE_MODE:
                raise TreeConflictError(
                    f"{b'/'.join(path).decode(errors='replace')}: "
                    f"{name.decode(errors='replace')} is a file, not a directory"
                )
            nested.setdefault(name, {})[rest] = entry
        elif entry is None:
            entries.pop(name, None)
        else:
            if current is not None and (current[0] == TREE_MODE) != (
                entry[0] == TREE_MODE
            ):
                raise TreeConflictError(
                    f"{name.decode(errors='replace')}: cannot replace a "
                    f"{'directory' if current[0] == TREE_MODE else 'file'} with a "
                    f"{'directory' if entry[0] == TREE_MODE else 'file'}"
                )
            entries[name] = entry
    for name, child_edits in nested.items():
        current = entries.get(name)
        child = edit_tree(repo, current[1] if current else None, child_edits)
        if child is None:
            entries.pop(name, None)
        else:
            entries[name] = (TREE_MODE, child)
    if not entries:
        return None
    if entries == original and tree is not None:
        return tree
    return store_object(repo, "tree", _serialize_tree(entries))


def split_path(path: str) -> tuple[bytes, ...]:
    """Split a repo-relative POSIX path into tree name components.

    Raises ValueError for an absolute path, an empty component, `.` or `..`,
    which git does not accept in a tree.
    """
    parts = tuple(path.split("/"))
    if any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise ValueError(f"invalid repository path {path!r}")
    return tuple(part.encode("utf-8") for part in parts)


def tree_sha(tree: bytes | None) -> str:
    """Return the hex sha of a tree from `edit_tree`, writing nothing for None."""
    return tree.hex() if tree is not None else EMPTY_TREE_SHA


def store_object(repo: git.Repo, kind: str, data: bytes) -> bytes:
    """Write a loose object of type `kind` and return its binary sha.

    gitdb's loose object writer compresses and renames in Python, where
    GitPython's own `odb.store` starts a `git hash-object` per object.
    """
    database = LooseObjectDB(os.path.join(repo.git_dir, "objects"))
    return database.store(IStream(kind, len(data), BytesIO(data))).binsha


# Characters that git's ident.c strips from both ends of a name or email.
_IDENT_CRUD = "".join(chr(code) for code in range(33)) + ".,:;<>\"\\'"


def _identity(name: str, email: str, date_variable: str) -> str:
    """Format an author or committer line's value as `git commit-tree` does."""
    name = re.sub(r"[\n<>]", "", name).strip(_IDENT_CRUD)
    email = re.sub(r"[\n<>]", "", email).strip(_IDENT_CRUD)
    if not name:
        raise ValueError("empty commit author name; set REMEDIATOR_GIT_AUTHOR_NAME")
    date = os.environ.get(date_variable, "")
    if date:
        seconds, offset = parse_date(date)
    else:
        seconds = int(time.time())
        is_dst = time.daylight and time.localtime(seconds).tm_isdst > 0
        offset = time.altzone if is_dst else time.timezone
    return f"{name} <{email}> {seconds} {altz_to_utctz_str(offset)}"


def create_commit(
    repo: git.Repo,
    tree: str,
    parents: list[str],
    message: str,
    *,
    author_name: str,
    author_email: str,
) -> str:
    """Store a commit of `tree` with `parents` and return its sha; no ref is moved.

    The message is stored verbatim, as `git commit-tree` stores it. The author
    is also the committer. Dates are now in the local time zone unless
    GIT_AUTHOR_DATE or GIT_COMMITTER_DATE is set. NOTE: unlike `git
    commit-tree`, this never signs the commit, even with `commit.gpgSign` set,
    and always writes UTF-8, even when `i18n.commitEncoding` names another.
    """
    if tree == EMPTY_TREE_SHA:
        store_object(repo, "tree", b"")
    lines = [f"tree {tree}"]
    lines += [f"parent {parent}" for parent in parents]
    lines.append(f"author {_identity(author_name, author_email, 'GIT_AUTHOR_DATE')}")
    lines.append(
        f"committer {_identity(author_name, author_email, 'GIT_COMMITTER_DATE')}"
    )
    data = ("\n".join(lines) + "\n\n" + message).encode("utf-8")
    return store_object(repo, "commit", data).hex()


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

    The blobs and trees are written straight to the object database, so no
    index, work tree, checkout or line-ending filter is involved, and no git
    process starts. Every written file gets mode 100644. Returns the new
    commit's sha; no ref is moved. Raises ValueError for an invalid path and
    TreeConflictError for a path that collides with a file or directory.
    """
    edits: dict[tuple[bytes, ...], tuple[int, bytes] | None] = {}
    for path, content in sorted(files.items()):
        edits[split_path(path)] = (BLOB_MODE, store_object(repo, "blob", content))
    base_tree = repo.commit(parent).tree.binsha if parent is not None else None
    tree = edit_tree(repo, base_tree, edits)
    return create_commit(
        repo,
        tree_sha(tree),
        [parent] if parent is not None else [],
        message,
        author_name=author_name,
        author_email=author_email,
    )


def read_blob(repo: git.Repo, rev: str, path: str) -> bytes | None:
    """Return the bytes of `path` at `rev`, or None when the file is absent there."""
    try:
        blob = repo.commit(rev).tree / path
    except KeyError:
        return None
    if blob.type != "blob":
        return None
    return blob.data_stream.read()


def is_bare_repository(path: Path) -> bool:
    """Tell whether `path` looks like a bare repository (HEAD file and objects)."""
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def _head_identity(path: Path) -> tuple[int, int, int] | None:
    # A repository deleted and created again at the same path gets a new HEAD
    # file, so a pooled `cat-file` process of the old one is not reused.
    try:
        info = os.stat(path / "HEAD")
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


_pool_lock = threading.Lock()
_pool: dict[Path, list[tuple[tuple[int, int, int], git.Repo]]] = {}


@contextlib.contextmanager
def pooled_repo(path: Path) -> Iterator[git.Repo]:
    """Lend a GitPython repository of the bare repository at `path` to one thread.

    The repository goes back to a small per-path pool when the block ends
    normally, so the next call reuses its `git cat-file` processes instead of
    starting new ones. After an exception it is closed, since an interrupted
    read may leave a persistent process out of step.
    """
    path = Path(path).resolve()
    identity = _head_identity(path)
    repo: git.Repo | None = None
    stale: list[git.Repo] = []
    with _pool_lock:
        idle = _pool.get(path, [])
        while idle and repo is None:
            idle_identity, candidate = idle.pop()
            if idle_identity == identity:
                repo = candidate
            else:
                stale.append(candidate)
    for candidate in stale:
        candidate.close()
    if repo is None:
        repo = git.Repo(path)
    try:
        yield repo
    except BaseException:
        repo.close()
        raise
    if identity is not None:
        with _pool_lock:
            idle = _pool.setdefault(path, [])
            if len(idle) < POOL_SIZE_PER_PATH:
                idle.append((identity, repo))
                return
    repo.close()


class GitOpsRepository:
    """A GitOps repository: a local bare repository, or a remote and its clone.

    A local bare repository (a path or `file://` URL) is read in place unless
    `use_clone` is True. Any other URL is cloned under `work_dir`. Call the
    public methods from a worker thread: they block on git, and with a clone
    also on the clone's file lock. Each public method with a clone takes the
    lock and fetches first.
    """

    def __init__(
        self,
        url: str,
        work_dir: Path,
        *,
        author_name: str = "Remediator",
        author_email: str = "remediator@localhost",
        use_clone: bool | None = None,
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
        local = local_path_of(url)
        self.bare_path: Path | None = None
        if not use_clone and local is not None and is_bare_repository(local):
            self.bare_path = local.resolve()

    # --- clone and lock ---------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[git.Repo]:
        """Yield the GitPython repo: the bare repository, or the fetched clone.

        A clone is created or fetched under its lock, held until the block ends.
        """
        if self.bare_path is not None:
            with pooled_repo(self.bare_path) as repo:
                yield repo
            return
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


def branch_ref(repo: git.Repo, branch: str) -> str:
    """Return the ref of the remote's `branch` in a bare repository or a clone."""
    prefix = "refs/heads/" if repo.bare else "refs/remotes/origin/"
    return prefix + branch


def resolve_commit(repo: git.Repo, rev: str) -> str | None:
    """Return the commit sha of `rev`, or None when it names no commit.

    A name that is not a full sha is tried first as the remote's branch (see
    `branch_ref`), then as any revision that `git rev-parse` accepts. Tags are
    peeled to their commit. The lookup goes through the repository's
    persistent `git cat-file --batch-check` process, so it starts no process
    after the first call.
    """
    if not rev or _UNSAFE_REVISION.search(rev):
        return None
    candidates = [rev] if _HEX_SHA.match(rev) else [branch_ref(repo, rev), rev]
    for candidate in candidates:
        try:
            sha, _, _ = repo.git.get_object_header(f"{candidate}^{{commit}}")
        except ValueError:
            continue
        return sha.decode("ascii") if isinstance(sha, bytes) else sha
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
