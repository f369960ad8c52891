"""JFrog Artifactory access tokens, for Artifactory's npm repositories.

npm registry URLs look like ``https://HOST/artifactory/api/npm/REPO/``; the
Access API is ``https://HOST/access/api/v1`` (with the same prefix when the
platform is served under a sub-path).

Calls, from JFrog's public REST API documentation:

- who: ``GET /access/api/v1/tokens/me`` (Artifactory 7.53.1 and later) gives
  the current token's ``token_id``, ``subject``, ``expiry`` and ``issued_at``;
  the user name is the subject's last ``/users/`` part. Older versions
  return 404, and then the npm repository's ``-/whoami`` is used instead.
- create: ``POST /access/api/v1/tokens`` (form body) with ``scope`` =
  ``applied-permissions/user``, ``expires_in`` seconds, ``refreshable`` and
  ``description``; the answer has ``token_id``, ``access_token``,
  ``expires_in`` and ``scope``.
- revoke: ``DELETE /access/api/v1/tokens/{token_id}`` (200 revoked, 204
  already revoked), or ``/tokens/me`` to revoke the calling token.
- list: ``GET /access/api/v1/tokens`` lists the caller's own tokens.

NOTE: these calls follow the documentation and are tested against a fake
written from it, not against a running Artifactory.

A user-scoped token carries every permission the user has: a user cannot make
a read-only token for itself (that takes a group scope an administrator
grants), so ``create`` refuses READ_ONLY rather than hand out more.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from npmguard.registry.base import (
    PUBLISH,
    READ_ONLY,
    Auth,
    Capabilities,
    IssuedToken,
    NotSupportedError,
    RegistryError,
    TokenInfo,
    TokenRejectedError,
    epoch,
    jwt_claims,
)
from npmguard.registry.http import (
    DEFAULT_TIMEOUT,
    HttpClient,
    Response,
    error_for,
    registry_base,
)
from npmguard.secret import Secret

log = logging.getLogger(__name__)

NAME = "artifactory"
REGISTRY_MARK = "/artifactory/api/npm/"
ACCESS_PATH = "/access/api/v1"
USER_SCOPE = "applied-permissions/user"
DESCRIPTION = "npmguard"
_LOGIN_HINT = (
    "create an access token in the JFrog Platform (your profile page, "
    '"Generate an Identity Token") and pass it to npmguard login'
)

CAPABILITIES = Capabilities(
    provider=NAME,
    rotate=True,
    unattended=True,
    mint=True,
    expiry=True,
    revoke=True,
    read_only=False,
    needs_password=False,
    note=(
        "Artifactory creates user-scoped access tokens with an expiry; they "
        "carry all of the user's permissions, as a user cannot make a "
        "read-only token for itself"
    ),
)


def access_base(registry: str) -> str:
    """Return the Access API URL for an npm repository URL on Artifactory."""
    base = registry_base(registry)
    parts = urllib.parse.urlsplit(base)
    index = parts.path.find(REGISTRY_MARK)
    if index < 0:
        raise RegistryError(
            f"{base}: not an Artifactory npm repository URL (no {REGISTRY_MARK} "
            "in the path); set the API URL in the config"
        )
    path = parts.path[:index] + ACCESS_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ArtifactoryTokens:
    """The JFrog Access token API behind one Artifactory npm repository."""

    def __init__(
        self,
        registry: str,
        *,
        api: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: HttpClient | None = None,
    ) -> None:
        self.registry = registry_base(registry)
        self.api = (api or access_base(self.registry)).rstrip("/")
        registry_base(self.api)  # refuses a non-http(s) override
        self._http = client or HttpClient(self.registry, timeout=timeout)
        self.capabilities = CAPABILITIES

    def whoami(self, token: Secret) -> str:
        me = self._me(token)
        if me is not None:
            name = _user_of(me.get("subject"))
            if name:
                return name
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
        me = self._me(token)
        if me is not None:
            return _info(me)
        # Older Artifactory: its access tokens are JWTs with these claims.
        claims = jwt_claims(token) or {}
        return TokenInfo(
            key=_str_or_none(claims.get("jti")),
            created=epoch(claims.get("iat")),
            expires=epoch(claims.get("exp")),
        )

    def list_tokens(self, auth: Auth) -> list[TokenInfo]:
        resp = self._call("GET", "/tokens", auth.token)
        if resp.status != 200:
            raise error_for(resp, "listing tokens", [auth.token])
        items = resp.json_object().get("tokens")
        if not isinstance(items, list):
            raise RegistryError(f"{self.registry}: the token list has no tokens")
        return [_info(item) for item in items if isinstance(item, dict)]

    def create(self, auth: Auth, *, scope: str, ttl_seconds: int | None) -> IssuedToken:
        if scope == READ_ONLY:
            raise NotSupportedError(
                f"{self.registry}: a user cannot create a read-only Artifactory "
                "token; ask an administrator for a token scoped to a read-only "
                "group, or use a publish token"
            )
        form = {
            "scope": USER_SCOPE,
            "refreshable": "false",
            "description": DESCRIPTION,
        }
        if ttl_seconds is not None:
            if ttl_seconds <= 0:
                raise ValueError("ttl_seconds must be positive")
            form["expires_in"] = str(int(ttl_seconds))
        resp = self._call("POST", "/tokens", auth.token, form=form)
        if resp.status not in (200, 201):
            hint = ""
            if resp.status == 403 and ttl_seconds is not None:
                hint = "the lifetime may exceed what the administrator allows"
            raise error_for(resp, "creating a token", [auth.token], hint=hint)
        data = resp.json_object()
        value = data.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{self.registry}: created a token but sent no value")
        token = Secret(value)
        now = time.time()
        lifetime = _number(data.get("expires_in"))
        info = TokenInfo(
            key=_str_or_none(data.get("token_id")),
            read_only=False,
            created=now,
            expires=now + lifetime if lifetime else None,
        )
        log.info(
            "%s: created token %s (id %s, lifetime %s)",
            self.registry,
            token.fingerprint,
            info.key,
            f"{lifetime:.0f} s" if lifetime else "the platform default",
        )
        return IssuedToken(value=token, info=info)

    def replace(self, auth: Auth, *, ttl_seconds: int | None) -> IssuedToken:
        # The Access API cannot copy a token's scope; a user-scoped token has
        # the user's permissions, which is what a token the user made has.
        return self.create(auth, scope=PUBLISH, ttl_seconds=ttl_seconds)

    def revoke(self, auth: Auth, target: Secret, info: TokenInfo | None) -> None:
        key = info.key if info is not None else None
        if key is None and auth.token != target:
            key = self._key_of(target)
            if key is None:
                log.info(
                    "%s: token %s is not accepted any more; nothing to revoke",
                    self.registry,
                    target.fingerprint,
                )
                return
        if key is None:
            resp = self._call("DELETE", "/tokens/me", target)
            already_gone = resp.status in (204, 401)
        else:
            path = "/tokens/" + urllib.parse.quote(key, safe="")
            resp = self._call("DELETE", path, auth.token)
            already_gone = resp.status in (204, 404)
        if already_gone:
            log.info(
                "%s: token %s was already revoked", self.registry, target.fingerprint
            )
            return
        if resp.status != 200:
            raise error_for(resp, "revoking a token", [auth.token, target])
        log.info(
            "%s: revoked token %s (id %s)",
            self.registry,
            target.fingerprint,
            key or "of the request",
        )

    def login(self, username: str, password: Secret, otp: str | None) -> IssuedToken:
        raise NotSupportedError(
            f"{self.registry}: npmguard does not log in to Artifactory with a "
            f"password; {_LOGIN_HINT}"
        )

    def web_login(
        self,
        show_url: Callable[[str], None],
        *,
        timeout: float = 300.0,
        stop: threading.Event | None = None,
    ) -> IssuedToken:
        raise NotSupportedError(
            f"{self.registry}: npmguard has no web login for Artifactory; {_LOGIN_HINT}"
        )

    # ----------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        token: Secret,
        *,
        form: dict[str, str] | None = None,
    ) -> Response:
        return self._http.request(method, self.api + path, bearer=token, form=form)

    def _me(self, token: Secret) -> dict[str, Any] | None:
        """Fetch the current token's details; None on versions without them."""
        resp = self._call("GET", "/tokens/me", token)
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise error_for(resp, "reading the token's details", [token])
        return resp.json_object()

    def _key_of(self, target: Secret) -> str | None:
        try:
            return self.token_info(target).key
        except TokenRejectedError:
            return None


def _info(data: dict[str, Any]) -> TokenInfo:
    return TokenInfo(
        key=_str_or_none(data.get("token_id")),
        read_only=None,
        created=epoch(data.get("issued_at")),
        expires=epoch(data.get("expiry")),
    )


def _user_of(subject: object) -> str | None:
    """``jfac@01abc/users/alice`` and ``alice`` both name alice."""
    if not isinstance(subject, str) or not subject:
        return None
    marker = "/users/"
    if marker in subject:
        return subject.rsplit(marker, 1)[1] or None
    return subject if "/" not in subject else None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
