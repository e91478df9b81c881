"""Build the GitHub or GitLab provider that `GitSettings.provider` names.

`GitOpsActivities` calls `forge_provider` for the providers in
FORGE_PROVIDERS. It reads these `GitSettings` fields, each optional:

- `api_url`: API base URL. Unset, it is derived from the repository URL:
  `https://api.github.com` for github.com, `https://<host>/api/v3` for GitHub
  Enterprise Server, and `https://<host>/api/v4` for GitLab.
- `repository`: GitHub `owner/name`, or a GitLab project path or numeric id.
  Unset, it is the path of the repository URL (or of the pull request URL).
- `token`: `SecretStr` sent as `Authorization: Bearer` (GitHub) or
  `PRIVATE-TOKEN` (GitLab).
- `merge_method`: `merge`, `squash` or `rebase`, `merge` when unset.
- `api_timeout_seconds`: timeout of one API request, 10 s when unset.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from activities.gitops.forge import (
    host_of,
    repository_from_url,
)
from activities.gitops.github import GitHubProvider
from activities.gitops.gitlab import GitLabProvider
from activities.gitops.local_provider import InvalidInputError

FORGE_PROVIDERS = ("github", "gitlab")


def _default_api_url(provider: str, repo_url: str) -> str:
    host = host_of(repo_url)
    if provider == "github":
        if host in ("", "github.com", "www.github.com"):
            return "https://api.github.com"
        return f"https://{host}/api/v3"
    return f"https://{host or 'gitlab.com'}/api/v4"


def forge_provider(settings: Any, repo_url: str) -> GitHubProvider | GitLabProvider:
    """Return the provider of `settings.provider` for the repository at `repo_url`.

    Raises InvalidInputError when the repository is unknown or a setting
    is invalid.
    """
    provider = settings.provider
    repository = settings.repository or repository_from_url(repo_url)
    if not repository:
        raise InvalidInputError(
            f"the {provider} provider needs a repository; set "
            "REMEDIATOR_GIT_REPOSITORY or REMEDIATOR_GIT_REPO_URL"
        )
    api_url = settings.api_url or _default_api_url(provider, repo_url)
    token = settings.token
    if isinstance(token, str):
        token = SecretStr(token)
    options: dict[str, Any] = {
        "api_url": api_url,
        "merge_method": settings.merge_method or "merge",
        "author_name": settings.author_name,
        "author_email": settings.author_email,
        "timeout_seconds": settings.api_timeout_seconds,
    }
    if provider == "github":
        return GitHubProvider(repository, token, **options)
    if provider == "gitlab":
        return GitLabProvider(repository, token, **options)
    raise InvalidInputError(
        f"unknown forge provider {provider!r}: expected one of "
        f"{', '.join(FORGE_PROVIDERS)}"
    )
