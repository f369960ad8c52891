"""``npmguard status`` as an inventory of stored credentials.

Credentials are put in place the way a user would: ``npmguard login``
against the session's Verdaccio (the canary is the account password), and
``npmguard secure`` of a GitHub Packages line that contains the canary as its
token. Ages and journal entries are set by editing npmguard's own state
files; last uses come from real audit records.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realparts import Canary, Keychain, Verdaccio

from npmguard import audit, lifecycle, paths
from npmguard.commands import status
from npmguard.config import Settings
from npmguard.daemon.core import Daemon
from npmguard.lifecycle import Managed
from npmguard.npmrc.locate import user_config_path
from npmguard.rotation import rotation_dir
from tests.npmcli import NPMGUARD, npmguard, run

DAY = 86400.0
GITHUB = "//npm.pkg.github.com/"
FIELDS = {
    "name", "registry", "url", "kind", "fingerprint", "origin", "username",
    "used_at", "issued", "age_days", "expires", "last_used", "rotated",
    "rotate_days", "next_rotation", "rotation_due", "remind_days",
    "password_stored", "registry_allows", "rotation", "mint", "flags",
}


def login(verdaccio: Verdaccio, password: str, home: Path, *,
          store_password: bool = True) -> Managed:
    user = f"inv{secrets.token_hex(4)}"
    verdaccio.add_user(user, password)
    argv = [*NPMGUARD, "login", "--registry", verdaccio.url, "--username", user,
            "--password-stdin", "--token-helper", "never"]
    if store_password:
        argv.append("--store-password")
    result = run(argv, home, stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    [entry] = lifecycle.find(verdaccio.url)
    return entry


def secure_github(home: Path, token: str) -> Managed:
    user_config_path(os.environ).write_text(f"{GITHUB}:_authToken={token}\n")
    result = npmguard("secure", "--token-helper", "never", cwd=home)
    assert result.returncode == 0, result.stderr
    [entry] = lifecycle.find(GITHUB)
    return entry


def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("NPMGUARD_CONFIG", str(path))


def status_json(home: Path) -> dict[str, Any]:
    result = npmguard("status", "--json", cwd=home)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def item(home: Path, registry: str) -> dict[str, Any]:
    [found] = [c for c in status_json(home)["credentials"]
               if c["registry"] == registry]
    return found


def status_text(home: Path) -> str:
    return npmguard("status", cwd=home).stdout


@pytest.fixture
def with_password(keyring_bus: Keychain, verdaccio: Verdaccio, canary: Canary,
                  home: Path) -> Managed:
    return login(verdaccio, canary, home)


@pytest.fixture
def without_password(keyring_bus: Keychain, verdaccio: Verdaccio, canary: Canary,
                     home: Path) -> Managed:
    return login(verdaccio, canary, home, store_password=False)


@pytest.fixture
def old_github(keyring_bus: Keychain, canary: Canary, home: Path) -> Managed:
    entry = secure_github(home, canary)
    lifecycle.update(entry.name, issued=time.time() - 100 * DAY)
    return entry


# --------------------------------------------------------------------------
# A login token with the password stored


def test_password_rotation(with_password: Managed, home: Path) -> None:
    assert item(home, with_password.registry)["rotation"] == "with the stored password"


def test_password_mint(with_password: Managed, home: Path) -> None:
    assert item(home, with_password.registry)["mint"] == "with the stored password"


def test_password_stored_flag(with_password: Managed, home: Path) -> None:
    assert item(home, with_password.registry)["password_stored"] is True


def test_password_provider(with_password: Managed, home: Path) -> None:
    allows = item(home, with_password.registry)["registry_allows"]
    assert allows["provider"] == "npm-token-api"


def test_password_used_at_marker(with_password: Managed, home: Path) -> None:
    used = item(home, with_password.registry)["used_at"]
    assert used == [{"path": str(home / ".npmrc"), "line": 1}]


def test_password_text_used_at(with_password: Managed, home: Path) -> None:
    assert "used at        ~/.npmrc:1" in status_text(home)


def test_password_text_registry_line(with_password: Managed, home: Path) -> None:
    assert ("npm-token-api: rotate with the stored password; mint with the stored "
            "password") in status_text(home)


def test_password_username(with_password: Managed, home: Path) -> None:
    assert item(home, with_password.registry)["username"] == (
        with_password.meta["username"])


def test_password_never_rotated(with_password: Managed, home: Path) -> None:
    assert "last rotated   never" in status_text(home)


def test_password_next_rotation_off(with_password: Managed, home: Path) -> None:
    assert "next rotation  off (set rotate_days in config.toml)" in status_text(home)


def test_password_next_rotation_scheduled(
    with_password: Managed, home: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = 7\n")
    found = item(home, with_password.registry)
    assert found["next_rotation"] == pytest.approx(found["issued"] + 7 * DAY)


def test_password_due_daemon_rotates(
    with_password: Managed, home: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = 7\n")
    lifecycle.update(with_password.name, issued=time.time() - 8 * DAY)
    assert "due now (every 7 days); the daemon rotates it" in status_text(home)


# --------------------------------------------------------------------------
# A login token without the password


def test_no_password_rotation(without_password: Managed, home: Path) -> None:
    assert item(home, without_password.registry)["rotation"] == "needs your password"


def test_no_password_mint(without_password: Managed, home: Path) -> None:
    assert item(home, without_password.registry)["mint"] == "needs your password"


def test_no_password_due_says_command(
    without_password: Managed, home: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, verdaccio: Verdaccio,
) -> None:
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = 1\n")
    lifecycle.update(without_password.name, issued=time.time() - 2 * DAY)
    assert f"run `npmguard rotate --registry {verdaccio.url}`" in status_text(home)


def test_mint_off_in_config(
    with_password: Managed, home: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_config(tmp_path, monkeypatch, "[tokens]\nmint = false\n")
    assert item(home, with_password.registry)["mint"] == "off"


# --------------------------------------------------------------------------
# GitHub Packages: cannot rotate, and old


def test_github_rotation(old_github: Managed, home: Path) -> None:
    assert item(home, GITHUB)["rotation"] == "not possible"


def test_github_old_flag(old_github: Managed, home: Path) -> None:
    assert item(home, GITHUB)["flags"]["old"] is True


def test_github_fresh_not_old(keyring_bus: Keychain, canary: Canary,
                              home: Path) -> None:
    secure_github(home, canary)
    assert item(home, GITHUB)["flags"]["old"] is False


def test_github_note(old_github: Managed, home: Path) -> None:
    assert "GitHub Packages has no API for npm tokens" in (
        item(home, GITHUB)["registry_allows"]["note"])


def test_github_text_old(old_github: Managed, home: Path) -> None:
    assert "old (over 90 days and it cannot rotate)" in status_text(home)


def test_github_next_rotation(old_github: Managed, home: Path) -> None:
    assert "next rotation  not possible" in status_text(home)


def test_github_age(old_github: Managed, home: Path) -> None:
    assert item(home, GITHUB)["age_days"] == pytest.approx(100, abs=0.01)


def test_github_origin(old_github: Managed, home: Path) -> None:
    assert item(home, GITHUB)["origin"] == "secure"


def test_github_no_canary(old_github: Managed, home: Path, canary: Canary) -> None:
    outputs = npmguard("status", cwd=home).stdout + npmguard(
        "status", "--json", cwd=home).stdout
    assert canary[:-4][-12:] not in outputs


# --------------------------------------------------------------------------
# Flags from the journal, the index and the audit trail


def write_journal(entry: Managed) -> None:
    txid = secrets.token_hex(8)
    record = {"txid": txid, "name": entry.name, "registry": entry.registry,
              "phase": "creating", "old_fingerprint": entry.fingerprint,
              "created": time.time()}
    rotation_dir().mkdir(parents=True, exist_ok=True)
    (rotation_dir() / f"{txid}.json").write_text(json.dumps(record))


def test_pending_flag(with_password: Managed, home: Path) -> None:
    write_journal(with_password)
    assert item(home, with_password.registry)["flags"]["rotation_pending"] is True


def test_pending_text(with_password: Managed, home: Path) -> None:
    write_journal(with_password)
    assert "rotation pending: run `npmguard rotate` to finish it" in status_text(home)


def test_not_pending(with_password: Managed, home: Path) -> None:
    assert item(home, with_password.registry)["flags"]["rotation_pending"] is False


def test_exposed_flag(with_password: Managed, home: Path) -> None:
    lifecycle.mark_exposed(with_password.fingerprint, "committed to git")
    assert item(home, with_password.registry)["flags"]["exposed"] == "committed to git"


def test_exposed_text(with_password: Managed, home: Path) -> None:
    lifecycle.mark_exposed(with_password.fingerprint, "committed to git")
    assert "exposed (committed to git): run `npmguard rotate --exposed`" in (
        status_text(home))


def test_last_use_handed_out(with_password: Managed, home: Path) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint=with_password.fingerprint)
    assert item(home, with_password.registry)["last_used"]["event"] == "handed-out"


def test_last_use_minted(with_password: Managed, home: Path) -> None:
    audit.record("minted", registry=with_password.registry, fingerprint="a" * 12,
                 stored_fingerprint=with_password.fingerprint)
    assert item(home, with_password.registry)["last_used"]["event"] == "minted"


def test_last_use_minted_handout(with_password: Managed, home: Path) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint="c" * 12, minted=True,
                 stored_fingerprint=with_password.fingerprint)
    assert item(home, with_password.registry)["last_used"]["event"] == "handed-out"


def test_last_use_other_token_handout(with_password: Managed, home: Path) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint="c" * 12, minted=True, stored_fingerprint="d" * 12)
    assert item(home, with_password.registry)["last_used"] is None


def test_last_use_minted_from_other(with_password: Managed, home: Path) -> None:
    audit.record("minted", registry=with_password.registry, fingerprint="a" * 12,
                 stored_fingerprint="d" * 12)
    assert item(home, with_password.registry)["last_used"] is None


def test_last_use_rotation_not_counted(with_password: Managed, home: Path) -> None:
    audit.record("minted", registry=with_password.registry, fingerprint="a" * 12,
                 reason="rotation")
    assert item(home, with_password.registry)["last_used"] is None


def test_last_use_other_token_not_counted(with_password: Managed,
                                          home: Path) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint="b" * 12)
    assert item(home, with_password.registry)["last_used"] is None


def test_last_use_newest(with_password: Managed, home: Path) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint=with_password.fingerprint)
    time.sleep(0.01)
    audit.record("minted", registry=with_password.registry, fingerprint="a" * 12,
                 stored_fingerprint=with_password.fingerprint)
    assert item(home, with_password.registry)["last_used"]["event"] == "minted"


def test_last_use_text_none(with_password: Managed, home: Path) -> None:
    assert "last use       none recorded" in status_text(home)


def test_last_use_across_blocks(with_password: Managed) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint=with_password.fingerprint)
    for _ in range(400):
        audit.record("found", registry="//other.example/", kind="_authToken")
    [entry] = lifecycle.find(with_password.registry)
    assert status.last_uses([entry])[entry.name].event == "handed-out"


def test_last_use_beyond_tail_bound(with_password: Managed,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    audit.record("handed-out", registry=with_password.registry,
                 fingerprint=with_password.fingerprint)
    for _ in range(40):
        audit.record("found", registry="//other.example/", kind="_authToken")
    monkeypatch.setattr(status, "AUDIT_TAIL_BYTES", 4096)
    [entry] = lifecycle.find(with_password.registry)
    assert status.last_uses([entry]) == {}


# --------------------------------------------------------------------------
# The command as a whole


def test_json_fields_stable(with_password: Managed, home: Path) -> None:
    assert set(item(home, with_password.registry)) == FIELDS


def test_json_format_version(with_password: Managed, home: Path) -> None:
    assert status_json(home)["inventory_format"] == 1


def test_json_no_secret(with_password: Managed, home: Path, canary: Canary) -> None:
    from npmguard.vault import KeychainStore

    token = KeychainStore().get(with_password.name)
    assert token is not None
    text = npmguard("status", "--json", cwd=home).stdout
    assert token.reveal()[:-4][-12:] not in text
    assert canary[:-4][-12:] not in text


def test_no_daemon_exit(with_password: Managed, home: Path) -> None:
    assert npmguard("status", cwd=home).returncode == 3


def test_no_daemon_inventory_printed(with_password: Managed, home: Path) -> None:
    assert "stored credentials: 1" in status_text(home)


def test_no_daemon_part_first(with_password: Managed, home: Path) -> None:
    assert status_text(home).startswith("npmguard daemon: not running")


def test_no_daemon_json_running_false(with_password: Managed, home: Path) -> None:
    assert status_json(home)["running"] is False


@pytest.fixture
def daemon(keyring_bus: Keychain) -> Iterator[Daemon]:
    running = Daemon(Settings(), tray=False)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_daemon_part_first(with_password: Managed, daemon: Daemon,
                           home: Path) -> None:
    assert status_text(home).startswith("npmguard daemon: running")


def test_daemon_exit_zero(with_password: Managed, daemon: Daemon,
                          home: Path) -> None:
    assert npmguard("status", cwd=home).returncode == 0


def test_daemon_json_has_inventory(with_password: Managed, daemon: Daemon,
                                   home: Path) -> None:
    data = status_json(home)
    assert (data["running"], len(data["credentials"])) == (True, 1)


def test_empty_inventory(home: Path) -> None:
    assert "stored credentials: none" in status_text(home)


def test_bad_index_one_line(home: Path) -> None:
    paths.index_path().parent.mkdir(parents=True, exist_ok=True)
    paths.index_path().write_text("{not json")
    result = npmguard("status", cwd=home)
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert str(paths.index_path()) in result.stderr


def test_bad_index_exit(home: Path) -> None:
    paths.index_path().parent.mkdir(parents=True, exist_ok=True)
    paths.index_path().write_text("{not json")
    assert npmguard("status", cwd=home).returncode == 2


def test_bad_config_names_line(with_password: Managed, home: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = = 1\n")
    result = npmguard("status", cwd=home)
    assert f"{tmp_path / 'config.toml'}:2:" in result.stderr


def test_bad_config_still_lists(with_password: Managed, home: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = = 1\n")
    assert "stored credentials: 1" in npmguard("status", cwd=home).stdout


def test_marker_missing_flag(with_password: Managed, home: Path) -> None:
    user_config_path(os.environ).write_text("")
    assert item(home, with_password.registry)["flags"]["marker_missing"] is True


@contextlib.contextmanager
def blocking_network_and_keychain() -> Iterator[None]:
    """Fault injection: any connection or keychain read fails the test.

    Undone before the test ends, because the fixtures' teardown talks to
    the keychain over the bus.
    """
    import keyring

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the inventory must not use the network or keychain")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", fail)
        patch.setattr(socket, "create_connection", fail)
        patch.setattr(keyring, "get_password", fail)
        patch.setattr(keyring, "get_credential", fail)
        yield


def test_inventory_offline(with_password: Managed, old_github: Managed) -> None:
    with blocking_network_and_keychain():
        credentials, errors = status.inventory_of_credentials()
    assert (len(credentials), errors) == (2, [])
