"""A fake JFrog Artifactory on 127.0.0.1: the Access token API and an npm repo.

Written from JFrog's public REST documentation (Access tokens: create, get
``me``, list, revoke by id or ``me``; the npm repository's ``-/whoami``). It
enforces authentication: an unknown, revoked or expired bearer token gets
401, a request beyond the user's rights gets 403. Tokens are JWT-shaped, as
Artifactory's are (``jti`` is the token id), with a signature of random
bytes: nothing may trust their payload, and the fake never reads it.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fake_gitlab import FakeRequest, FakeResponse, LoopbackFake, random_text

UNAUTHORIZED = FakeResponse(
    401, {"errors": [{"code": "UNAUTHORIZED", "message": "Bad credentials"}]}
)
NOT_FOUND = FakeResponse(
    404, {"errors": [{"code": "NOT_FOUND", "message": "Not found"}]}
)
USER_SCOPE = "applied-permissions/user"
SERVICE_ID = "jfac@01fake"


@dataclass
class FakeAccessToken:
    token_id: str
    user: str
    scope: str
    issued_at: int
    expiry: int | None
    description: str
    refreshable: bool = False
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and (self.expiry is None or now < self.expiry)

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "token_id": self.token_id,
            "subject": f"{SERVICE_ID}/users/{self.user}",
            "issued_at": self.issued_at,
            "issuer": SERVICE_ID,
            "refreshable": self.refreshable,
        }
        if self.expiry is not None:
            data["expiry"] = self.expiry
        if self.description:
            data["description"] = self.description
        return data


class FakeArtifactory(LoopbackFake):
    """A fake Artifactory with one npm repository, ``repo``.

    ``me_endpoint=False`` acts like Artifactory before 7.53.1, which has no
    ``tokens/me``. ``max_expires_in`` is the longest lifetime a user may ask
    for, as an administrator would set it.
    """

    def __init__(
        self,
        *,
        prefix: str = "",
        repo: str = "npm-local",
        me_endpoint: bool = True,
        max_expires_in: int = 365 * 86400,
    ) -> None:
        super().__init__()
        self.prefix = prefix.rstrip("/")
        self.repo = repo
        self.me_endpoint = me_endpoint
        self.max_expires_in = max_expires_in
        self.tokens: dict[str, FakeAccessToken] = {}

    @property
    def registry(self) -> str:
        return f"{self.origin}{self.prefix}/artifactory/api/npm/{self.repo}/"

    @property
    def access(self) -> str:
        return f"{self.origin}{self.prefix}/access/api/v1"

    def add_token(
        self, user: str, *, value: str | None = None, expires_in: int | None = 3600
    ) -> str:
        """Add a token as the JFrog web page would make it; return its value."""
        with self.lock:
            record = self._new(user, USER_SCOPE, expires_in, "made by hand")
            value = value or self._value(record)
            self.tokens[value] = record
        return value

    def record(self, value: str) -> FakeAccessToken:
        with self.lock:
            return self.tokens[value]

    def _new(
        self, user: str, scope: str, expires_in: int | None, description: str
    ) -> FakeAccessToken:
        now = int(time.time())
        return FakeAccessToken(
            token_id=str(uuid.uuid4()),
            user=user,
            scope=scope,
            issued_at=now,
            expiry=None if not expires_in else now + expires_in,
            description=description,
        )

    def _value(self, record: FakeAccessToken) -> str:
        def part(obj: dict[str, Any]) -> str:
            raw = json.dumps(obj).encode()
            return base64.urlsafe_b64encode(raw).decode().rstrip("=")

        claims: dict[str, Any] = {
            "jti": record.token_id,
            "sub": f"{SERVICE_ID}/users/{record.user}",
            "scp": record.scope,
            "iat": record.issued_at,
        }
        if record.expiry is not None:
            claims["exp"] = record.expiry
        return ".".join(
            [part({"typ": "JWT", "alg": "RS256"}), part(claims), random_text(43)]
        )

    def handle(self, req: FakeRequest) -> FakeResponse:
        bearer = req.bearer()
        caller = self.tokens.get(bearer) if bearer else None
        if caller is None or not caller.active(time.time()):
            return UNAUTHORIZED
        access = f"{self.prefix}/access/api/v1/tokens"
        npm = f"{self.prefix}/artifactory/api/npm/{self.repo}/"
        if req.path == access:
            if req.method == "POST":
                return self._create(req, caller)
            if req.method == "GET":
                return self._list(caller)
        if req.path.startswith(access + "/"):
            return self._one(req, caller, req.path[len(access) + 1 :])
        if req.path == npm + "-/whoami" and req.method == "GET":
            return FakeResponse(200, {"username": caller.user})
        if req.path.startswith(npm) and req.method == "GET":
            return FakeResponse(200, {"name": req.path[len(npm) :], "versions": {}})
        return NOT_FOUND

    def _create(self, req: FakeRequest, caller: FakeAccessToken) -> FakeResponse:
        params = req.params()
        scope = str(params.get("scope") or USER_SCOPE)
        if scope != USER_SCOPE:
            # Group and admin scopes are for administrators.
            return FakeResponse(403, {"errors": [{"message": "scope not permitted"}]})
        raw = params.get("expires_in")
        expires_in: int | None = None
        if raw is not None:
            try:
                expires_in = int(raw)
            except ValueError:
                return FakeResponse(400, {"errors": [{"message": "bad expires_in"}]})
            if expires_in <= 0 or expires_in > self.max_expires_in:
                return FakeResponse(
                    403, {"errors": [{"message": "expires_in is over the limit"}]}
                )
        description = str(params.get("description") or "")
        record = self._new(caller.user, scope, expires_in, description)
        value = self._value(record)
        self.tokens[value] = record
        body: dict[str, Any] = {
            "token_id": record.token_id,
            "access_token": value,
            "scope": scope,
            "token_type": "Bearer",
        }
        if expires_in:
            body["expires_in"] = expires_in
        return FakeResponse(200, body)

    def _list(self, caller: FakeAccessToken) -> FakeResponse:
        now = time.time()
        mine = [
            t.describe()
            for t in self.tokens.values()
            if t.user == caller.user and t.active(now)
        ]
        return FakeResponse(200, {"tokens": mine})

    def _one(self, req: FakeRequest, caller: FakeAccessToken, ref: str) -> FakeResponse:
        if ref == "me" and not self.me_endpoint:
            return NOT_FOUND
        target = caller if ref == "me" else self._by_id(ref)
        if target is None:
            return NOT_FOUND
        if target.user != caller.user:
            return FakeResponse(403, {"errors": [{"message": "not your token"}]})
        if req.method == "GET":
            return FakeResponse(200, target.describe())
        if req.method == "DELETE":
            if target.revoked:
                return FakeResponse(204)
            target.revoked = True
            return FakeResponse(200, None)
        return NOT_FOUND

    def _by_id(self, token_id: str) -> FakeAccessToken | None:
        for record in self.tokens.values():
            if record.token_id == token_id:
                return record
        return None
