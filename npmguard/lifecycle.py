"""The data npmguard keeps about each stored token, besides its value.

The credential index (``credentials.json``, no secrets) has one entry per
vault name. Tokens that ``npmguard login`` stored, or that were rotated,
carry more fields there:

- ``url``: the registry URL the token is for (an index entry made by
  ``secure`` has only the ``//host/path/`` key, so the URL is worked out
  from npm's ``registry`` settings, or guessed as https);
- ``username``, ``provider``, ``read_only``;
- ``issued`` (when the current token was created), ``expires``,
  ``token_key`` (the registry's id for it), ``rotated`` (when npmguard last
  replaced it), ``password`` (true when the user chose to store the account
  password next to it, so that tokens can be minted without asking);
- ``exposed``: why the token counts as leaked, until it is rotated.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npmguard.migrate import PASSWORD_SUFFIX, load_index, save_index, state_lock
from npmguard.npmrc.nerf import InvalidRegistryError, candidate_keys, nerf_dart

DAY = 86400.0
# Kinds a registry token API can replace; _auth and _password are a user's
# password, which only the registry's website can change.
TOKEN_KINDS = ("_authToken",)


@dataclass(frozen=True)
class Managed:
    """One stored credential and its index entry."""

    name: str
    meta: Mapping[str, Any]
    # The password entry of another index entry with the same token (secured
    # again from a second file). The same token means the same account.
    shared_password: str | None = None

    @property
    def registry(self) -> str:
        return str(self.meta.get("registry") or "")

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind") or "")

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint") or "")

    @property
    def is_token(self) -> bool:
        return self.kind in TOKEN_KINDS and self.registry.startswith("//")

    @property
    def issued(self) -> float | None:
        value = self.meta.get("issued", self.meta.get("created"))
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def expires(self) -> float | None:
        value = self.meta.get("expires")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def rotated(self) -> float | None:
        value = self.meta.get("rotated")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def password_name(self) -> str | None:
        if self.meta.get("password"):
            return self.name + PASSWORD_SUFFIX
        return self.shared_password

    def age_days(self, now: float | None = None) -> float | None:
        if self.issued is None:
            return None
        return max(0.0, ((now or time.time()) - self.issued) / DAY)

    def url(self, urls: Mapping[str, str] | None = None) -> str:
        """Return the registry URL for API calls: recorded, configured or guessed."""
        recorded = self.meta.get("url")
        if isinstance(recorded, str) and recorded:
            return recorded
        return registry_url(self.registry, urls or {})


def managed(*, tokens_only: bool = False) -> list[Managed]:
    """Return every indexed credential, sorted by registry then name."""
    index = load_index()
    passwords = {
        (meta.get("registry"), meta.get("fingerprint")): name + PASSWORD_SUFFIX
        for name, meta in index.items()
        if meta.get("password") and meta.get("fingerprint")
    }
    entries = [
        Managed(name, meta, passwords.get((meta.get("registry"),
                                           meta.get("fingerprint"))))
        for name, meta in index.items()
    ]
    if tokens_only:
        entries = [m for m in entries if m.is_token]
    return sorted(entries, key=lambda m: (m.registry, m.name))


def find(registry: str | None, *, tokens_only: bool = True) -> list[Managed]:
    """Return the stored credentials for ``registry`` (a URL or key), or all."""
    entries = managed(tokens_only=tokens_only)
    if registry is None:
        return entries
    keys = set(candidate_keys(registry))
    return [m for m in entries if m.registry in keys]


def update(name: str, **fields: object) -> None:
    """Set fields of one index entry; a None value removes the field."""
    with state_lock():
        index = load_index()
        entry = index.get(name)
        if entry is None:
            return
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        save_index(index)


def mark_exposed(fingerprint: str, reason: str) -> list[str]:
    """Mark stored tokens with ``fingerprint`` as exposed; return their names."""
    marked: list[str] = []
    with state_lock():
        index = load_index()
        for name, entry in index.items():
            if entry.get("fingerprint") == fingerprint and not entry.get("exposed"):
                entry["exposed"] = reason
                marked.append(name)
        if marked:
            save_index(index)
    return marked


def configured_urls(env: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """Map ``//host/path/`` keys to the registry URLs npm is configured with."""
    from npmguard.files import read_config
    from npmguard.npmrc.locate import standard_configs

    urls: dict[str, str] = {}
    for located in standard_configs(env, cwd):
        try:
            values = read_config(located.path).document.values()
        except Exception:  # noqa: BLE001 - an unreadable file only loses a hint
            continue
        for key, value in values.items():
            if (key == "registry" or key.endswith(":registry")) and isinstance(
                value, str
            ):
                try:
                    urls.setdefault(nerf_dart(value), value)
                except InvalidRegistryError:
                    continue
    return urls


def registry_url(registry: str, urls: Mapping[str, str]) -> str:
    """Return a URL for a ``//host/path/`` key: configured, else a guess.

    npm's keys drop the scheme. A configured ``registry`` setting with the
    same key gives it back; otherwise loopback hosts are taken to speak
    http and every other host https.
    """
    if not registry.startswith("//"):
        return registry
    if registry in urls:
        return urls[registry]
    host = registry[2:].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return ("http:" if loopback else "https:") + registry

