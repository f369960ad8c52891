"""``npmguard daemon`` as a real process, and the ``Daemon`` class in-process.

The daemon runs as ``python -m npmguard daemon --no-tray`` with the test's
HOME, so its socket is ``$XDG_RUNTIME_DIR/npmguard/daemon.sock`` under the
test's home. Tokens come from gnome-keyring on the private ``keyring_bus``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import realparts

from npmguard.config import Settings
from npmguard.daemon.client import DaemonUnavailable, request
from npmguard.daemon.core import Daemon
from npmguard.secret import fingerprint
from tests.npmcli import NPMGUARD, npmguard

REGISTRY = "http://127.0.0.1:9/"
NERF = "//127.0.0.1:9/"
START_TIMEOUT = 20.0


@dataclass
class DaemonProcess:
    popen: subprocess.Popen[bytes]
    stderr_path: Path
    socket_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # Popen signals this exact child and does nothing once it is reaped.
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _socket_path() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "npmguard" / "daemon.sock"


def _log_path() -> Path:
    return Path(os.environ["XDG_STATE_HOME"]) / "npmguard" / "npmguard.log"


def _wait_ready(proc: DaemonProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(
                f"daemon exited with {proc.popen.returncode}:\n{proc.stderr()}"
            )
        try:
            if request({"op": "status"}, path=os.fspath(proc.socket_path),
                       timeout=2)["ok"]:
                return
        except DaemonUnavailable:
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon did not reply within {START_TIMEOUT}s")


@pytest.fixture
def start_daemon(home: Path, tmp_path: Path) -> Iterator[Callable[[], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start() -> DaemonProcess:
        stderr_path = tmp_path / f"daemon-{len(started)}.stderr"
        with open(stderr_path, "wb") as stderr:
            popen = subprocess.Popen(
                [*NPMGUARD, "daemon", "--no-tray"], cwd=home, env=dict(os.environ),
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
            )
        proc = DaemonProcess(popen, stderr_path, _socket_path(), _log_path())
        started.append(proc)
        _wait_ready(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def _write_npmrc(home: Path, token: str) -> Path:
    npmrc = home / ".npmrc"
    npmrc.write_text(f"{NERF}:_authToken={token}\n")
    return npmrc


def _secure(home: Path) -> None:
    result = npmguard("secure", "--token-helper", "never", cwd=home)
    assert result.returncode == 0, result.stderr


def _stale_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()


# --- lifecycle ---------------------------------------------------------------


def test_status_json_running(start_daemon: Callable[[], DaemonProcess],
                             home: Path) -> None:
    proc = start_daemon()
    result = npmguard("status", "--json", cwd=home)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["running"] is True
    assert status["pid"] == proc.pid
    assert status["status"] in ("secure", "exposed", "error", "locked")


def test_status_text_running(start_daemon: Callable[[], DaemonProcess],
                             home: Path) -> None:
    proc = start_daemon()
    result = npmguard("status", cwd=home)
    assert result.returncode == 0, result.stderr
    assert f"running (pid {proc.pid}" in result.stdout


def test_status_not_running(home: Path) -> None:
    result = npmguard("status", cwd=home)
    assert result.returncode == 3
    assert "not running" in result.stdout


def test_status_json_not_running(home: Path) -> None:
    result = npmguard("status", "--json", cwd=home)
    assert result.returncode == 3
    assert json.loads(result.stdout)["running"] is False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["term", "int"])
def test_signal_stops_within_second(
    start_daemon: Callable[[], DaemonProcess], signum: int
) -> None:
    proc = start_daemon()
    proc.popen.send_signal(signum)
    try:
        code = proc.popen.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon still running 1 s after signal {signum}")
    assert code == 0, proc.stderr()


def test_sigterm_removes_socket(start_daemon: Callable[[], DaemonProcess]) -> None:
    proc = start_daemon()
    proc.popen.terminate()
    proc.popen.wait(timeout=5)
    assert not proc.socket_path.exists()


def test_sigterm_logs_stop(start_daemon: Callable[[], DaemonProcess]) -> None:
    proc = start_daemon()
    proc.popen.terminate()
    proc.popen.wait(timeout=5)
    assert "daemon stopped" in proc.log()


def test_second_daemon_refused(start_daemon: Callable[[], DaemonProcess],
                               home: Path) -> None:
    first = start_daemon()
    second = npmguard("daemon", "--no-tray", cwd=home, timeout=30)
    assert second.returncode == 2
    assert f"another npmguard daemon (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr


def test_second_daemon_keeps_first(start_daemon: Callable[[], DaemonProcess],
                                   home: Path) -> None:
    first = start_daemon()
    npmguard("daemon", "--no-tray", cwd=home, timeout=30)
    assert request({"op": "status"}, path=os.fspath(first.socket_path))["pid"] == (
        first.pid
    )


def test_stale_socket_replaced(start_daemon: Callable[[], DaemonProcess]) -> None:
    _stale_socket(_socket_path())
    proc = start_daemon()
    assert request({"op": "status"}, path=os.fspath(proc.socket_path))["ok"]


def test_pause_resume_over_socket(start_daemon: Callable[[], DaemonProcess]) -> None:
    proc = start_daemon()
    path = os.fspath(proc.socket_path)
    request({"op": "pause"}, path=path)
    paused = request({"op": "status"}, path=path)
    request({"op": "resume"}, path=path)
    resumed = request({"op": "status"}, path=path)
    assert paused["status"] == "paused"
    assert resumed["paused"] is False


def test_vault_ops_served(start_daemon: Callable[[], DaemonProcess]) -> None:
    proc = start_daemon()
    reply = request({"op": "vault.status"}, path=os.fspath(proc.socket_path))
    assert "unknown op" not in reply.get("error", "")
    assert "unlocked" in reply


def test_unknown_op_rejected(start_daemon: Callable[[], DaemonProcess]) -> None:
    proc = start_daemon()
    reply = request({"op": "vault.explode"}, path=os.fspath(proc.socket_path))
    assert "unknown op" in reply["error"]


# --- tokens ------------------------------------------------------------------------


def test_token_from_keychain(
    keyring_bus: realparts.Keychain, start_daemon: Callable[[], DaemonProcess],
    home: Path, canary: str,
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    proc = start_daemon()
    result = npmguard("token", "--registry", REGISTRY, cwd=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == canary + "\n"
    assert f"fp {fingerprint(canary)}" in proc.log()
    assert "handed out the _authToken" in proc.log()


def test_token_log_names_process(
    keyring_bus: realparts.Keychain, start_daemon: Callable[[], DaemonProcess],
    home: Path, canary: str,
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    proc = start_daemon()
    npmguard("token", "--registry", REGISTRY, cwd=home)
    line = next(x for x in proc.log().splitlines() if "handed out" in x)
    assert "python" in line
    assert "parents" in line


def test_canary_absent_from_log(
    keyring_bus: realparts.Keychain, start_daemon: Callable[[], DaemonProcess],
    home: Path, canary: str,
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    proc = start_daemon()
    for args in (("token", "--registry", REGISTRY),
                 ("token", "--registry", REGISTRY, "--header"),
                 ("token", "--registry", "http://127.0.0.1:8/")):
        npmguard(*args, cwd=home)
    request({"op": "status"}, path=os.fspath(proc.socket_path))
    proc.stop()
    assert proc.log()
    assert canary not in proc.log()
    assert canary not in proc.stderr()


def test_token_header_from_daemon(
    keyring_bus: realparts.Keychain, start_daemon: Callable[[], DaemonProcess],
    home: Path, canary: str,
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    start_daemon()
    result = npmguard("token", "--registry", REGISTRY, "--header", cwd=home)
    assert result.stdout == f"Bearer {canary}\n"


def test_token_fallback_no_daemon(
    keyring_bus: realparts.Keychain, home: Path, canary: str
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    result = npmguard("token", "--registry", REGISTRY, cwd=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == canary + "\n"
    assert result.stderr == ""


def test_token_fallback_stale_socket(
    keyring_bus: realparts.Keychain, home: Path, canary: str
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    _stale_socket(_socket_path())
    result = npmguard("token", "--registry", REGISTRY, cwd=home)
    assert result.stdout == canary + "\n"
    assert result.stderr == ""


def test_token_locked_not_fallen_back(
    keyring_bus: realparts.Keychain, start_daemon: Callable[[], DaemonProcess],
    home: Path, canary: str,
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    proc = start_daemon()
    keyring_bus.lock()  # the guard unlocks it again after the test
    result = npmguard("token", "--registry", REGISTRY, cwd=home)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "locked" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "token request from" in proc.log()


def test_token_missing_names_cwd(
    start_daemon: Callable[[], DaemonProcess], home: Path, tmp_path: Path
) -> None:
    start_daemon()
    project = tmp_path / "project"
    project.mkdir()
    result = npmguard("token", "--registry", "http://127.0.0.1:7/", cwd=project)
    assert result.returncode == 2
    assert f"read from {project}" in result.stderr


def test_token_env_reference_local(
    start_daemon: Callable[[], DaemonProcess], home: Path
) -> None:
    (home / ".npmrc").write_text(f"{NERF}:_authToken=${{REFERENCED_TOKEN}}\n")
    start_daemon()
    env = dict(os.environ, REFERENCED_TOKEN="value-from-client-env")
    result = npmguard("token", "--registry", REGISTRY, cwd=home, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "value-from-client-env\n"


def test_exec_through_daemon(
    keyring_bus: realparts.Keychain, start_daemon: Callable[[], DaemonProcess],
    home: Path, canary: str,
) -> None:
    _write_npmrc(home, canary)
    _secure(home)
    proc = start_daemon()
    check = (
        "import os; v = os.environ.get('npm_config_//127.0.0.1:9/:_authToken'); "
        "print('match' if v == os.environ['NPMGUARD_CANARY'] else 'differs')"
    )
    result = npmguard("exec", "--", sys.executable, "-c", check, cwd=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "match"
    assert "for exec" in proc.log()


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0
              ) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_file_vault_through_daemon(
    start_daemon: Callable[[], DaemonProcess], home: Path, canary: str
) -> None:
    pytest.importorskip("npmguard.vault.daemon_ops")
    pytest.importorskip("npmguard.daemon.guardian")
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "npmguard" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[vault]\nbackend = "file"\n')
    npmrc = _write_npmrc(home, canary)
    proc = start_daemon()
    unlock = subprocess.run(
        [*NPMGUARD, "unlock", "--passphrase-stdin"], cwd=home, env=dict(os.environ),
        input="correct horse battery staple\n", capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert unlock.returncode == 0, unlock.stderr
    # The unlock makes the guardian secure what it could not before.
    _wait_for(lambda: canary not in npmrc.read_text(), "the file to be secured")
    served = npmguard("token", "--registry", REGISTRY, cwd=home)
    assert served.stdout == canary + "\n"
    npmguard("lock", cwd=home)
    refused = npmguard("token", "--registry", REGISTRY, cwd=home)
    assert refused.returncode == 2
    assert "locked" in refused.stderr
    assert canary not in proc.log()


# --- the Daemon class in-process ------------------------------------------------


def _npmguard_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith("npmguard-") and t.is_alive()]


@pytest.fixture
def running_daemon(home: Path) -> Iterator[Daemon]:
    daemon = Daemon(Settings(), tray=False)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_inprocess_stop_joins_threads(home: Path) -> None:
    before = set(_npmguard_threads())
    daemon = Daemon(Settings(), tray=False)
    daemon.start()
    request({"op": "status"}, path=daemon.socket_path)
    daemon.stop()
    assert set(_npmguard_threads()) - before == set()


def test_inprocess_stop_removes_socket(home: Path) -> None:
    daemon = Daemon(Settings(), tray=False)
    daemon.start()
    daemon.stop()
    assert not Path(daemon.socket_path).exists()


def test_inprocess_quit_ends_wait(running_daemon: Daemon) -> None:
    running_daemon.quit()
    assert running_daemon.wait(timeout=1.0)


def test_inprocess_status_fields(running_daemon: Daemon) -> None:
    reply: dict[str, Any] = request({"op": "status"}, path=running_daemon.socket_path)
    assert reply["pid"] == os.getpid()
    assert "server" in reply["parts"]


def test_missing_part_skipped(
    home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Fault injection: a None entry makes importing the watcher fail as if
    # the module were not installed.
    monkeypatch.setitem(sys.modules, "npmguard.daemon.watcher", None)
    caplog.set_level(logging.WARNING, logger="npmguard.daemon.core")
    daemon = Daemon(Settings(), tray=False)
    daemon.start()
    try:
        reply = request({"op": "status"}, path=daemon.socket_path)
    finally:
        daemon.stop()
    assert "watcher" not in reply["parts"]
    warnings = [r for r in caplog.records if "watcher" in r.getMessage()]
    assert len(warnings) == 1


def test_pause_holds_state(running_daemon: Daemon) -> None:
    running_daemon.pause()
    assert running_daemon.state.snapshot.paused
    running_daemon.resume()
    assert not running_daemon.state.snapshot.paused
