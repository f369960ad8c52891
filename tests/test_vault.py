"""One conformance suite for every credential store npmguard ships.

``MemoryStore``, ``KeychainStore`` on a real gnome-keyring (Secret Service
on a private D-Bus bus), ``FileVault`` on a real file and ``DaemonStore``
talking to a daemon over its socket must behave the same. The keychain's
failure modes (locked, no daemon, no bus at all) must reach the user as one
line and exit code 2, fast.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import realparts
from test_filevault import CHEAP_KDF, PASSPHRASE, stand_in_daemon

from npmguard.errors import (
    CredentialNotFoundError,
    VaultLockedError,
    VaultUnavailableError,
)
from npmguard.secret import Secret
from npmguard.vault import (
    CredentialStore,
    DaemonStore,
    FileVault,
    KeychainStore,
    MemoryStore,
)
from npmguard.vault.base import require

NAME = "//registry.example.com:8443/repo/:_authToken#0a1b2c3d4e"
# A locked or missing keychain must fail well within this many seconds.
FAIL_FAST_SECONDS = 5.0


@pytest.fixture(params=["memory", "keychain", "file", "daemon"])
def store(
    request: pytest.FixtureRequest, keyring_bus: realparts.Keychain
) -> Iterator[CredentialStore]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "keychain":
        yield KeychainStore()
    elif request.param == "file":
        vault = FileVault()
        vault.create(Secret(PASSPHRASE), kdf=CHEAP_KDF)
        yield vault
    else:
        # The daemon's file vault, through the stand-in daemon's socket.
        with stand_in_daemon(request.getfixturevalue("tmp_path")) as daemon:
            daemon.unlock_new_vault()
            yield DaemonStore()


def _pem_key() -> str:
    body = base64.encodebytes(os.urandom(1536)).decode().strip()
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"


def _env() -> dict[str, str]:
    """The environment for an npmguard child, named variable by variable."""
    names = (
        "PATH",
        "LANG",
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR",
        "NPM_CONFIG_USERCONFIG",
        "NPM_CONFIG_GLOBALCONFIG",
        "DBUS_SESSION_BUS_ADDRESS",
        "PYTHON_KEYRING_BACKEND",
    )
    return {name: os.environ[name] for name in names if name in os.environ}


def _run_secure(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "npmguard", "secure", "--token-helper", "never"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- conformance -------------------------------------------------------------


def test_store_set_get(store: CredentialStore, canary: str) -> None:
    store.set(NAME, Secret(canary))
    assert store.get(NAME) == Secret(canary)


def test_store_get_missing(store: CredentialStore) -> None:
    assert store.get(NAME) is None


def test_store_overwrite(store: CredentialStore, canary: str) -> None:
    store.set(NAME, Secret("first-value-0000"))
    store.set(NAME, Secret(canary))
    assert store.get(NAME) == Secret(canary)


def test_store_delete(store: CredentialStore, canary: str) -> None:
    store.set(NAME, Secret(canary))
    store.delete(NAME)
    assert store.get(NAME) is None


def test_store_delete_missing(store: CredentialStore) -> None:
    store.delete(NAME)
    assert store.get(NAME) is None


def test_store_unicode_value(store: CredentialStore) -> None:
    value = "pässwörd-🔑-パスワード-\u00a0-end"
    store.set(NAME, Secret(value))
    got = store.get(NAME)
    assert got is not None
    assert got.reveal() == value


def test_store_pem_value(store: CredentialStore) -> None:
    value = _pem_key()
    assert len(value) > 2000
    store.set(NAME, Secret(value))
    got = store.get(NAME)
    assert got is not None
    assert got.reveal() == value


def test_store_names_distinct(store: CredentialStore) -> None:
    names = [
        NAME,
        NAME + "#raw",
        "//registry.example.com:8443/repo/:_authToken#0a1b2c3d4f",
        "//registry.example.com/repo/:_authToken#0a1b2c3d4e",
        "_authToken#0a1b2c3d4e",
    ]
    for i, name in enumerate(names):
        store.set(name, Secret(f"value-{i}-for-this-name"))
    for i, name in enumerate(names):
        assert store.get(name) == Secret(f"value-{i}-for-this-name"), name


def test_store_delete_one_name(store: CredentialStore) -> None:
    store.set(NAME, Secret("decoded-value-1"))
    store.set(NAME + "#raw", Secret("'decoded-value-1'"))
    store.delete(NAME)
    assert store.get(NAME + "#raw") == Secret("'decoded-value-1'")


def test_require_missing(store: CredentialStore) -> None:
    with pytest.raises(CredentialNotFoundError) as caught:
        require(store, NAME)
    assert NAME in str(caught.value)


def test_keychain_persists(keyring_bus: realparts.Keychain, canary: str) -> None:
    KeychainStore().set(NAME, Secret(canary))
    assert KeychainStore().get(NAME) == Secret(canary)


def test_keychain_encrypted_at_rest(
    keyring_bus: realparts.Keychain, canary: str
) -> None:
    KeychainStore().set(NAME, Secret(canary))
    # gnome-keyring writes its file a moment after the change.
    realparts.wait_until(
        lambda: keyring_bus.keyring_file.exists(), timeout=5, what="login.keyring"
    )
    assert canary.encode() not in keyring_bus.keyring_file.read_bytes()


def test_keychain_service_attribute(keyring_bus: realparts.Keychain) -> None:
    KeychainStore().set(NAME, Secret("value-under-service"))
    with keyring_bus.default_collection() as collection:
        found = list(collection.search_items({"service": "npmguard", "username": NAME}))
    assert len(found) == 1


def test_keychain_compatible_with_keyring(
    keyring_bus: realparts.Keychain, canary: str
) -> None:
    # Entries written by keyring itself (older npmguard versions) and by the
    # store must be readable by the other, with the same label and attributes.
    import keyring

    store = KeychainStore()
    keyring.set_password("npmguard", NAME, canary)
    assert store.get(NAME) == Secret(canary)
    store.set(NAME + "#raw", Secret("from-the-store"))
    assert keyring.get_password("npmguard", NAME + "#raw") == "from-the-store"
    store.set(NAME, Secret("overwritten-by-store"))
    assert keyring.get_password("npmguard", NAME) == "overwritten-by-store"
    with keyring_bus.default_collection() as collection:
        found = list(collection.search_items({"service": "npmguard", "username": NAME}))
        assert len(found) == 1
        assert found[0].get_label() == f"Password for '{NAME}' on 'npmguard'"
        assert found[0].get_attributes()["application"] == "Python keyring library"
    keyring.delete_password("npmguard", NAME + "#raw")
    assert store.get(NAME + "#raw") is None
    store.delete(NAME)
    assert keyring.get_password("npmguard", NAME) is None


def test_keychain_survives_daemon_restart(
    crash_keyring_bus: realparts.Keychain, canary: str
) -> None:
    store = KeychainStore()
    store.set(NAME, Secret(canary))
    # A restart with the login password: the store's connection and session
    # were opened against the daemon that is gone now.
    crash_keyring_bus.unlock()
    assert store.get(NAME) == Secret(canary)


# --- locked keychain ---------------------------------------------------------


def test_locked_get_raises(locked_keyring_bus: realparts.Keychain) -> None:
    started = time.monotonic()
    with pytest.raises(VaultLockedError):
        KeychainStore().get(NAME)
    assert time.monotonic() - started < FAIL_FAST_SECONDS


def test_locked_set_raises(locked_keyring_bus: realparts.Keychain) -> None:
    with pytest.raises(VaultLockedError):
        KeychainStore().set(NAME, Secret("value-while-locked"))


def test_locked_message_one_line(locked_keyring_bus: realparts.Keychain) -> None:
    with pytest.raises(VaultLockedError) as caught:
        KeychainStore().get(NAME)
    assert "\n" not in str(caught.value)
    assert "locked" in str(caught.value)


def test_screen_locked_raises(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Locked over D-Bus, as a screen locker does. A keychain of its own: the
    # shared one would need a daemon restart to unlock it again.
    chain = realparts.start_keychain(
        tmp_path / "screen", locked=True, lock_method="lock"
    )
    try:
        for name, value in chain.env.items():
            monkeypatch.setenv(name, value)
        started = time.monotonic()
        with pytest.raises(VaultLockedError):
            KeychainStore().get(NAME)
        assert time.monotonic() - started < FAIL_FAST_SECONDS
    finally:
        chain.stop()


def test_locked_cli_secure(
    locked_keyring_bus: realparts.Keychain, home: Path, canary: str
) -> None:
    npmrc = home / ".npmrc"
    original = f"//registry.npmjs.org/:_authToken={canary}\n".encode()
    npmrc.write_bytes(original)
    env = _env() | {"PYTHON_KEYRING_BACKEND": realparts.KEYRING_BACKEND}
    started = time.monotonic()
    result = _run_secure(home, env)
    elapsed = time.monotonic() - started
    try:
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "locked" in result.stderr
        assert "Traceback" not in result.stderr
        assert npmrc.read_bytes() == original
        assert elapsed < 20, f"secure took {elapsed:.1f}s on a locked keychain"
    finally:
        npmrc.unlink()


def test_locked_cli_no_journal(
    locked_keyring_bus: realparts.Keychain, home: Path, canary: str
) -> None:
    npmrc = home / ".npmrc"
    npmrc.write_text(f"//registry.npmjs.org/:_authToken={canary}\n")
    env = _env() | {"PYTHON_KEYRING_BACKEND": realparts.KEYRING_BACKEND}
    _run_secure(home, env)
    npmrc.unlink()
    journal = Path(env["XDG_STATE_HOME"]) / "npmguard" / "journal"
    assert not journal.exists() or not list(journal.iterdir())


# --- no keychain at all ------------------------------------------------------


def test_bare_bus_unavailable(
    bare_bus: realparts.Keychain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", realparts.KEYRING_BACKEND)
    started = time.monotonic()
    with pytest.raises(VaultUnavailableError) as caught:
        KeychainStore()
    assert "\n" not in str(caught.value)
    assert time.monotonic() - started < FAIL_FAST_SECONDS


def test_bare_bus_default_backend(bare_bus: realparts.Keychain) -> None:
    # keyring picks its own backend: none is viable on a bus without a daemon.
    with pytest.raises(VaultUnavailableError):
        KeychainStore()


def test_no_bus_unavailable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", realparts.KEYRING_BACKEND)
    assert "DBUS_SESSION_BUS_ADDRESS" not in os.environ
    with pytest.raises(VaultUnavailableError) as caught:
        KeychainStore()
    assert "\n" not in str(caught.value)


def test_no_bus_default_backend(home: Path) -> None:
    with pytest.raises(VaultUnavailableError):
        KeychainStore()


@pytest.mark.parametrize("bus", ["bare", "unset"])
def test_unavailable_cli_secure(
    request: pytest.FixtureRequest, bus: str, home: Path, canary: str
) -> None:
    env = _env() | {"PYTHON_KEYRING_BACKEND": realparts.KEYRING_BACKEND}
    if bus == "bare":
        chain: realparts.Keychain = request.getfixturevalue("bare_bus")
        env["DBUS_SESSION_BUS_ADDRESS"] = chain.address
    else:
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    npmrc = home / ".npmrc"
    original = f"//registry.npmjs.org/:_authToken={canary}\n".encode()
    npmrc.write_bytes(original)
    result = _run_secure(home, env)
    try:
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1, result.stderr
        # With no keychain, the file vault is used, and it is locked.
        assert "no OS keychain is usable" in result.stderr
        assert "npmguard unlock" in result.stderr
        assert "Traceback" not in result.stderr
        assert npmrc.read_bytes() == original
    finally:
        npmrc.unlink()


def test_secret_never_in_errors(store: CredentialStore, canary: str) -> None:
    store.set(NAME, Secret(canary))
    got = store.get(NAME)
    assert canary not in repr(got)
    assert canary not in str(got)
