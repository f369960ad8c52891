"""Choosing a provider for a registry URL, the providers of registries without
a token API, and the HTTP client they all share (proxies, redirects,
timeouts, error messages). Registries are the real Verdaccio or loopback
fakes named as fakes; no request leaves 127.0.0.1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from fake_gitlab import FakeRequest, FakeResponse, LoopbackFake
from realparts import Canary, Verdaccio

from npmguard.config import PROVIDER_KINDS
from npmguard.registry import (
    PROVIDERS,
    PUBLISH,
    Auth,
    NotSupportedError,
    RegistryError,
    RegistryUnreachableError,
    TokenRejectedError,
    detect_kind,
    provider_for,
)
from npmguard.registry.artifactory import ArtifactoryTokens
from npmguard.registry.gitlab import GitLabTokens
from npmguard.registry.http import (
    HttpClient,
    display_url,
    proxy_for,
    registry_base,
)
from npmguard.registry.npmapi import NpmTokenApi
from npmguard.registry.unsupported import ManualTokens
from npmguard.secret import Secret

Log = pytest.LogCaptureFixture


@pytest.fixture
def debug_log(caplog: Log) -> Log:
    caplog.set_level(logging.DEBUG, logger="npmguard")
    return caplog


# --------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://registry.npmjs.org/", "npm-token-api"),
        ("https://registry.npmjs.org", "npm-token-api"),
        ("//registry.npmjs.org/", "npm-token-api"),
        ("https://npm.pkg.github.com/", "github"),
        ("https://npm.pkg.github.com/acme", "github"),
        ("https://gitlab.com/api/v4/projects/123/packages/npm/", "gitlab"),
        ("https://git.acme.io/api/v4/packages/npm/", "gitlab"),
        ("https://git.acme.io/api/v4/groups/9/-/packages/npm/", "gitlab"),
        ("https://acme.jfrog.io/artifactory/api/npm/npm/", "artifactory"),
        ("http://127.0.0.1:4873/", "npm-token-api"),
        ("https://verdaccio.acme.io/npm/", "npm-token-api"),
        ("https://git.acme.io/api/v4/projects/1/", "npm-token-api"),
    ],
)
def test_detect_kind(url: str, kind: str) -> None:
    assert detect_kind(url) == kind


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("npm-token-api", NpmTokenApi),
        ("gitlab", GitLabTokens),
        ("artifactory", ArtifactoryTokens),
        ("github", ManualTokens),
        ("none", ManualTokens),
    ],
)
def test_explicit_kind(kind: str, cls: type) -> None:
    url = "https://acme.jfrog.io/artifactory/api/npm/x/"
    api = "https://acme.example/api"
    assert isinstance(provider_for(url, kind=kind, api=api), cls)


def test_auto_kind() -> None:
    provider = provider_for("https://gitlab.com/api/v4/packages/npm/", kind="auto")
    assert isinstance(provider, GitLabTokens)


def test_unknown_kind() -> None:
    with pytest.raises(RegistryError, match="use one of"):
        provider_for("https://registry.example/", kind="nexus")


def test_config_kinds_known() -> None:
    assert set(PROVIDER_KINDS) <= {"auto", *PROVIDERS}


def test_providers_notes() -> None:
    assert all(note and "\n" not in note for note in PROVIDERS.values())


def test_none_capabilities() -> None:
    provider = provider_for("https://registry.example/", kind="none")
    assert provider.capabilities.rotate is False


def test_github_capabilities() -> None:
    provider = provider_for("https://npm.pkg.github.com/")
    assert provider.capabilities.provider == "github"


def test_npmjs_needs_password() -> None:
    assert provider_for("https://registry.npmjs.org/").capabilities.needs_password


def test_npmjs_no_mint() -> None:
    """npmjs wants a one-time code for new tokens, so no token per job."""
    assert provider_for("https://registry.npmjs.org/").capabilities.mint is False


def test_private_registry_mints() -> None:
    assert provider_for("http://127.0.0.1:4873/").capabilities.mint is True


def test_bad_url() -> None:
    with pytest.raises(RegistryError, match="not an http"):
        provider_for("file:///etc/npmrc")


# --------------------------------------------------------------------------
# Registries without a token API


def test_github_create_message() -> None:
    provider = provider_for("https://npm.pkg.github.com/")
    with pytest.raises(NotSupportedError, match="github.com") as caught:
        provider.create(Auth(token=Secret("x")), scope=PUBLISH, ttl_seconds=None)
    assert "npmguard login" in str(caught.value)


def test_none_revoke_message() -> None:
    provider = provider_for("https://registry.example/", kind="none")
    with pytest.raises(NotSupportedError, match="registry's own tools"):
        provider.revoke(Auth(token=Secret("x")), Secret("y"), None)


@pytest.mark.parametrize("method", ["replace", "list_tokens", "login", "web_login"])
def test_github_writes_refused(method: str) -> None:
    provider = provider_for("https://npm.pkg.github.com/")
    calls = {
        "replace": lambda: provider.replace(Auth(token=Secret("x")), ttl_seconds=None),
        "list_tokens": lambda: provider.list_tokens(Auth(token=Secret("x"))),
        "login": lambda: provider.login("u", Secret("p"), None),
        "web_login": lambda: provider.web_login(lambda url: None),
    }
    with pytest.raises(NotSupportedError):
        calls[method]()


def test_none_whoami(verdaccio: Verdaccio) -> None:
    token = Secret(verdaccio.add_user("detect-none-user", "detect-pw-1"))
    assert provider_for(verdaccio.url, kind="none").whoami(token) == "detect-none-user"


def test_none_whoami_canary(
    verdaccio: Verdaccio, canary: Canary, debug_log: Log
) -> None:
    with pytest.raises(TokenRejectedError) as caught:
        provider_for(verdaccio.url, kind="none").whoami(Secret(canary))
    assert canary not in str(caught.value) + debug_log.text


# --------------------------------------------------------------------------
# URLs and proxies


def test_registry_base_nerf() -> None:
    assert registry_base("//npm.acme.io/team") == "https://npm.acme.io/team/"


def test_registry_base_drops_userinfo() -> None:
    assert registry_base("https://bob:hunter2@npm.acme.io/") == "https://npm.acme.io/"


def test_display_url_drops_query() -> None:
    assert display_url("https://h.example/done?session=abc") == "https://h.example/done"


@pytest.mark.parametrize(
    ("url", "env", "proxy"),
    [
        ("https://r.example/", {"https_proxy": "http://p:1"}, "http://p:1"),
        ("https://r.example/", {"HTTPS_PROXY": "http://p:1"}, "http://p:1"),
        ("https://r.example/", {"http_proxy": "http://p:1"}, None),
        ("http://r.example/", {"http_proxy": "http://p:2"}, "http://p:2"),
        ("http://r.example/", {"https_proxy": "http://p:1"}, "http://p:1"),
        ("http://r.example/", {"proxy": "http://p:3"}, "http://p:3"),
        (
            "https://r.example/",
            {"https_proxy": "http://p:1", "no_proxy": "example"},
            None,
        ),
        (
            "https://r.example/",
            {"https_proxy": "http://p:1", "NO_PROXY": ".r.example"},
            None,
        ),
        (
            "https://r.example/",
            {"https_proxy": "http://p:1", "no_proxy": "other.example"},
            "http://p:1",
        ),
        (
            "https://xr.example/",
            {"https_proxy": "http://p:1", "no_proxy": "r.example"},
            "http://p:1",
        ),
        ("https://r.example/", {"https_proxy": "http://p:1", "no_proxy": "*"}, None),
        ("http://127.0.0.1:4873/", {"http_proxy": "http://p:2"}, None),
        ("http://localhost:4873/", {"http_proxy": "http://p:2"}, None),
        ("http://[::1]:4873/", {"http_proxy": "http://p:2"}, None),
    ],
)
def test_proxy_for(url: str, env: dict[str, str], proxy: str | None) -> None:
    assert proxy_for(url, env) == proxy


class FakeRegistry(LoopbackFake):
    """A fake npm registry that serves whoami for one token, and nothing else."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.hosts: list[str] = []

    def handle(self, req: FakeRequest) -> FakeResponse:
        self.hosts.append(req.headers.get("Host", ""))
        if req.path.endswith("/-/whoami") and req.bearer() == self.token:
            return FakeResponse(200, {"username": "proxied-user"})
        return FakeResponse(401, {"error": "unauthorized"})


@pytest.fixture
def fake_registry(canary: Canary) -> Iterator[FakeRegistry]:
    fake = FakeRegistry(canary)
    with fake:
        yield fake
    assert fake.errors == []


def test_proxy_used(
    fake_registry: FakeRegistry, canary: Canary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote registry is reached through the proxy (here a fake on loopback)."""
    monkeypatch.setenv("HTTP_PROXY", fake_registry.origin)
    api = NpmTokenApi("http://registry.example.test/")
    api.whoami(Secret(canary))
    assert fake_registry.hosts == ["registry.example.test"]


def test_loopback_skips_proxy(
    fake_registry: FakeRegistry, canary: Canary, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = LoopbackFake()
    dead_proxy = dead.origin
    dead.stop()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    name = NpmTokenApi(fake_registry.origin).whoami(Secret(canary))
    assert name == "proxied-user"


# --------------------------------------------------------------------------
# Responses the client must not trust


class FakeRedirector(LoopbackFake):
    """A fake registry that sends every request elsewhere."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def handle(self, req: FakeRequest) -> FakeResponse:
        return FakeResponse(302, {}, {"Location": self.target + req.path})


def test_redirect_not_followed(fake_registry: FakeRegistry, canary: Canary) -> None:
    redirector = FakeRedirector(fake_registry.origin)
    with redirector, pytest.raises(RegistryError, match="redirect"):
        NpmTokenApi(redirector.origin).whoami(Secret(canary))
    assert fake_registry.hosts == []


class FakeEcho(LoopbackFake):
    """A fake registry whose error message repeats the credentials it got."""

    def handle(self, req: FakeRequest) -> FakeResponse:
        echoed = req.headers.get("Authorization", "") + " " + str(req.params())
        return FakeResponse(401, {"error": f"rejected {echoed}"})


def test_echoed_token_hidden(canary: Canary) -> None:
    echo = FakeEcho()
    with echo, pytest.raises(TokenRejectedError) as caught:
        NpmTokenApi(echo.origin).whoami(Secret(canary))
    assert canary not in str(caught.value)


def test_echoed_password_hidden(canary: Canary) -> None:
    echo = FakeEcho()
    auth = Auth(token=Secret("some-token-value"), password=Secret(canary))
    with echo, pytest.raises(TokenRejectedError) as caught:
        NpmTokenApi(echo.origin).create(auth, scope=PUBLISH, ttl_seconds=None)
    assert canary not in str(caught.value)


def test_echo_marked_hidden(canary: Canary) -> None:
    echo = FakeEcho()
    with echo, pytest.raises(TokenRejectedError, match="<hidden>"):
        NpmTokenApi(echo.origin).whoami(Secret(canary))


class FakeHtml(LoopbackFake):
    """A fake web server that returns HTML, as a wrong registry URL would."""

    def handle(self, req: FakeRequest) -> FakeResponse:
        return FakeResponse(200, b"<html>login page</html>")


def test_not_json(canary: Canary) -> None:
    page = FakeHtml()
    with page, pytest.raises(RegistryError, match="not JSON"):
        NpmTokenApi(page.origin).whoami(Secret(canary))


class FakeSlow(LoopbackFake):
    """A fake registry that answers after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def handle(self, req: FakeRequest) -> FakeResponse:
        time.sleep(self.delay)
        return FakeResponse(200, {"username": "late"})


def test_timeout(canary: Canary) -> None:
    slow = FakeSlow(1.0)
    with slow, pytest.raises(RegistryUnreachableError, match="timed out"):
        NpmTokenApi(slow.origin, timeout=0.2).whoami(Secret(canary))


def test_refused_names_registry(canary: Canary) -> None:
    closed = LoopbackFake()
    url = closed.origin + "/"
    closed.stop()
    with pytest.raises(RegistryUnreachableError, match="connection refused") as caught:
        NpmTokenApi(url).whoami(Secret(canary))
    assert url in str(caught.value)


def test_client_headers(fake_registry: FakeRegistry, canary: Canary) -> None:
    client = HttpClient(fake_registry.origin)
    resp = client.request(
        "GET", fake_registry.origin + "/-/whoami", bearer=Secret(canary)
    )
    assert resp.json_object() == {"username": "proxied-user"}
