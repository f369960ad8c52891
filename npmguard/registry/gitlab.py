"""GitLab personal access tokens, for GitLab's npm package registry.

npm registry URLs on GitLab look like
``https://HOST/api/v4/projects/ID/packages/npm/``,
``https://HOST/api/v4/groups/ID/-/packages/npm/`` or
``https://HOST/api/v4/packages/npm/``; the REST API is the part up to and
including ``/api/v4`` (which keeps a sub-path when GitLab is served under one).

NOTE: tested against a fake written from GitLab's API documentation, not
against a running GitLab.

A token rotates itself: ``POST /personal_access_tokens/self/rotate`` returns
a new token with the same scopes and revokes the old one at once. GitLab sets
an expiry on every token (a week after rotation unless ``expires_at`` sets
another date), so rotation is unattended and tokens always expire. A user cannot
create a useful personal access token through the API, so ``create`` and the
logins say to make one in GitLab's web page.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from npmguard.registry.base import (
    Auth,
    Capabilities,
    IssuedToken,
    NotSupportedError,
    RegistryError,
    TokenInfo,
    TokenRejectedError,
    epoch,
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

NAME = "gitlab"
API_MARK = "/api/v4"
# Scopes that allow more than reading; GitLab's npm publish needs "api".
_WRITE_SCOPES = frozenset({"api", "write_repository", "write_registry", "sudo"})
_MAX_PAGES = 50
_CREATE_HINT = (
    "create a personal access token with the read_api scope (api to publish) "
    "in GitLab's user settings and pass it to npmguard login"
)

CAPABILITIES = Capabilities(
    provider=NAME,
    rotate=True,
    unattended=True,
    mint=False,
    expiry=True,
    revoke=True,
    read_only=False,
    needs_password=False,
    note=(
        "GitLab rotates a personal access token in place (the old one stops "
        "working at once) and gives it an expiry date; new tokens are made in "
        "GitLab's web page"
    ),
)


def api_base(registry: str) -> str:
    """Return GitLab's REST API URL for an npm registry URL on GitLab."""
    base = registry_base(registry)
    parts = urllib.parse.urlsplit(base)
    index = parts.path.find(API_MARK + "/")
    if index < 0:
        raise RegistryError(
            f"{base}: not a GitLab package registry URL (no {API_MARK}/ in the "
            "path); set the API URL in the config"
        )
    path = parts.path[: index + len(API_MARK)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class GitLabTokens:
    """GitLab's personal access token API behind one npm registry."""

    def __init__(
        self,
        registry: str,
        *,
        api: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: HttpClient | None = None,
    ) -> None:
        self.registry = registry_base(registry)
        self.api = (api or api_base(self.registry)).rstrip("/")
        registry_base(self.api)  # refuses a non-http(s) override
        self._http = client or HttpClient(self.registry, timeout=timeout)
        self.capabilities = CAPABILITIES

    def whoami(self, token: Secret) -> str:
        data = self._get_object("/user", token, "checking the token")
        name = data.get("username")
        if not isinstance(name, str) or not name:
            raise RegistryError(
                f"{self.registry}: GitLab's /user response has no username"
            )
        return name

    def token_info(self, token: Secret) -> TokenInfo:
        data = self._get_object(
            "/personal_access_tokens/self", token, "reading the token's details"
        )
        if data.get("active") is False or data.get("revoked") is True:
            raise TokenRejectedError(
                f"{self.registry}: GitLab reports this token as revoked or expired"
            )
        return _info(data)

    def list_tokens(self, auth: Auth) -> list[TokenInfo]:
        found: list[TokenInfo] = []
        page = "1"
        for _ in range(_MAX_PAGES):
            query = urllib.parse.urlencode(
                {"state": "active", "per_page": "100", "page": page}
            )
            resp = self._call("GET", f"/personal_access_tokens?{query}", auth.token)
            if resp.status != 200:
                raise error_for(resp, "listing tokens", [auth.token])
            items = resp.json()
            if not isinstance(items, list):
                raise RegistryError(
                    f"{self.registry}: GitLab's token list response is not a list"
                )
            found.extend(_info(item) for item in items if isinstance(item, dict))
            page = resp.header("x-next-page").strip()
            if not page:
                break
        return found

    def create(self, auth: Auth, *, scope: str, ttl_seconds: int | None) -> IssuedToken:
        raise NotSupportedError(
            f"{self.registry}: GitLab lets a user create only limited tokens "
            f"through its API; {_CREATE_HINT}"
        )

    def replace(self, auth: Auth, *, ttl_seconds: int | None) -> IssuedToken:
        body: dict[str, str] = {}
        if ttl_seconds is not None:
            body["expires_at"] = _expiry_date(ttl_seconds)
        resp = self._call(
            "POST", "/personal_access_tokens/self/rotate", auth.token, body
        )
        if resp.status == 404:
            # GitLab before 16.10 rotates only by id.
            old = self.token_info(auth.token)
            resp = self._call(
                "POST", f"/personal_access_tokens/{old.key}/rotate", auth.token, body
            )
        if resp.status not in (200, 201):
            hint = ""
            if resp.status == 403:
                hint = "the token needs the api or self_rotate scope to rotate itself"
            raise error_for(resp, "rotating the token", [auth.token], hint=hint)
        data = resp.json_object()
        value = data.get("token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{self.registry}: GitLab rotated but sent no token")
        token = Secret(value)
        info = _info(data)
        log.info(
            "%s: GitLab rotated token %s into %s (id %s, expires %s); the old one "
            "is revoked",
            self.registry,
            auth.token.fingerprint,
            token.fingerprint,
            info.key,
            _day(info.expires),
        )
        return IssuedToken(value=token, info=info, old_revoked=True)

    def revoke(self, auth: Auth, target: Secret, info: TokenInfo | None) -> None:
        key = info.key if info is not None else None
        if key is not None and auth.token != target:
            path = f"/personal_access_tokens/{urllib.parse.quote(key, safe='')}"
            resp = self._call("DELETE", path, auth.token)
            already_gone = resp.status == 404
        else:
            resp = self._call("DELETE", "/personal_access_tokens/self", target)
            # The target authenticates this request: a 401 means GitLab no
            # longer accepts it, which is what revoking wants.
            already_gone = resp.status == 401
        if already_gone:
            log.info(
                "%s: token %s was already revoked or expired",
                self.registry,
                target.fingerprint,
            )
            return
        if resp.status not in (200, 204):
            raise error_for(resp, "revoking a token", [auth.token, target])
        log.info("%s: revoked token %s", self.registry, target.fingerprint)

    def login(self, username: str, password: Secret, otp: str | None) -> IssuedToken:
        raise NotSupportedError(
            f"{self.registry}: GitLab's npm registry takes no password login; "
            f"{_CREATE_HINT}"
        )

    def web_login(
        self,
        show_url: Callable[[str], None],
        *,
        timeout: float = 300.0,
        stop: threading.Event | None = None,
    ) -> IssuedToken:
        raise NotSupportedError(
            f"{self.registry}: GitLab's npm registry has no web login; {_CREATE_HINT}"
        )

    # ----------------------------------------------------------------------

    def _call(
        self, method: str, path: str, token: Secret, body: dict[str, Any] | None = None
    ) -> Response:
        return self._http.request(
            method,
            self.api + path,
            headers={"PRIVATE-TOKEN": token.reveal()},
            json_body=body,
            secrets=[token],
        )

    def _get_object(self, path: str, token: Secret, what: str) -> dict[str, Any]:
        resp = self._call("GET", path, token)
        if resp.status != 200:
            hint = ""
            if resp.status == 403:
                hint = "the token may lack the read_api or api scope"
            raise error_for(resp, what, [token], hint=hint)
        return resp.json_object()


def _info(data: dict[str, Any]) -> TokenInfo:
    scopes = data.get("scopes")
    read_only = None
    if isinstance(scopes, list):
        read_only = not any(s in _WRITE_SCOPES for s in scopes)
    token_id = data.get("id")
    return TokenInfo(
        key=str(token_id) if isinstance(token_id, int | str) else None,
        read_only=read_only,
        created=epoch(data.get("created_at")),
        expires=epoch(data.get("expires_at")),
    )


def _expiry_date(ttl_seconds: int) -> str:
    """GitLab takes whole days (it expires tokens at midnight UTC)."""
    days = max(1, math.ceil(ttl_seconds / 86400))
    day = datetime.now(timezone.utc).date() + timedelta(days=days)
    return day.isoformat()


def _day(moment: float | None) -> str:
    if moment is None:
        return "unknown"
    return time.strftime("%Y-%m-%d", time.gmtime(moment))
