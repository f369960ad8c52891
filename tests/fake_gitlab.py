"""A fake GitLab on 127.0.0.1 for the personal access token API, and the base
class of the loopback fakes the registry tests use.

The fake follows GitLab's public REST documentation (personal access tokens
API: self, list, rotate, revoke; ``GET /user``) and
enforces authentication the way GitLab does: an unknown, revoked or expired
token gets 401, a token without the needed scope gets 403. It is a fake, not
GitLab: it knows only what these tests need.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import threading
import traceback
import urllib.parse
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# The loopback server every fake builds on


@dataclass
class FakeRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None

    def params(self) -> dict[str, str]:
        """The body as fields, from JSON or a form."""
        kind = self.headers.get("Content-Type", "")
        if kind.startswith("application/x-www-form-urlencoded"):
            pairs = urllib.parse.parse_qsl(self.body.decode(), keep_blank_values=True)
            return dict(pairs)
        data = self.json()
        if isinstance(data, dict):
            return {str(k): v for k, v in data.items()}
        return {}

    def bearer(self) -> str | None:
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        return value if scheme.lower() == "bearer" and value else None


@dataclass
class FakeResponse:
    """A fake's response; ``body`` is sent as JSON unless it is bytes."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    """A request as the fake recorded it: no header or body values."""

    method: str
    path: str
    status: int


class LoopbackFake:
    """An HTTP server on 127.0.0.1 (a port the kernel picks) in its own thread.

    Subclasses respond in ``handle``. Use as a context manager, or call
    ``start`` and ``stop``. When ``handle`` raises, the fake responds 500 and
    keeps the traceback in ``errors``, so the test can fail on it.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=type(self).__name__,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackFake:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()
        if self._thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} did not stop in {timeout} s")

    def __enter__(self) -> LoopbackFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, req: FakeRequest) -> FakeResponse:
        raise NotImplementedError

    def dispatch(self, req: FakeRequest) -> FakeResponse:
        with self.lock:
            try:
                resp = self.handle(req)
            except Exception:  # noqa: BLE001 - kept for the test, answered as 500
                self.errors.append(traceback.format_exc())
                log.exception(
                    "%s failed on %s %s", type(self).__name__, req.method, req.path
                )
                resp = FakeResponse(500, {"message": "fake failed"})
            self.seen.append(Seen(req.method, req.path, resp.status))
            return resp


def _handler_for(fake: LoopbackFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            req = FakeRequest(
                method=self.command,
                path=urllib.parse.unquote(parts.path),
                query=dict(urllib.parse.parse_qsl(parts.query)),
                headers=self.headers,
                body=body,
            )
            resp = fake.dispatch(req)
            if isinstance(resp.body, bytes):
                raw, kind = resp.body, "text/html"
            else:
                raw = b"" if resp.body is None else json.dumps(resp.body).encode()
                kind = "application/json"
            self.send_response(resp.status)
            for name, value in resp.headers.items():
                self.send_header(name, value)
            if raw:
                self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            # The fakes record requests in ``seen``; stderr stays quiet.
            return

    return Handler


def random_text(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


# --------------------------------------------------------------------------
# GitLab

UNAUTHORIZED = FakeResponse(401, {"message": "401 Unauthorized"})
NOT_FOUND = FakeResponse(404, {"message": "404 Not found"})
# GitLab's default lifetime of a rotated token, and its upper limit.
DEFAULT_ROTATE_DAYS = 7
MAX_DAYS = 365


@dataclass
class FakePat:
    """One personal access token in the fake."""

    id: int
    user: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: date
    revoked: bool = False

    def active(self, today: date) -> bool:
        # GitLab: a token stops working at midnight UTC of its expiry date.
        return not self.revoked and today < self.expires_at

    def describe(self, today: date) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "revoked": self.revoked,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "scopes": list(self.scopes),
            "user_id": 1,
            "last_used_at": None,
            "active": self.active(today),
            "expires_at": self.expires_at.isoformat(),
        }


class FakeGitLab(LoopbackFake):
    """A fake GitLab; ``prefix`` serves it under a sub-path, like "/gitlab".

    ``self_rotate=False`` acts like GitLab before 16.10, which rotates only
    by token id.
    """

    def __init__(self, *, prefix: str = "", self_rotate: bool = True) -> None:
        super().__init__()
        self.prefix = prefix.rstrip("/")
        self.self_rotate = self_rotate
        self.tokens: dict[str, FakePat] = {}
        self._next_id = 100

    @property
    def api(self) -> str:
        return f"{self.origin}{self.prefix}/api/v4"

    def project_registry(self, project: int = 42) -> str:
        return f"{self.api}/projects/{project}/packages/npm/"

    def today(self) -> date:
        return datetime.now(timezone.utc).date()

    def add_token(
        self,
        user: str,
        scopes: list[str],
        *,
        value: str | None = None,
        days: int = 30,
    ) -> str:
        """Add a token as GitLab's web page would make it; return its value."""
        value = value or "glpat-" + random_text(20)
        with self.lock:
            self.tokens[value] = self._new(user, "npmguard test", scopes, days)
        return value

    def record(self, value: str) -> FakePat:
        with self.lock:
            return self.tokens[value]

    def _new(self, user: str, name: str, scopes: list[str], days: int) -> FakePat:
        self._next_id += 1
        return FakePat(
            id=self._next_id,
            user=user,
            name=name,
            scopes=list(scopes),
            created_at=datetime.now(timezone.utc).replace(microsecond=0),
            expires_at=self.today() + timedelta(days=days),
        )

    def handle(self, req: FakeRequest) -> FakeResponse:
        api = f"{self.prefix}/api/v4"
        if not req.path.startswith(api + "/"):
            return NOT_FOUND
        path = req.path[len(api) :]
        value = req.headers.get("PRIVATE-TOKEN")
        caller = self.tokens.get(value) if value else None
        if caller is None or not caller.active(self.today()):
            return UNAUTHORIZED
        parts = path.strip("/").split("/")
        if path == "/user" and req.method == "GET":
            return FakeResponse(200, {"id": 1, "username": caller.user})
        if parts[0] == "personal_access_tokens":
            return self._tokens(req, caller, parts[1:])
        return NOT_FOUND

    def _tokens(
        self, req: FakeRequest, caller: FakePat, rest: list[str]
    ) -> FakeResponse:
        today = self.today()
        if not rest and req.method == "GET":
            return self._list(req, caller)
        target = self._target(caller, rest[0]) if rest else None
        if target is None:
            return NOT_FOUND
        if len(rest) == 1 and req.method == "GET":
            return FakeResponse(200, target.describe(today))
        if len(rest) == 1 and req.method == "DELETE":
            target.revoked = True
            return FakeResponse(204)
        if rest[1:] == ["rotate"] and req.method == "POST":
            if rest[0] == "self" and not self.self_rotate:
                return NOT_FOUND
            return self._rotate(req, caller, target)
        return NOT_FOUND

    def _target(self, caller: FakePat, ref: str) -> FakePat | None:
        if ref == "self":
            return caller
        for pat in self.tokens.values():
            if str(pat.id) == ref and pat.user == caller.user:
                return pat
        return None

    def _list(self, req: FakeRequest, caller: FakePat) -> FakeResponse:
        today = self.today()
        mine = [p for p in self.tokens.values() if p.user == caller.user]
        if req.query.get("state") == "active":
            mine = [p for p in mine if p.active(today)]
        per_page = int(req.query.get("per_page", "20"))
        page = int(req.query.get("page", "1"))
        chunk = mine[(page - 1) * per_page : page * per_page]
        more = page * per_page < len(mine)
        headers = {"X-Next-Page": str(page + 1) if more else ""}
        return FakeResponse(200, [p.describe(today) for p in chunk], headers)

    def _rotate(
        self, req: FakeRequest, caller: FakePat, target: FakePat
    ) -> FakeResponse:
        if not {"api", "self_rotate"} & set(caller.scopes):
            return FakeResponse(403, {"error": "insufficient_scope"})
        days = DEFAULT_ROTATE_DAYS
        requested = req.params().get("expires_at")
        if requested:
            try:
                day = date.fromisoformat(str(requested))
            except ValueError:
                return FakeResponse(400, {"message": "expires_at is invalid"})
            days = (day - self.today()).days
            if days < 1 or days > MAX_DAYS:
                return FakeResponse(400, {"message": "expires_at is out of range"})
        target.revoked = True
        value = "glpat-" + random_text(20)
        fresh = self._new(target.user, target.name, target.scopes, days)
        self.tokens[value] = fresh
        return FakeResponse(200, {**fresh.describe(self.today()), "token": value})
