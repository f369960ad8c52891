"""A small JSON-over-HTTP client for registry token APIs, on urllib.

Every request has a timeout, never follows a redirect (a redirect would carry
the Authorization header to wherever the server points), and goes through a
proxy chosen the way npm chooses one. HTTP errors come back as responses,
and ``error_for`` turns one into the matching ``RegistryError``. Its message
names the registry URL and the status, and never a header or a token.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from npmguard.registry.base import (
    OtpRequiredError,
    RegistryError,
    RegistryUnreachableError,
    TokenRejectedError,
)
from npmguard.secret import Secret

log = logging.getLogger(__name__)

USER_AGENT = "npmguard (token API client)"
DEFAULT_TIMEOUT = 10.0
# Token API responses are a few kilobytes, so a larger body is not one.
MAX_BODY = 4 * 1024 * 1024
_MESSAGE_LIMIT = 200
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


@dataclass(frozen=True)
class Response:
    """A registry response: status, lower-cased headers and the raw body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    where: str  # the registry URL, for messages

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def json(self) -> Any:
        """Decode the body as JSON; raise ``RegistryError`` when it is not JSON."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            raise RegistryError(
                f"{self.where}: the response (HTTP {self.status}) is not JSON; "
                "is this the right registry URL?"
            ) from None

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        if not isinstance(data, dict):
            raise RegistryError(
                f"{self.where}: expected a JSON object (HTTP {self.status}), "
                f"got {type(data).__name__}"
            )
        return data


@dataclass
class Request:
    """One request; ``secrets`` are scrubbed from any text shown to the user."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    secrets: tuple[str, ...] = ()
    # The URL contains something a reader could use (a login session), so
    # the debug log shows only the method.
    private_url: bool = False


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment, fit for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    # Everything before the last "@" is user info, which may hold a password.
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def registry_base(url: str) -> str:
    """Normalize a registry URL to scheme, host and path, ending in "/".

    Takes npm's nerf-dart form (``//host/path/``) as https. User info, query
    and fragment are dropped: credentials never travel in the URL.
    """
    text = url.strip()
    if text.startswith("//"):
        text = "https:" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"{display_url(text)!r} is not an http(s) registry URL")
    try:
        _ = parts.port
    except ValueError:
        raise RegistryError(f"{display_url(text)!r} has an invalid port") from None
    base = display_url(text)
    return base if base.endswith("/") else base + "/"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Return the proxy npm would use for ``url``, or None to connect directly.

    Like npm: ``https_proxy`` for https URLs; ``https_proxy``, ``http_proxy``
    or ``proxy`` for http ones (lower or upper case); ``no_proxy`` lists
    domain suffixes that go direct. Unlike npm, loopback addresses never go
    through a proxy, and ``*`` in ``no_proxy`` turns proxies off.
    """
    env = os.environ if environ is None else environ
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host or is_loopback(host):
        return None

    def setting(name: str) -> str:
        return env.get(name) or env.get(name.upper()) or ""

    if parts.scheme == "https":
        proxy = setting("https_proxy")
    else:
        proxy = setting("https_proxy") or setting("http_proxy") or setting("proxy")
    if not proxy or _no_proxy_matches(host, setting("no_proxy")):
        return None
    return proxy


def _no_proxy_matches(host: str, no_proxy: str) -> bool:
    host_labels = host.rstrip(".").split(".")[::-1]
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        labels = [p for p in entry.split(":", 1)[0].split(".") if p][::-1]
        if labels and host_labels[: len(labels)] == labels:
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class HttpClient:
    """Send JSON requests to one registry's APIs.

    ``registry`` names the registry in messages; requests may go to other
    URLs of the same service (GitLab's and Artifactory's APIs).
    """

    def __init__(
        self,
        registry: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = display_url(registry)
        self.timeout = timeout
        self._environ = environ
        self._ssl_context = ssl_context

    def request(
        self,
        method: str,
        url: str,
        *,
        bearer: Secret | None = None,
        headers: Mapping[str, str] | None = None,
        json_body: object = None,
        form: Mapping[str, str] | None = None,
        secrets: Iterable[Secret | None] = (),
        private_url: bool = False,
    ) -> Response:
        """Send one request and return the response, whatever its status.

        Raise ``RegistryUnreachableError`` when no response arrives.
        """
        hidden = [s.reveal() for s in secrets if s is not None and s.reveal()]
        req = Request(method, url, private_url=private_url)
        req.headers["Accept"] = "application/json"
        req.headers["User-Agent"] = USER_AGENT
        if bearer is not None:
            req.headers["Authorization"] = f"Bearer {bearer.reveal()}"
            hidden.append(bearer.reveal())
        for name, value in (headers or {}).items():
            req.headers[name] = value
        if json_body is not None:
            req.body = json.dumps(json_body).encode()
            req.headers["Content-Type"] = "application/json"
        elif form is not None:
            req.body = urllib.parse.urlencode(form).encode()
            req.headers["Content-Type"] = "application/x-www-form-urlencoded"
        req.secrets = tuple(hidden)
        return self.send(req)

    def send(self, req: Request) -> Response:
        """Send a prepared request; see ``request``."""
        shown_url = "(private URL)" if req.private_url else display_url(req.url)
        scheme = urllib.parse.urlsplit(req.url).scheme
        if scheme not in ("http", "https"):
            raise RegistryError(f"{self.registry}: {shown_url} is not an http(s) URL")
        raw = urllib.request.Request(
            req.url, data=req.body, method=req.method, headers=req.headers
        )
        proxy = proxy_for(req.url, self._environ)
        opener = self._opener(scheme, proxy)

        started = time.monotonic()
        try:
            with opener.open(raw, timeout=self.timeout) as resp:
                status, headers, body = resp.status, resp.headers, _read(resp)
        except urllib.error.HTTPError as err:
            status, headers = err.code, err.headers
            try:
                body = _read(err)
            except OSError:
                body = b""
            finally:
                err.close()
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = _reason(err)
            via = " through the proxy" if proxy else ""
            log.debug("%s %s failed%s: %s", req.method, shown_url, via, reason)
            raise RegistryUnreachableError(
                f"{self.registry}: no answer{via} ({reason})"
            ) from None

        elapsed = (time.monotonic() - started) * 1000
        log.debug("%s %s -> HTTP %d in %.0f ms", req.method, shown_url, status, elapsed)
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        return Response(status, lowered, body, self.registry)

    def _opener(self, scheme: str, proxy: str | None) -> urllib.request.OpenerDirector:
        handlers: list[urllib.request.BaseHandler] = [
            # An empty mapping also keeps urllib from reading *_proxy itself.
            urllib.request.ProxyHandler({scheme: proxy} if proxy else {}),
            _NoRedirect(),
        ]
        if self._ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl_context))
        return urllib.request.build_opener(*handlers)


def _read(resp: Any) -> bytes:
    body: bytes = resp.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise RegistryError("the registry's response is larger than 4 MiB")
    return body


def _reason(err: BaseException) -> str:
    inner = getattr(err, "reason", err)
    if isinstance(inner, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {inner.verify_message}"
    if isinstance(inner, ssl.SSLError):
        return "TLS failed"
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, socket.gaierror):
        return "host name not found"
    if isinstance(inner, ValueError):
        return "invalid URL"
    text = getattr(inner, "strerror", None) or type(inner).__name__
    return str(text)


def wants_otp(resp: Response) -> bool:
    """Tell whether a 401 requests a one-time code (npm's convention)."""
    if resp.status != 401:
        return False
    challenge = [p.strip().lower() for p in resp.header("www-authenticate").split(",")]
    if "otp" in challenge:
        return True
    return b"one-time pass" in resp.body


def server_message(resp: Response, secrets: Iterable[str] = ()) -> str:
    """Extract the server's error text: short, on one line, secrets removed."""
    try:
        data = json.loads(resp.body) if resp.body.strip() else None
    except ValueError:
        return ""
    text = _pick_message(data)
    if not text:
        return ""
    for value in secrets:
        if not value:
            continue
        for form in (value, base64.b64encode(value.encode()).decode()):
            text = text.replace(form, "<hidden>")
    text = " ".join(text.split())
    printable = "".join(ch for ch in text if ch.isprintable())
    if len(printable) > _MESSAGE_LIMIT:
        printable = printable[: _MESSAGE_LIMIT - 1] + "…"
    return printable


def _pick_message(data: object) -> str:
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        for key in ("error_description", "message", "error", "reason"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict | list):
                found = _pick_message(value)
                if found:
                    return found
        errors = data.get("errors")
        if isinstance(errors, list):
            return "; ".join(m for m in (_pick_message(e) for e in errors) if m)
    if isinstance(data, list):
        return "; ".join(m for m in (_pick_message(e) for e in data[:3]) if m)
    return ""


def error_for(
    resp: Response,
    what: str,
    secrets: Iterable[Secret | None] = (),
    *,
    hint: str = "",
) -> RegistryError:
    """Build the error for a failed ``what`` (such as "creating a token").

    ``hint`` is a plain sentence on what to do, added to the message.
    """
    hidden = [s.reveal() for s in secrets if s is not None]
    message = server_message(resp, hidden)
    detail = f": {message}" if message else ""
    head = f"{resp.where}: {what} failed (HTTP {resp.status}{detail})"
    if hint:
        head = f"{head}; {hint}"
    if wants_otp(resp):
        return OtpRequiredError(
            f"{resp.where}: {what} needs a one-time password from your "
            "authenticator app; run again with the code"
        )
    if resp.status in (401, 403):
        return TokenRejectedError(head)
    if resp.status == 429:
        retry = resp.header("retry-after")
        later = f"; try again in {retry} s" if retry.isdigit() else ""
        return RegistryError(f"{head}; the registry limits requests{later}")
    if 300 <= resp.status < 400:
        return RegistryError(
            f"{head}; the registry redirects elsewhere, which npmguard does not "
            "follow with credentials: configure the final URL"
        )
    return RegistryError(head)
