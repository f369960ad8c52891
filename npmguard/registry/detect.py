"""Pick the token provider for a registry URL.

An explicit ``kind`` (from the config's ``provider`` setting) wins. Otherwise
the URL decides: registry.npmjs.org speaks npm's token API,
npm.pkg.github.com is GitHub Packages, ``/api/v4/…/packages/npm`` is GitLab,
``/artifactory/api/npm/`` is Artifactory, and anything else is taken to be
npm-compatible (Verdaccio and most private registries).
"""

from __future__ import annotations

import urllib.parse

from npmguard.registry import artifactory, gitlab, npmapi, unsupported
from npmguard.registry.base import Provider, RegistryError
from npmguard.registry.http import DEFAULT_TIMEOUT, registry_base

AUTO = "auto"
NPM = npmapi.NAME
GITLAB = gitlab.NAME
ARTIFACTORY = artifactory.NAME
GITHUB = unsupported.GITHUB
NONE = "none"

# Every value ``kind`` takes, with one line on what npmguard can do there.
PROVIDERS: dict[str, str] = {
    NPM: (
        "npm's token API (registry.npmjs.org, Verdaccio): create, list and "
        "revoke tokens; creating one needs the password"
    ),
    GITLAB: (
        "GitLab personal access tokens: unattended self-rotation with an "
        "expiry; new tokens are made in GitLab"
    ),
    ARTIFACTORY: (
        "JFrog Artifactory access tokens: unattended creation with a lifetime "
        "and revocation; no read-only tokens for users"
    ),
    GITHUB: (
        "GitHub Packages: no token API; replace tokens on github.com by hand, "
        "npmguard reminds you"
    ),
    NONE: (
        "no token API: replace tokens with the registry's own tools, npmguard "
        "reminds you"
    ),
}


def detect_kind(registry_url: str) -> str:
    """Return the provider kind the URL implies (never ``auto``)."""
    parts = urllib.parse.urlsplit(registry_base(registry_url))
    host = (parts.hostname or "").lower()
    path = parts.path
    if host == npmapi.NPMJS_HOST:
        return NPM
    if host == unsupported.GITHUB_HOST:
        return GITHUB
    if gitlab.API_MARK + "/" in path and "/packages/npm" in path:
        return GITLAB
    if artifactory.REGISTRY_MARK in path:
        return ARTIFACTORY
    return NPM


def provider_for(
    registry_url: str,
    *,
    kind: str | None = None,
    api: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Provider:
    """Create the provider for ``registry_url``; ``api`` overrides its API URL."""
    chosen = detect_kind(registry_url) if kind in (None, AUTO) else kind
    if chosen == NPM:
        return npmapi.NpmTokenApi(registry_url, api=api, timeout=timeout)
    if chosen == GITLAB:
        return gitlab.GitLabTokens(registry_url, api=api, timeout=timeout)
    if chosen == ARTIFACTORY:
        return artifactory.ArtifactoryTokens(registry_url, api=api, timeout=timeout)
    if chosen == GITHUB:
        return unsupported.ManualTokens(
            registry_url, kind=unsupported.GITHUB, timeout=timeout
        )
    if chosen == NONE:
        return unsupported.ManualTokens(
            registry_url, kind=unsupported.UNKNOWN, timeout=timeout
        )
    known = ", ".join([AUTO, *PROVIDERS])
    raise RegistryError(
        f"unknown registry provider {kind!r} for {registry_base(registry_url)}; "
        f"use one of: {known}"
    )
