"""Registries whose tokens npmguard cannot create, rotate or revoke.

GitHub Packages (``npm.pkg.github.com``) takes GitHub personal access tokens,
which only github.com's web page makes and revokes. Any registry configured
with ``provider = "none"`` is treated the same way. npmguard still checks who
a token belongs to (npm's ``/-/whoami``, which both serve) and reminds the
user when a stored token gets old; every method that would change a token
raises ``NotSupportedError`` saying what to do by hand.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from npmguard.registry.base import (
    Auth,
    Capabilities,
    IssuedToken,
    NotSupportedError,
    TokenInfo,
    TokenRejectedError,
    epoch,
    jwt_claims,
)
from npmguard.registry.http import (
    DEFAULT_TIMEOUT,
    HttpClient,
    error_for,
    registry_base,
)
from npmguard.secret import Secret

log = logging.getLogger(__name__)

GITHUB = "github"
UNKNOWN = "unknown"
GITHUB_HOST = "npm.pkg.github.com"

GITHUB_CAPABILITIES = Capabilities(
    provider=GITHUB,
    rotate=False,
    unattended=False,
    mint=False,
    expiry=False,
    revoke=False,
    read_only=False,
    needs_password=False,
    note=(
        "GitHub Packages has no API for npm tokens: create a new token on "
        "github.com by hand; npmguard reminds you when the stored one gets old"
    ),
)
UNKNOWN_CAPABILITIES = Capabilities(
    provider=UNKNOWN,
    rotate=False,
    unattended=False,
    mint=False,
    expiry=False,
    revoke=False,
    read_only=False,
    needs_password=False,
    note=(
        "npmguard has no token API for this registry: create a new token with "
        "the registry's own tools; npmguard reminds you when the stored one "
        "gets old"
    ),
)


class ManualTokens:
    """A registry whose tokens the user replaces by hand."""

    def __init__(
        self,
        registry: str,
        *,
        kind: str = UNKNOWN,
        timeout: float = DEFAULT_TIMEOUT,
        client: HttpClient | None = None,
    ) -> None:
        if kind not in (GITHUB, UNKNOWN):
            raise ValueError(f"unknown kind {kind!r}")
        self.registry = registry_base(registry)
        self.kind = kind
        self._http = client or HttpClient(self.registry, timeout=timeout)
        self.capabilities = (
            GITHUB_CAPABILITIES if kind == GITHUB else UNKNOWN_CAPABILITIES
        )

    def whoami(self, token: Secret) -> str:
        resp = self._http.request("GET", self.registry + "-/whoami", bearer=token)
        if resp.status != 200:
            raise error_for(resp, "checking the token", [token])
        name = resp.json_object().get("username")
        if not isinstance(name, str) or not name:
            raise TokenRejectedError(
                f"{self.registry}: the registry does not know this token"
            )
        return name

    def token_info(self, token: Secret) -> TokenInfo:
        # There is no API to ask, but a JWT still carries its own lifetime.
        claims = jwt_claims(token) or {}
        return TokenInfo(
            created=epoch(claims.get("iat")), expires=epoch(claims.get("exp"))
        )

    def list_tokens(self, auth: Auth) -> list[TokenInfo]:
        raise NotSupportedError(f"{self.registry}: {self._cannot('list tokens')}")

    def create(self, auth: Auth, *, scope: str, ttl_seconds: int | None) -> IssuedToken:
        raise NotSupportedError(f"{self.registry}: {self._cannot('create tokens')}")

    def replace(self, auth: Auth, *, ttl_seconds: int | None) -> IssuedToken:
        raise NotSupportedError(f"{self.registry}: {self._cannot('rotate tokens')}")

    def revoke(self, auth: Auth, target: Secret, info: TokenInfo | None) -> None:
        raise NotSupportedError(f"{self.registry}: {self._cannot('revoke tokens')}")

    def login(self, username: str, password: Secret, otp: str | None) -> IssuedToken:
        raise NotSupportedError(f"{self.registry}: {self._cannot('log in')}")

    def web_login(
        self,
        show_url: Callable[[str], None],
        *,
        timeout: float = 300.0,
        stop: threading.Event | None = None,
    ) -> IssuedToken:
        raise NotSupportedError(f"{self.registry}: {self._cannot('log in')}")

    def _cannot(self, action: str) -> str:
        if self.kind == GITHUB:
            return (
                f"GitHub Packages gives npmguard no way to {action}; create a new "
                "token on github.com (Settings, Developer settings, personal "
                "access tokens, with read:packages, or write:packages to "
                "publish), run npmguard login, and delete the old token there"
            )
        return (
            f"npmguard has no token API for this registry and cannot {action}; "
            "create a new token with the registry's own tools and run npmguard "
            "login"
        )
