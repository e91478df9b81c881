"""Argo CD client and the `wait_for_sync` activity.

The incident workflow runs `wait_for_sync` after the rollback pull request is
merged. The activity reads the Argo CD Application through the REST API
(`GET /api/v1/applications/{name}`) until it reports the merged revision synced
and healthy, and other activities reuse `ArgoCDClient.get_application` to read
an Application once.

Errors raised here are `ApplicationError` subclasses, so Temporal records their
type and retries only the retryable ones:

- `ArgoCDApplicationNotFoundError` (404): non-retryable, names the application.
- `ArgoCDPermissionError` (401, 403): non-retryable. Since v2.6.7 Argo CD also
  returns 403 for an application that does not exist, unless the request
  names the application's project.
- `ArgoCDRequestError` (any other 4xx): non-retryable.
- `ArgoCDUnavailableError` (connection errors, timeouts, 429, 5xx, a body that
  is not JSON): retryable. `wait_for_sync` retries these itself with backoff.
- `ApplicationError(type="SyncFailed", non_retryable=True)` from `wait_for_sync`:
  Argo CD ran the merged revision and the operation failed or errored, or it
  cannot render the revision (`Unknown` sync status, an `...Error` condition).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr
from temporalio import activity
from temporalio.exceptions import ApplicationError

from remediator.settings import ArgoCDSettings
from workflows.models import SyncInput, SyncResult

logger = logging.getLogger(__name__)

SYNC_FAILED = "SyncFailed"

# Maximum pause between two reads after transient errors, in seconds.
MAX_BACKOFF_SECONDS = 10.0


# --- Errors -------------------------------------------------------------------


class ArgoCDError(ApplicationError):
    """Base class of every error the Argo CD client raises."""


class ArgoCDApplicationNotFoundError(ArgoCDError):
    """The Argo CD API returned 404 for the application."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(
            f"Argo CD application {name!r} not found ({detail}); check the "
            "application name and REMEDIATOR_ARGOCD_APPLICATION_TEMPLATE",
            type="ArgoCDApplicationNotFound",
            non_retryable=True,
        )
        self.name = name


class ArgoCDPermissionError(ArgoCDError):
    """The Argo CD API rejected the token (401) or the request (403)."""

    def __init__(self, name: str, status_code: int, detail: str) -> None:
        super().__init__(
            f"Argo CD rejected the request for application {name!r} with HTTP "
            f"{status_code} ({detail}); check REMEDIATOR_ARGOCD_TOKEN and the "
            "project RBAC. Argo CD also returns 403 for an application that "
            "does not exist",
            type="ArgoCDPermissionDenied",
            non_retryable=True,
        )
        self.name = name
        self.status_code = status_code


class ArgoCDRequestError(ArgoCDError):
    """The Argo CD API rejected the request with another 4xx status."""

    def __init__(self, name: str, status_code: int, detail: str) -> None:
        super().__init__(
            f"Argo CD rejected the request for application {name!r} with HTTP "
            f"{status_code} ({detail})",
            type="ArgoCDRequestRejected",
            non_retryable=True,
        )
        self.name = name
        self.status_code = status_code


class ArgoCDUnavailableError(ArgoCDError):
    """The Argo CD API could not be reached or failed with a retryable status."""

    def __init__(self, name: str, detail: str, status_code: int | None = None) -> None:
        super().__init__(
            f"Argo CD API unavailable while reading application {name!r}: {detail}",
            type="ArgoCDUnavailable",
            non_retryable=False,
        )
        self.name = name
        self.status_code = status_code


# --- Client -------------------------------------------------------------------


def _error_detail(response: httpx.Response) -> str:
    """Return the message of an Argo CD error body, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        message = body.get("message") or body.get("error")
        if message:
            return str(message)
    return response.text[:200]


class ArgoCDClient:
    """Reads Argo CD Applications over the REST API with a bearer token.

    The token is sent only in the `Authorization` header and is never logged or
    included in error messages.
    """

    def __init__(
        self,
        base_url: str,
        token: SecretStr | None,
        timeout: float = 10.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json"}
        if token is not None and token.get_secret_value():
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> ArgoCDClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the underlying HTTP connection pool."""
        await self._http.aclose()

    async def get_application(
        self,
        name: str,
        *,
        refresh: str | None = None,
        app_namespace: str | None = None,
        project: str | None = None,
    ) -> dict[str, Any]:
        """Fetch one Application as Argo CD's JSON document.

        `refresh` ("normal" or "hard") makes Argo CD compare the Application
        with Git before it returns. `app_namespace` selects an Application
        outside Argo CD's own namespace. With `project`, Argo CD returns 404
        rather than 403 for a missing Application that the token could see.
        Raises the `ArgoCDError` subclasses described in the module docstring.
        """
        params: dict[str, str] = {}
        if refresh:
            params["refresh"] = refresh
        if app_namespace:
            params["appNamespace"] = app_namespace
        if project:
            params["project"] = project
        path = f"/api/v1/applications/{quote(name, safe='')}"

        try:
            response = await self._http.get(path, params=params)
        except httpx.TimeoutException as err:
            raise ArgoCDUnavailableError(name, f"request timed out ({err!r})") from err
        except httpx.TransportError as err:
            raise ArgoCDUnavailableError(name, f"connection failed ({err!r})") from err

        status = response.status_code
        if status == 404:
            raise ArgoCDApplicationNotFoundError(name, _error_detail(response))
        if status in (401, 403):
            raise ArgoCDPermissionError(name, status, _error_detail(response))
        if status == 429 or status >= 500:
            detail = f"HTTP {status} ({_error_detail(response)})"
            raise ArgoCDUnavailableError(name, detail, status_code=status)
        if status >= 400:
            raise ArgoCDRequestError(name, status, _error_detail(response))

        try:
            document = response.json()
        except ValueError as err:
            raise ArgoCDUnavailableError(
                name, f"HTTP {status} with a body that is not JSON"
            ) from err
        if not isinstance(document, dict):
            raise ArgoCDUnavailableError(
                name,
                f"HTTP {status} with a JSON {type(document).__name__}, not an object",
            )
        return document


# --- Sync verdict ---------------------------------------------------------------


class SyncState(StrEnum):
    """The state of the sync of one revision."""

    DONE = "done"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True)
class SyncVerdict:
    """The verdict of `evaluate_sync` on one Application document."""

    state: SyncState
    message: str
    revision: str = ""
    sync_status: str = ""
    health_status: str = ""
    operation_phase: str = ""


FAILED_PHASES = frozenset({"Failed", "Error"})
RUNNING_PHASES = frozenset({"Running", "Terminating"})


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [str(item) for item in value if item is not None]


def normalize_repo_url(url: str) -> str:
    """Reduce a Git URL to lower-case host/path, so SSH, HTTPS and `.git` match."""
    text = url.strip().lower()
    if "://" in text:
        text = text.split("://", 1)[1]
        text = text.split("@", 1)[-1]
    elif "@" in text and ":" in text:
        # scp-like SSH form: git@host:org/repo.git
        text = text.split("@", 1)[1].replace(":", "/", 1)
    text = text.rstrip("/")
    if text.endswith(".git"):
        text = text[: -len(".git")]
    return text.rstrip("/")


def _same_revision(reported: str, revision: str) -> bool:
    return bool(reported) and reported.strip().lower() == revision.strip().lower()


def _source_indexes(app: dict[str, Any], repo_url: str | None) -> list[int] | None:
    """Return indexes of `spec.sources` with repoURL `repo_url`, or None for any."""
    if not repo_url:
        return None
    sources = _mapping(app.get("spec")).get("sources")
    if not isinstance(sources, list):
        return None
    wanted = normalize_repo_url(repo_url)
    return [
        index
        for index, source in enumerate(sources)
        if normalize_repo_url(str(_mapping(source).get("repoURL", ""))) == wanted
    ]


def _reported_revision(
    holder: dict[str, Any], revision: str, indexes: list[int] | None
) -> tuple[str, bool]:
    """Return the revision reported in `holder` and whether it is ours.

    `holder` is `status.sync`, `operationState.syncResult` or
    `operationState.operation.sync`. Single-source apps use `revision`, and
    multi-source apps use `revisions`, one entry per source.
    """
    single = str(holder.get("revision") or "")
    if single:
        return single, _same_revision(single, revision)

    revisions = _strings(holder.get("revisions"))
    if not revisions:
        return "", False
    candidates = (
        revisions
        if indexes is None
        else [revisions[i] for i in indexes if i < len(revisions)]
    )
    for candidate in candidates:
        if _same_revision(candidate, revision):
            return candidate, True
    return ",".join(revisions), False


def _operation_revision(
    operation_state: dict[str, Any], revision: str, indexes: list[int] | None
) -> tuple[str, bool]:
    """Return the revision an operation ran or runs, and whether it is ours."""
    sync_result = _mapping(operation_state.get("syncResult"))
    reported, ours = _reported_revision(sync_result, revision, indexes)
    if reported:
        return reported, ours
    requested = _mapping(_mapping(operation_state.get("operation")).get("sync"))
    return _reported_revision(requested, revision, indexes)


def _failed_hooks(operation_state: dict[str, Any]) -> list[str]:
    """Describe the sync result resources whose hook or sync status failed."""
    resources = _mapping(operation_state.get("syncResult")).get("resources")
    failed = []
    for resource in resources if isinstance(resources, list) else []:
        entry = _mapping(resource)
        if (
            entry.get("hookPhase") in FAILED_PHASES
            or entry.get("status") == "SyncFailed"
        ):
            kind = entry.get("kind", "?")
            name = entry.get("name", "?")
            failed.append(f"{kind}/{name}: {entry.get('message', '')}".rstrip(": "))
    return failed


def _error_conditions(status: dict[str, Any]) -> list[str]:
    """Describe `status.conditions` whose type ends in `Error`, like ComparisonError."""
    conditions = status.get("conditions")
    described = []
    for condition in conditions if isinstance(conditions, list) else []:
        entry = _mapping(condition)
        condition_type = str(entry.get("type") or "")
        if condition_type.endswith("Error"):
            described.append(f"{condition_type}: {entry.get('message', '')}")
    return described


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def evaluate_sync(
    app: dict[str, Any],
    revision: str,
    *,
    repo_url: str | None = None,
    compared_after: datetime | None = None,
) -> SyncVerdict:
    """Decide whether Argo CD has deployed `revision` of the Application `app`.

    Done needs all of: the sync revision equal to `revision`, sync status
    `Synced`, health `Healthy`, and no `Failed`/`Error`/`Running` operation on
    `revision`. For multi-source apps the revision is the entry of
    `sync.revisions` for the source whose repoURL is `repo_url`, or any entry
    when `repo_url` is unset.

    Failed means Argo CD cannot deploy `revision`: its operation ended `Failed`
    or `Error`, or the comparison at `revision` is `Unknown` or carries an
    `...Error` condition. Argo CD omits the revision when manifest generation
    fails, so an error without a revision counts as ours too, unless
    `status.reconciledAt` is older than `compared_after` (the error may predate
    the merge).

    Everything else is pending, including an operation that still retries or
    failed on another (older) revision.
    """
    status = _mapping(app.get("status"))
    sync = _mapping(status.get("sync"))
    sync_status = str(sync.get("status") or "")
    health_status = str(_mapping(status.get("health")).get("status") or "")
    operation_state = _mapping(status.get("operationState"))
    phase = str(operation_state.get("phase") or "")
    indexes = _source_indexes(app, repo_url)

    reported, at_revision = _reported_revision(sync, revision, indexes)
    op_revision, operation_is_ours = _operation_revision(
        operation_state, revision, indexes
    )

    def verdict(state: SyncState, message: str) -> SyncVerdict:
        return SyncVerdict(
            state=state,
            message=message,
            revision=reported,
            sync_status=sync_status,
            health_status=health_status,
            operation_phase=phase,
        )

    # 1. Argo CD cannot render or compare our revision.
    error_conditions = _error_conditions(status)
    if error_conditions or sync_status == "Unknown":
        reconciled_at = _parse_time(status.get("reconciledAt"))
        stale = (
            compared_after is not None
            and reconciled_at is not None
            and reconciled_at < compared_after
        )
        if at_revision or (not reported and not stale):
            detail = "; ".join(error_conditions) or "no condition reported"
            return verdict(
                SyncState.FAILED,
                f"Argo CD reports sync status {sync_status or 'missing'} for "
                f"revision {revision}: {detail}",
            )
        return verdict(
            SyncState.PENDING,
            f"Argo CD reports sync status {sync_status or 'missing'} with errors "
            f"for revision {reported or 'unknown'}, which predates {revision}",
        )

    # 2. The operation on our revision ended badly or is still running.
    if operation_is_ours and phase in FAILED_PHASES:
        message = str(operation_state.get("message") or "")
        hooks = _failed_hooks(operation_state)
        if hooks:
            message = f"{message}; failed resources: {', '.join(hooks)}"
        return verdict(
            SyncState.FAILED,
            f"Argo CD sync operation on revision {revision} ended {phase}: {message}",
        )
    if operation_is_ours and phase in RUNNING_PHASES:
        retries = operation_state.get("retryCount")
        retry_note = f" after {retries} retries" if retries else ""
        return verdict(
            SyncState.PENDING,
            f"Argo CD sync operation on revision {revision} is {phase}{retry_note}",
        )

    # 3. Argo CD has not compared or applied our revision yet.
    if not at_revision:
        note = ""
        if operation_state and not operation_is_ours:
            note = (
                f"; the last operation ran revision {op_revision or 'unknown'} "
                f"and is {phase or 'without phase'}"
            )
        return verdict(
            SyncState.PENDING,
            f"Argo CD reports revision {reported or 'none'}, waiting for "
            f"{revision}{note}",
        )
    if sync_status != "Synced":
        return verdict(
            SyncState.PENDING,
            f"Argo CD reports sync status {sync_status or 'missing'} at {revision}",
        )
    if health_status != "Healthy":
        return verdict(
            SyncState.PENDING,
            f"Argo CD reports health {health_status or 'missing'} at {revision}",
        )
    return verdict(
        SyncState.DONE, f"Argo CD reports revision {revision} Synced and Healthy"
    )


# --- Activity -------------------------------------------------------------------


@dataclass
class _Progress:
    """Heartbeat details that let a retried `wait_for_sync` resume its clock."""

    revision: str
    started_at: float
    polls: int = 0
    errors: int = 0
    last: SyncVerdict | None = None

    def to_details(self) -> dict[str, Any]:
        last = self.last
        return {
            "revision": self.revision,
            "started_at": self.started_at,
            "polls": self.polls,
            "errors": self.errors,
            "state": last.state.value if last else "",
            "sync_status": last.sync_status if last else "",
            "health_status": last.health_status if last else "",
            "operation_phase": last.operation_phase if last else "",
            "message": last.message if last else "",
        }

    @classmethod
    def resume(cls, details: Any, revision: str) -> _Progress:
        """Rebuild progress from an earlier attempt's heartbeat on `revision`."""
        if isinstance(details, dict) and details.get("revision") == revision:
            try:
                progress = cls(
                    revision=revision,
                    started_at=float(details["started_at"]),
                    polls=int(details.get("polls", 0)),
                    errors=int(details.get("errors", 0)),
                )
            except (KeyError, TypeError, ValueError):
                progress = None
            # A start time in the future is corrupt, so the clock starts again.
            if progress is not None and 0 < progress.started_at <= time.time():
                return progress
        return cls(revision=revision, started_at=time.time())


class ArgoCDActivities:
    """Activities that read Argo CD. Register an instance's methods on a worker."""

    def __init__(
        self, settings: ArgoCDSettings, *, client: ArgoCDClient | None = None
    ) -> None:
        self.settings = settings
        self.client = client or ArgoCDClient(settings.url, settings.token)

    async def get_application(self, name: str, **kwargs: Any) -> dict[str, Any]:
        """Fetch one Application with `ArgoCDClient.get_application`."""
        return await self.client.get_application(name, **kwargs)

    @activity.defn(name="wait_for_sync")
    async def wait_for_sync(self, input: SyncInput) -> SyncResult:
        """Poll Argo CD until it reports `input.revision` synced and healthy.

        Heartbeats after every read. Returns `synced=False` when
        `ArgoCDSettings.sync_timeout_seconds` has passed since the first
        attempt started, and raises `SyncFailed` (non-retryable) when Argo CD
        cannot deploy the revision.
        """
        info = activity.info()
        details = info.heartbeat_details[0] if info.heartbeat_details else None
        progress = _Progress.resume(details, input.revision)
        if progress.polls:
            activity.logger.info(
                "Resuming the wait for application %s at revision %s after %d polls",
                input.argocd_application,
                input.revision,
                progress.polls,
            )
        timeout_seconds = input.timeout_seconds or self.settings.sync_timeout_seconds
        deadline = progress.started_at + timeout_seconds
        # An error that Argo CD reported before this wait began may predate the merge.
        started_at = datetime.fromtimestamp(progress.started_at, UTC)
        poll_seconds = max(input.poll_seconds or self.settings.poll_seconds, 0.05)
        consecutive_errors = 0

        # The first read of a fresh wait requests a refresh, so Argo CD
        # compares with Git now instead of at its next reconciliation.
        refresh = "normal" if progress.polls == 0 else None
        while True:
            delay = poll_seconds
            try:
                app = await self.client.get_application(
                    input.argocd_application, refresh=refresh
                )
                refresh = None
            # Transient API failures never count as synced: back off and read again.
            except ArgoCDUnavailableError as err:
                consecutive_errors += 1
                progress.errors += 1
                delay = min(poll_seconds * 2**consecutive_errors, MAX_BACKOFF_SECONDS)
                activity.logger.warning(
                    "Reading application %s failed (%d in a row), retrying in "
                    "%.1f s: %s",
                    input.argocd_application,
                    consecutive_errors,
                    delay,
                    err.message,
                )
            else:
                consecutive_errors = 0
                progress.polls += 1
                progress.last = evaluate_sync(
                    app,
                    input.revision,
                    repo_url=input.repo_url or None,
                    compared_after=started_at,
                )
                verdict = progress.last
                if verdict.state is SyncState.DONE:
                    activity.logger.info(
                        "Application %s synced revision %s after %d polls",
                        input.argocd_application,
                        input.revision,
                        progress.polls,
                    )
                    return sync_result(True, progress, verdict.message)
                if verdict.state is SyncState.FAILED:
                    activity.logger.error(
                        "Application %s failed to sync revision %s: %s",
                        input.argocd_application,
                        input.revision,
                        verdict.message,
                    )
                    raise ApplicationError(
                        verdict.message,
                        sync_result(False, progress, verdict.message).model_dump(
                            mode="json"
                        ),
                        type=SYNC_FAILED,
                        non_retryable=True,
                    )

            activity.heartbeat(progress.to_details())
            remaining = deadline - time.time()
            if remaining <= 0:
                last = progress.last.message if progress.last else "no status read"
                message = (
                    f"Argo CD did not report revision {input.revision} synced and "
                    f"healthy within {timeout_seconds:.0f} s. "
                    f"Last status: {last}"
                )
                activity.logger.warning(
                    "Timed out waiting for application %s: %s",
                    input.argocd_application,
                    message,
                )
                return sync_result(False, progress, message)
            await asyncio.sleep(min(delay, remaining))


def sync_result(synced: bool, progress: _Progress, message: str) -> SyncResult:
    """Build the activity result from the last verdict of a sync wait."""
    last = progress.last
    return SyncResult(
        synced=synced,
        revision=last.revision if last else "",
        sync_status=last.sync_status if last else "",
        health_status=last.health_status if last else "",
        operation_phase=last.operation_phase if last else "",
        message=message,
        polls=progress.polls,
    )
