"""Smoke tests of the real services and of the guards in conftest.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import keyring
import keyring.errors
import pytest
import realparts
from realparts import CANARY_ENV, CANARY_RE

if TYPE_CHECKING:
    from conftest import GuardedTest

# --------------------------------------------------------------------------
# Keychain


def test_keyring_round_trip_on_private_bus(
    keyring_bus: realparts.Keychain, canary: str
) -> None:
    assert os.environ["DBUS_SESSION_BUS_ADDRESS"] == keyring_bus.address
    assert not keyring_bus.is_locked()
    keyring.set_password("npmguard-realparts", "alice", canary)
    assert keyring.get_password("npmguard-realparts", "alice") == canary
    assert type(keyring.get_keyring()).__module__ == "keyring.backends.SecretService"
    # gnome-keyring encrypts its file: the value must not be readable there.
    assert canary.encode() not in keyring_bus.keyring_file.read_bytes()
    keyring.delete_password("npmguard-realparts", "alice")
    assert keyring.get_password("npmguard-realparts", "alice") is None


def test_keychain_is_emptied_between_tests(keyring_bus: realparts.Keychain) -> None:
    keyring.set_password("npmguard-realparts", "left-behind", "value")
    # Clearing is the guard's job at teardown; here only check that it works.
    assert keyring_bus.clear() >= 1
    assert keyring.get_password("npmguard-realparts", "left-behind") is None


def test_keyring_bus_reset_unlocks_and_empties(
    keyring_bus: realparts.Keychain,
) -> None:
    keyring.set_password("npmguard-realparts", "alice", "value")
    keyring_bus.lock()
    assert keyring_bus.is_locked()
    # The guard calls reset after every test that used keyring_bus.
    keyring_bus.reset()
    assert not keyring_bus.is_locked()
    assert keyring.get_password("npmguard-realparts", "alice") is None


def test_locked_keychain_raises_quickly(
    locked_keyring_bus: realparts.Keychain,
) -> None:
    assert locked_keyring_bus.is_locked()
    started = time.monotonic()
    with pytest.raises(keyring.errors.KeyringLocked):
        keyring.get_password("npmguard-realparts", "alice")
    with pytest.raises(keyring.errors.KeyringLocked):
        keyring.set_password("npmguard-realparts", "alice", "value")
    assert time.monotonic() - started < 2.0


def test_bus_without_keyring_daemon_has_no_keyring(
    bare_bus: realparts.Keychain,
) -> None:
    assert os.environ["DBUS_SESSION_BUS_ADDRESS"] == bare_bus.address
    assert "PYTHON_KEYRING_BACKEND" not in os.environ
    with pytest.raises(keyring.errors.NoKeyringError):
        keyring.get_password("npmguard-realparts", "alice")


def test_without_a_bus_fixture_there_is_no_bus() -> None:
    assert "DBUS_SESSION_BUS_ADDRESS" not in os.environ
    with pytest.raises(keyring.errors.NoKeyringError):
        keyring.get_password("npmguard-realparts", "alice")


def test_keychain_lock_unlock_and_wrong_password(tmp_path: Path) -> None:
    chain = realparts.start_keychain(tmp_path / "kc")
    try:
        with chain.default_collection() as collection:
            collection.create_item("probe", {"app": "npmguard-realparts"}, b"value")
        chain.lock()
        assert chain.is_locked()
        chain.unlock()
        assert not chain.is_locked()
        with chain.default_collection() as collection:
            items = list(collection.search_items({"app": "npmguard-realparts"}))
            assert [item.get_secret() for item in items] == [b"value"]
        chain.lock_with_wrong_password()
        assert chain.is_locked()
    finally:
        chain.stop()
    assert not chain.bus.process.alive()


def _kill_daemon(chain: realparts.Keychain) -> realparts.ManagedProcess:
    """SIGKILL the keychain's daemon, a child of this process, by its PID."""
    daemon = chain.daemon
    assert daemon is not None and daemon.alive()
    daemon.popen.kill()
    daemon.popen.wait(timeout=10)
    return daemon


def test_revive_restarts_dead_daemon(tmp_path: Path) -> None:
    chain = realparts.start_keychain(tmp_path / "kc")
    try:
        with chain.default_collection() as collection:
            collection.create_item("probe", {"app": "npmguard-realparts"}, b"value")
        assert chain.revive() is None, "a running daemon is left alone"
        address, bus_pid = chain.address, chain.bus.process.pid
        dead = _kill_daemon(chain)

        death = chain.revive()
        assert death is not None
        assert death.pid == dead.pid
        assert death.returncode == -signal.SIGKILL
        assert "was killed by SIGKILL" in death.describe()
        assert chain.daemon is not None
        assert chain.daemon.alive()
        assert chain.daemon.pid != dead.pid
        assert death.restarted_pid == chain.daemon.pid
        assert chain.check_daemon() is None
        assert chain.deaths == [death]
        assert chain.address == address
        assert chain.bus.process.pid == bus_pid
        # Same keyring file and password: the item is still there, unlocked.
        assert not chain.is_locked()
        with chain.default_collection() as collection:
            items = list(collection.search_items({"app": "npmguard-realparts"}))
            assert [item.get_secret() for item in items] == [b"value"]

        _kill_daemon(chain)
        second = chain.reset()
        assert len(chain.deaths) == 2
        assert second is chain.deaths[-1]
        assert not chain.is_locked()
        assert chain.clear() == 0, "reset empties the revived keychain"
    finally:
        chain.stop()
    assert not chain.bus.process.alive()
    assert chain.daemon is not None and not chain.daemon.alive()


def test_reset_revives_locked_keychain(tmp_path: Path) -> None:
    chain = realparts.start_keychain(tmp_path / "kc", locked=True)
    try:
        _kill_daemon(chain)
        death = chain.reset()
        assert death is not None
        assert death.returncode == -signal.SIGKILL
        assert chain.is_locked()
    finally:
        chain.stop()


def test_check_daemon_reports_once(tmp_path: Path) -> None:
    chain = realparts.start_keychain(tmp_path / "kc")
    try:
        assert chain.check_daemon() is None
        dead = _kill_daemon(chain)
        death = chain.check_daemon()
        assert death is not None
        assert death.pid == dead.pid
        assert death.restarted_pid is None
        assert chain.check_daemon() is None
        assert chain.daemon is dead
        # revive still restarts it, without reporting the death again.
        assert chain.revive() is None
        assert chain.daemon is not dead
        assert chain.daemon is not None
        assert chain.daemon.alive()
    finally:
        chain.stop()
    assert dead.pid not in realparts.leak_exempt_pids()


def test_admitted_connection_reads_property(keyring_bus: realparts.Keychain) -> None:
    from jeepney import DBusAddress, MessageType, Properties

    collection = DBusAddress(
        realparts.DEFAULT_COLLECTION,
        realparts.SECRETS_BUS_NAME,
        "org.freedesktop.Secret.Collection",
    )
    with keyring_bus.admitted_connection() as conn:
        reply = conn.send_and_get_reply(Properties(collection).get("Label"), timeout=5)
    assert reply.header.message_type == MessageType.method_return
    assert reply.body[0][1] == "Login"


_DAEMON_DEATH_TESTS = """
import keyring

ADDRESSES = {}


def _kill(chain):
    chain.daemon.popen.kill()
    chain.daemon.popen.wait(timeout=10)


def test_shared_daemon_killed(keyring_bus):
    keyring.set_password("npmguard-realparts", "alice", "value")
    _kill(keyring_bus)


def test_shared_keychain_after_kill(keyring_bus):
    ADDRESSES["shared"] = keyring_bus.address
    assert keyring_bus.daemon.alive()
    assert keyring.get_password("npmguard-realparts", "alice") is None
    keyring.set_password("npmguard-realparts", "bob", "value")
    assert keyring.get_password("npmguard-realparts", "bob") == "value"


def test_crash_keychain_own(crash_keyring_bus):
    ADDRESSES["own"] = crash_keyring_bus.address
    assert crash_keyring_bus.address != ADDRESSES["shared"]
    keyring.set_password("npmguard-realparts", "carol", "value")


def test_crash_keychain_killed(crash_keyring_bus):
    assert crash_keyring_bus.address not in (ADDRESSES["shared"], ADDRESSES["own"])
    assert keyring.get_password("npmguard-realparts", "carol") is None
    _kill(crash_keyring_bus)


def test_shared_keychain_still_serves(keyring_bus):
    assert keyring.get_password("npmguard-realparts", "bob") is None
"""


def test_guard_daemon_death(pytester: pytest.Pytester) -> None:
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    (pytester.path / "realparts.py").write_text((here / "realparts.py").read_text())
    pytester.makepyfile(test_inner=_DAEMON_DEATH_TESTS)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    output = result.stdout.str()

    # The two tests that kill a daemon pass their own assertions and then
    # error at teardown; the tests after them pass.
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_shared_daemon_killed*",
            "*keyring daemon of keyring_bus died during "
            "test_inner.py::test_shared_daemon_killed*was killed by SIGKILL*"
            "restarted as pid*",
            "*ERROR at teardown of test_crash_keychain_killed*",
            "*keyring daemons that died*",
        ]
    )
    summary = output.split("keyring daemons that died")[1]
    killed = "crash_keyring_bus died during test_inner.py::test_crash_keychain_killed"
    assert killed in summary
    assert "test_shared_keychain_after_kill" not in summary
    assert "test_shared_keychain_still_serves" not in summary


# --------------------------------------------------------------------------
# Registry and Node tools


def _npm() -> str:
    npm = shutil.which("npm")
    assert npm is not None, "npm is not on PATH"
    return npm


def test_verdaccio_user_token_works_with_npm(
    verdaccio: realparts.Verdaccio, home: Path
) -> None:
    assert verdaccio.url.startswith("http://127.0.0.1:")
    assert verdaccio.nerf == verdaccio.url[len("http:") :]
    assert verdaccio.ping()
    token = verdaccio.add_user("alice", "alice-password-1")
    assert token
    assert verdaccio.whoami(token) == "alice"
    (home / ".npmrc").write_text(f"{verdaccio.nerf}:_authToken={token}\n")
    result = subprocess.run(
        [_npm(), "whoami", "--registry", verdaccio.url],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alice"


def test_npm_default_registry_is_a_dead_local_port(home: Path) -> None:
    result = subprocess.run(
        [_npm(), "config", "get", "registry"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("http://127.0.0.1:")


def test_verdaccio_jwt_tokens_expire(verdaccio_factory) -> None:  # type: ignore[no-untyped-def]
    server = verdaccio_factory(jwt_expires_in="1s")
    token = server.add_user("bob", "bob-password-1")
    assert token.count(".") == 2, "expected a JWT"
    assert server.whoami(token) == "bob"
    time.sleep(2.1)
    assert server.whoami(token) is None


def test_pnpm_runs() -> None:
    pnpm = realparts.find_node_tool("pnpm")
    result = subprocess.run(
        [str(pnpm), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("10.")


# --------------------------------------------------------------------------
# Display


def test_display_accepts_x_connections(display: realparts.VirtualDisplay) -> None:
    assert os.environ["DISPLAY"] == display.display
    number = display.display.lstrip(":")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(f"/tmp/.X11-unix/X{number}")


def test_no_display_without_the_fixture() -> None:
    assert "DISPLAY" not in os.environ


# --------------------------------------------------------------------------
# Processes


def test_spawned_processes_are_listed_and_stopped(tmp_path: Path) -> None:
    proc = realparts.spawn(
        "sleeper",
        ["sleep", "30"],
        log_path=tmp_path / "sleeper.log",
        env=realparts.isolated_env(tmp_path / "h"),
    )
    try:
        assert proc.pid in realparts.live_children()
        assert proc.pid in realparts.leak_exempt_pids()
    finally:
        proc.stop(timeout=2)
    assert not proc.alive()
    assert proc.pid not in realparts.live_children()
    assert proc.pid not in realparts.leak_exempt_pids()


# --------------------------------------------------------------------------
# The per-test environment and the access guard


def test_environment_points_into_tmp(home: Path, tmp_path: Path, canary: str) -> None:
    assert Path(os.environ["HOME"]) == home
    assert Path.cwd() == tmp_path
    for name in (
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_CACHE_HOME",
    ):
        assert Path(os.environ[name]).is_relative_to(home)
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])
    assert runtime.is_relative_to(home)
    assert runtime.stat().st_mode & 0o777 == 0o700
    assert os.environ["NPM_CONFIG_USERCONFIG"] == str(home / ".npmrc")
    assert CANARY_RE.fullmatch(canary)
    assert os.environ[CANARY_ENV] == canary
    assert canary[4:] not in repr(canary)
    assert f"{canary}" == str.__str__(canary)


def test_guard_rejects_the_real_home(home_guard: GuardedTest) -> None:
    # Opening a missing file for reading: were the guard broken, the test
    # would still only look up a name that does not exist.
    probe = home_guard.real_homes[0] / "npmguard-guard-probe-does-not-exist"
    with home_guard.expect_violation() as seen, pytest.raises(realparts.GuardViolation):
        open(probe)  # noqa: SIM115 - the open itself is what is checked
    assert str(probe) in seen[0]


def test_access_guard_rules(tmp_path: Path) -> None:
    real = tmp_path / "realhome"
    (real / "prefix").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "link").symlink_to(real)
    guard = realparts.AccessGuard(
        [real, Path("/")],
        [real / "prefix", tmp_path],
        bus_address="unix:path=/tmp/outer-bus-socket,guid=0",
        uid=4242,
    )
    assert guard.homes == [str(real)], "/ is never treated as a home"
    assert guard.allowed == [str(real / "prefix")], "a root above a home is dropped"
    guard.allow(tmp_path)
    guard.allow(real / "basetemp")
    assert guard.allowed == [str(real / "basetemp"), str(real / "prefix")]

    def bad(event: str, *args: object) -> bool:
        return guard.check(event, args) is not None

    assert bad("open", str(real / ".npmrc"), "r", 0)
    assert bad("open", os.fsencode(real / ".npmrc"), "r", 0)
    assert bad("open", elsewhere / "link" / ".npmrc", "r", 0), "symlink into home"
    assert not bad("open", str(real / "prefix" / "lib.py"), "r", 0)
    assert not bad("open", str(elsewhere / "file"), "w", 0)
    assert not bad("open", 3, "r", 0)
    assert bad("os.rename", str(elsewhere / "a"), str(real / "b"), None, None)
    assert bad("shutil.rmtree", str(real), None)
    dir_fd = os.open(real, os.O_RDONLY)
    try:
        assert bad("os.remove", ".npmrc", dir_fd)
    finally:
        os.close(dir_fd)

    with socket.socket(socket.AF_INET) as inet, socket.socket(socket.AF_UNIX) as unix:
        # Only the decision is asked for: nothing is connected.
        assert bad("socket.connect", inet, ("192.0.2.10", 443))
        assert not bad("socket.connect", inet, ("127.0.0.1", 4873))
        assert bad("socket.getaddrinfo", "registry.example", 443, 0, 0, 0)
        assert not bad("socket.getaddrinfo", "localhost", 443, 0, 0, 0)
        assert bad("socket.connect", unix, "/tmp/outer-bus-socket")
        assert bad("socket.connect", unix, "/run/user/4242/bus")
        assert not bad("socket.connect", unix, str(tmp_path / "private-bus"))

    guard.audit("open", (str(real / ".npmrc"), "r", 0))  # not armed: no effect
    guard.armed = True
    with pytest.raises(realparts.GuardViolation):
        guard.audit("open", (str(real / ".npmrc"), "r", 0))
    guard.armed = False
    assert len(guard.violations) == 1


_INNER_TESTS = """
import os
import subprocess
import sys
import threading
from pathlib import Path

import keyring
import pytest

PROBE = Path(os.environ["GUARD_PROBE_HOME"]) / "probe.txt"
RELEASE = threading.Event()


def test_write_under_real_home():
    PROBE.write_text("x")


def test_swallowed_access_still_fails():
    try:
        PROBE.read_text()
    except Exception:
        pass


def test_leaked_thread():
    threading.Thread(target=RELEASE.wait, args=(60,), name="leaky").start()


def test_leaked_child():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_outer_bus_is_off_limits(monkeypatch):
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", os.environ["GUARD_OUTER_BUS"])
    with pytest.raises(Exception):
        keyring.get_password("npmguard-realparts", "alice")


def test_canary_outside_tmp_path(canary, tmp_path_factory):
    (tmp_path_factory.getbasetemp() / "leaked-canary.txt").write_text(canary)


def test_canary_in_home_is_wiped(canary, home):
    (home / ".npmrc").write_text("//r.example/:_authToken=" + canary)


def test_failed_test_keeps_its_dir(canary, home):
    (home / ".npmrc").write_text("//r.example/:_authToken=" + canary)
    assert False, "this test fails on purpose"


def test_outer_variables_are_gone():
    assert "NODE_AUTH_TOKEN" not in os.environ
    assert "npm_config_registry" not in os.environ
    assert "NPMGUARD_VAULT" not in os.environ
    assert os.environ["NPMGUARD_TEST_NODE_BIN"] == "kept"


def test_env_change_a():
    os.environ["NPMGUARD_TEST_STRAY"] = "1"


def test_env_change_b():
    assert "NPMGUARD_TEST_STRAY" not in os.environ


def test_z_release_thread():
    RELEASE.set()
"""


def test_guards_end_to_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    (pytester.path / "realparts.py").write_text((here / "realparts.py").read_text())
    pytester.makepyfile(test_inner=_INNER_TESTS)
    fake_home = tmp_path / "fake-real-home"
    fake_home.mkdir()
    outer_bus = tmp_path / "outer-bus"
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.setenv("GUARD_PROBE_HOME", str(fake_home))
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={outer_bus}")
    monkeypatch.setenv("GUARD_OUTER_BUS", f"unix:path={outer_bus}")
    monkeypatch.setenv("NODE_AUTH_TOKEN", "outer-token")
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("NPMGUARD_VAULT", "outer")
    monkeypatch.setenv("NPMGUARD_TEST_NODE_BIN", "kept")
    monkeypatch.setenv("NPMGUARD_TEST_LEAK_GRACE", "0.2")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    output = result.stdout.str()

    assert result.ret != 0
    result.assert_outcomes(passed=10, failed=2, errors=4)
    result.stdout.fnmatch_lines(
        [
            "*test_swallowed_access_still_fails*",
            "*probe.txt, which is under the real home*",
        ]
    )
    assert "left non-daemon thread 'leaky' running" in output
    assert "left child process" in output
    assert "connection to the outer session bus" in output
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CANARY LEAK"))
    listed = []
    for line in lines[start + 1 :]:
        if not line.startswith("  /"):
            break
        listed.append(Path(line.strip()).name)
    assert listed == ["leaked-canary.txt"]
    assert not (fake_home / "probe.txt").exists()
    kept = pytester.path / "runpytest-0" / "test_failed_test_keeps_its_dir0"
    assert (kept / "home" / ".npmrc").exists()
