"""The Artifactory provider against FakeArtifactory, a loopback fake of JFrog's
Access token API and an npm repository (see tests/fake_artifactory.py). The
fake rejects unknown, revoked and expired tokens with 401, so these tests
prove that a revoked or expired token really stops working there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from fake_artifactory import FakeArtifactory
from realparts import Canary

from npmguard.registry import (
    PUBLISH,
    READ_ONLY,
    Auth,
    NotSupportedError,
    RegistryError,
    TokenInfo,
    TokenRejectedError,
)
from npmguard.registry.artifactory import ArtifactoryTokens, access_base
from npmguard.secret import Secret

Log = pytest.LogCaptureFixture
USER = "arti"


@pytest.fixture
def jfrog() -> Iterator[FakeArtifactory]:
    fake = FakeArtifactory()
    with fake:
        yield fake
    assert fake.errors == []


@pytest.fixture
def provider(jfrog: FakeArtifactory) -> ArtifactoryTokens:
    return ArtifactoryTokens(jfrog.registry)


@pytest.fixture
def token(jfrog: FakeArtifactory) -> Secret:
    return Secret(jfrog.add_token(USER))


@pytest.fixture
def debug_log(caplog: Log) -> Log:
    caplog.set_level(logging.DEBUG, logger="npmguard")
    return caplog


# --------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    ("registry", "access"),
    [
        (
            "https://acme.jfrog.io/artifactory/api/npm/npm-remote/",
            "https://acme.jfrog.io/access/api/v1",
        ),
        (
            "https://repo.example/tools/artifactory/api/npm/npm/",
            "https://repo.example/tools/access/api/v1",
        ),
        (
            "http://127.0.0.1:8082/artifactory/api/npm/npm-local",
            "http://127.0.0.1:8082/access/api/v1",
        ),
    ],
)
def test_access_base_url(registry: str, access: str) -> None:
    assert access_base(registry) == access


def test_access_base_not_artifactory() -> None:
    with pytest.raises(RegistryError, match="not an Artifactory"):
        access_base("https://registry.example/npm/")


def test_sub_path_whoami() -> None:
    fake = FakeArtifactory(prefix="/jfrog")
    with fake:
        value = fake.add_token(USER)
        name = ArtifactoryTokens(fake.registry).whoami(Secret(value))
    assert name == USER


# --------------------------------------------------------------------------
# whoami and token_info


def test_whoami_me(provider: ArtifactoryTokens, token: Secret) -> None:
    assert provider.whoami(token) == USER


def test_whoami_old_version() -> None:
    """Before 7.53.1 there is no tokens/me; the npm repository answers."""
    fake = FakeArtifactory(me_endpoint=False)
    with fake:
        value = fake.add_token(USER)
        name = ArtifactoryTokens(fake.registry).whoami(Secret(value))
    assert name == USER


def test_whoami_revoked(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    jfrog.record(token.reveal()).revoked = True
    with pytest.raises(TokenRejectedError):
        provider.whoami(token)


def test_whoami_canary(
    provider: ArtifactoryTokens, canary: Canary, debug_log: Log
) -> None:
    with pytest.raises(TokenRejectedError) as caught:
        provider.whoami(Secret(canary))
    assert canary not in str(caught.value)
    assert canary not in debug_log.text


def test_info_id(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    assert provider.token_info(token).key == jfrog.record(token.reveal()).token_id


def test_info_expiry(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    assert provider.token_info(token).expires == jfrog.record(token.reveal()).expiry


def test_info_old_version_from_jwt() -> None:
    fake = FakeArtifactory(me_endpoint=False)
    with fake:
        value = fake.add_token(USER)
        info = ArtifactoryTokens(fake.registry).token_info(Secret(value))
        assert info.key == fake.record(value).token_id


# --------------------------------------------------------------------------
# create


def test_create_works(provider: ArtifactoryTokens, token: Secret) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    assert provider.whoami(issued.value) == USER


def test_create_lifetime(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    expiry = jfrog.record(issued.value.reveal()).expiry
    assert issued.info.expires == pytest.approx(expiry, abs=2)


def test_create_id(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    assert issued.info.key == jfrog.record(issued.value.reveal()).token_id


def test_create_default_lifetime(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=None)
    assert jfrog.record(issued.value.reveal()).expiry is None


def test_create_expires_for_real(provider: ArtifactoryTokens, token: Secret) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=1)
    time.sleep(1.2)
    with pytest.raises(TokenRejectedError):
        provider.whoami(issued.value)


def test_create_read_only(provider: ArtifactoryTokens, token: Secret) -> None:
    with pytest.raises(NotSupportedError, match="read-only"):
        provider.create(Auth(token=token), scope=READ_ONLY, ttl_seconds=600)


def test_create_over_limit(provider: ArtifactoryTokens, token: Secret) -> None:
    with pytest.raises(TokenRejectedError, match="lifetime"):
        provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=10**9)


def test_create_needs_valid_token(provider: ArtifactoryTokens, canary: Canary) -> None:
    with pytest.raises(TokenRejectedError):
        provider.create(Auth(token=Secret(canary)), scope=PUBLISH, ttl_seconds=60)


def test_create_log_clean(
    provider: ArtifactoryTokens, token: Secret, debug_log: Log
) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    assert issued.value.reveal() not in debug_log.text
    assert issued.value.fingerprint in debug_log.text


def test_replace_keeps_old(provider: ArtifactoryTokens, token: Secret) -> None:
    new = provider.replace(Auth(token=token), ttl_seconds=600)
    assert (new.old_revoked, provider.whoami(token)) == (False, USER)


# --------------------------------------------------------------------------
# revoke and list


def test_revoke_by_id(provider: ArtifactoryTokens, token: Secret) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    provider.revoke(Auth(token=token), issued.value, issued.info)
    with pytest.raises(TokenRejectedError):
        provider.whoami(issued.value)


def test_revoke_finds_id(provider: ArtifactoryTokens, token: Secret) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    provider.revoke(Auth(token=token), issued.value, None)
    with pytest.raises(TokenRejectedError):
        provider.whoami(issued.value)


def test_revoke_self(provider: ArtifactoryTokens, token: Secret) -> None:
    provider.revoke(Auth(token=token), token, None)
    with pytest.raises(TokenRejectedError):
        provider.whoami(token)


def test_revoke_twice(provider: ArtifactoryTokens, token: Secret) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    provider.revoke(Auth(token=token), issued.value, issued.info)
    provider.revoke(Auth(token=token), issued.value, issued.info)
    assert provider.whoami(token) == USER


def test_revoke_unknown_id(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    provider.revoke(Auth(token=token), Secret("gone"), TokenInfo(key="no-such-id"))
    assert jfrog.seen[-1].status == 404


def test_revoke_canary(
    provider: ArtifactoryTokens, token: Secret, canary: Canary, debug_log: Log
) -> None:
    provider.revoke(Auth(token=token), Secret(canary), None)
    assert canary not in debug_log.text


def test_list_has_created(provider: ArtifactoryTokens, token: Secret) -> None:
    issued = provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=600)
    keys = {info.key for info in provider.list_tokens(Auth(token=token))}
    assert issued.info.key in keys


def test_list_own_only(
    jfrog: FakeArtifactory, provider: ArtifactoryTokens, token: Secret
) -> None:
    jfrog.add_token("someone-else")
    assert len(provider.list_tokens(Auth(token=token))) == 1


# --------------------------------------------------------------------------
# What Artifactory cannot do here


def test_login_refused(provider: ArtifactoryTokens) -> None:
    with pytest.raises(NotSupportedError, match="npmguard login"):
        provider.login(USER, Secret("pw"), None)


def test_web_login_refused(provider: ArtifactoryTokens) -> None:
    with pytest.raises(NotSupportedError, match="npmguard login"):
        provider.web_login(lambda url: None)


def test_capabilities(provider: ArtifactoryTokens) -> None:
    caps = provider.capabilities
    assert (caps.mint, caps.unattended, caps.read_only) == (True, True, False)
