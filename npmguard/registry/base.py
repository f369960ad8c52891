"""What a registry can do with tokens, behind one interface.

A provider speaks one registry family's token API: who a token belongs to,
creating a token (read-only or with publish rights, with an expiry where the
registry enforces one), listing and revoking tokens, and replacing a token.
Registries that cannot do some of this say so in ``Capabilities`` so that
``npmguard status`` and ``npmguard rotate`` can tell the user plainly.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from npmguard.errors import NpmguardError
from npmguard.secret import Secret

READ_ONLY = "read-only"
PUBLISH = "publish"


class RegistryError(NpmguardError):
    """A registry request failed; the message names the registry, never a token."""


class RegistryUnreachableError(RegistryError):
    """The registry did not answer (connection refused, timeout, TLS failure)."""


class TokenRejectedError(RegistryError):
    """The registry refused the token (401, 403, or an anonymous whoami)."""


class OtpRequiredError(RegistryError):
    """The registry wants a one-time code for this request."""


class PasswordRequiredError(RegistryError):
    """Creating or revoking tokens on this registry needs the account password."""


class NotSupportedError(RegistryError):
    """The registry has no API for this; the message says what to do instead."""


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; ``note`` is one plain sentence for the user."""

    provider: str  # "npm-token-api", "gitlab", "artifactory", "github", "unknown"
    rotate: bool  # can replace the stored token with a new one
    unattended: bool  # rotation needs no password or one-time code
    mint: bool  # can create a short-lived token for one job
    expiry: bool  # tokens it creates carry an expiry the registry enforces
    revoke: bool  # can revoke a token it knows
    read_only: bool  # can create read-only tokens
    needs_password: bool  # creating a token needs the account password
    note: str = ""


@dataclass(frozen=True)
class TokenInfo:
    """What the registry says about a token; holds no secret."""

    key: str | None = None  # the registry's id for the token, used to revoke it
    read_only: bool | None = None
    created: float | None = None  # epoch seconds
    expires: float | None = None  # epoch seconds


@dataclass(frozen=True)
class IssuedToken:
    """A token the registry just created, with what is known about it."""

    value: Secret
    info: TokenInfo
    old_revoked: bool = False  # the registry revoked the token it replaced


@dataclass(frozen=True)
class Auth:
    """What a request may authenticate with; only ``token`` is always present."""

    token: Secret
    password: Secret | None = None
    otp: str | None = None


class Provider(Protocol):
    """One registry's token API."""

    registry: str  # the registry URL, as npm is configured with it
    capabilities: Capabilities

    def whoami(self, token: Secret) -> str:
        """Return the user name the token belongs to; raise TokenRejectedError."""

    def token_info(self, token: Secret) -> TokenInfo:
        """Return what the registry tells about ``token`` (expiry, key, scope)."""

    def create(self, auth: Auth, *, scope: str, ttl_seconds: int | None) -> IssuedToken:
        """Create a new token for the same user with ``scope`` (READ_ONLY/PUBLISH)."""

    def replace(self, auth: Auth, *, ttl_seconds: int | None) -> IssuedToken:
        """Return a token to take ``auth.token``'s place.

        Most registries create a new one and leave the old one in force
        until ``revoke``; GitLab's self-rotation revokes the old token at
        once and says so with ``old_revoked``.
        """

    def revoke(self, auth: Auth, target: Secret, info: TokenInfo | None) -> None:
        """Revoke ``target``; a token the registry no longer knows is not an error."""

    def list_tokens(self, auth: Auth) -> list[TokenInfo]:
        """Return the tokens of ``auth``'s user that the registry lists."""

    def login(self, username: str, password: Secret, otp: str | None) -> IssuedToken:
        """Log in with a user name and password (npm's legacy flow)."""

    def web_login(
        self,
        show_url: Callable[[str], None],
        *,
        timeout: float = 300.0,
        stop: threading.Event | None = None,
    ) -> IssuedToken:
        """Log in in a browser: call ``show_url`` with the page, wait for the token.

        Waiting ends after ``timeout`` seconds or when ``stop`` is set.
        """


# --------------------------------------------------------------------------
# Helpers the providers share


def jwt_claims(token: Secret) -> dict[str, Any] | None:
    """Decode the payload of ``token`` when it is a JWT, WITHOUT verifying it.

    Only for display and caching (expiry, a registry's token id): the
    signature is not checked, so nothing here may grant or deny access.
    """
    parts = token.reveal().split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    padded = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        payload = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def epoch(value: object) -> float | None:
    """Convert a number, an ISO 8601 time or a date to seconds since the epoch.

    A bare date (GitLab's ``expires_at``) means midnight UTC at its start.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        # Some APIs send milliseconds.
        return float(value) / 1000 if value > 1e11 else float(value)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
