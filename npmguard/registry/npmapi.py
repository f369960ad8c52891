"""npm's token API, as the public registry and Verdaccio serve it.

Endpoints: ``GET /-/whoami``, ``GET|POST /-/npm/v1/tokens``,
``DELETE /-/npm/v1/tokens/token/KEY``, the legacy login
``PUT /-/user/org.couchdb.user:NAME`` and the web login ``POST /-/v1/login``.

Creating a token needs the account password on every call (and on
registry.npmjs.org usually a one-time code too), so rotation through this API
is never unattended.

Lifetimes: the API takes no lifetime, so ``ttl_seconds`` is ignored. The
registry decides. Verdaccio's config setting ``security.api.jwt.sign.expiresIn``
makes every token a JWT with that lifetime, and without it tokens never
expire. registry.npmjs.org follows the website's token policy. When a token
is a JWT, its ``exp`` claim is read (without verifying the signature) into
``TokenInfo.expires``, for display and caching only.

Token keys: the list shows each token's ``key`` and a masked ``token``. A token
npmguard did not create is found by, in turn: the key in its JWT payload
(Verdaccio puts ``token.key`` there), the SHA-512 hex of the token (how
registry.npmjs.org derives keys), and the masked form (first and last
characters), which must match exactly one entry. Login (session) tokens are
not in the list on Verdaccio, and ``revoke`` says so instead of pretending.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from npmguard.registry.base import (
    PUBLISH,
    READ_ONLY,
    Auth,
    Capabilities,
    IssuedToken,
    NotSupportedError,
    PasswordRequiredError,
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
    wants_otp,
)
from npmguard.secret import Secret

log = logging.getLogger(__name__)

NAME = "npm-token-api"
NPMJS_HOST = "registry.npmjs.org"
# The list is one page on Verdaccio; this bounds a registry whose "next"
# link never ends.
_MAX_PAGES = 50
# A masked token must show at least this many characters to identify one.
_MIN_MASK_CHARS = 6
_WEB_LOGIN_TIMEOUT = 300.0
_MAX_RETRY_AFTER = 30.0

NPMJS_CAPABILITIES = Capabilities(
    provider=NAME,
    rotate=True,
    unattended=False,
    mint=False,
    expiry=False,
    revoke=True,
    read_only=True,
    needs_password=True,
    note=(
        "registry.npmjs.org creates a token only with your password and, "
        "with two-factor auth, a one-time code; the website's policy sets "
        "how long a token lives"
    ),
)
# With the password stored, a token per job can be created and then revoked
# after the job (``mint``). How long it would live otherwise is the registry's
# setting.
GENERIC_CAPABILITIES = Capabilities(
    provider=NAME,
    rotate=True,
    unattended=False,
    mint=True,
    expiry=False,
    revoke=True,
    read_only=True,
    needs_password=True,
    note=(
        "creating a token needs your password; the registry's own settings "
        "decide whether tokens expire (Verdaccio: security.api.jwt)"
    ),
)


@dataclass(frozen=True)
class _Entry:
    """One token in the registry's list."""

    info: TokenInfo
    mask: str


class NpmTokenApi:
    """The npm token API of one registry."""

    def __init__(
        self,
        registry: str,
        *,
        api: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: HttpClient | None = None,
    ) -> None:
        self.registry = registry_base(registry)
        # Where the /-/ endpoints live, when not under the registry URL.
        self.api = registry_base(api) if api else self.registry
        self._http = client or HttpClient(self.registry, timeout=timeout)
        host = urllib.parse.urlsplit(self.registry).hostname
        self.capabilities = (
            NPMJS_CAPABILITIES if host == NPMJS_HOST else GENERIC_CAPABILITIES
        )

    # ----------------------------------------------------------------------
    # Reading

    def whoami(self, token: Secret) -> str:
        resp = self._http.request("GET", self._url("-/whoami"), bearer=token)
        if resp.status != 200:
            raise error_for(resp, "checking the token", [token])
        name = resp.json_object().get("username")
        if isinstance(name, str) and name:
            return name
        # Verdaccio treats an unknown or expired token like no token at all.
        raise TokenRejectedError(
            f"{self.registry}: the registry does not know this token (it is "
            "unknown, expired or revoked)"
        )

    def token_info(self, token: Secret) -> TokenInfo:
        claims = jwt_claims(token) or {}
        from_jwt = TokenInfo(
            key=_jwt_key(claims),
            created=epoch(claims.get("iat")),
            expires=epoch(claims.get("exp")),
        )
        try:
            entries = self._entries(Auth(token=token))
        except TokenRejectedError:
            # An expired JWT is still worth describing: its expiry shows why.
            if from_jwt.expires is not None and from_jwt.expires <= time.time():
                return from_jwt
            raise
        except NotSupportedError:
            return from_jwt
        entry = self._find(token, entries, from_jwt.key)
        if entry is None:
            return from_jwt
        return TokenInfo(
            key=entry.info.key,
            read_only=entry.info.read_only,
            created=entry.info.created or from_jwt.created,
            expires=from_jwt.expires,
        )

    def list_tokens(self, auth: Auth) -> list[TokenInfo]:
        return [entry.info for entry in self._entries(auth)]

    # ----------------------------------------------------------------------
    # Writing

    def create(self, auth: Auth, *, scope: str, ttl_seconds: int | None) -> IssuedToken:
        if scope not in (READ_ONLY, PUBLISH):
            raise ValueError(f"unknown token scope {scope!r}")
        if auth.password is None:
            raise PasswordRequiredError(
                f"{self.registry}: creating a token needs the account password"
            )
        if ttl_seconds is not None:
            log.debug(
                "%s: the npm token API takes no lifetime; the registry's policy "
                "decides when the new token expires",
                self.registry,
            )

        body = {
            "password": auth.password.reveal(),
            "readonly": scope == READ_ONLY,
            "cidr_whitelist": [],
        }
        resp = self._write("POST", "-/npm/v1/tokens", auth, body)
        if resp.status not in (200, 201):
            hint = ""
            if resp.status == 401 and not wants_otp(resp):
                hint = "check the password and that the token is still valid"
            raise error_for(resp, "creating a token", _secrets(auth), hint=hint)

        issued = self._issued(resp.json_object())
        log.info(
            "%s: created %s token %s%s",
            self.registry,
            scope,
            issued.value.fingerprint,
            _expiry_note(issued.info.expires),
        )
        return issued

    def replace(self, auth: Auth, *, ttl_seconds: int | None) -> IssuedToken:
        old = self.token_info(auth.token)
        # A token the list does not show (a login session token) can publish.
        scope = READ_ONLY if old.read_only else PUBLISH
        return self.create(auth, scope=scope, ttl_seconds=ttl_seconds)

    def revoke(self, auth: Auth, target: Secret, info: TokenInfo | None) -> None:
        entries = self._entries(auth)
        hint = info.key if info is not None else None
        entry = self._find(target, entries, hint or _jwt_key(jwt_claims(target) or {}))
        if entry is None or entry.info.key is None:
            self._explain_unlisted(target)
            return
        key = entry.info.key
        path = "-/npm/v1/tokens/token/" + urllib.parse.quote(key, safe="")
        resp = self._write("DELETE", path, auth, None)
        if resp.status == 404:
            log.info(
                "%s: token %s was already revoked", self.registry, target.fingerprint
            )
            return
        if resp.status not in (200, 202, 204):
            raise error_for(resp, "revoking a token", [*_secrets(auth), target])
        log.info(
            "%s: revoked token %s (key %s)", self.registry, target.fingerprint, key
        )

    # ----------------------------------------------------------------------
    # Logging in

    def login(self, username: str, password: Secret, otp: str | None) -> IssuedToken:
        resp = self._put_user(username, password, otp)
        if resp.status in (401, 403) and not wants_otp(resp):
            log.info("%s: login as %s rejected", self.registry, username)
            raise TokenRejectedError(f"{self.registry}: wrong user name or password")
        if resp.status not in (200, 201):
            raise error_for(
                resp,
                f"logging in as {username}",
                [password, _basic(username, password)],
            )

        value = resp.json_object().get("token")
        if not isinstance(value, str) or not value:
            raise RegistryError(
                f"{self.registry}: the login was accepted but the registry sent "
                "no token"
            )
        token = Secret(value)
        issued = IssuedToken(value=token, info=self._info_of_new(token))
        log.info(
            "%s: logged in as %s, token %s%s",
            self.registry,
            username,
            token.fingerprint,
            _expiry_note(issued.info.expires),
        )
        return issued

    def web_login(
        self,
        show_url: Callable[[str], None],
        *,
        timeout: float = _WEB_LOGIN_TIMEOUT,
        stop: threading.Event | None = None,
    ) -> IssuedToken:
        """Log in in a browser; give up after ``timeout`` seconds or on ``stop``.

        A registry without web login raises ``NotSupportedError``, so the
        caller can fall back to ``login``.
        """
        resp = self._http.request("POST", self._url("-/v1/login"), json_body={})
        if 400 <= resp.status <= 499 or resp.status == 500:
            raise NotSupportedError(
                f"{self.registry}: the registry has no web login (HTTP "
                f"{resp.status}); log in with a user name and password instead"
            )
        if resp.status not in (200, 201):
            raise error_for(resp, "starting a web login")
        data = resp.json_object()
        login_url = data.get("loginUrl")
        done_url = data.get("doneUrl")
        if not _is_web_url(login_url) or not _is_web_url(done_url):
            raise RegistryError(
                f"{self.registry}: the web login response has no valid loginUrl "
                "and doneUrl"
            )
        assert isinstance(login_url, str) and isinstance(done_url, str)
        done_url = self._through_registry(done_url)
        show_url(login_url)
        return self._wait_for_web_login(done_url, timeout, stop or threading.Event())

    # ----------------------------------------------------------------------
    # Helpers

    def _url(self, path: str) -> str:
        return self.api + path.lstrip("/")

    def _write(
        self, method: str, path: str, auth: Auth, body: dict[str, Any] | None
    ) -> Response:
        """Send a write; retry a refusal with the password when there is one.

        Verdaccio refuses every write made with a read-only token (403),
        even revoking that token, and any request with an expired one (401);
        the account password authenticates the same request as the user.
        """
        headers = {"npm-otp": auth.otp} if auth.otp else {}
        url = self._url(path)
        resp = self._http.request(
            method,
            url,
            bearer=auth.token,
            headers=headers,
            json_body=body,
            secrets=_secrets(auth),
        )
        if resp.status not in (401, 403) or auth.password is None or wants_otp(resp):
            return resp
        # An expired JWT still names its user; a rejected token of another
        # kind leaves only whoami, which then fails too.
        claimed = (jwt_claims(auth.token) or {}).get("name")
        if isinstance(claimed, str) and claimed:
            user = claimed
        elif resp.status == 401:
            return resp
        else:
            user = self.whoami(auth.token)
        basic = _basic(user, auth.password)
        log.info(
            "%s: token %s may not write here (read-only?); retrying as %s with "
            "the password",
            self.registry,
            auth.token.fingerprint,
            user,
        )
        return self._http.request(
            method,
            url,
            headers={**headers, "Authorization": f"Basic {basic.reveal()}"},
            json_body=body,
            secrets=[*_secrets(auth), basic],
        )

    def _issued(self, data: dict[str, Any]) -> IssuedToken:
        """Read a ``POST /-/npm/v1/tokens`` response into an ``IssuedToken``."""
        value = data.get("token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{self.registry}: created a token but sent no value")
        token = Secret(value)
        claims = jwt_claims(token) or {}
        info = TokenInfo(
            key=_str_or_none(data.get("key")) or _jwt_key(claims),
            read_only=_bool_or_none(data.get("readonly")),
            created=epoch(data.get("created")) or epoch(claims.get("iat")),
            expires=epoch(claims.get("exp")),
        )
        return IssuedToken(value=token, info=info)

    def _put_user(self, username: str, password: Secret, otp: str | None) -> Response:
        """Send npm's legacy login: PUT the user document, as ``npm login`` does."""
        url = self._url(
            "-/user/org.couchdb.user:" + urllib.parse.quote(username, safe="")
        )
        body = {
            "_id": f"org.couchdb.user:{username}",
            "name": username,
            "password": password.reveal(),
            "type": "user",
            "roles": [],
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        basic = _basic(username, password)
        otp_header = {"npm-otp": otp} if otp else {}
        hidden = [password, basic]
        resp = self._http.request(
            "PUT", url, json_body=body, headers=otp_header, secrets=hidden
        )
        if resp.status != 409:
            return resp

        # The user exists: npm then logs in with Basic credentials on the
        # user document's current revision.
        auth_headers = {**otp_header, "Authorization": f"Basic {basic.reveal()}"}
        current = self._http.request(
            "GET", url + "?write=true", headers=auth_headers, secrets=hidden
        )
        rev = _user_rev(current)
        target = f"{url}/-rev/{urllib.parse.quote(rev, safe='')}" if rev else url
        return self._http.request(
            "PUT", target, json_body=body, headers=auth_headers, secrets=hidden
        )

    def _entries(self, auth: Auth) -> list[_Entry]:
        url: str | None = self._url("-/npm/v1/tokens")
        entries: list[_Entry] = []
        for _ in range(_MAX_PAGES):
            if url is None:
                break
            resp = self._http.request(
                "GET", url, bearer=auth.token, secrets=_secrets(auth)
            )
            if resp.status == 404:
                raise NotSupportedError(
                    f"{self.registry}: the registry has no token list (HTTP 404)"
                )
            if resp.status != 200:
                raise error_for(resp, "listing tokens", _secrets(auth))
            data = resp.json_object()
            objects = data.get("objects")
            if not isinstance(objects, list):
                raise RegistryError(f"{self.registry}: the token list has no objects")
            entries.extend(_entry(obj) for obj in objects if isinstance(obj, dict))
            url = self._next_page(data)
        return entries

    def _next_page(self, data: dict[str, Any]) -> str | None:
        urls = data.get("urls")
        link = urls.get("next") if isinstance(urls, dict) else None
        if not isinstance(link, str) or not link:
            return None
        absolute = urllib.parse.urljoin(self.api, link)
        mine = urllib.parse.urlsplit(self.api)
        theirs = urllib.parse.urlsplit(absolute)
        if (theirs.scheme, theirs.netloc) != (mine.scheme, mine.netloc):
            # The token would go with the request: only to the registry itself.
            log.warning(
                "%s: the token list continues on another host; not following it",
                self.registry,
            )
            return None
        return absolute

    def _find(
        self, token: Secret, entries: list[_Entry], key_hint: str | None
    ) -> _Entry | None:
        # NOTE: the SHA-512 rule is npm-profile's documentation of
        # registry.npmjs.org, not checked against it: tests reach only Verdaccio.
        keys = {hashlib.sha512(token.reveal().encode()).hexdigest()}
        if key_hint:
            keys.add(key_hint)
        for entry in entries:
            if entry.info.key in keys:
                return entry
        masked = [e for e in entries if _mask_matches(e.mask, token.reveal())]
        return masked[0] if len(masked) == 1 else None

    def _explain_unlisted(self, target: Secret) -> None:
        try:
            self.whoami(target)
        except TokenRejectedError:
            log.info(
                "%s: token %s is not listed and not accepted; nothing to revoke",
                self.registry,
                target.fingerprint,
            )
            return
        log.info(
            "%s: token %s works but is not in the token list; cannot revoke it",
            self.registry,
            target.fingerprint,
        )
        raise NotSupportedError(
            f"{self.registry}: this token is not in the registry's token list (a "
            "login session token is not), so the token API cannot revoke it; end "
            "it on the registry's website, or by changing the account password "
            "where the registry ties tokens to it"
        )

    def _info_of_new(self, token: Secret) -> TokenInfo:
        claims = jwt_claims(token) or {}
        return TokenInfo(
            key=_jwt_key(claims),
            created=epoch(claims.get("iat")) or time.time(),
            expires=epoch(claims.get("exp")),
        )

    def _through_registry(self, done_url: str) -> str:
        """Poll a mirror, not registry.npmjs.org, when npm's response names it.

        A proxy or mirror passes the public registry's doneUrl on unchanged,
        but the login session lives behind the mirror.
        """
        done = urllib.parse.urlsplit(done_url)
        mine = urllib.parse.urlsplit(self.api)
        if done.hostname != NPMJS_HOST or mine.hostname == NPMJS_HOST:
            return done_url
        prefix = mine.path.rstrip("/")
        path = done.path
        if prefix and not path.startswith(prefix + "/"):
            path = prefix + path
        return urllib.parse.urlunsplit(
            (mine.scheme, mine.netloc, path, done.query, done.fragment)
        )

    def _wait_for_web_login(
        self, done_url: str, timeout: float, stop: threading.Event
    ) -> IssuedToken:
        deadline = time.monotonic() + timeout
        while True:
            # The done URL is as good as the token for whoever polls it first:
            # it stays out of logs and messages.
            resp = self._http.request("GET", done_url, private_url=True)
            if resp.status == 200:
                value = resp.json_object().get("token")
                if not isinstance(value, str) or not value:
                    raise RegistryError(
                        f"{self.registry}: the web login finished without a token"
                    )
                token = Secret(value)
                log.info(
                    "%s: web login finished, token %s",
                    self.registry,
                    token.fingerprint,
                )
                return IssuedToken(value=token, info=self._info_of_new(token))
            if resp.status != 202:
                raise error_for(resp, "waiting for the web login")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistryError(
                    f"{self.registry}: the web login did not finish within "
                    f"{timeout:.0f} s"
                )
            delay = min(_retry_after(resp.header("retry-after")), left)
            if stop.wait(delay):
                raise RegistryError(f"{self.registry}: the web login was cancelled")


def _secrets(auth: Auth) -> list[Secret | None]:
    return [auth.token, auth.password]


def _basic(user: str, password: Secret) -> Secret:
    raw = f"{user}:{password.reveal()}".encode()
    return Secret(base64.b64encode(raw).decode())


def _entry(obj: dict[str, Any]) -> _Entry:
    info = TokenInfo(
        key=_str_or_none(obj.get("key")),
        read_only=_bool_or_none(obj.get("readonly")),
        created=epoch(obj.get("created")),
    )
    return _Entry(info=info, mask=_str_or_none(obj.get("token")) or "")


def _mask_matches(mask: str, value: str) -> bool:
    """True when a listed mask ("abcde...vwxyz", "abcdef…" or "abcdef") fits."""
    for sep in ("...", "…"):
        if sep in mask:
            head, _, tail = mask.partition(sep)
            break
    else:
        head, tail = mask, ""
    if len(head) + len(tail) < _MIN_MASK_CHARS or len(value) < len(head) + len(tail):
        return False
    return value.startswith(head) and value.endswith(tail)


def _jwt_key(claims: dict[str, Any]) -> str | None:
    token = claims.get("token")
    return _str_or_none(token.get("key")) if isinstance(token, dict) else None


def _user_rev(resp: Response) -> str | None:
    if resp.status != 200:
        return None
    try:
        data = resp.json()
    except RegistryError:
        return None
    return _str_or_none(data.get("_rev")) if isinstance(data, dict) else None


def _retry_after(header: str) -> float:
    try:
        seconds = float(header)
    except ValueError:
        return 1.0
    return max(0.2, min(seconds, _MAX_RETRY_AFTER))


def _is_web_url(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = urllib.parse.urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _bool_or_none(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _expiry_note(expires: float | None) -> str:
    if expires is None:
        return ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
    return f", expires {stamp}"
