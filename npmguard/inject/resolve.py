"""Work out which credentials a command run in a directory would use.

npm reads the project config (the ``.npmrc`` next to the nearest
``package.json``), then the user config, then the global one; a key set at
an earlier level wins. For one registry it tries the registry's nerf-dart key
and then each shorter path prefix, and for one key it prefers
``_authToken``, then ``_auth``, then ``username`` with ``_password``
(the order of npm-registry-fetch 19, which sends npm 11's requests).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from npmguard.errors import ConfigFileError, NpmguardError
from npmguard.files import read_config
from npmguard.npmrc.credentials import Finding, find_credentials
from npmguard.npmrc.locate import standard_configs
from npmguard.npmrc.nerf import DEFAULT_REGISTRY, candidate_keys, nerf_dart
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore, require

# npm 11's env-replace: ``${NAME}``, or ``${NAME?}`` which becomes "" when
# unset; an odd number of backslashes before ``$`` escapes the reference.
_ENV_EXPRESSION = re.compile(r"(?<!\\)(\\*)\$\{([^${}?]+)(\?)?\}")


def expand_env(value: str, env: Mapping[str, str]) -> str:
    """Expand environment references in a config value as npm 11 does."""

    def replace(match: re.Match[str]) -> str:
        escapes, name, optional = match.group(1), match.group(2), match.group(3)
        if len(escapes) % 2:
            return match.group(0)[(len(escapes) + 1) // 2 :]
        fallback = "" if optional else match.group(0)[len(escapes) :]
        return escapes[len(escapes) // 2 :] + env.get(name, fallback)

    return _ENV_EXPRESSION.sub(replace, value)


@dataclass(frozen=True)
class Credential:
    """A credential ready to hand out."""

    registry: str
    kind: str  # "_authToken", "_auth" or "basic"
    value: Secret
    source: Path

    def auth_header(self) -> Secret:
        """Return the Authorization header value npm would send."""
        if self.kind == "_authToken":
            return Secret("Bearer " + self.value.reveal())
        return Secret("Basic " + self.value.reveal())


class Effective:
    """The credential lines that win for each config key, across levels."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.cwd = cwd
        self.by_key: dict[str, Finding] = {}
        self.registry_setting: str | None = None
        self.errors: list[NpmguardError] = []
        for located in reversed(standard_configs(env, cwd)):
            try:
                config = read_config(located.path)
            except ConfigFileError as err:
                if located.path.exists():
                    self.errors.append(err)
                continue
            registry = config.document.values().get("registry")
            if isinstance(registry, str):
                self.registry_setting = registry
            for finding in find_credentials(located.path, config.document):
                if finding.section is not None or finding.shadowed:
                    continue
                # Lower levels were read first, so a later level overwrites.
                self.by_key[finding.key] = finding

    def default_registry(self) -> str:
        return self.registry_setting or DEFAULT_REGISTRY

    def secured(self) -> list[Finding]:
        return [f for f in self.by_key.values() if f.state == "secured"]

    def lookup(self, registry_url: str) -> list[Finding]:
        """Return the findings npm would use for ``registry_url``, best first."""
        for nerf in candidate_keys(registry_url):
            token = self.by_key.get(f"{nerf}:_authToken")
            if token and token.state in ("plaintext", "secured", "reference"):
                return [token]
            auth = self.by_key.get(f"{nerf}:_auth")
            if auth and auth.state in ("plaintext", "secured", "reference"):
                return [auth]
            password = self.by_key.get(f"{nerf}:_password")
            username = self.by_key.get(f"{nerf}:username")
            if (
                password
                and password.state in ("plaintext", "secured", "reference")
                and username
                and username.entry is not None
                and isinstance(username.entry.value, str)
            ):
                return [password, username]
        return []


def value_of(
    finding: Finding, store: CredentialStore, env: Mapping[str, str]
) -> Secret:
    """Return the value behind a finding: from the vault, the file or the env."""
    if finding.state == "secured" and finding.vault_name:
        return require(store, finding.vault_name)
    if finding.state == "plaintext" and finding.value is not None:
        return finding.value
    if finding.state == "reference" and finding.entry is not None:
        expanded = expand_env(str(finding.entry.value), env)
        if expanded:
            return Secret(expanded)
    raise NpmguardError(
        f"{finding.key} has no usable value (it is {finding.state})",
        path=finding.path,
        line=finding.line,
    )


def resolve(
    registry_url: str,
    effective: Effective,
    store: CredentialStore,
    env: Mapping[str, str],
) -> Credential:
    """Return the credential for ``registry_url`` or raise a clear error."""
    findings = effective.lookup(registry_url)
    nerf = nerf_dart(registry_url)
    if not findings:
        raise NpmguardError(
            f"no credential for {nerf} in the npm config files read from "
            f"{effective.cwd}; run `npmguard scan` to see what is configured"
        )
    first = findings[0]
    if first.kind == "_password":
        password = base64.b64decode(value_of(first, store, env).reveal()).decode()
        username = str(findings[1].entry.value if findings[1].entry else "")
        pair = base64.b64encode(f"{username}:{password}".encode()).decode()
        return Credential(nerf, "basic", Secret(pair), first.path)
    return Credential(nerf, first.kind, value_of(first, store, env), first.path)


def exec_environment(
    effective: Effective,
    store: CredentialStore,
    registry_url: str | None,
) -> dict[str, str]:
    """Return npm's ``npm_config_//host/:KIND`` variables for secured values.

    With ``registry_url`` only that registry's keys are included. Every
    value is read before any is returned, so one missing value fails the
    whole call and the command does not run half-authenticated.
    """
    findings = effective.secured()
    if registry_url is not None:
        keys = set(candidate_keys(registry_url))
        findings = [f for f in findings if f.registry in keys]
    variables: dict[str, str] = {}
    for finding in findings:
        if finding.registry is None or not finding.key.startswith("//"):
            continue  # Top-level legacy keys are rejected by npm 11 anyway.
        value = require(store, finding.vault_name or "")
        variables[f"npm_config_{finding.key}"] = value.reveal()
    return variables


def exec_findings(effective: Effective, registry_url: str | None) -> list[Finding]:
    """Return the secured findings ``exec_environment`` turns into variables.

    Each becomes ``npm_config_<finding.key>``; ``npmguard.inject.mint`` uses
    the findings' vault names to replace stored tokens with minted ones.
    """
    findings = effective.secured()
    if registry_url is not None:
        keys = set(candidate_keys(registry_url))
        findings = [f for f in findings if f.registry in keys]
    return [
        f for f in findings
        if f.registry is not None and f.key.startswith("//") and f.vault_name
    ]
