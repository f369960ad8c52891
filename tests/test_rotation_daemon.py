"""The daemon's side of the token lifecycle, against the real parts.

Tokens come from ``npmguard login`` against the session's Verdaccio, with
the canary as the account password. They are stored in gnome-keyring on the
private ``keyring_bus``. ``rotate_days`` comes from a config.toml that
``NPMGUARD_CONFIG`` names, and a token is made "old" by moving its
``issued`` time back in the credential index. Notifications go to the test
notification server on the same bus; the tray runs on Xvfb, docked in the
XEmbed tray manager. A registry that is down is a bound port that never
listens.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import realparts
from notify_server import NotificationServer
from realparts import Canary, HttpError, Keychain, Verdaccio

from npmguard import audit, lifecycle
from npmguard.config import Settings, load_settings
from npmguard.daemon.client import DaemonUnavailable, request
from npmguard.daemon.core import Daemon
from npmguard.daemon.rotator import RotationWorker
from npmguard.daemon.state import DaemonState
from npmguard.lifecycle import Managed
from npmguard.notify import Notifier
from npmguard.npmrc.locate import user_config_path
from npmguard.tray import Tray, describe
from npmguard.vault import KeychainStore
from tests.npmcli import NPMGUARD, npmguard, run

DAY = 86400.0
START_TIMEOUT = 20.0
ROTATE_TIMEOUT = 30.0
TRAY_MANAGER = Path(__file__).with_name("xembed_tray.py")
GITHUB = "//npm.pkg.github.com/"


# --------------------------------------------------------------------------
# Helpers


def leaked(secret: str, text: str) -> bool:
    """Whether ``secret``, or any 12 characters of it before its last 4, is in
    ``text``."""
    head = secret[:-4]
    return any(head[i:i + 12] in text for i in range(max(1, len(head) - 11)))


def login(verdaccio: Verdaccio, password: str, home: Path, *,
          store_password: bool = True) -> Managed:
    """Log a new user in with ``npmguard login``; return the stored entry."""
    user = f"rot{secrets.token_hex(4)}"
    verdaccio.add_user(user, password)
    argv = [*NPMGUARD, "login", "--registry", verdaccio.url, "--username", user,
            "--password-stdin", "--token-helper", "never"]
    if store_password:
        argv.append("--store-password")
    result = run(argv, home, stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    [entry] = lifecycle.find(verdaccio.url)
    return entry


def stored(entry: Managed) -> str:
    value = KeychainStore().get(entry.name)
    assert value is not None
    return value.reveal()


def current(url: str) -> Managed:
    [entry] = lifecycle.find(url)
    return entry


def make_old(entry: Managed, days: float) -> None:
    lifecycle.update(entry.name, issued=time.time() - days * DAY)


def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("NPMGUARD_CONFIG", str(path))
    return path


def packument_status(verdaccio: Verdaccio, token: str) -> int:
    """The status of a scoped packument GET with ``token``, as npm install does.

    No such package exists, so a token Verdaccio accepts gets 404 and a
    revoked one 403.
    """
    try:
        status, _ = verdaccio.request("GET", "@rot%2fnothing", token=token)
    except HttpError as err:
        return err.status
    return status


def events(name: str) -> list[dict[str, Any]]:
    return [r for r in audit.read() if r["event"] == name]


def wait_for(predicate: Callable[[], bool], what: str,
             timeout: float = ROTATE_TIMEOUT) -> None:
    realparts.wait_until(predicate, timeout=timeout, what=what, interval=0.05)


def rotated_from(url: str, fingerprint: str) -> Callable[[], bool]:
    return lambda: current(url).fingerprint != fingerprint


@dataclass
class DeadPort:
    """A bound port that never listens: connections to it are refused."""

    sock: socket.socket

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/"


@pytest.fixture
def dead_port() -> Iterator[DeadPort]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield DeadPort(sock)
    finally:
        sock.close()


@pytest.fixture
def notifications(keyring_bus: Keychain, tmp_path: Path
                  ) -> Iterator[NotificationServer]:
    server = NotificationServer.start(keyring_bus.bus, tmp_path / "notify-server")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workers() -> Iterator[list[RotationWorker]]:
    """Rotation workers a test started; each must stop within a second."""
    started: list[RotationWorker] = []
    yield started
    for worker in started:
        worker.stop()
    for worker in started:
        assert worker.join(ROTATE_TIMEOUT), "the rotator did not stop"


def start_worker(workers: list[RotationWorker], state: DaemonState | None = None,
                 **options: Any) -> RotationWorker:
    worker = RotationWorker(
        load_settings(), state or DaemonState(), KeychainStore,
        notify=Notifier(timeout=2.0).notify, **options,
    )
    workers.append(worker)
    worker.start()
    return worker


def cycles(worker: RotationWorker, count: int) -> None:
    wait_for(lambda: worker.cycles >= count, f"{count} rotation checks")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test started, stopped after it. A test with a tray lists
    ``tray_manager`` first, so that its icon goes before the tray manager."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start_daemon(daemons: list[Daemon], *, tray: bool = False,
                 settings: Settings | None = None, **rotation: Any) -> Daemon:
    daemon = Daemon(settings or load_settings(), tray=tray, rotation=rotation)
    daemons.append(daemon)
    daemon.start()
    return daemon


@dataclass
class DaemonProcess:
    popen: subprocess.Popen[bytes]
    output: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture
def daemon_process(home: Path, tmp_path: Path) -> Iterator[Callable[[], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start() -> DaemonProcess:
        output = tmp_path / "daemon.out"
        with open(output, "wb") as out:
            popen = subprocess.Popen(
                [*NPMGUARD, "daemon", "--no-tray"], cwd=home, env=dict(os.environ),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        proc = DaemonProcess(popen, output)
        started.append(proc)
        wait_for(lambda: _replies(), "the daemon to reply", START_TIMEOUT)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def _replies() -> bool:
    try:
        return bool(request({"op": "status"}, timeout=2)["ok"])
    except DaemonUnavailable:
        return False


def log_text() -> str:
    path = Path(os.environ["XDG_STATE_HOME"]) / "npmguard" / "npmguard.log"
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class TrayManager:
    process: realparts.ManagedProcess


@pytest.fixture
def tray_manager(display: realparts.VirtualDisplay, tmp_path: Path
                 ) -> Iterator[TrayManager]:
    state_dir = tmp_path / "xembed-tray"
    state_dir.mkdir()
    env = realparts.isolated_env(state_dir / "home", DISPLAY=display.display)
    proc = realparts.spawn("xembed-tray", [sys.executable, TRAY_MANAGER],
                           log_path=state_dir / "xembed-tray.log", env=env)
    try:
        realparts.wait_until(lambda: '"ready"' in proc.log_path.read_text(),
                             timeout=5.0, what="the tray manager", proc=proc)
        yield TrayManager(proc)
    finally:
        proc.stop()


def tray_of(daemon: Daemon) -> Tray:
    [tray] = [part for part in daemon.parts if isinstance(part, Tray)]
    assert tray.shown.wait(5.0), "the tray icon was not shown"
    return tray


def menu_item(tray: Tray, text: str) -> Any:
    assert tray.menu is not None
    [item] = [i for i in tray.menu.items if i.text == text]
    return item


# --------------------------------------------------------------------------
# Scheduled rotation in the running daemon


@pytest.fixture
def due_token(verdaccio: Verdaccio, canary: Canary, home: Path, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[Managed, str]:
    """A stored Verdaccio token, password stored, 3 days old, rotate_days 1."""
    entry = login(verdaccio, canary, home)
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = 1\n")
    make_old(entry, 3)
    return current(verdaccio.url), stored(entry)


def test_scheduled_rotates_due_token(
    keyring_bus: Keychain, verdaccio: Verdaccio, due_token: tuple[Managed, str],
    daemon_process: Callable[[], DaemonProcess],
) -> None:
    entry, _ = due_token
    daemon_process()
    wait_for(rotated_from(verdaccio.url, entry.fingerprint), "the rotation")
    assert current(verdaccio.url).rotated is not None


def test_scheduled_old_token_revoked(
    keyring_bus: Keychain, verdaccio: Verdaccio, due_token: tuple[Managed, str],
    daemon_process: Callable[[], DaemonProcess],
) -> None:
    entry, old = due_token
    assert packument_status(verdaccio, old) == 404
    daemon_process()
    wait_for(rotated_from(verdaccio.url, entry.fingerprint), "the rotation")
    assert packument_status(verdaccio, old) == 403


def test_scheduled_new_token_works(
    keyring_bus: Keychain, verdaccio: Verdaccio, due_token: tuple[Managed, str],
    daemon_process: Callable[[], DaemonProcess], home: Path,
) -> None:
    entry, _ = due_token
    daemon_process()
    wait_for(rotated_from(verdaccio.url, entry.fingerprint), "the rotation")
    result = npmguard("exec", "--", "npm", "whoami", "--registry", verdaccio.url,
                      cwd=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == entry.meta["username"]


def test_scheduled_audit_events(
    keyring_bus: Keychain, verdaccio: Verdaccio, due_token: tuple[Managed, str],
    daemon_process: Callable[[], DaemonProcess],
) -> None:
    entry, _ = due_token
    daemon_process()
    wait_for(lambda: bool(events("rotated")), "the rotated audit record")
    kinds = {r["event"] for r in audit.read() if r.get("registry") == entry.registry}
    assert {"minted", "rotated", "revoked"} <= kinds


def test_scheduled_no_secret_leaks(
    keyring_bus: Keychain, verdaccio: Verdaccio, due_token: tuple[Managed, str],
    daemon_process: Callable[[], DaemonProcess], notifications: NotificationServer,
    canary: Canary, home: Path,
) -> None:
    entry, old = due_token
    proc = daemon_process()
    wait_for(lambda: bool(events("rotated")), "the rotated audit record")
    new = stored(current(verdaccio.url))
    status = npmguard("status", "--json", cwd=home)
    texts = [log_text(), audit.audit_path().read_text(), notifications.raw_text(),
             proc.output.read_text(errors="replace"), status.stdout, status.stderr]
    for secret in (canary, old, new):
        assert not any(leaked(secret, text) for text in texts)


def test_scheduled_success_notified(
    keyring_bus: Keychain, verdaccio: Verdaccio, due_token: tuple[Managed, str],
    daemon_process: Callable[[], DaemonProcess], notifications: NotificationServer,
) -> None:
    entry, _ = due_token
    daemon_process()
    wait_for(lambda: any("rotated" in n["summary"]
                         for n in notifications.notifications()),
             "the rotated notification")
    [shown] = [n for n in notifications.notifications() if "rotated" in n["summary"]]
    assert entry.registry in shown["summary"]


def test_scheduled_fresh_token_kept(
    keyring_bus: Keychain, verdaccio: Verdaccio, canary: Canary, home: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    workers: list[RotationWorker],
) -> None:
    entry = login(verdaccio, canary, home)
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = 1\n")
    cycles(start_worker(workers, interval=0.05), 3)
    assert current(verdaccio.url).fingerprint == entry.fingerprint


def test_damaged_index_logged_once(
    keyring_bus: Keychain, workers: list[RotationWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from npmguard import paths

    paths.index_path().parent.mkdir(parents=True, exist_ok=True)
    paths.index_path().write_text("{not json")
    caplog.set_level(logging.WARNING, logger="npmguard.daemon.rotator")
    cycles(start_worker(workers, interval=0.05), 5)
    lines = [r for r in caplog.records if "not checking scheduled" in r.getMessage()]
    assert [str(paths.index_path()) in r.getMessage() for r in lines] == [True]


# --------------------------------------------------------------------------
# A registry that is down


@pytest.fixture
def down_registry(verdaccio: Verdaccio, canary: Canary, home: Path, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch, dead_port: DeadPort
                  ) -> tuple[Managed, str]:
    """A due token whose registry's token API is configured at a dead port."""
    entry = login(verdaccio, canary, home)
    write_config(tmp_path, monkeypatch,
                 f'[tokens]\nrotate_days = 1\n[registries."{verdaccio.url}"]\n'
                 f'api = "{dead_port.url}"\n')
    make_old(entry, 3)
    return current(verdaccio.url), stored(entry)


def test_down_registry_keeps_old_token(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker],
) -> None:
    entry, old = down_registry
    cycles(start_worker(workers, interval=0.05), 3)
    assert stored(entry) == old


def test_down_registry_old_token_works(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker],
) -> None:
    entry, old = down_registry
    cycles(start_worker(workers, interval=0.05), 3)
    assert verdaccio.whoami(old) == entry.meta["username"]


def test_down_registry_backs_off(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker],
) -> None:
    cycles(start_worker(workers, interval=0.05, backoff=60.0), 10)
    assert len(events("failed")) == 1


def test_down_registry_retries_after_backoff(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker],
) -> None:
    worker = start_worker(workers, interval=0.05, backoff=0.3)
    wait_for(lambda: len(events("failed")) >= 3, "three tries")
    failures = worker.state.snapshot.rotation_failures
    assert failures[0].retry_at is not None


def test_down_registry_notifies_once(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker], notifications: NotificationServer,
) -> None:
    entry, _ = down_registry
    cycles(start_worker(workers, interval=0.05, backoff=0.1), 10)
    shown = [n for n in notifications.wait_for(1)
             if "failed" in n["summary"]]
    assert [entry.registry in n["summary"] for n in shown] == [True]


def test_down_registry_notification_says_what_to_do(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker], notifications: NotificationServer,
) -> None:
    cycles(start_worker(workers, interval=0.05), 2)
    [shown] = notifications.wait_for(1)
    assert f"npmguard rotate --registry {verdaccio.url}" in shown["body"]


def test_down_registry_tray_says_failed(
    keyring_bus: Keychain, verdaccio: Verdaccio, tray_manager: TrayManager,
    down_registry: tuple[Managed, str], daemons: list[Daemon],
) -> None:
    entry, _ = down_registry
    tray = tray_of(start_daemon(daemons, tray=True, interval=0.05, backoff=60.0))
    wait_for(lambda: "rotation failed" in tray.title, "the tray title", 10)
    assert f"rotation failed for {entry.registry}" in tray.title


def test_down_registry_status_shows_failure(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    daemons: list[Daemon], home: Path,
) -> None:
    daemon = start_daemon(daemons, interval=0.05, backoff=60.0)
    wait_for(lambda: bool(daemon.state.snapshot.rotation_failures), "a failure")
    result = npmguard("status", cwd=home)
    assert f"rotation failed: {down_registry[0].registry}" in result.stdout


def test_down_registry_describe_error_state(
    keyring_bus: Keychain, verdaccio: Verdaccio, down_registry: tuple[Managed, str],
    workers: list[RotationWorker],
) -> None:
    worker = start_worker(workers, interval=0.05)
    wait_for(lambda: bool(worker.state.snapshot.rotation_failures), "a failure")
    assert describe(worker.state.snapshot).startswith("npmguard: rotation failed")


# --------------------------------------------------------------------------
# Reminders


@pytest.fixture
def old_github_token(keyring_bus: Keychain, canary: Canary, home: Path) -> Managed:
    """The canary stored for GitHub Packages by `secure`, issued 100 days ago."""
    user_config_path(os.environ).write_text(f"{GITHUB}:_authToken={canary}\n")
    result = npmguard("secure", "--token-helper", "never", cwd=home)
    assert result.returncode == 0, result.stderr
    [entry] = lifecycle.find(GITHUB)
    make_old(entry, 100)
    return entry


def test_github_old_reminded_once(
    old_github_token: Managed, workers: list[RotationWorker],
    notifications: NotificationServer,
) -> None:
    cycles(start_worker(workers, interval=0.05), 10)
    assert len(notifications.wait_for(1)) == 1


def test_github_reminder_says_what_to_do(
    old_github_token: Managed, workers: list[RotationWorker],
    notifications: NotificationServer,
) -> None:
    cycles(start_worker(workers, interval=0.05), 2)
    [shown] = notifications.wait_for(1)
    assert "github.com" in shown["body"]


def test_github_reminder_audited_once(
    old_github_token: Managed, workers: list[RotationWorker],
) -> None:
    cycles(start_worker(workers, interval=0.05), 10)
    assert [r["fingerprint"] for r in events("reminder")] == [
        old_github_token.fingerprint
    ]


def test_github_reminder_once_across_restart(
    old_github_token: Managed, workers: list[RotationWorker],
) -> None:
    first = start_worker(workers, interval=0.05)
    cycles(first, 2)
    first.stop()
    cycles(start_worker(workers, interval=0.05), 2)
    assert len(events("reminder")) == 1


def test_github_reminder_again_next_day(
    old_github_token: Managed, workers: list[RotationWorker],
) -> None:
    clock = [time.time()]
    worker = start_worker(workers, interval=0.05, clock=lambda: clock[0])
    cycles(worker, 2)
    clock[0] += DAY + 1
    cycles(worker, worker.cycles + 2)
    assert len(events("reminder")) == 2


def test_github_fresh_not_reminded(
    old_github_token: Managed, workers: list[RotationWorker],
) -> None:
    lifecycle.update(old_github_token.name, issued=time.time())
    cycles(start_worker(workers, interval=0.05), 3)
    assert events("reminder") == []


def test_github_reminder_no_canary(
    old_github_token: Managed, workers: list[RotationWorker],
    notifications: NotificationServer, canary: Canary,
) -> None:
    cycles(start_worker(workers, interval=0.05), 2)
    notifications.wait_for(1)
    texts = [notifications.raw_text(), audit.audit_path().read_text()]
    assert not any(leaked(canary, text) for text in texts)


@pytest.fixture
def due_without_password(verdaccio: Verdaccio, canary: Canary, home: Path,
                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                         ) -> Managed:
    entry = login(verdaccio, canary, home, store_password=False)
    write_config(tmp_path, monkeypatch, "[tokens]\nrotate_days = 1\n")
    make_old(entry, 3)
    return current(verdaccio.url)


def test_needs_password_not_rotated(
    keyring_bus: Keychain, due_without_password: Managed,
    workers: list[RotationWorker], verdaccio: Verdaccio,
) -> None:
    cycles(start_worker(workers, interval=0.05), 5)
    assert current(verdaccio.url).fingerprint == due_without_password.fingerprint


def test_needs_password_not_tried(
    keyring_bus: Keychain, due_without_password: Managed,
    workers: list[RotationWorker],
) -> None:
    cycles(start_worker(workers, interval=0.05), 5)
    assert events("failed") == []


def test_needs_password_reminded_once(
    keyring_bus: Keychain, due_without_password: Managed,
    workers: list[RotationWorker], notifications: NotificationServer,
    verdaccio: Verdaccio,
) -> None:
    cycles(start_worker(workers, interval=0.05), 10)
    [shown] = notifications.wait_for(1)
    assert f"npmguard rotate --registry {verdaccio.url}" in shown["body"]


def test_needs_password_reminder_names_registry(
    keyring_bus: Keychain, due_without_password: Managed,
    workers: list[RotationWorker], notifications: NotificationServer,
) -> None:
    cycles(start_worker(workers, interval=0.05), 2)
    [shown] = notifications.wait_for(1)
    assert shown["summary"] == (
        f"rotation of {due_without_password.registry} is due"
    )


# --------------------------------------------------------------------------
# Leak response: a stored token back in plaintext


@pytest.fixture
def reexposed(verdaccio: Verdaccio, canary: Canary, home: Path
              ) -> tuple[Managed, str]:
    """A stored token whose value is also in the user config in plaintext."""
    entry = login(verdaccio, canary, home)
    old = stored(entry)
    config = user_config_path(os.environ)
    config.write_text(config.read_text() + f"{entry.registry}:_authToken={old}\n")
    return entry, old


def ask_settings() -> Settings:
    return Settings(user_policy="ask")


def test_leak_marks_index(
    keyring_bus: Keychain, verdaccio: Verdaccio, reexposed: tuple[Managed, str],
    daemons: list[Daemon],
) -> None:
    daemon = start_daemon(daemons, settings=ask_settings())
    wait_for(lambda: bool(daemon.state.snapshot.leaks), "the leak", 10)
    assert "in plaintext again at ~/.npmrc:2" in str(
        current(verdaccio.url).meta.get("exposed"))


def test_leak_found_audited(
    keyring_bus: Keychain, verdaccio: Verdaccio, reexposed: tuple[Managed, str],
    daemons: list[Daemon],
) -> None:
    entry, _ = reexposed
    daemon = start_daemon(daemons, settings=ask_settings())
    wait_for(lambda: bool(daemon.state.snapshot.leaks), "the leak", 10)
    [found] = events("found")
    assert (found["fingerprint"], found["line"]) == (entry.fingerprint, 2)


def test_leak_notified_with_action(
    keyring_bus: Keychain, verdaccio: Verdaccio, reexposed: tuple[Managed, str],
    daemons: list[Daemon], notifications: NotificationServer,
) -> None:
    start_daemon(daemons, settings=ask_settings())
    wait_for(lambda: any(n["summary"] == "Stored npm token exposed"
                         for n in notifications.notifications()),
             "the leak notification", 10)
    [shown] = [n for n in notifications.notifications()
               if n["summary"] == "Stored npm token exposed"]
    assert shown["actions"] == ["rotate-exposed", "Rotate and revoke"]


def test_leak_tray_item_enabled(
    keyring_bus: Keychain, verdaccio: Verdaccio, reexposed: tuple[Managed, str],
    tray_manager: TrayManager, daemons: list[Daemon],
) -> None:
    daemon = start_daemon(daemons, tray=True, settings=ask_settings())
    tray = tray_of(daemon)
    wait_for(lambda: bool(daemon.state.snapshot.leaks), "the leak", 10)
    assert menu_item(tray, "Rotate exposed tokens").enabled


def test_leak_tray_item_disabled_without_leak(
    keyring_bus: Keychain, tray_manager: TrayManager, daemons: list[Daemon],
) -> None:
    tray = tray_of(start_daemon(daemons, tray=True, settings=ask_settings()))
    assert not menu_item(tray, "Rotate exposed tokens").enabled


@pytest.fixture
def rotated_from_tray(
    keyring_bus: Keychain, verdaccio: Verdaccio, reexposed: tuple[Managed, str],
    tray_manager: TrayManager, daemons: list[Daemon],
) -> tuple[Managed, str]:
    entry, old = reexposed
    daemon = start_daemon(daemons, tray=True, settings=ask_settings())
    tray = tray_of(daemon)
    wait_for(lambda: bool(daemon.state.snapshot.leaks), "the leak", 10)
    menu_item(tray, "Rotate exposed tokens")(tray.icon)
    wait_for(rotated_from(verdaccio.url, entry.fingerprint), "the rotation")
    wait_for(lambda: not daemon.state.snapshot.leaks, "the leak to clear", 10)
    return entry, old


def test_tray_rotation_revokes_old(
    verdaccio: Verdaccio, rotated_from_tray: tuple[Managed, str]
) -> None:
    _, old = rotated_from_tray
    assert packument_status(verdaccio, old) == 403


def test_tray_rotation_clears_exposed(
    verdaccio: Verdaccio, rotated_from_tray: tuple[Managed, str]
) -> None:
    assert "exposed" not in current(verdaccio.url).meta


def test_tray_rotation_new_token_works(
    verdaccio: Verdaccio, rotated_from_tray: tuple[Managed, str]
) -> None:
    entry, _ = rotated_from_tray
    assert verdaccio.whoami(stored(current(verdaccio.url))) == entry.meta["username"]


def test_tray_rotation_reason_audited(
    verdaccio: Verdaccio, rotated_from_tray: tuple[Managed, str]
) -> None:
    [rotated] = events("rotated")
    assert rotated["reason"].startswith("exposed: in plaintext again")


# --------------------------------------------------------------------------
# Notification actions


@dataclass
class ActionServer:
    """A notification server that can report a chosen action, in a thread.

    Like tests/notify_server.py, but it also emits ``ActionInvoked`` (the
    server's own signal, from the name's owner) on ``invoke``.
    """

    address: str
    shown: list[dict[str, Any]] = field(default_factory=list)
    _outbox: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(5.0), "the action server did not start"

    def invoke(self, notification: int, key: str) -> None:
        self._outbox.put((notification, key))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _serve(self) -> None:
        from jeepney import (
            DBusAddress,
            HeaderFields,
            MessageType,
            new_method_return,
            new_signal,
        )
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection

        conn = open_dbus_connection(bus=self.address)
        try:
            conn.send_and_get_reply(
                message_bus.RequestName("org.freedesktop.Notifications", 4),
                timeout=5)
            self._ready.set()
            emitter = DBusAddress("/org/freedesktop/Notifications",
                                  interface="org.freedesktop.Notifications")
            while not self._stop.is_set():
                while not self._outbox.empty():
                    conn.send(new_signal(emitter, "ActionInvoked", "us",
                                         self._outbox.get()))
                try:
                    msg = conn.receive(timeout=0.05)
                except TimeoutError:
                    continue
                fields = msg.header.fields
                if msg.header.message_type != MessageType.method_call:
                    continue
                if fields.get(HeaderFields.member) == "Notify":
                    self.shown.append({"id": len(self.shown) + 1,
                                       "actions": list(msg.body[5])})
                    conn.send(new_method_return(msg, "u", (len(self.shown),)))
                elif fields.get(HeaderFields.member) == "AddMatch":
                    continue
        finally:
            conn.close()


@pytest.fixture
def action_server(keyring_bus: Keychain) -> Iterator[ActionServer]:
    server = ActionServer(keyring_bus.bus.address)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def spoof_action(address: str, notification: int, key: str) -> None:
    """Emit ActionInvoked from a connection that is not the server's."""
    from jeepney import DBusAddress, new_signal
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=address)
    try:
        emitter = DBusAddress("/org/freedesktop/Notifications",
                              interface="org.freedesktop.Notifications")
        conn.send(new_signal(emitter, "ActionInvoked", "us", (notification, key)))
    finally:
        conn.close()


def test_action_chosen_calls_back(action_server: ActionServer) -> None:
    chosen: queue.SimpleQueue[str] = queue.SimpleQueue()
    notifier = Notifier(timeout=2.0, on_action=chosen.put)
    try:
        assert notifier.notify("s", "b", actions=[("rotate-exposed", "Rotate")])
        action_server.invoke(1, "rotate-exposed")
        assert chosen.get(timeout=5.0) == "rotate-exposed"
    finally:
        notifier.close()


def test_action_spoofed_ignored(action_server: ActionServer,
                                keyring_bus: Keychain) -> None:
    chosen: queue.SimpleQueue[str] = queue.SimpleQueue()
    notifier = Notifier(timeout=2.0, on_action=chosen.put)
    try:
        notifier.notify("s", "b", actions=[("rotate-exposed", "Rotate")])
        spoof_action(keyring_bus.bus.address, 1, "rotate-exposed")
        action_server.invoke(1, "unknown-key")
        with pytest.raises(queue.Empty):
            chosen.get(timeout=1.0)
    finally:
        notifier.close()


def test_action_offered(action_server: ActionServer) -> None:
    notifier = Notifier(timeout=2.0, on_action=lambda key: None)
    try:
        notifier.notify("s", "b", actions=[("rotate-exposed", "Rotate and revoke")])
    finally:
        notifier.close()
    assert action_server.shown[0]["actions"] == ["rotate-exposed", "Rotate and revoke"]


def test_action_not_offered_without_callback(action_server: ActionServer) -> None:
    Notifier(timeout=2.0).notify("s", "b", actions=[("rotate-exposed", "Rotate")])
    wait_for(lambda: bool(action_server.shown), "the notification", 5)
    assert action_server.shown[0]["actions"] == []


def test_action_daemon_rotates(
    keyring_bus: Keychain, verdaccio: Verdaccio, reexposed: tuple[Managed, str],
    daemons: list[Daemon],
) -> None:
    entry, _ = reexposed
    daemon = start_daemon(daemons, settings=ask_settings())
    wait_for(lambda: bool(daemon.state.snapshot.leaks), "the leak", 10)
    daemon.notification_action("rotate-exposed")
    wait_for(rotated_from(verdaccio.url, entry.fingerprint), "the rotation")
    assert current(verdaccio.url).rotated is not None


# --------------------------------------------------------------------------
# Socket ops


def test_invalidate_op_ok(keyring_bus: Keychain, daemons: list[Daemon]) -> None:
    daemon = start_daemon(daemons)
    assert request({"op": "invalidate"}, path=daemon.socket_path) == {"ok": True}


def test_invalidate_op_drops_cache(
    keyring_bus: Keychain, verdaccio: Verdaccio, canary: Canary, home: Path,
    daemons: list[Daemon],
) -> None:
    entry = login(verdaccio, canary, home)
    daemon = start_daemon(daemons)
    assert daemon.vault.get(entry.name) is not None
    KeychainStore().delete(entry.name)
    request({"op": "invalidate"}, path=daemon.socket_path)
    # Read from the keychain again, where the value is gone now.
    assert daemon.vault.get(entry.name) is None


def test_rotate_op_rotates(
    keyring_bus: Keychain, verdaccio: Verdaccio, canary: Canary, home: Path,
    daemons: list[Daemon],
) -> None:
    entry = login(verdaccio, canary, home)
    daemon = start_daemon(daemons)
    reply = request({"op": "rotate", "registry": verdaccio.url, "exposed": False},
                    path=daemon.socket_path, timeout=60)
    assert [r["ok"] for r in reply["rotations"]] == [True]
    assert current(verdaccio.url).fingerprint != entry.fingerprint


def test_rotate_op_exposed_none(keyring_bus: Keychain, verdaccio: Verdaccio,
                                canary: Canary, home: Path,
                                daemons: list[Daemon]) -> None:
    login(verdaccio, canary, home)
    daemon = start_daemon(daemons)
    reply = request({"op": "rotate", "registry": None, "exposed": True},
                    path=daemon.socket_path, timeout=60)
    assert reply["messages"] == ["no stored token is known to be exposed"]


def test_rotate_op_unknown_registry(keyring_bus: Keychain,
                                   daemons: list[Daemon]) -> None:
    daemon = start_daemon(daemons)
    reply = request({"op": "rotate", "registry": "https://nowhere.invalid/",
                     "exposed": False}, path=daemon.socket_path)
    assert reply["error"].startswith("no stored token for https://nowhere.invalid/")


def test_rotate_op_bad_field(keyring_bus: Keychain, daemons: list[Daemon]) -> None:
    daemon = start_daemon(daemons)
    reply = request({"op": "rotate", "registry": 5}, path=daemon.socket_path)
    assert reply["ok"] is False


# --------------------------------------------------------------------------
# The guardian's audit records


@pytest.fixture
def secured_by_guardian(keyring_bus: Keychain, canary: Canary) -> Path:
    from npmguard.daemon.guardian import Guardian
    from npmguard.npmrc.locate import global_config_path

    config = user_config_path(os.environ)
    config.write_text(f"{GITHUB}:_authToken={canary}\n")
    Guardian(Settings(), DaemonState(), KeychainStore, user_config=config,
             global_config=global_config_path(os.environ)).handle({config})
    return config


def test_guardian_found_audited(secured_by_guardian: Path, canary: Canary) -> None:
    from npmguard.secret import fingerprint

    [found] = events("found")
    assert (found["fingerprint"], found["path"], found["policy"]) == (
        fingerprint(canary), str(secured_by_guardian), "auto")


def test_guardian_secured_audited(secured_by_guardian: Path, canary: Canary) -> None:
    from npmguard.secret import fingerprint

    [secured] = events("secured")
    assert (secured["fingerprint"], secured["registry"], secured["line"]) == (
        fingerprint(canary), GITHUB, 1)


def test_guardian_audit_no_canary(secured_by_guardian: Path, canary: Canary) -> None:
    assert not leaked(canary, audit.audit_path().read_text())


def test_guardian_new_value_not_leak(secured_by_guardian: Path) -> None:
    assert "exposed" not in current(GITHUB).meta


# --------------------------------------------------------------------------
# Refused requests in the audit trail


def test_refused_locked_vault_audited(
    locked_keyring_bus: Keychain, daemons: list[Daemon], home: Path
) -> None:
    user_config_path(os.environ).write_text(
        "; npmguard:0123456789 //127.0.0.1:9/:_authToken=<keychain>\n")
    daemon = start_daemon(daemons)
    reply = request({"op": "token", "registry": "http://127.0.0.1:9/",
                     "cwd": str(home), "env": {"HOME": str(home)}},
                    path=daemon.socket_path)
    assert reply["ok"] is False
    assert [r["reason"] for r in events("refused")] == ["the vault is locked"]


@pytest.fixture
def open_socket_dir() -> Iterator[Path]:
    """A socket directory that another user can reach (0755 up to /tmp)."""
    directory = Path(tempfile.mkdtemp(prefix="npmguard-peer-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


# The child is the system Python, because another user cannot reach the
# venv's interpreter under /root.
SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(),
                    reason="needs root and /usr/bin/python3 to act as another user")
def test_refused_peer_audited(open_socket_dir: Path, keyring_bus: Keychain) -> None:
    path = open_socket_dir / "d.sock"
    daemon = Daemon(Settings(), tray=False, socket_path=str(path))
    daemon.start()
    try:
        path.chmod(0o666)
        script = ("import socket; s = socket.socket(socket.AF_UNIX); "
                  f"s.connect({str(path)!r}); print(s.recv(4096).decode())")
        result = subprocess.run([str(SYSTEM_PYTHON), "-c", script], user=65534,
                                capture_output=True, text=True, timeout=30,
                                check=False, cwd="/")
    finally:
        daemon.stop()
    assert "rejected" in result.stdout, result.stderr
    [refused] = events("refused")
    assert refused["peer"]["exe"].startswith("python")


def test_state_json_lists_failures(keyring_bus: Keychain) -> None:
    from npmguard.daemon.state import RotationFailure

    state = DaemonState()
    state.update(rotation_failures=(RotationFailure("n", "//r/", "0" * 12, "down"),))
    assert json.loads(json.dumps(state.snapshot.to_json()))["rotation_failures"][0][
        "message"] == "down"
