"""The GitLab provider against FakeGitLab, a loopback fake of GitLab's
personal access token API (see tests/fake_gitlab.py). The fake rejects
unknown, revoked and expired tokens with 401, so these tests prove that a
rotated or revoked token really stops working there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from fake_gitlab import FakeGitLab
from realparts import Canary

from npmguard.registry import (
    PUBLISH,
    Auth,
    NotSupportedError,
    RegistryError,
    TokenInfo,
    TokenRejectedError,
)
from npmguard.registry.gitlab import GitLabTokens, api_base
from npmguard.secret import Secret

Log = pytest.LogCaptureFixture
USER = "gina"


@pytest.fixture
def gitlab() -> Iterator[FakeGitLab]:
    fake = FakeGitLab()
    with fake:
        yield fake
    assert fake.errors == []


@pytest.fixture
def provider(gitlab: FakeGitLab) -> GitLabTokens:
    return GitLabTokens(gitlab.project_registry())


@pytest.fixture
def debug_log(caplog: Log) -> Log:
    caplog.set_level(logging.DEBUG, logger="npmguard")
    return caplog


def _utc_day(days: int) -> float:
    day = datetime.now(timezone.utc).date() + timedelta(days=days)
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


# --------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    ("registry", "api"),
    [
        (
            "https://gl.example/api/v4/projects/7/packages/npm/",
            "https://gl.example/api/v4",
        ),
        ("https://gl.example/api/v4/packages/npm/", "https://gl.example/api/v4"),
        (
            "https://gl.example/api/v4/groups/3/-/packages/npm/",
            "https://gl.example/api/v4",
        ),
        (
            "https://gl.example/gitlab/api/v4/projects/7/packages/npm/",
            "https://gl.example/gitlab/api/v4",
        ),
        ("//gl.example/api/v4/packages/npm/", "https://gl.example/api/v4"),
    ],
)
def test_api_base_url(registry: str, api: str) -> None:
    assert api_base(registry) == api


def test_api_base_not_gitlab() -> None:
    with pytest.raises(RegistryError, match="not a GitLab"):
        api_base("https://registry.example/npm/")


def test_sub_path_whoami() -> None:
    fake = FakeGitLab(prefix="/gitlab")
    with fake:
        token = fake.add_token(USER, ["api"])
        name = GitLabTokens(fake.project_registry()).whoami(Secret(token))
    assert name == USER


def test_api_override(gitlab: FakeGitLab) -> None:
    token = gitlab.add_token(USER, ["api"])
    provider = GitLabTokens("https://npm.example/packages/", api=gitlab.api)
    assert provider.whoami(Secret(token)) == USER


# --------------------------------------------------------------------------
# whoami and token_info


def test_whoami_ok(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["read_api"])
    assert provider.whoami(Secret(token)) == USER


def test_whoami_revoked(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["api"])
    gitlab.record(token).revoked = True
    with pytest.raises(TokenRejectedError):
        provider.whoami(Secret(token))


def test_whoami_expired(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["api"], days=0)
    with pytest.raises(TokenRejectedError):
        provider.whoami(Secret(token))


def test_whoami_canary(provider: GitLabTokens, canary: Canary, debug_log: Log) -> None:
    with pytest.raises(TokenRejectedError) as caught:
        provider.whoami(Secret(canary))
    assert canary not in str(caught.value)
    assert canary not in debug_log.text


def test_info_key(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["api"])
    assert provider.token_info(Secret(token)).key == str(gitlab.record(token).id)


def test_info_publish_scope(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["api"])
    assert provider.token_info(Secret(token)).read_only is False


def test_info_read_scope(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["read_api"])
    assert provider.token_info(Secret(token)).read_only is True


def test_info_expiry(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = gitlab.add_token(USER, ["api"], days=30)
    assert provider.token_info(Secret(token)).expires == _utc_day(30)


# --------------------------------------------------------------------------
# replace (GitLab's self-rotation)


def test_rotate_new_works(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api"]))
    new = provider.replace(Auth(token=old), ttl_seconds=None)
    assert provider.whoami(new.value) == USER


def test_rotate_old_rejected(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api"]))
    provider.replace(Auth(token=old), ttl_seconds=None)
    with pytest.raises(TokenRejectedError):
        provider.whoami(old)


def test_rotate_says_revoked(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api"]))
    assert provider.replace(Auth(token=old), ttl_seconds=None).old_revoked is True


def test_rotate_default_week(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api"]))
    new = provider.replace(Auth(token=old), ttl_seconds=None)
    assert new.info.expires == _utc_day(7)


def test_rotate_ttl_days(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api"]))
    new = provider.replace(Auth(token=old), ttl_seconds=2 * 86400 + 1)
    assert new.info.expires == _utc_day(3)


def test_rotate_short_ttl(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    """GitLab counts whole days, so an hour becomes one day."""
    old = Secret(gitlab.add_token(USER, ["api"]))
    new = provider.replace(Auth(token=old), ttl_seconds=3600)
    assert new.info.expires == _utc_day(1)


def test_rotate_keeps_scopes(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api", "read_user"]))
    new = provider.replace(Auth(token=old), ttl_seconds=None)
    assert gitlab.record(new.value.reveal()).scopes == ["api", "read_user"]


def test_rotate_needs_scope(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["read_api"]))
    with pytest.raises(TokenRejectedError, match="self_rotate"):
        provider.replace(Auth(token=old), ttl_seconds=None)


def test_rotate_refused_keeps(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["read_api"]))
    with pytest.raises(TokenRejectedError):
        provider.replace(Auth(token=old), ttl_seconds=None)
    assert provider.whoami(old) == USER


def test_rotate_self_rotate_scope(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["read_api", "self_rotate"]))
    new = provider.replace(Auth(token=old), ttl_seconds=None)
    assert provider.whoami(new.value) == USER


def test_rotate_too_long(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    old = Secret(gitlab.add_token(USER, ["api"]))
    with pytest.raises(RegistryError, match="HTTP 400"):
        provider.replace(Auth(token=old), ttl_seconds=400 * 86400)


def test_rotate_by_id() -> None:
    """GitLab before 16.10 has no self/rotate; rotation goes by token id."""
    legacy = FakeGitLab(self_rotate=False)
    with legacy:
        old = Secret(legacy.add_token(USER, ["api"]))
        provider = GitLabTokens(legacy.project_registry())
        new = provider.replace(Auth(token=old), ttl_seconds=None)
        assert provider.whoami(new.value) == USER


def test_rotate_canary(
    gitlab: FakeGitLab, provider: GitLabTokens, canary: Canary, debug_log: Log
) -> None:
    old = Secret(gitlab.add_token(USER, ["api"], value=canary))
    new = provider.replace(Auth(token=old), ttl_seconds=None)
    assert canary not in debug_log.text
    assert new.value.reveal() not in debug_log.text


def test_rotate_logs_ids(
    gitlab: FakeGitLab, provider: GitLabTokens, caplog: Log
) -> None:
    caplog.set_level(logging.INFO, logger="npmguard")
    old = Secret(gitlab.add_token(USER, ["api"]))
    new = provider.replace(Auth(token=old), ttl_seconds=None)
    assert new.value.fingerprint in caplog.text


# --------------------------------------------------------------------------
# revoke


def test_revoke_self(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = Secret(gitlab.add_token(USER, ["api"]))
    provider.revoke(Auth(token=token), token, None)
    with pytest.raises(TokenRejectedError):
        provider.whoami(token)


def test_revoke_by_id(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    keeper = Secret(gitlab.add_token(USER, ["api"]))
    target = Secret(gitlab.add_token(USER, ["read_api"]))
    info = provider.token_info(target)
    provider.revoke(Auth(token=keeper), target, info)
    with pytest.raises(TokenRejectedError):
        provider.whoami(target)


def test_revoke_by_id_uses_auth(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    keeper = Secret(gitlab.add_token(USER, ["api"]))
    target = Secret(gitlab.add_token(USER, ["read_api"]))
    info = provider.token_info(target)
    provider.revoke(Auth(token=keeper), target, info)
    assert gitlab.seen[-1].path.endswith(f"/personal_access_tokens/{info.key}")


def test_revoke_twice(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = Secret(gitlab.add_token(USER, ["api"]))
    provider.revoke(Auth(token=token), token, None)
    provider.revoke(Auth(token=token), token, None)
    assert gitlab.record(token.reveal()).revoked is True


def test_revoke_gone_id(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    keeper = Secret(gitlab.add_token(USER, ["api"]))
    ghost = TokenInfo(key="999999")
    provider.revoke(Auth(token=keeper), Secret("glpat-gone"), ghost)
    assert gitlab.seen[-1].status == 404


def test_revoke_canary(provider: GitLabTokens, canary: Canary, debug_log: Log) -> None:
    provider.revoke(Auth(token=Secret(canary)), Secret(canary), None)
    assert canary not in debug_log.text


# --------------------------------------------------------------------------
# list


def test_list_own(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    mine = Secret(gitlab.add_token(USER, ["api"]))
    gitlab.add_token("someone-else", ["api"])
    keys = {info.key for info in provider.list_tokens(Auth(token=mine))}
    assert keys == {str(gitlab.record(mine.reveal()).id)}


def test_list_pages(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    tokens = [gitlab.add_token(USER, ["read_api"]) for _ in range(130)]
    found = provider.list_tokens(Auth(token=Secret(tokens[0])))
    assert len(found) == 130


def test_list_skips_revoked(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    mine = Secret(gitlab.add_token(USER, ["api"]))
    gone = gitlab.add_token(USER, ["api"])
    gitlab.record(gone).revoked = True
    assert len(provider.list_tokens(Auth(token=mine))) == 1


# --------------------------------------------------------------------------
# What GitLab cannot do


def test_create_refused(gitlab: FakeGitLab, provider: GitLabTokens) -> None:
    token = Secret(gitlab.add_token(USER, ["api"]))
    with pytest.raises(NotSupportedError, match="npmguard login"):
        provider.create(Auth(token=token), scope=PUBLISH, ttl_seconds=None)


def test_login_refused(provider: GitLabTokens) -> None:
    with pytest.raises(NotSupportedError, match="personal access token"):
        provider.login(USER, Secret("pw"), None)


def test_web_login_refused(provider: GitLabTokens) -> None:
    with pytest.raises(NotSupportedError, match="personal access token"):
        provider.web_login(lambda url: None)


def test_capabilities(provider: GitLabTokens) -> None:
    caps = provider.capabilities
    assert (caps.rotate, caps.unattended, caps.mint) == (True, True, False)


def test_unreachable(canary: Canary) -> None:
    fake = FakeGitLab()
    registry = fake.project_registry()
    fake.stop()
    started = time.monotonic()
    with pytest.raises(RegistryError, match="no answer"):
        GitLabTokens(registry, timeout=2).whoami(Secret(canary))
    assert time.monotonic() - started < 2
