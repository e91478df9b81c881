"""A local stand-in for Argo CD that auto-syncs applications from bare Git repositories.

`remediator demo` and the tests serve `ArgoCDStandIn.app` with uvicorn on
127.0.0.1. The stand-in polls the target branch of each registered application and
"deploys" every new head after a short delay. It reports the result through
Argo CD's Application REST API (`GET /api/v1/applications/{name}`,
`POST /api/v1/applications/{name}/sync`), so `activities.argocd` reads it as it
reads a real Argo CD. Nothing is applied to a cluster: the only
live state is the image that the injected render function finds in the synced
files, which `live_image()` and the `on_sync` callbacks hand to the demo
application.

Argo CD behaviour it copies:
- A render error becomes sync status `Unknown` with a `ComparisonError`
  condition and no revision, and no operation starts.
- An operation is `Running` (health `Progressing`) and then `Succeeded`, after
  which `status.history` gets an entry. Argo CD keeps 10 entries by default
  (`revisionHistoryLimit`), and so does the stand-in.
- After a failed operation the auto-sync does not retry the same revision; a
  new commit or a manual sync starts the next operation.
- A manual sync that names a revision other than the target branch is
  rejected, as Argo CD's API server rejects it while automated sync is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

logger = logging.getLogger(__name__)

RenderImage = Callable[[dict[str, str], str], str]
"""Return the container image that the files of an app path deploy.

Arguments are the files under the application path at one revision, keyed by
their path relative to it (`deployment.yaml`), and the layout name.
"""

SyncListener = Callable[[str, str, str], None]
"""Callback after each operation: (application name, revision, live image)."""

HISTORY_LIMIT = 10
DEFAULT_FAILURE_MESSAGE = "one or more synchronization tasks completed unsuccessfully"

# gRPC status codes that Argo CD's gRPC gateway puts in error bodies.
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_FAILED_PRECONDITION = 9
GRPC_INTERNAL = 13
GRPC_UNAUTHENTICATED = 16

SOURCE_TYPES = {"kustomize": "Kustomize", "helm": "Helm"}


class GitReadError(RuntimeError):
    """A git command on the bare repository failed."""


def _timestamp() -> str:
    """Return the current time in Argo CD's RFC 3339 form, with second resolution."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(repo: Path, *args: str) -> str:
    command = ["git", f"--git-dir={repo}", *args]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GitReadError(f"git {' '.join(args)} in {repo} failed: {err}") from err
    if result.returncode != 0:
        raise GitReadError(
            f"git {' '.join(args)} in {repo} failed with exit status "
            f"{result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def resolve_revision(repo: Path, revision: str) -> str:
    """Resolve a branch, tag or commit of the bare repository `repo` to its SHA."""
    return _git(
        repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"
    ).strip()


def read_app_files(repo: Path, revision: str, app_path: str) -> dict[str, str]:
    """Read every file under `app_path` at `revision`, keyed by path relative to it."""
    prefix = app_path.strip("/")
    if prefix in ("", "."):
        prefix = ""
    pathspec = [f"{prefix}/"] if prefix else []
    listing = _git(
        repo, "ls-tree", "-r", "-z", "--name-only", revision, "--", *pathspec
    )
    files: dict[str, str] = {}
    for path in filter(None, listing.split("\0")):
        relative = path[len(prefix) + 1 :] if prefix else path
        files[relative] = _git(repo, "show", f"{revision}:{path}")
    return files


@dataclass
class _Application:
    """One registered application and the state Argo CD would report for it."""

    name: str
    namespace: str
    repo_path: Path
    app_path: str
    target_branch: str
    layout: str
    render_image: RenderImage
    repo_url: str
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: str = field(default_factory=_timestamp)
    sync_status: str = "OutOfSync"
    sync_revision: str = ""
    health_status: str = "Missing"
    conditions: list[dict[str, str]] = field(default_factory=list)
    operation_state: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    next_history_id: int = 0
    image: str = ""
    reconciled_at: str = ""
    # The head that the auto-sync last compared. It does not retry that head.
    handled_revision: str = ""
    failing_revisions: dict[str, str] = field(default_factory=dict)
    operation: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def source(self) -> dict[str, str]:
        return {
            "repoURL": self.repo_url,
            "path": self.app_path,
            "targetRevision": self.target_branch,
        }

    @property
    def destination(self) -> dict[str, str]:
        return {"server": "https://kubernetes.default.svc", "namespace": self.namespace}

    def operation_running(self) -> bool:
        return self.operation is not None and not self.operation.done()


class ArgoCDStandIn:
    """Argo CD's Application API over local bare repositories, with auto-sync.

    Register applications, then serve `app` (its lifespan starts the poller) or
    call `start()` and `stop()` on the event loop that serves it. `token`, when
    set, is the bearer token every request must carry.
    """

    def __init__(
        self,
        *,
        token: str | SecretStr | None = None,
        poll_seconds: float = 0.2,
        sync_delay_seconds: float = 0.5,
        argocd_namespace: str = "argocd",
        on_sync: SyncListener | None = None,
    ) -> None:
        if isinstance(token, SecretStr):
            token = token.get_secret_value()
        self._token = token or None
        self.poll_seconds = poll_seconds
        self.sync_delay_seconds = sync_delay_seconds
        self.argocd_namespace = argocd_namespace
        self._applications: dict[str, _Application] = {}
        self._listeners: list[SyncListener] = [on_sync] if on_sync else []
        self._live_images: dict[str, str] = {}
        self._live_lock = threading.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._last_poll_errors: dict[str, str] = {}
        self.app = self._build_api()

    # --- Registration and Python-side access ---------------------------------

    def register(
        self,
        name: str,
        *,
        namespace: str,
        repo_path: str | Path,
        app_path: str,
        render_image: RenderImage,
        target_branch: str = "main",
        layout: str = "plain",
        repo_url: str | None = None,
    ) -> None:
        """Add an application that deploys `app_path` of `target_branch` in `repo_path`.

        `repo_url` is what `spec.source.repoURL` reports, the absolute bare
        repository path when unset. The first poll after registration syncs
        the current head.
        """
        if name in self._applications:
            raise ValueError(f"application {name!r} is already registered")
        path = Path(repo_path).resolve()
        self._applications[name] = _Application(
            name=name,
            namespace=namespace,
            repo_path=path,
            app_path=app_path,
            target_branch=target_branch,
            layout=layout,
            render_image=render_image,
            repo_url=repo_url or str(path),
        )
        with self._live_lock:
            self._live_images[name] = ""

    def add_sync_listener(self, listener: SyncListener) -> None:
        """Call `listener` on the event loop after each operation applies resources.

        Listeners must not block, because they run on the loop that serves the API.
        """
        self._listeners.append(listener)

    def live_image(self, name: str) -> str:
        """Return the image the last operation deployed, "" before the first one.

        Safe to call from any thread.
        """
        with self._live_lock:
            if name not in self._live_images:
                raise KeyError(f"application {name!r} is not registered")
            return self._live_images[name]

    def fail_revision(
        self, name: str, revision: str, message: str = DEFAULT_FAILURE_MESSAGE
    ) -> None:
        """Make operations on `revision` end `Failed` with `message` (for tests).

        The resources are applied all the same, so sync ends `Synced` and health
        `Healthy`, as when a PostSync hook fails in Argo CD.
        """
        self._get(name).failing_revisions[revision] = message

    def clear_failures(self, name: str) -> None:
        """Let operations on every revision succeed again."""
        self._get(name).failing_revisions.clear()

    def application(self, name: str) -> dict[str, Any]:
        """Return the Application document that the API serves for `name`."""
        return self._render_document(self._get(name))

    def _get(self, name: str) -> _Application:
        try:
            return self._applications[name]
        except KeyError:
            raise KeyError(f"application {name!r} is not registered") from None

    # --- Lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start the background poller on the running loop, unless it already runs."""
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_forever(), name="argocd-poll")
            logger.info(
                "Argo CD stand-in started for %d applications, polling every %.2f s",
                len(self._applications),
                self.poll_seconds,
            )

    async def stop(self) -> None:
        """Cancel the poller and any running operation."""
        tasks = [self._poller] if self._poller else []
        tasks += [a.operation for a in self._applications.values() if a.operation]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._poller is not None:
            logger.info("Argo CD stand-in stopped")
        self._poller = None

    async def _poll_forever(self) -> None:
        while True:
            for application in list(self._applications.values()):
                await self._poll_once(application)
            await asyncio.sleep(self.poll_seconds)

    async def _poll_once(self, application: _Application) -> None:
        try:
            await self.reconcile(application.name)
        # A missing branch or a broken repository must not stop the other apps:
        # log each new error once and keep polling.
        except GitReadError as err:
            message = str(err)
            if self._last_poll_errors.get(application.name) != message:
                logger.warning(
                    "Polling application %s failed: %s", application.name, message
                )
            self._last_poll_errors[application.name] = message
        else:
            self._last_poll_errors.pop(application.name, None)

    # --- Reconciliation and operations ---------------------------------------

    async def reconcile(self, name: str) -> None:
        """Compare the target branch head with the synced state and auto-sync it."""
        application = self._get(name)
        async with application.lock:
            head = await asyncio.to_thread(
                resolve_revision,
                application.repo_path,
                f"refs/heads/{application.target_branch}",
            )
            application.reconciled_at = _timestamp()
            if head == application.handled_revision or application.operation_running():
                return
            application.handled_revision = head
            # NOTE: Argo CD skips the operation when the new head renders the
            # same manifests as the live state. The stand-in always syncs.
            await self._compare_and_sync(application, head, initiated_by="automated")

    async def request_sync(self, name: str, revision: str | None = None) -> str:
        """Start an operation on the branch head, as `POST .../sync` does.

        Returns the head SHA. Like Argo CD with automated sync, it raises
        `ValueError` when `revision` is set to anything but the target branch
        name, even that branch's head SHA. Raises `RuntimeError` while another
        operation runs.
        """
        application = self._get(name)
        if revision and revision != application.target_branch:
            raise ValueError(
                f"Cannot sync to {revision}: auto-sync currently set to "
                f"{application.target_branch}"
            )
        async with application.lock:
            head = await asyncio.to_thread(
                resolve_revision,
                application.repo_path,
                f"refs/heads/{application.target_branch}",
            )
            if application.operation_running():
                raise RuntimeError("another operation is already in progress")
            application.handled_revision = head
            await self._compare_and_sync(application, head, initiated_by="admin")
            return head

    async def _compare_and_sync(
        self, application: _Application, revision: str, *, initiated_by: str
    ) -> None:
        """Render `revision` and start an operation, or report a ComparisonError."""
        try:
            files = await asyncio.to_thread(
                read_app_files, application.repo_path, revision, application.app_path
            )
            image = application.render_image(files, application.layout)
        # Argo CD reports a render failure on the Application instead of failing
        # the controller, so any error of the injected function is reported.
        except Exception as err:
            message = (
                "rpc error: code = Unknown desc = Manifest generation error: "
                f"{application.app_path}: {err}"
            )
            logger.warning(
                "Application %s cannot render revision %s: %s",
                application.name,
                revision,
                err,
            )
            application.sync_status = "Unknown"
            application.sync_revision = ""
            application.conditions = [
                {
                    "type": "ComparisonError",
                    "message": message,
                    "lastTransitionTime": _timestamp(),
                }
            ]
            return

        application.conditions = []
        if revision != application.sync_revision:
            application.sync_status = "OutOfSync"
            application.sync_revision = revision
        self._begin_operation(application, revision, image, initiated_by)
        application.operation = asyncio.create_task(
            self._finish_operation(application, revision, image),
            name=f"argocd-sync-{application.name}",
        )

    def _begin_operation(
        self, application: _Application, revision: str, image: str, initiated_by: str
    ) -> None:
        """Record a Running operation, so the API reports it before this returns."""
        initiator: dict[str, Any] = (
            {"automated": True}
            if initiated_by == "automated"
            else {"username": "admin"}
        )
        application.operation_state = {
            "operation": {
                "sync": {"revision": revision},
                "initiatedBy": initiator,
                "retry": {},
            },
            "phase": "Running",
            "message": "one or more tasks are running",
            "startedAt": _timestamp(),
            "syncResult": {"revision": revision, "source": application.source},
        }
        application.health_status = "Progressing"
        logger.info(
            "Application %s syncing revision %s (image %s)",
            application.name,
            revision,
            image,
        )

    async def _finish_operation(
        self, application: _Application, revision: str, image: str
    ) -> None:
        await asyncio.sleep(self.sync_delay_seconds)

        # The resources are applied whether or not a hook fails afterwards.
        with self._live_lock:
            self._live_images[application.name] = image
        application.image = image
        application.sync_status = "Synced"
        application.health_status = "Healthy"
        finished_at = _timestamp()
        state = application.operation_state
        assert state is not None, "_begin_operation sets the operation state"
        state["finishedAt"] = finished_at

        failure = application.failing_revisions.get(revision)
        if failure is not None:
            state["phase"] = "Failed"
            state["message"] = failure
            state["syncResult"]["resources"] = [
                self._deployment_result(application),
                {
                    "group": "batch",
                    "version": "v1",
                    "kind": "Job",
                    "namespace": application.namespace,
                    "name": f"{application.name}-post-sync",
                    "status": "Synced",
                    "hookType": "PostSync",
                    "hookPhase": "Failed",
                    "syncPhase": "PostSync",
                    "message": "Job has reached the specified backoff limit",
                },
            ]
            logger.warning(
                "Application %s operation on revision %s failed: %s",
                application.name,
                revision,
                failure,
            )
        else:
            state["phase"] = "Succeeded"
            state["message"] = "successfully synced (all tasks run)"
            state["syncResult"]["resources"] = [self._deployment_result(application)]
            self._append_history(application, state)
            logger.info("Application %s synced revision %s", application.name, revision)

        self._notify(application.name, revision, image)

    def _deployment_result(self, application: _Application) -> dict[str, Any]:
        return {
            "group": "apps",
            "version": "v1",
            "kind": "Deployment",
            "namespace": application.namespace,
            "name": application.name,
            "status": "Synced",
            "message": f"deployment.apps/{application.name} configured",
            "syncPhase": "Sync",
        }

    def _append_history(self, application: _Application, state: dict[str, Any]) -> None:
        """Record the succeeded operation `state` in `status.history`."""
        application.history.append(
            {
                "id": application.next_history_id,
                "revision": state["syncResult"]["revision"],
                "deployStartedAt": state["startedAt"],
                "deployedAt": state["finishedAt"],
                "source": application.source,
                "initiatedBy": state["operation"]["initiatedBy"],
            }
        )
        application.next_history_id += 1
        del application.history[:-HISTORY_LIMIT]

    def _notify(self, name: str, revision: str, image: str) -> None:
        for listener in self._listeners:
            try:
                listener(name, revision, image)
            # A faulty listener must not stop the stand-in from syncing.
            except Exception:
                logger.exception(
                    "Sync listener failed for application %s at revision %s",
                    name,
                    revision,
                )

    # --- Argo CD JSON ---------------------------------------------------------

    def _render_document(self, application: _Application) -> dict[str, Any]:
        sync: dict[str, Any] = {
            "status": application.sync_status,
            "comparedTo": {
                "source": application.source,
                "destination": application.destination,
            },
        }
        if application.sync_revision:
            sync["revision"] = application.sync_revision
        status: dict[str, Any] = {
            "sync": sync,
            "health": {"status": application.health_status},
            "history": copy.deepcopy(application.history),
            "summary": {"images": [application.image] if application.image else []},
            "reconciledAt": application.reconciled_at,
            "sourceType": SOURCE_TYPES.get(application.layout, "Directory"),
        }
        if application.conditions:
            status["conditions"] = list(application.conditions)
        if application.operation_state is not None:
            status["operationState"] = copy.deepcopy(application.operation_state)
        return {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {
                "name": application.name,
                "namespace": self.argocd_namespace,
                "uid": application.uid,
                "creationTimestamp": application.created_at,
            },
            "spec": {
                "project": "default",
                "source": application.source,
                "destination": application.destination,
                "syncPolicy": {"automated": {"prune": False, "selfHeal": False}},
            },
            "status": status,
        }

    # --- HTTP API -------------------------------------------------------------

    def _build_api(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        api = FastAPI(title="Argo CD stand-in", lifespan=lifespan)

        @api.middleware("http")
        async def check_token(request: Request, call_next: Any) -> Any:
            if self._token is not None:
                header = request.headers.get("authorization", "")
                scheme, _, presented = header.partition(" ")
                valid = scheme.lower() == "bearer" and secrets.compare_digest(
                    presented.encode(), self._token.encode()
                )
                if not valid:
                    return _error(401, GRPC_UNAUTHENTICATED, "no session information")
            return await call_next(request)

        @api.get("/api/v1/applications")
        async def list_applications() -> dict[str, Any]:
            items = [self._render_document(a) for a in self._applications.values()]
            return {"metadata": {}, "items": items}

        @api.get("/api/v1/applications/{name}", response_model=None)
        async def get_application(
            name: str, refresh: str | None = None
        ) -> dict[str, Any] | JSONResponse:
            application = self._applications.get(name)
            if application is None:
                return _not_found(name)
            if refresh:
                await self._poll_once(application)
            return self._render_document(application)

        @api.post("/api/v1/applications/{name}/sync", response_model=None)
        async def sync_application(
            name: str, body: Annotated[dict[str, Any] | None, Body()] = None
        ) -> dict[str, Any] | JSONResponse:
            application = self._applications.get(name)
            if application is None:
                return _not_found(name)
            revision = (body or {}).get("revision")
            if revision is not None and not isinstance(revision, str):
                return _error(400, GRPC_INVALID_ARGUMENT, "revision must be a string")
            try:
                await self.request_sync(name, revision or None)
            except (ValueError, RuntimeError) as err:
                return _error(400, GRPC_FAILED_PRECONDITION, str(err))
            except GitReadError as err:
                return _error(500, GRPC_INTERNAL, str(err))
            return self._render_document(application)

        return api


def _error(status_code: int, code: int, message: str) -> JSONResponse:
    """Build an error response in the shape of Argo CD's gRPC gateway."""
    return JSONResponse(
        status_code=status_code,
        content={"error": message, "code": code, "message": message},
    )


def _not_found(name: str) -> JSONResponse:
    return _error(404, GRPC_NOT_FOUND, f'applications.argoproj.io "{name}" not found')
