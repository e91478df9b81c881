"""Parts shared by the GitHub and GitLab pull-request providers.

`GitHubProvider` and `GitLabProvider` speak their forge's REST API over httpx
and reuse this module for the rollback edit, the pull request text, input
checks and the classification of HTTP failures:

- connection errors, timeouts, HTTP 429 and 5xx raise `ForgeUnavailableError`,
  which is not a `PermanentGitOpsError`, so the activity's retry policy retries;
- any other 4xx raises `ForgeRequestError` (non-retryable);
- required checks that block a merge raise `MergeBlockedError` (non-retryable).

The token is sent only in a request header. Error messages name the method
and path, never the headers, and any echo of the token in a response body is
replaced by `***` before the body reaches a message.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml
from pydantic import SecretStr

from activities.gitops.local_provider import (
    INCIDENT_TRAILER,
    TRACE_TRAILER,
    InvalidInputError,
    NothingToRollBackError,
    PermanentGitOpsError,
    _trace_id,
    cleanup_whitespace,
    describe_pull_request,
    scrub,
    validate_names,
)
from activities.gitops.yaml_edit import image_scalars, set_scalars
from workflows.models import ImageChange, PullRequestInput

logger = logging.getLogger(__name__)

MERGE_METHODS = ("merge", "squash", "rebase")
STRATEGIES = ("pin",)
REMEDIATION_LABEL = "remediation"
SHADOW_LABEL = "shadow"
DEFAULT_TIMEOUT_SECONDS = 10.0

MAX_DETAIL_CHARS = 300


class ForgeUnavailableError(Exception):
    """The forge could not be reached or failed with a retryable status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ForgeRequestError(PermanentGitOpsError):
    """The forge rejected a request with a 4xx status that a retry cannot fix."""

    error_type = "ForgeRequestRejected"

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class MergeBlockedError(PermanentGitOpsError):
    """Required checks or rules of the forge block the merge."""

    error_type = "MergeBlocked"

    def __init__(self, message: str, checks: list[str]) -> None:
        super().__init__(message)
        self.checks = checks


class UnsupportedStrategyError(PermanentGitOpsError):
    """The provider cannot build the rollback with the requested strategy."""

    error_type = "UnsupportedStrategy"


def validate_merge_method(merge_method: str) -> str:
    """Check that `merge_method` is in MERGE_METHODS and return it."""
    if merge_method not in MERGE_METHODS:
        raise InvalidInputError(
            f"invalid merge method {merge_method!r}: expected one of "
            f"{', '.join(MERGE_METHODS)}"
        )
    return merge_method


def validate_open(request: PullRequestInput, provider: str) -> None:
    """Check the fields that end up in API paths, branch names and the edit.

    Raises InvalidInputError, NothingToRollBackError, or
    UnsupportedStrategyError for the revert strategy.
    """
    validate_names(request)
    if request.strategy == "revert":
        # TODO: revert through the API needs the compare API and a content
        # merge for paths that changed since the suspect commits.
        raise UnsupportedStrategyError(
            f"the {provider} provider supports only the pin strategy, not revert; "
            "set REMEDIATOR_GIT_STRATEGY=pin or use the local provider"
        )
    if request.strategy not in STRATEGIES:
        raise InvalidInputError(f"invalid strategy {request.strategy!r}: expected pin")
    if not request.change.last_good_revision:
        raise InvalidInputError("the change has no last good revision to roll back to")
    if not request.change.image_changes:
        raise NothingToRollBackError(
            "strategy pin needs image changes, and the change has none"
        )


def labels_for(draft: bool) -> list[str]:
    """Return the labels of a rollback pull request."""
    return [REMEDIATION_LABEL, SHADOW_LABEL] if draft else [REMEDIATION_LABEL]


def describe(request: PullRequestInput) -> tuple[str, str]:
    """Build the pull request title and body, the same text as the local provider's."""
    return describe_pull_request(request)


def commit_message(request: PullRequestInput, title: str, body: str) -> str:
    """Build a rollback commit message with the incident and trace trailers."""
    trailers = [f"{INCIDENT_TRAILER}: {request.incident_id}"]
    trace_id = _trace_id(request.trace_id)
    if trace_id:
        trailers.append(f"{TRACE_TRAILER}: {trace_id}")
    return cleanup_whitespace(f"{title}\n\n{body}\n" + "\n".join(trailers) + "\n")


def has_incident_trailer(message: str, incident_id: str) -> bool:
    """Tell whether a commit message carries this incident's trailer line."""
    trailer = f"{INCIDENT_TRAILER}: {incident_id}"
    return any(line.strip() == trailer for line in message.splitlines())


def pin_edits(
    read_file: Callable[[str], str | None],
    changes: list[ImageChange],
    *,
    revision: str,
    good_counts_as_done: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """Write each change's good value where `read_file` returns the bad one.

    `read_file` returns a file's text at `revision`, or None when it is absent.
    Returns the edited files (path to new text) and a line for each change
    left out. With `good_counts_as_done`, a value that is already good (an
    earlier attempt committed it to the remediation branch) is neither edited
    nor left out. Raises NothingToRollBackError when no change is edited or done.
    """
    by_file: dict[str, list[ImageChange]] = {}
    for change in changes:
        by_file.setdefault(change.file, []).append(change)

    edited: dict[str, str] = {}
    skipped: list[str] = []
    done = 0
    for file, file_changes in sorted(by_file.items()):
        text = read_file(file)
        if text is None:
            skipped.append(f"{file}: not found at {revision[:12]}")
            continue
        try:
            current = image_scalars(text)
        except yaml.YAMLError as error:
            raise InvalidInputError(f"cannot edit {file}: {error}") from error
        updates: dict[str, str] = {}
        for change in file_changes:
            value = current.get(change.location)
            if value == change.bad:
                updates[change.location] = change.good
            elif good_counts_as_done and value == change.good:
                done += 1
            else:
                skipped.append(
                    f"{file} {change.location}: head has {value!r}, "
                    f"not the bad {change.bad!r}"
                )
        if updates:
            try:
                edited[file] = set_scalars(text, updates)
            except ValueError as error:
                raise InvalidInputError(f"cannot edit {file}: {error}") from error
    if not edited and not done:
        raise NothingToRollBackError(
            "the target branch no longer has any bad value: " + "; ".join(skipped)
        )
    return edited, skipped


def skipped_note(skipped: list[str]) -> str:
    """Return the body paragraph that lists the changes left out, or ''."""
    if not skipped:
        return ""
    note = "\nLeft unchanged, because the target branch changed them since:\n"
    return note + "".join(f"- {scrub(line)}\n" for line in skipped)


def decode_base64_text(content: str, path: str) -> str:
    """Decode a base64 file body of a contents API response as UTF-8."""
    try:
        return base64.b64decode(content).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot edit {path}: not UTF-8 text") from error


def encode_base64_text(text: str) -> str:
    """Encode UTF-8 text as the base64 string the contents APIs expect."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def repository_from_url(url: str) -> str:
    """Return the `owner/name` (or GitLab group path) of a repository or PR URL.

    Accepts `https://host/owner/repo(.git)`, `git@host:owner/repo.git`, a
    GitHub pull request URL (`.../pull/7`) and a GitLab merge request URL
    (`.../-/merge_requests/7`). Returns '' when the URL has no path.
    """
    text = url.strip()
    if "://" in text:
        path = urlsplit(text).path
    elif "@" in text and ":" in text:
        path = text.split(":", 1)[1]
    else:
        return ""
    path = path.split("/-/", 1)[0]
    path = re.sub(r"/pulls?/\d+/?$", "", path)
    return path.strip("/").removesuffix(".git")


def host_of(url: str) -> str:
    """Return the host of an HTTPS or scp-like SSH repository URL, or ''."""
    text = url.strip()
    if "://" in text:
        return (urlsplit(text).hostname or "").lower()
    if "@" in text and ":" in text:
        return text.split("@", 1)[1].split(":", 1)[0].lower()
    return ""


class ForgeClient:
    """A synchronous httpx session that classifies forge failures.

    One client serves one provider operation: `session()` opens the pool and
    closes it at the end, because the activity builds a provider per call.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        secret: SecretStr | None,
        forge: str,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers)
        self.secret = secret
        self.forge = forge
        self.timeout = timeout
        self.transport = transport
        self._http: httpx.Client | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[ForgeClient]:
        """Open the HTTP connection pool for one operation, then close it."""
        if self._http is not None:
            yield self
            return
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self.headers,
            timeout=self.timeout,
            transport=self.transport,
        )
        try:
            yield self
        finally:
            self._http.close()
            self._http = None

    def redact(self, text: str) -> str:
        """Replace the token, if the text contains it, by `***`."""
        if self.secret is not None:
            value = self.secret.get_secret_value()
            if value:
                text = text.replace(value, "***")
        return text

    def detail(self, response: httpx.Response) -> str:
        """Return the message of an error body, redacted and cut to one line."""
        try:
            body = response.json()
        except ValueError:
            body = None
        message: Any = None
        if isinstance(body, dict):
            message = body.get("message") or body.get("error")
            errors = body.get("errors")
            if isinstance(errors, list) and errors:
                message = f"{message}: {errors}"
        text = str(message) if message else response.text or response.reason_phrase
        return scrub(self.redact(text))[:MAX_DETAIL_CHARS]

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        accept: tuple[int, ...] = (),
    ) -> httpx.Response:
        """Send one request and return its response.

        Returns 2xx responses and those whose status is in `accept`. Raises
        ForgeUnavailableError (retryable) for transport errors, timeouts, 429
        and 5xx, and ForgeRequestError for any other status.
        """
        if self._http is None:
            with self.session():
                return self.request(
                    method, path, json=json, params=params, accept=accept
                )
        what = f"{self.forge} {method} {path}"
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.TimeoutException as error:
            raise ForgeUnavailableError(
                f"{what} timed out after {self.timeout} s: {type(error).__name__}"
            ) from None
        except httpx.TransportError as error:
            raise ForgeUnavailableError(
                f"{what} failed: {type(error).__name__}: {self.redact(str(error))}"
            ) from None
        status = response.status_code
        if status in accept or 200 <= status < 300:
            return response
        detail = self.detail(response)
        if status == 429 or status >= 500:
            raise ForgeUnavailableError(
                f"{what} returned HTTP {status} ({detail}); retrying later", status
            )
        hint = ""
        if status in (401, 403):
            hint = "; check REMEDIATOR_GIT_TOKEN and its permissions"
        raise ForgeRequestError(
            f"{what} returned HTTP {status} ({detail}){hint}", status
        )

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its JSON body, or None for an empty body."""
        response = self.request(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ForgeUnavailableError(
                f"{self.forge} {method} {path} returned HTTP "
                f"{response.status_code} with a body that is not JSON",
                response.status_code,
            ) from None
