"""Argo CD backend that reads the Application custom resource through Kubernetes.

Where the workers may not reach the Argo CD API server but may read the
cluster, they read `applications.argoproj.io/v1alpha1` objects with the
`kubernetes` client instead. The object is the document that Argo CD's REST
API returns for `GET /api/v1/applications/{name}` (metadata, spec, status),
so `evaluate_sync` and `find_change` work on it unchanged.

- `KubernetesArgoCDClient.get_application(name)` reads one Application in the
  configured namespace (`argocd` by default). With `refresh`, it first sets
  the annotation `argocd.argoproj.io/refresh`, which makes the application
  controller compare with Git now; a rejected patch is logged and skipped.
- `KubernetesArgoCDActivities.wait_for_sync` reads the Application once and
  then watches it (`watch=true` with `fieldSelector=metadata.name=<name>`),
  evaluating each event with `evaluate_sync` and heartbeating meanwhile. It
  registers under the same activity name as `ArgoCDActivities.wait_for_sync`,
  so a worker registers one backend or the other.

Errors are those of `activities.argocd`: 404 raises
`ArgoCDApplicationNotFoundError`, 401/403 `ArgoCDPermissionError`, other 4xx
`ArgoCDRequestError`, and connection failures, timeouts, 429 and 5xx
`ArgoCDUnavailableError` (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import watch
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.argocd import (
    MAX_BACKOFF_SECONDS,
    SYNC_FAILED,
    ArgoCDApplicationNotFoundError,
    ArgoCDError,
    ArgoCDPermissionError,
    ArgoCDRequestError,
    ArgoCDUnavailableError,
    SyncState,
    SyncVerdict,
    _Progress,
    evaluate_sync,
    sync_result,
)
from remediator.settings import ArgoCDSettings
from workflows.models import SyncInput, SyncResult

logger = logging.getLogger(__name__)

GROUP = "argoproj.io"
VERSION = "v1alpha1"
PLURAL = "applications"
DEFAULT_NAMESPACE = "argocd"
REFRESH_ANNOTATION = "argocd.argoproj.io/refresh"
HTTP_GONE = 410

T = TypeVar("T")


def _api_error(name: str, error: k8s.ApiException) -> ArgoCDError:
    """Map a Kubernetes API error on an Application to the Argo CD client errors."""
    status = error.status or 0
    detail = f"Kubernetes API: {error.reason or 'no reason'}"
    if status == 404:
        return ArgoCDApplicationNotFoundError(name, detail)
    if status in (401, 403):
        return ArgoCDPermissionError(name, status, detail)
    # 410 Gone: a watch's resourceVersion expired, and a fresh read recovers.
    if status in (HTTP_GONE, 429) or status >= 500 or status == 0:
        return ArgoCDUnavailableError(name, f"HTTP {status} ({detail})", status)
    return ArgoCDRequestError(name, status, detail)


class KubernetesArgoCDClient:
    """Reads Argo CD Applications as custom resources through the Kubernetes API.

    `api_client` defaults to one built from the in-cluster service account,
    or from the kubeconfig outside a cluster.
    """

    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        api_client: k8s.ApiClient | None = None,
        *,
        request_timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.request_timeout = request_timeout
        self.api_client = api_client or _default_api_client()
        self.api = k8s.CustomObjectsApi(self.api_client)

    def close(self) -> None:
        """Close the connection pool of the Kubernetes client."""
        self.api_client.close()

    def _call(self, name: str, function: Callable[[], T]) -> T:
        try:
            return function()
        except k8s.ApiException as error:
            raise _api_error(name, error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ArgoCDUnavailableError(
                name, f"Kubernetes API request failed ({type(error).__name__})"
            ) from None

    def read_application(self, name: str) -> dict[str, Any]:
        """Read one Application object; blocking."""
        document = self._call(
            name,
            lambda: self.api.get_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                _request_timeout=self.request_timeout,
            ),
        )
        if not isinstance(document, dict):
            raise ArgoCDUnavailableError(
                name, f"the Kubernetes API returned a {type(document).__name__}"
            )
        return document

    def request_refresh(self, name: str, refresh: str) -> None:
        """Set the refresh annotation; blocking. Rejections are logged, not raised."""
        body = {"metadata": {"annotations": {REFRESH_ANNOTATION: refresh}}}
        try:
            self._call(
                name,
                lambda: self.api.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    name,
                    body,
                    _request_timeout=self.request_timeout,
                ),
            )
        except (ArgoCDPermissionError, ArgoCDRequestError) as error:
            logger.warning(
                "Could not request a %s refresh of application %s: %s",
                refresh,
                name,
                error.message,
            )

    async def get_application(
        self, name: str, *, refresh: str | None = None, **_: Any
    ) -> dict[str, Any]:
        """Fetch one Application, after a refresh request when `refresh` is set.

        Accepts and ignores the REST client's `app_namespace` and `project`
        keywords, because the namespace comes from the settings.
        """
        if refresh:
            await asyncio.to_thread(self.request_refresh, name, refresh)
        return await asyncio.to_thread(self.read_application, name)

    def watch_application(
        self,
        name: str,
        resource_version: str,
        timeout_seconds: int,
        on_event: Callable[[dict[str, Any]], bool],
    ) -> str:
        """Stream the Application's events until `on_event` returns True or the
        server ends the watch after `timeout_seconds`; blocking.

        Returns the last resourceVersion seen. Raises
        ArgoCDApplicationNotFoundError when the Application is deleted, and
        ArgoCDUnavailableError with status 410 when `resource_version` expired.
        """
        watcher = watch.Watch()
        last = resource_version

        def stream() -> str:
            nonlocal last
            for event in watcher.stream(
                self.api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                # The read timeout covers a connection that stops sending.
                _request_timeout=(self.request_timeout, timeout_seconds + 10),
            ):
                kind = event.get("type")
                document = event.get("object")
                if not isinstance(document, dict):
                    continue
                version = (document.get("metadata") or {}).get("resourceVersion")
                last = version or last
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    raise ArgoCDApplicationNotFoundError(
                        name, "deleted while waiting for its sync"
                    )
                if on_event(document):
                    break
            return last

        try:
            return self._call(name, stream)
        finally:
            watcher.stop()


def _default_api_client() -> k8s.ApiClient:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return k8s.ApiClient()


class KubernetesArgoCDActivities:
    """`wait_for_sync` over the Kubernetes watch API. Register an instance's methods."""

    def __init__(
        self,
        settings: ArgoCDSettings,
        *,
        client: KubernetesArgoCDClient | None = None,
        watch_seconds: int = 30,
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self.settings = settings
        self.client = client or KubernetesArgoCDClient(
            settings.namespace or DEFAULT_NAMESPACE
        )
        self.watch_seconds = max(int(watch_seconds), 1)
        self.heartbeat_seconds = heartbeat_seconds

    async def get_application(self, name: str, **kwargs: Any) -> dict[str, Any]:
        """Fetch one Application with `KubernetesArgoCDClient.get_application`."""
        return await self.client.get_application(name, **kwargs)

    @activity.defn(name="wait_for_sync")
    async def wait_for_sync(self, input: SyncInput) -> SyncResult:
        """Watch the Application until it reports `input.revision` synced and healthy.

        Heartbeats every `heartbeat_seconds` while it waits. Returns
        `synced=False` when the sync timeout has passed since the first
        attempt started, and raises `SyncFailed` (non-retryable) when Argo CD
        cannot deploy the revision.
        """
        info = activity.info()
        details = info.heartbeat_details[0] if info.heartbeat_details else None
        progress = _Progress.resume(details, input.revision)
        timeout_seconds = input.timeout_seconds or self.settings.sync_timeout_seconds
        deadline = progress.started_at + timeout_seconds
        started_at = datetime.fromtimestamp(progress.started_at, UTC)

        async def heartbeat_forever() -> None:
            while True:
                activity.heartbeat(progress.to_details())
                await asyncio.sleep(self.heartbeat_seconds)

        heartbeats = asyncio.create_task(heartbeat_forever())
        try:
            verdict = await self._wait(input, progress, deadline, started_at)
        finally:
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
        activity.heartbeat(progress.to_details())

        if verdict is not None and verdict.state is SyncState.DONE:
            activity.logger.info(
                "Application %s synced revision %s after %d events",
                input.argocd_application,
                input.revision,
                progress.polls,
            )
            return sync_result(True, progress, verdict.message)
        if verdict is not None and verdict.state is SyncState.FAILED:
            activity.logger.error(
                "Application %s failed to sync revision %s: %s",
                input.argocd_application,
                input.revision,
                verdict.message,
            )
            raise ApplicationError(
                verdict.message,
                sync_result(False, progress, verdict.message).model_dump(mode="json"),
                type=SYNC_FAILED,
                non_retryable=True,
            )
        last = progress.last.message if progress.last else "no status read"
        message = (
            f"Argo CD did not report revision {input.revision} synced and healthy "
            f"within {timeout_seconds:.0f} s. Last status: {last}"
        )
        activity.logger.warning(
            "Timed out waiting for application %s: %s",
            input.argocd_application,
            message,
        )
        return sync_result(False, progress, message)

    async def _wait(
        self,
        input: SyncInput,
        progress: _Progress,
        deadline: float,
        started_at: datetime,
    ) -> SyncVerdict | None:
        """Return the first final verdict, or None when the deadline passes."""
        name = input.argocd_application
        refresh = "normal" if progress.polls == 0 else None
        resource_version = ""
        consecutive_errors = 0

        def evaluate(document: dict[str, Any]) -> bool:
            progress.polls += 1
            progress.last = evaluate_sync(
                document,
                input.revision,
                repo_url=input.repo_url or None,
                compared_after=started_at,
            )
            return progress.last.state is not SyncState.PENDING

        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            try:
                if not resource_version:
                    # A fresh read gives the state now and the version to watch from.
                    document = await self.client.get_application(name, refresh=refresh)
                    refresh = None
                    if evaluate(document):
                        return progress.last
                    metadata = document.get("metadata") or {}
                    resource_version = str(metadata.get("resourceVersion") or "")
                    remaining = deadline - time.time()
                    if remaining <= 0:
                        return None
                seconds = max(1, min(self.watch_seconds, int(remaining) + 1))
                resource_version = await asyncio.to_thread(
                    self.client.watch_application,
                    name,
                    resource_version,
                    seconds,
                    evaluate,
                )
                consecutive_errors = 0
                last = progress.last
                if last is not None and last.state is not SyncState.PENDING:
                    return last
            except ArgoCDUnavailableError as error:
                # 410 Gone: the watched version expired, so read the object again.
                resource_version = ""
                if error.status_code == HTTP_GONE:
                    continue
                consecutive_errors += 1
                progress.errors += 1
                delay = min(
                    max(self.settings.poll_seconds, 0.05) * 2**consecutive_errors,
                    MAX_BACKOFF_SECONDS,
                    max(deadline - time.time(), 0),
                )
                activity.logger.warning(
                    "Watching application %s failed (%d in a row), retrying in "
                    "%.1f s: %s",
                    name,
                    consecutive_errors,
                    delay,
                    error.message,
                )
                await asyncio.sleep(delay)
