"""Desktop notifications over the private session bus, and the state listener.

A small notification server (tests/notify_server.py) runs on the
``keyring_bus`` fixture's bus and records every Notify call, and the
assertions read those records. Exposures come from scanning real .npmrc files that
hold the session canary as their token.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from notify_server import NotificationServer
from realparts import Canary, Keychain

from npmguard.cli import main as cli_main
from npmguard.config import Settings
from npmguard.daemon.guardian import Guardian
from npmguard.daemon.state import DaemonState, Exposure
from npmguard.files import read_config
from npmguard.notify import ChangeNotifier, Notifier, notify_on_changes
from npmguard.npmrc.credentials import find_credentials
from npmguard.npmrc.locate import global_config_path, user_config_path
from npmguard.vault import KeychainStore

REGISTRY = "//registry.npmjs.org/"


@pytest.fixture
def server(keyring_bus: Keychain, tmp_path: Path) -> Iterator[NotificationServer]:
    running = NotificationServer.start(keyring_bus.bus, tmp_path / "notify-server")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def feeds() -> Iterator[list[ChangeNotifier]]:
    """Workers started by a test; each must stop within a second."""
    started: list[ChangeNotifier] = []
    yield started
    for worker in started:
        worker.stop()
    for worker in started:
        assert worker.join(1.0), f"{worker.name} did not stop within 1 s"


def write_npmrc(path: Path, token: str, registry: str = REGISTRY) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{registry}:_authToken={token}\n")
    return path


def exposures_in(path: Path, policy: str = "ask") -> tuple[Exposure, ...]:
    config = read_config(path)
    return tuple(
        Exposure(str(f.path), f.line, f.registry, f.kind, f.fingerprint, policy)
        for f in find_credentials(path, config.document)
        if f.state == "plaintext"
    )


def leaked(canary: str, text: str) -> bool:
    """Whether the token or a piece longer than its last 4 chars is in text."""
    return canary in text or canary[4:16] in text or canary[:-4] in text


def watch(
    state: DaemonState, feeds: list[ChangeNotifier], **options: float
) -> ChangeNotifier:
    worker = notify_on_changes(state, Notifier(timeout=2.0), **options)
    feeds.append(worker)
    return worker


# --------------------------------------------------------------------------
# Notifier


def test_notify_delivers(server: NotificationServer) -> None:
    assert Notifier().notify("Summary here", "Body here", "critical")
    [shown] = server.wait_for(1)
    assert (shown["app_name"], shown["summary"], shown["body"]) == (
        "npmguard",
        "Summary here",
        "Body here",
    )
    assert shown["urgency"] == 2


def test_notify_no_server(bare_bus: Keychain, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(timeout=5.0)
    started = time.monotonic()
    assert notifier.notify("s", "b") is False
    # Told by the bus at once, not found out by waiting for the time limit.
    assert time.monotonic() - started < notifier.timeout
    assert "no notification server" in caplog.text


def test_notify_no_bus(caplog: pytest.LogCaptureFixture) -> None:
    assert Notifier().notify("s", "b") is False
    assert "DBUS_SESSION_BUS_ADDRESS unset" in caplog.text


def test_notify_failure_logged_once(
    bare_bus: Keychain, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier()
    for _ in range(3):
        notifier.notify("s", "b")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_notify_recovery_logged(
    keyring_bus: Keychain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="npmguard.notify")
    notifier = Notifier()
    notifier.notify("before", "no server yet")
    running = NotificationServer.start(keyring_bus.bus, tmp_path / "late-server")
    try:
        assert notifier.notify("after", "server up")
    finally:
        running.stop()
    assert "notifications work again" in caplog.text


def test_notify_silent_server_times_out(keyring_bus: Keychain, tmp_path: Path) -> None:
    # Fault injection: a server that owns the name and never replies.
    silent = NotificationServer.start(keyring_bus.bus, tmp_path / "silent", silent=True)
    try:
        notifier = Notifier(timeout=0.3)
        assert notifier.notify("s", "b") is False
    finally:
        silent.stop()


def test_notify_stub_platform() -> None:
    # macOS and Windows are absent here; the platform name is all that differs.
    notifier = Notifier(platform="darwin")
    assert (notifier.supported, notifier.notify("s", "b")) == (False, False)


def test_notify_bad_urgency() -> None:
    with pytest.raises(ValueError, match="urgency"):
        Notifier().notify("s", "b", urgency="loud")


# --------------------------------------------------------------------------
# notify_on_changes


def test_changes_exposed_once(
    server: NotificationServer,
    home: Path,
    canary: Canary,
    feeds: list[ChangeNotifier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    npmrc = write_npmrc(home / ".npmrc", canary)
    state = DaemonState()
    watch(state, feeds)
    exposed = exposures_in(npmrc)
    state.update(exposures=exposed)
    state.update(paused=True)
    state.update(paused=False)
    # The same token one line further down is still the same exposure.
    npmrc.write_text("; moved\n" + npmrc.read_text())
    state.update(exposures=exposures_in(npmrc))
    [shown] = server.wait_for(1)
    time.sleep(0.5)
    assert len(server.notifications()) == 1
    assert shown["summary"] == "Exposed npm token found"
    assert f"~/.npmrc:1, registry {REGISTRY}" in shown["body"]
    assert not leaked(canary, server.raw_text())
    assert not leaked(canary, caplog.text)


def test_changes_present_before_subscribing(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    state.update(exposures=exposures_in(write_npmrc(home / ".npmrc", canary)))
    watch(state, feeds)
    [shown] = server.wait_for(1)
    assert shown["summary"] == "Exposed npm token found"


def test_changes_secured(
    server: NotificationServer,
    home: Path,
    canary: Canary,
    feeds: list[ChangeNotifier],
    capsys: pytest.CaptureFixture[str],
) -> None:
    npmrc = write_npmrc(home / ".npmrc", canary)
    state = DaemonState()
    watch(state, feeds)
    state.update(exposures=exposures_in(npmrc))
    server.wait_for(1)
    # The real move into the keychain on the private bus, then the two
    # updates the guardian makes: the count first, then a rescan's exposures.
    assert cli_main(["secure", "--token-helper", "never"]) == 0
    capsys.readouterr()
    state.update(secured_count=1)
    state.update(exposures=exposures_in(npmrc))
    shown = server.wait_for(2)
    assert [n["summary"] for n in shown] == [
        "Exposed npm token found",
        "npm token secured",
    ]
    assert f"~/.npmrc:1, registry {REGISTRY}" in shown[1]["body"]
    assert not leaked(canary, server.raw_text())


def test_changes_secured_count_after_removal(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.05)
    state.update(exposures=exposures_in(write_npmrc(home / ".npmrc", canary)))
    server.wait_for(1)
    state.update(exposures=())
    state.update(secured_count=1)
    shown = server.wait_for(2)
    assert shown[-1]["summary"] == "npm token secured"
    assert "~/.npmrc:1" in shown[-1]["body"]


def test_changes_secured_unnamed(
    server: NotificationServer, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.05, match_seconds=0.3)
    state.update(secured_count=1)
    [shown] = server.wait_for(1)
    assert shown["summary"] == "npm token secured"
    assert shown["body"] == "Moved from a watched npm config file into the keychain."


def test_changes_earlier_secured_quiet(
    server: NotificationServer, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    state.update(secured_count=4)
    watch(state, feeds, settle=0.05, match_seconds=0.2)
    state.update(vault_locked=True)
    [shown] = server.wait_for(1)
    time.sleep(0.5)
    assert len(server.notifications()) == 1
    assert shown["summary"] == "Keychain locked"


def test_changes_reexposed_after_secured(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    exposed = exposures_in(write_npmrc(home / ".npmrc", canary))
    state = DaemonState()
    watch(state, feeds, settle=0.05)
    state.update(exposures=exposed)
    server.wait_for(1)
    state.update(exposures=(), secured_count=1)
    server.wait_for(2)
    state.update(exposures=exposed)
    shown = server.wait_for(3)
    assert [n["summary"] for n in shown][-1] == "Exposed npm token found"


def test_changes_removed_by_hand_is_quiet(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    worker = watch(state, feeds, settle=0.05)
    state.update(exposures=exposures_in(write_npmrc(home / ".npmrc", canary)))
    server.wait_for(1)
    state.update(exposures=())
    state.update(vault_locked=True)
    shown = server.wait_for(2)
    time.sleep(0.3)
    assert [n["summary"] for n in shown] == [
        "Exposed npm token found",
        "Keychain locked",
    ]
    assert worker.alive()


def test_changes_locked_once(
    server: NotificationServer, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.05)
    state.update(vault_locked=True)
    state.update(error="watcher stalled")
    state.update(error=None)
    [shown] = server.wait_for(1)
    time.sleep(0.3)
    assert len(server.notifications()) == 1
    assert shown["summary"] == "Keychain locked"


def test_changes_locked_again(
    server: NotificationServer, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.05)
    state.update(vault_locked=True)
    server.wait_for(1)
    state.update(vault_locked=False)
    state.update(vault_locked=True)
    assert len(server.wait_for(2)) == 2


def test_changes_burst_merged(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.3)
    exposures: tuple[Exposure, ...] = ()
    for n in range(5):
        npmrc = write_npmrc(home / f"p{n}" / ".npmrc", canary)
        exposures += exposures_in(npmrc)
        state.update(exposures=exposures)
    [shown] = server.wait_for(1)
    time.sleep(0.5)
    assert len(server.notifications()) == 1
    assert shown["summary"] == "5 exposed npm tokens found"
    assert shown["body"].count(", registry ") == 3
    assert "and 2 more" in shown["body"]


def test_changes_rate_limited(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.0, burst=1, per_seconds=1.5)
    first = exposures_in(write_npmrc(home / "a" / ".npmrc", canary))
    state.update(exposures=first)
    server.wait_for(1)
    second = exposures_in(write_npmrc(home / "b" / ".npmrc", canary))
    third = exposures_in(write_npmrc(home / "c" / ".npmrc", canary))
    state.update(exposures=first + second)
    state.update(exposures=first + second + third)
    time.sleep(0.5)
    # Held back while the budget is spent...
    assert len(server.notifications()) == 1
    # ...then sent as one.
    shown = server.wait_for(2, timeout=5.0)
    assert shown[1]["summary"] == "2 exposed npm tokens found"


def test_changes_auto_policy_says_secured_only(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    state = DaemonState()
    watch(state, feeds, settle=0.3)
    state.update(exposures=exposures_in(write_npmrc(home / ".npmrc", canary), "auto"))
    state.update(exposures=(), secured_count=1)
    [shown] = server.wait_for(1)
    time.sleep(0.5)
    assert len(server.notifications()) == 1
    assert shown["summary"] == "npm token secured"


def test_changes_stop_is_prompt(bare_bus: Keychain) -> None:
    worker = notify_on_changes(DaemonState(), Notifier())
    worker.stop()
    assert worker.join(1.0)


# --------------------------------------------------------------------------
# With the daemon's guardian making the changes


def _guardian(state: DaemonState, policy: str) -> Guardian:
    return Guardian(
        Settings(user_policy=policy),
        state,
        KeychainStore,
        user_config=user_config_path(os.environ),
        global_config=global_config_path(os.environ),
    )


def test_guardian_ask_then_secure_now(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    write_npmrc(home / ".npmrc", canary)
    state = DaemonState()
    watch(state, feeds, settle=0.05)
    guardian = _guardian(state, "ask")
    guardian.full_scan()
    server.wait_for(1)
    assert guardian.secure_now() == 1
    shown = server.wait_for(2)
    assert [n["summary"] for n in shown] == [
        "Exposed npm token found",
        "npm token secured",
    ]
    assert f"~/.npmrc:1, registry {REGISTRY}" in shown[1]["body"]
    assert not leaked(canary, server.raw_text())


def test_guardian_auto_secures(
    server: NotificationServer, home: Path, canary: Canary, feeds: list[ChangeNotifier]
) -> None:
    write_npmrc(home / ".npmrc", canary)
    state = DaemonState()
    watch(state, feeds, settle=0.05, match_seconds=0.5)
    _guardian(state, "auto").full_scan()
    [shown] = server.wait_for(1)
    assert shown["summary"] == "npm token secured"
    assert not leaked(canary, server.raw_text())
