"""The npm token API provider against the real Verdaccio 6.8.

What Verdaccio does, as these tests prove it: a token's key is random and
carried inside the token (readable only in a JWT); the list masks tokens as
their first and last five characters; a revoked token gets 403 at once;
a login token is not in the list and cannot be revoked; a read-only token may
not write at all, not even revoke itself; with JWTs, a token stops working at
``exp``. Verdaccio 6.8 has no web login and no one-time codes, so those flows
run against small loopback fakes, named as fakes below.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_gitlab import FakeRequest, FakeResponse, LoopbackFake, random_text
from npmcli import run, write_package
from realparts import Canary, HttpError, Verdaccio

from npmguard.registry import (
    PUBLISH,
    READ_ONLY,
    Auth,
    NotSupportedError,
    OtpRequiredError,
    PasswordRequiredError,
    RegistryError,
    TokenRejectedError,
)
from npmguard.registry.npmapi import NpmTokenApi
from npmguard.secret import Secret

PASSWORD = "registry-test-pw-1"
Factory = Callable[..., Verdaccio]
Log = pytest.LogCaptureFixture


class User:
    """A fresh Verdaccio user with its login token."""

    def __init__(self, server: Verdaccio, prefix: str = "reg") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.password = Secret(PASSWORD)
        self.login = Secret(server.add_user(self.name, PASSWORD))

    def auth(self, token: Secret | None = None) -> Auth:
        return Auth(token=token or self.login, password=self.password)


@pytest.fixture(scope="module")
def jwt_verdaccio(verdaccio_factory: Factory) -> Verdaccio:
    """Verdaccio whose tokens are JWTs living two minutes."""
    return verdaccio_factory(jwt_expires_in="120s")


@pytest.fixture(scope="module")
def short_verdaccio(verdaccio_factory: Factory) -> Verdaccio:
    """Verdaccio whose tokens are JWTs living three seconds."""
    return verdaccio_factory(jwt_expires_in="3s")


@pytest.fixture
def debug_log(caplog: Log) -> Log:
    caplog.set_level(logging.DEBUG, logger="npmguard")
    return caplog


def _npm_env(home: Path, registry_nerf: str, token: Secret) -> dict[str, str]:
    env = dict(os.environ)
    node_bin = env.get("NPMGUARD_TEST_NODE_BIN")
    if node_bin:
        env["PATH"] = node_bin + os.pathsep + env.get("PATH", "")
    # The token reaches npm in its environment only, never in a file.
    env[f"npm_config_{registry_nerf}:_authToken"] = token.reveal()
    return env


def _publish(
    server: Verdaccio, home: Path, tmp_path: Path, token: Secret
) -> subprocess.CompletedProcess[str]:
    name = f"@reg/pkg-{uuid.uuid4().hex[:8]}"
    package = write_package(tmp_path / "pkg", name)
    env = _npm_env(home, server.nerf, token)
    return run(["npm", "publish", "--registry", server.url], package, env=env)


# --------------------------------------------------------------------------
# whoami


def test_whoami_login_token(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    assert NpmTokenApi(verdaccio.url).whoami(user.login) == user.name


def test_whoami_unknown_token(
    verdaccio: Verdaccio,
    canary: Canary,
    debug_log: Log,
) -> None:
    with pytest.raises(TokenRejectedError) as caught:
        NpmTokenApi(verdaccio.url).whoami(Secret(canary))
    assert canary not in str(caught.value)
    assert canary not in debug_log.text


def test_whoami_names_registry(verdaccio: Verdaccio, canary: Canary) -> None:
    with pytest.raises(TokenRejectedError) as caught:
        NpmTokenApi(verdaccio.url).whoami(Secret(canary))
    assert verdaccio.url in str(caught.value)


# --------------------------------------------------------------------------
# create


def test_create_read_only_info(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    issued = NpmTokenApi(verdaccio.url).create(
        user.auth(), scope=READ_ONLY, ttl_seconds=None
    )
    assert issued.info.read_only is True


def test_create_read_only_works(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert api.whoami(issued.value) == user.name


def test_create_read_only_cannot_publish(
    verdaccio: Verdaccio,
    home: Path,
    tmp_path: Path,
) -> None:
    user = User(verdaccio)
    issued = NpmTokenApi(verdaccio.url).create(
        user.auth(), scope=READ_ONLY, ttl_seconds=None
    )
    result = _publish(verdaccio, home, tmp_path, issued.value)
    assert result.returncode != 0
    assert "E403" in result.stderr


def test_create_publish_can_publish(
    verdaccio: Verdaccio,
    home: Path,
    tmp_path: Path,
) -> None:
    user = User(verdaccio)
    issued = NpmTokenApi(verdaccio.url).create(
        user.auth(), scope=PUBLISH, ttl_seconds=None
    )
    result = _publish(verdaccio, home, tmp_path, issued.value)
    assert result.returncode == 0, result.stderr


def test_create_no_password(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    with pytest.raises(PasswordRequiredError):
        NpmTokenApi(verdaccio.url).create(
            Auth(token=user.login), scope=PUBLISH, ttl_seconds=None
        )


def test_create_wrong_password(verdaccio: Verdaccio, debug_log: Log) -> None:
    user = User(verdaccio)
    wrong = Secret("wrong-password-" + random_text(12))
    with pytest.raises(TokenRejectedError) as caught:
        NpmTokenApi(verdaccio.url).create(
            Auth(token=user.login, password=wrong), scope=PUBLISH, ttl_seconds=None
        )
    assert wrong.reveal() not in str(caught.value)
    assert wrong.reveal() not in debug_log.text


def test_create_canary_token(
    verdaccio: Verdaccio,
    canary: Canary,
    debug_log: Log,
) -> None:
    auth = Auth(token=Secret(canary), password=Secret(PASSWORD))
    with pytest.raises(TokenRejectedError) as caught:
        NpmTokenApi(verdaccio.url).create(auth, scope=PUBLISH, ttl_seconds=None)
    assert canary not in str(caught.value)
    assert canary not in debug_log.text


def test_create_logs_fingerprint(verdaccio: Verdaccio, caplog: Log) -> None:
    caplog.set_level(logging.INFO, logger="npmguard")
    user = User(verdaccio)
    issued = NpmTokenApi(verdaccio.url).create(
        user.auth(), scope=PUBLISH, ttl_seconds=None
    )
    assert issued.value.fingerprint in caplog.text
    assert issued.value.reveal() not in caplog.text


# --------------------------------------------------------------------------
# list


def test_list_has_created(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    keys = {info.key for info in api.list_tokens(user.auth())}
    assert issued.info.key in keys


def test_list_omits_login_token(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    assert NpmTokenApi(verdaccio.url).list_tokens(user.auth()) == []


def test_token_info_finds_key(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert api.token_info(issued.value).key == issued.info.key


def test_token_info_read_only(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert api.token_info(issued.value).read_only is True


# --------------------------------------------------------------------------
# revoke


def test_revoke_rejects_token(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=PUBLISH, ttl_seconds=None)
    api.revoke(user.auth(), issued.value, None)
    with pytest.raises(TokenRejectedError):
        api.whoami(issued.value)


def test_revoke_blocks_scoped_read(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    api.revoke(user.auth(), issued.value, issued.info)
    with pytest.raises(HttpError) as caught:
        verdaccio.request("GET", "@reg%2fnothing", token=issued.value.reveal())
    assert caught.value.status == 403


def test_revoke_keeps_other_tokens(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    kept = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    gone = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    api.revoke(user.auth(), gone.value, None)
    assert api.whoami(kept.value) == user.name


def test_revoke_read_only_itself(verdaccio: Verdaccio) -> None:
    """Verdaccio refuses any write by a read-only token; the password does it."""
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    api.revoke(user.auth(issued.value), issued.value, None)
    with pytest.raises(TokenRejectedError):
        api.whoami(issued.value)


def test_revoke_read_only_no_password(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    with pytest.raises(TokenRejectedError):
        api.revoke(Auth(token=issued.value), issued.value, None)


def test_revoke_login_token(verdaccio: Verdaccio) -> None:
    """A login token is not listed, so revoking it is refused, not faked."""
    user = User(verdaccio)
    with pytest.raises(NotSupportedError):
        NpmTokenApi(verdaccio.url).revoke(user.auth(), user.login, None)


def test_revoke_login_token_survives(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    with pytest.raises(NotSupportedError):
        api.revoke(user.auth(), user.login, None)
    assert api.whoami(user.login) == user.name


def test_revoke_twice_quiet(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.create(user.auth(), scope=PUBLISH, ttl_seconds=None)
    api.revoke(user.auth(), issued.value, issued.info)
    api.revoke(user.auth(), issued.value, issued.info)
    assert issued.info.key not in {i.key for i in api.list_tokens(user.auth())}


def test_revoke_canary_quiet(
    verdaccio: Verdaccio,
    canary: Canary,
    debug_log: Log,
) -> None:
    user = User(verdaccio)
    NpmTokenApi(verdaccio.url).revoke(user.auth(), Secret(canary), None)
    assert canary not in debug_log.text


# --------------------------------------------------------------------------
# replace


def test_replace_keeps_read_only(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    old = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    new = api.replace(user.auth(old.value), ttl_seconds=None)
    assert new.info.read_only is True


def test_replace_login_is_publish(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    new = NpmTokenApi(verdaccio.url).replace(user.auth(), ttl_seconds=None)
    assert new.info.read_only is False


def test_replace_leaves_old(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    old = api.create(user.auth(), scope=PUBLISH, ttl_seconds=None)
    new = api.replace(user.auth(old.value), ttl_seconds=None)
    assert (new.old_revoked, api.whoami(old.value)) == (False, user.name)


# --------------------------------------------------------------------------
# login


def test_login_existing_user(verdaccio: Verdaccio) -> None:
    user = User(verdaccio)
    api = NpmTokenApi(verdaccio.url)
    issued = api.login(user.name, user.password, None)
    assert api.whoami(issued.value) == user.name


def test_login_wrong_password(verdaccio: Verdaccio, debug_log: Log) -> None:
    user = User(verdaccio)
    wrong = Secret("not-the-password-" + random_text(8))
    with pytest.raises(TokenRejectedError, match="wrong user name or password"):
        NpmTokenApi(verdaccio.url).login(user.name, wrong, None)
    assert wrong.reveal() not in debug_log.text


def test_login_new_user_registers(verdaccio: Verdaccio) -> None:
    """As with npm's legacy login, an unknown name signs up where allowed."""
    name = f"reg-new-{uuid.uuid4().hex[:8]}"
    api = NpmTokenApi(verdaccio.url)
    issued = api.login(name, Secret(PASSWORD), None)
    assert api.whoami(issued.value) == name


# --------------------------------------------------------------------------
# JWT tokens


def test_jwt_key_from_token(jwt_verdaccio: Verdaccio) -> None:
    user = User(jwt_verdaccio)
    api = NpmTokenApi(jwt_verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert api.token_info(issued.value).key == issued.info.key


def test_jwt_expiry_read(jwt_verdaccio: Verdaccio) -> None:
    user = User(jwt_verdaccio)
    before = time.time()
    issued = NpmTokenApi(jwt_verdaccio.url).create(
        user.auth(), scope=READ_ONLY, ttl_seconds=None
    )
    assert issued.info.expires == pytest.approx(before + 120, abs=5)


def test_jwt_login_expiry(jwt_verdaccio: Verdaccio) -> None:
    user = User(jwt_verdaccio)
    before = time.time()
    issued = NpmTokenApi(jwt_verdaccio.url).login(user.name, user.password, None)
    assert issued.info.expires == pytest.approx(before + 120, abs=5)


def test_jwt_revoke(jwt_verdaccio: Verdaccio) -> None:
    user = User(jwt_verdaccio)
    api = NpmTokenApi(jwt_verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    api.revoke(user.auth(), issued.value, None)
    with pytest.raises(TokenRejectedError):
        api.whoami(issued.value)


def test_jwt_stops_at_expiry(short_verdaccio: Verdaccio) -> None:
    user = User(short_verdaccio)
    api = NpmTokenApi(short_verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert issued.info.expires is not None
    time.sleep(max(0.0, issued.info.expires - time.time()) + 1.0)
    with pytest.raises(TokenRejectedError):
        api.whoami(issued.value)


def test_jwt_works_before_expiry(short_verdaccio: Verdaccio) -> None:
    user = User(short_verdaccio)
    api = NpmTokenApi(short_verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert api.whoami(issued.value) == user.name


def test_jwt_expired_info(short_verdaccio: Verdaccio) -> None:
    """An expired JWT still tells when it expired, so status can say why."""
    user = User(short_verdaccio)
    api = NpmTokenApi(short_verdaccio.url)
    issued = api.create(user.auth(), scope=READ_ONLY, ttl_seconds=None)
    assert issued.info.expires is not None
    time.sleep(max(0.0, issued.info.expires - time.time()) + 1.0)
    assert api.token_info(issued.value).expires == issued.info.expires


# --------------------------------------------------------------------------
# Web login: Verdaccio 6.8 has none; the flow itself runs against a fake.


def test_web_login_verdaccio(verdaccio_factory: Factory) -> None:
    """Verdaccio 6.8 answers 404 even with its webLogin flag on."""
    server = verdaccio_factory(flags={"webLogin": True})
    with pytest.raises(NotSupportedError):
        NpmTokenApi(server.url).web_login(lambda url: None, timeout=5)


class FakeWebLoginRegistry(LoopbackFake):
    """A fake of npm's web login: pending until the browser page is visited."""

    def __init__(self, token: str, *, pending_polls: int = 2) -> None:
        super().__init__()
        self.token = token
        self.session = random_text(16)
        self.pending_polls = pending_polls
        self.visited = False
        self.polls = 0

    def handle(self, req: FakeRequest) -> FakeResponse:
        if req.method == "POST" and req.path == "/-/v1/login":
            return FakeResponse(
                200,
                {
                    "loginUrl": f"{self.origin}/login/{self.session}",
                    "doneUrl": f"{self.origin}/done/{self.session}",
                },
            )
        if req.method == "GET" and req.path == f"/done/{self.session}":
            self.polls += 1
            if not self.visited or self.polls <= self.pending_polls:
                return FakeResponse(202, {}, {"Retry-After": "0"})
            return FakeResponse(200, {"token": self.token})
        return FakeResponse(404, {"error": "not found"})


@pytest.fixture
def web_fake(canary: Canary) -> Iterator[FakeWebLoginRegistry]:
    fake = FakeWebLoginRegistry(canary)
    with fake:
        yield fake


def test_web_login_token(web_fake: FakeWebLoginRegistry, canary: Canary) -> None:
    def browser(url: str) -> None:
        web_fake.visited = True

    issued = NpmTokenApi(web_fake.origin).web_login(browser, timeout=10)
    assert issued.value.reveal() == canary


def test_web_login_shows_url(web_fake: FakeWebLoginRegistry) -> None:
    shown_urls: list[str] = []

    def browser(url: str) -> None:
        shown_urls.append(url)
        web_fake.visited = True

    NpmTokenApi(web_fake.origin).web_login(browser, timeout=10)
    assert shown_urls == [f"{web_fake.origin}/login/{web_fake.session}"]


def test_web_login_quiet_log(
    web_fake: FakeWebLoginRegistry,
    canary: Canary,
    debug_log: Log,
) -> None:
    def browser(url: str) -> None:
        web_fake.visited = True

    NpmTokenApi(web_fake.origin).web_login(browser, timeout=10)
    assert canary not in debug_log.text
    assert web_fake.session not in debug_log.text


def test_web_login_timeout(web_fake: FakeWebLoginRegistry) -> None:
    with pytest.raises(RegistryError, match="did not finish"):
        NpmTokenApi(web_fake.origin).web_login(lambda url: None, timeout=0.5)


def test_web_login_stop(web_fake: FakeWebLoginRegistry) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(RegistryError, match="cancelled"):
        NpmTokenApi(web_fake.origin).web_login(lambda url: None, timeout=10, stop=stop)


# --------------------------------------------------------------------------
# One-time codes: Verdaccio has none; npm's convention runs against a fake.

OTP = "123456"


class FakeOtpRegistry(LoopbackFake):
    """A fake registry account with two-factor auth on writes.

    ``header=True`` asks for the code the standard way (``WWW-Authenticate:
    OTP``); otherwise only the body says "one-time pass", as some do.
    """

    def __init__(self, token: str, *, header: bool = True) -> None:
        super().__init__()
        self.token = token
        self.header = header
        self.otps: list[str | None] = []

    def _otp_missing(self, req: FakeRequest) -> FakeResponse | None:
        self.otps.append(req.headers.get("npm-otp"))
        if req.headers.get("npm-otp") == OTP:
            return None
        if self.header:
            return FakeResponse(
                401, {"error": "otp required"}, {"WWW-Authenticate": "OTP"}
            )
        return FakeResponse(401, {"error": "You must provide a one-time pass."})

    def handle(self, req: FakeRequest) -> FakeResponse:
        if req.method == "PUT" and req.path.startswith("/-/user/org.couchdb.user:"):
            return self._otp_missing(req) or FakeResponse(201, {"token": self.token})
        if req.bearer() != self.token:
            return FakeResponse(401, {"error": "unauthorized"})
        if req.method == "POST" and req.path == "/-/npm/v1/tokens":
            missing = self._otp_missing(req)
            if missing is not None:
                return missing
            return FakeResponse(
                200, {"token": "npm_" + random_text(36), "key": "k1", "readonly": False}
            )
        return FakeResponse(404, {"error": "not found"})


@pytest.fixture
def otp_fake(canary: Canary) -> Iterator[FakeOtpRegistry]:
    fake = FakeOtpRegistry(canary)
    with fake:
        yield fake


def test_otp_required_header(otp_fake: FakeOtpRegistry, canary: Canary) -> None:
    auth = Auth(token=Secret(canary), password=Secret(PASSWORD))
    with pytest.raises(OtpRequiredError):
        NpmTokenApi(otp_fake.origin).create(auth, scope=PUBLISH, ttl_seconds=None)


def test_otp_required_body(canary: Canary) -> None:
    auth = Auth(token=Secret(canary), password=Secret(PASSWORD))
    fake = FakeOtpRegistry(canary, header=False)
    with fake, pytest.raises(OtpRequiredError):
        NpmTokenApi(fake.origin).create(auth, scope=PUBLISH, ttl_seconds=None)


def test_otp_sent(otp_fake: FakeOtpRegistry, canary: Canary) -> None:
    auth = Auth(token=Secret(canary), password=Secret(PASSWORD), otp=OTP)
    NpmTokenApi(otp_fake.origin).create(auth, scope=PUBLISH, ttl_seconds=None)
    assert otp_fake.otps == [OTP]


def test_otp_message_clean(
    otp_fake: FakeOtpRegistry,
    canary: Canary,
    debug_log: Log,
) -> None:
    auth = Auth(token=Secret(canary), password=Secret(PASSWORD))
    with pytest.raises(OtpRequiredError) as caught:
        NpmTokenApi(otp_fake.origin).create(auth, scope=PUBLISH, ttl_seconds=None)
    assert canary not in str(caught.value) + debug_log.text


def test_otp_login(otp_fake: FakeOtpRegistry, canary: Canary) -> None:
    with pytest.raises(OtpRequiredError):
        NpmTokenApi(otp_fake.origin).login("someone", Secret(PASSWORD), None)


def test_otp_login_with_code(otp_fake: FakeOtpRegistry, canary: Canary) -> None:
    issued = NpmTokenApi(otp_fake.origin).login("someone", Secret(PASSWORD), OTP)
    assert issued.value.reveal() == canary
