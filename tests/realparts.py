"""Real services for tests: a private D-Bus bus, gnome-keyring, Xvfb, Verdaccio.

Every process starts with stdin from /dev/null, except the keyring daemon,
which reads its password from a pipe. Each one writes its output to a log
file in its state directory and runs in its own session. It is stopped by
its own PID: TERM, a wait, then KILL.

Nothing here changes ``os.environ``. Each helper builds its child's
environment from scratch, taking only PATH from the caller, so an outer
session bus, display or npm configuration never reaches the services.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

KEYRING_BACKEND = "keyring.backends.SecretService.Keyring"
DEFAULT_KEYRING_PASSWORD = "npmguard-test-login"
NODE_BIN_ENV = "NPMGUARD_TEST_NODE_BIN"
# The session's fake token: plaintext copies of it outside a test's own tmp
# dir fail the run.
CANARY_ENV = "NPMGUARD_CANARY"
CANARY_RE = re.compile(r"npm_[A-Za-z0-9]{36}")


class Canary(str):
    """The canary token; its repr hides the value.

    pytest prints a failing test's arguments with repr, so a plain string
    would put the canary into every report of a failed test that used it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Canary('npm_...{self[-4:]}')"


SECRETS_BUS_NAME = "org.freedesktop.secrets"
DEFAULT_COLLECTION = "/org/freedesktop/secrets/aliases/default"


class RealPartsError(RuntimeError):
    """A real service could not be started or did not behave as expected."""


# --------------------------------------------------------------------------
# Processes


@dataclass
class ManagedProcess:
    """A child process started by ``spawn`` and stopped only through its PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as err:
            return f"(log {self.log_path} unreadable: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """Send TERM, wait up to ``timeout`` seconds, then KILL; always reap."""
        # Popen.terminate and Popen.kill signal this exact PID and do nothing
        # once the child has been reaped, so a recycled PID is never hit.
        try:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout)
        finally:
            with _LOCK:
                _RUNNING.pop(self.pid, None)


_RUNNING: dict[int, ManagedProcess] = {}
_EXEMPT_PIDS: set[int] = set()
_LOCK = threading.Lock()

_PR_SET_PDEATHSIG = 1
try:
    _PRCTL: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. If the test run is killed
    # outright, the kernel then ends the services too instead of leaving
    # daemons behind.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    stdin: int | None = None,
    pass_fds: Sequence[int] = (),
) -> ManagedProcess:
    """Start a long-running child that ``stop_all`` and the leak guard know."""
    # The parent-death signal is tied to the thread that forked: only the
    # main thread lives as long as the test run.
    on_main = threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=_die_with_parent if on_main else None,
        )
    proc = ManagedProcess(name, popen, log_path)
    with _LOCK:
        _RUNNING[proc.pid] = proc
    return proc


def running() -> list[ManagedProcess]:
    with _LOCK:
        return list(_RUNNING.values())


def stop_all() -> None:
    """Stop every process ``spawn`` started that is still registered, newest first."""
    for proc in reversed(running()):
        proc.stop()


atexit.register(stop_all)


def exempt_pid(pid: int) -> None:
    """Tell the leak guard that ``pid`` is a service that outlives single tests.

    Processes started through ``spawn`` are exempt already; this is for
    long-lived children started some other way by module or session fixtures.
    """
    with _LOCK:
        _EXEMPT_PIDS.add(pid)


def leak_exempt_pids() -> frozenset[int]:
    with _LOCK:
        return frozenset(_RUNNING) | frozenset(_EXEMPT_PIDS)


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: ManagedProcess | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``predicate`` until it holds; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and not proc.alive():
            raise RealPartsError(
                f"{proc.name} (pid {proc.pid}) exited with {proc.popen.returncode} "
                f"while waiting for {what}; log {proc.log_path}:\n{proc.log_tail()}"
            )
        if time.monotonic() >= deadline:
            tail = f"; log {proc.log_path}:\n{proc.log_tail()}" if proc else ""
            raise RealPartsError(
                f"timed out after {timeout:.1f}s waiting for {what}{tail}"
            )
        time.sleep(interval)


def _read_line_from_fd(fd: int, proc: ManagedProcess, what: str, timeout: float) -> str:
    """Read one line a child writes to the pipe ``fd``; the write end is closed."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RealPartsError(
                f"{proc.name} did not report {what} within {timeout:.1f}s; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        ready, _, _ = select.select([fd], [], [], min(left, 0.1))
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RealPartsError(
                f"{proc.name} closed its pipe before reporting {what}; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        data += chunk
    return data.split(b"\n", 1)[0].decode().strip()


def _spawn_reporting(
    name: str,
    argv_with_fd: Callable[[int], Sequence[str | os.PathLike[str]]],
    *,
    what: str,
    log_path: Path,
    env: Mapping[str, str],
    timeout: float,
) -> tuple[ManagedProcess, str]:
    """Start a child that writes one line (an address, a display) to an inherited fd."""
    read_fd, write_fd = os.pipe()
    try:
        proc = spawn(
            name,
            argv_with_fd(write_fd),
            log_path=log_path,
            env=env,
            pass_fds=[write_fd],
        )
        os.close(write_fd)
        write_fd = -1
        try:
            line = _read_line_from_fd(read_fd, proc, what, timeout)
        except BaseException:
            proc.stop()
            raise
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return proc, line


# --------------------------------------------------------------------------
# Environments and tools


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment whose HOME and XDG dirs live under ``home``."""
    runtime = home / ".run"
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_RUNTIME_DIR": str(runtime),
    }
    for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(extra)
    return env


def find_node_tool(name: str) -> Path:
    """Find a Node tool in ``$NPMGUARD_TEST_NODE_BIN`` first, then on PATH."""
    tried: list[str] = []
    node_bin = os.environ.get(NODE_BIN_ENV)
    if node_bin:
        candidate = Path(node_bin) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        tried.append(str(candidate))
    found = shutil.which(name)
    if found:
        return Path(found)
    tried.append("PATH")
    raise RealPartsError(
        f"{name} not found (tried {', '.join(tried)}); run `bash tests/run.sh`, "
        f"which installs it, or point {NODE_BIN_ENV} at a node_modules/.bin"
    )


def require_program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RealPartsError(
            f"{name} is not installed; `bash tests/run.sh` installs the Debian "
            "packages gnome-keyring, xvfb, libnotify-bin and dbus"
        )
    return found


def free_port() -> int:
    """Ask the kernel for a port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# D-Bus session bus

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- Only this empty directory: the bus must not auto-start anything, a
       locked keyring daemon or a prompter included. -->
  <servicedir>{services}</servicedir>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass
class SessionBus:
    """A private, hermetic session bus; ``address`` is its DBUS_SESSION_BUS_ADDRESS."""

    state_dir: Path
    address: str
    process: ManagedProcess

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "bus"

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """A jeepney blocking connection to this bus, closed on exit."""
        from jeepney.io.blocking import open_dbus_connection

        conn = open_dbus_connection(bus=self.address)
        try:
            yield conn
        finally:
            conn.close()

    def name_has_owner(self, name: str) -> bool:
        from jeepney.bus_messages import message_bus

        with self.connect() as conn:
            reply = conn.send_and_get_reply(message_bus.NameHasOwner(name), timeout=5)
        return bool(reply.body[0])

    def stop(self) -> None:
        self.process.stop()


def start_session_bus(state_dir: Path, *, timeout: float = 10.0) -> SessionBus:
    dbus_daemon = require_program("dbus-daemon")
    state_dir.mkdir(parents=True, exist_ok=True)
    services = state_dir / "services"
    services.mkdir(exist_ok=True)
    socket_path = state_dir / "bus"
    if len(os.fsencode(socket_path)) > 100:
        raise RealPartsError(f"bus socket path too long for AF_UNIX: {socket_path}")
    config = state_dir / "session.conf"
    config.write_text(
        _BUS_CONFIG.format(
            socket=escape(str(socket_path)), services=escape(str(services))
        )
    )
    env = isolated_env(state_dir / "home")
    proc, address = _spawn_reporting(
        "dbus-daemon",
        lambda fd: [
            dbus_daemon,
            "--nofork",
            "--nopidfile",
            f"--config-file={config}",
            f"--print-address={fd}",
        ],
        what="its address",
        log_path=state_dir / "dbus-daemon.log",
        env=env,
        timeout=timeout,
    )
    return SessionBus(state_dir=state_dir, address=address, process=proc)


# --------------------------------------------------------------------------
# gnome-keyring


@dataclass
class DaemonDeath:
    """Record of a keyring daemon that ``Keychain.check_daemon`` found exited."""

    name: str
    pid: int
    returncode: int | None
    log_path: Path
    log_tail: str
    # Set by ``Keychain.revive`` once a new daemon serves the same keyring.
    restarted_pid: int | None = None

    @property
    def known_race(self) -> bool:
        """Whether the log shows gnome-keyring's client-registration abort."""
        return "assertion 'client' failed" in self.log_tail

    def describe(self, *, with_log: bool = True) -> str:
        """Describe the death in one line, then the log's last lines if asked."""
        text = f"{self.name} (pid {self.pid}) {_exit_text(self.returncode)}"
        if self.restarted_pid is not None:
            text += (
                f"; restarted as pid {self.restarted_pid} on the same bus, "
                "keyring files and password"
            )
        if self.known_race:
            text += (
                "; its log shows gnome-keyring's own abort when it handles the "
                "first call of a new D-Bus connection before registering that "
                "client, which any Secret Service client can trigger"
            )
        if not with_log:
            return f"{text}; log {self.log_path}"
        if not self.log_tail.strip():
            return f"{text}; its log {self.log_path} is empty"
        return f"{text}; log {self.log_path} ends:\n{self.log_tail}"


@dataclass
class Keychain:
    """A session bus, possibly with a gnome-keyring-daemon serving secrets on it.

    ``daemon`` is None for a bus with no keyring at all. ``env`` is what a
    test process needs so that ``keyring`` talks to this keychain.
    """

    bus: SessionBus
    home: Path
    password: str | None
    daemon: ManagedProcess | None
    env: dict[str, str] = field(default_factory=dict)
    # The state ``reset`` returns to after a test locked or unlocked it.
    meant_locked: bool = False
    log_path: Path | None = None
    timeout: float = 10.0
    # Every daemon of this keychain that died, oldest first.
    deaths: list[DaemonDeath] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.bus.address

    @property
    def keyring_file(self) -> Path:
        return self.home / ".local" / "share" / "keyrings" / "login.keyring"

    @contextlib.contextmanager
    def admitted_connection(self, timeout: float = 5.0) -> Iterator[Any]:
        """A jeepney connection on which the keyring daemon has replied to a call.

        gnome-keyring 42 sometimes handles the first call of a new connection
        while it has no client record for the caller (roughly 1 in 1,000 new
        connections, measured on a test machine). A property read then aborts
        the whole daemon, whereas ReadAlias only returns "/". Every connection
        of this harness therefore starts with ReadAlias, so that the harness's
        own calls do not kill the daemon that the product under test is using.
        """
        with self._admitted(timeout) as (conn, _):
            yield conn

    @contextlib.contextmanager
    def _admitted(self, timeout: float) -> Iterator[tuple[Any, str | None]]:
        """Open an admitted connection and read the default collection's path."""
        with self.bus.connect() as conn:
            yield conn, self._read_default_alias(conn, timeout)

    @contextlib.contextmanager
    def default_collection(self) -> Iterator[Any]:
        """The secretstorage default collection, over a private connection."""
        import secretstorage

        with self.admitted_connection() as conn:
            yield secretstorage.Collection(conn, DEFAULT_COLLECTION)

    def is_locked(self, timeout: float = 5.0) -> bool:
        """Whether the default collection is locked; raises if there is none."""
        with self._admitted(timeout) as (conn, path):
            if path is None:
                raise RealPartsError("the keychain has no default collection")
            return bool(
                _get_property(
                    conn, path, "org.freedesktop.Secret.Collection", "Locked", timeout
                )
            )

    def _default_collection_path(self, timeout: float) -> str | None:
        with self._admitted(timeout) as (_, path):
            return path

    @staticmethod
    def _read_default_alias(conn: Any, timeout: float) -> str | None:
        """Return the default collection's path, or None when there is none."""
        # Direct jeepney calls carry a timeout; secretstorage's would wait
        # forever on a daemon that stopped responding.
        from jeepney import DBusAddress, new_method_call

        service = DBusAddress(
            "/org/freedesktop/secrets",
            SECRETS_BUS_NAME,
            "org.freedesktop.Secret.Service",
        )
        # A first call that the daemon handled without a client record
        # returns "/" even when the collection exists. The second reply on
        # the same connection is the real one.
        for _ in range(2):
            reply = conn.send_and_get_reply(
                new_method_call(service, "ReadAlias", "s", ("default",)),
                timeout=timeout,
            )
            _raise_for_error(reply)
            path = str(reply.body[0])
            if path != "/":
                return path
        return None

    def lock(self) -> None:
        """Lock the default collection over D-Bus, as a screen locker would."""
        with self.default_collection() as collection:
            collection.lock()
        if not self.is_locked():
            raise RealPartsError("default collection is still unlocked after lock()")

    def lock_with_wrong_password(self) -> None:
        """Restart the daemon with a wrong login password: the keyring stays locked."""
        self._restart_daemon(f"{self.password}-but-wrong")
        wait_until(
            lambda: _collection_exists(self) and self.is_locked(),
            timeout=self.timeout,
            what="a locked default collection",
            proc=self.daemon,
        )

    def unlock(self) -> None:
        """Restart the daemon with the right password, which unlocks the keyring."""
        self._restart_daemon(self.password)
        wait_until(
            lambda: _collection_unlocked(self),
            timeout=self.timeout,
            what="an unlocked default collection",
            proc=self.daemon,
        )

    def check_daemon(self) -> DaemonDeath | None:
        """Record the daemon's exit and return it, the first time it is seen.

        Return None while the daemon runs, and for a death already recorded.
        """
        daemon = self.daemon
        if daemon is None or daemon.alive():
            return None
        if self.deaths and self.deaths[-1].pid == daemon.pid:
            return None
        assert self.log_path is not None
        death = DaemonDeath(
            name=daemon.name,
            pid=daemon.pid,
            returncode=daemon.popen.returncode,
            log_path=self.log_path,
            log_tail=daemon.log_tail(10),
        )
        self.deaths.append(death)
        return death

    def revive(self) -> DaemonDeath | None:
        """Restart a dead daemon in the lock state this keychain is meant to have.

        The new daemon serves the same bus address, keyring files and
        password, so a session-wide keychain outlives one daemon abort.
        Returns the death, or None when the daemon was running. A keychain
        left without a daemon by a failed restart gets one too.
        """
        if self.password is None:
            return None
        death = self.check_daemon()
        if self.daemon is not None and self.daemon.alive():
            return None
        if self.meant_locked:
            self.lock_with_wrong_password()
        else:
            self.unlock()
        if death is not None and self.daemon is not None:
            death.restarted_pid = self.daemon.pid
        return death

    def reset(self) -> DaemonDeath | None:
        """Return to the lock state it started in; an unlocked one is emptied.

        A dead daemon is restarted first (see ``revive``); its death is
        returned, so that the caller can fail the test it died in.
        """
        if self.password is None:
            return None
        death = self.revive()
        try:
            self._return_to_start()
        except Exception as err:
            # The daemon may have died during the reset itself. That death is
            # still reported against the test that just ran.
            late = self.revive()
            if late is None:
                if isinstance(err, RealPartsError):
                    raise
                # secretstorage raises its own errors; the guard reports
                # RealPartsError as a failed reset.
                raise RealPartsError(f"resetting the keychain failed: {err!r}") from err
            death = death or late
            self._return_to_start()
        return death

    def _return_to_start(self) -> None:
        locked = self.is_locked()
        if self.meant_locked and not locked:
            self.lock_with_wrong_password()
        elif not self.meant_locked:
            if locked:
                self.unlock()
            self.clear()

    def _restart_daemon(self, password: str | None) -> None:
        if password is None or self.log_path is None:
            raise RealPartsError("this bus has no keyring daemon to restart")
        if self.daemon is not None:
            self.daemon.stop()
        self.daemon = None
        self.daemon = _start_keyring_daemon(
            self.bus, self.home, password, self.log_path, self.timeout
        )

    def clear(self) -> int:
        """Delete every item in the default collection; return how many."""
        with self.default_collection() as collection:
            if collection.is_locked():
                return 0
            items = list(collection.get_all_items())
            for item in items:
                item.delete()
        return len(items)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        self.bus.stop()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


def _get_property(
    conn: Any, path: str, interface: str, name: str, timeout: float
) -> Any:
    from jeepney import DBusAddress, Properties

    target = DBusAddress(path, SECRETS_BUS_NAME, interface)
    reply = conn.send_and_get_reply(Properties(target).get(name), timeout=timeout)
    _raise_for_error(reply)
    return reply.body[0][1]


def _start_keyring_daemon(
    bus: SessionBus, home: Path, password: str, log_path: Path, timeout: float
) -> ManagedProcess:
    program = require_program("gnome-keyring-daemon")
    env = isolated_env(home, DBUS_SESSION_BUS_ADDRESS=bus.address)
    read_fd, write_fd = os.pipe()
    try:
        proc = spawn(
            "gnome-keyring-daemon",
            [program, "--foreground", "--unlock", "--components=secrets"],
            log_path=log_path,
            env=env,
            stdin=read_fd,
        )
    finally:
        os.close(read_fd)
    # The daemon reads the login password up to EOF; closing is the EOF.
    try:
        os.write(write_fd, password.encode())
    finally:
        os.close(write_fd)
    try:
        wait_until(
            lambda: bus.name_has_owner(SECRETS_BUS_NAME),
            timeout=timeout,
            what=f"{SECRETS_BUS_NAME} on the private bus",
            proc=proc,
        )
    except BaseException:
        proc.stop()
        raise
    return proc


def start_keychain(
    state_dir: Path,
    *,
    password: str = DEFAULT_KEYRING_PASSWORD,
    locked: bool = False,
    lock_method: str = "wrong-password",
    timeout: float = 10.0,
) -> Keychain:
    """A private bus with gnome-keyring whose default collection is unlocked.

    With ``locked=True`` the collection ends up locked: ``wrong-password``
    creates the keyring, restarts the daemon with another password (as after
    a changed login password), and ``lock`` locks it over D-Bus instead.
    """
    if lock_method not in ("wrong-password", "lock"):
        raise ValueError(f"unknown lock_method {lock_method!r}")
    bus = start_session_bus(state_dir / "bus", timeout=timeout)
    chain = Keychain(
        bus=bus,
        home=state_dir / "home",
        password=password,
        daemon=None,
        env={
            "DBUS_SESSION_BUS_ADDRESS": bus.address,
            "PYTHON_KEYRING_BACKEND": KEYRING_BACKEND,
        },
        meant_locked=locked,
        log_path=state_dir / "gnome-keyring.log",
        timeout=timeout,
    )
    try:
        # The first start creates the login keyring with this password; the
        # collection appears a moment after the daemon takes its bus name.
        chain.unlock()
        with chain.default_collection() as collection:
            # The same check through secretstorage, the library keyring uses.
            if collection.is_locked():
                raise RealPartsError("secretstorage sees a locked default collection")
        if locked and lock_method == "lock":
            chain.lock()
        elif locked:
            chain.lock_with_wrong_password()
    except BaseException:
        chain.stop()
        raise
    return chain


def start_bare_bus(state_dir: Path, *, timeout: float = 10.0) -> Keychain:
    """A private bus with no keyring daemon, so no service provides secrets."""
    bus = start_session_bus(state_dir / "bus", timeout=timeout)
    return Keychain(
        bus=bus,
        home=state_dir / "home",
        password=None,
        daemon=None,
        env={"DBUS_SESSION_BUS_ADDRESS": bus.address},
    )


def _raise_for_error(reply: Any) -> None:
    from jeepney import MessageType

    if reply.header.message_type == MessageType.error:
        raise RealPartsError(f"D-Bus error {reply.header.fields}: {reply.body}")


def _collection_exists(chain: Keychain) -> bool:
    return chain._default_collection_path(timeout=5.0) is not None


def _collection_unlocked(chain: Keychain) -> bool:
    return _collection_exists(chain) and not chain.is_locked()


# --------------------------------------------------------------------------
# Xvfb


@dataclass
class VirtualDisplay:
    display: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def start_xvfb(state_dir: Path, *, timeout: float = 15.0) -> VirtualDisplay:
    """Xvfb on the first free display; ``display`` is like ``:3``."""
    xvfb = require_program("Xvfb")
    state_dir.mkdir(parents=True, exist_ok=True)
    env = isolated_env(state_dir / "home")
    proc, number = _spawn_reporting(
        "Xvfb",
        lambda fd: [
            xvfb,
            "-displayfd",
            str(fd),
            "-screen",
            "0",
            "1024x768x24",
            "-nolisten",
            "tcp",
        ],
        what="its display number",
        log_path=state_dir / "xvfb.log",
        env=env,
        timeout=timeout,
    )
    if not number.isdigit():
        proc.stop()
        raise RealPartsError(f"Xvfb reported a display number of {number!r}")
    return VirtualDisplay(display=f":{number}", process=proc)


# --------------------------------------------------------------------------
# Verdaccio


class HttpError(RealPartsError):
    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


# An opener that ignores *_proxy variables, so requests meant for the local
# registry never leave the machine through a proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Verdaccio:
    """A Verdaccio registry on 127.0.0.1 with no uplinks; see ``verdaccio_config``."""

    port: int
    state_dir: Path
    process: ManagedProcess
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def nerf(self) -> str:
        """The registry URL without its scheme, as used in ``.npmrc`` auth keys."""
        return f"//127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """Send a JSON request; return status and decoded body (HTTP errors raise)."""
        url = self.url + path.lstrip("/")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                raw = resp.read()
                status: int = resp.status
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            raise HttpError(method, url, err.code, text) from None
        return status, json.loads(raw) if raw.strip() else None

    def ping(self) -> bool:
        try:
            status, _ = self.request("GET", "-/ping", timeout=2)
        except (OSError, RealPartsError):
            return False
        return status == 200

    def add_user(self, name: str, password: str) -> str:
        """Create ``name`` (or log in when it exists) and return its token."""
        status, reply = self.request(
            "PUT",
            f"-/user/org.couchdb.user:{name}",
            {
                "_id": f"org.couchdb.user:{name}",
                "name": name,
                "password": password,
                "type": "user",
                "roles": [],
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            },
        )
        token = reply.get("token") if isinstance(reply, dict) else None
        if status not in (200, 201) or not token:
            raise RealPartsError(f"adding user {name} gave HTTP {status} and no token")
        return str(token)

    def whoami(self, token: str) -> str | None:
        """The user a token belongs to, or None when Verdaccio ignores it.

        Verdaccio treats an expired or unknown token like a missing one: it
        returns 200 with an empty object, not 401.
        """
        _, reply = self.request("GET", "-/whoami", token=token)
        name = reply.get("username") if isinstance(reply, dict) else None
        return None if name is None else str(name)

    def stop(self) -> None:
        self.process.stop()


def verdaccio_config(
    state_dir: Path,
    port: int,
    *,
    jwt_expires_in: str | None = None,
    scoped_access: str = "$authenticated",
    flags: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Build Verdaccio settings: htpasswd users, no uplinks, publish for users only.

    Unscoped packages are readable by anyone. Scoped ones need a login by
    default, so a test can tell a request that sent its token from one that
    did not.
    """
    users_only = "$authenticated"
    config: dict[str, Any] = {
        "storage": str(state_dir / "storage"),
        "auth": {"htpasswd": {"file": str(state_dir / "htpasswd"), "max_users": 1000}},
        "uplinks": {},
        "packages": {
            "@*/*": {
                "access": scoped_access,
                "publish": users_only,
                "unpublish": users_only,
            },
            "**": {"access": "$all", "publish": users_only, "unpublish": users_only},
        },
        "listen": f"127.0.0.1:{port}",
        "web": {"enable": False},
        "log": {"type": "stdout", "format": "json", "level": "http"},
    }
    if jwt_expires_in is not None:
        # Any jwt setting switches the API from the legacy AES tokens, which
        # never expire, to JWTs that carry this lifetime.
        config["security"] = {"api": {"jwt": {"sign": {"expiresIn": jwt_expires_in}}}}
    if flags:
        # Verdaccio's feature switches, such as webLogin.
        config["flags"] = dict(flags)
    return config


def start_verdaccio(
    state_dir: Path,
    *,
    jwt_expires_in: str | None = None,
    scoped_access: str = "$authenticated",
    flags: Mapping[str, bool] | None = None,
    timeout: float = 60.0,
    attempts: int = 3,
) -> Verdaccio:
    """Start Verdaccio on a free 127.0.0.1 port and wait until /-/ping responds."""
    program = find_node_tool("verdaccio")
    state_dir.mkdir(parents=True, exist_ok=True)
    env = isolated_env(state_dir / "home")
    last_error: RealPartsError | None = None
    for attempt in range(attempts):
        port = free_port()
        config_path = state_dir / "config.yaml"
        # YAML is a superset of JSON, so no YAML writer is needed.
        settings = verdaccio_config(
            state_dir,
            port,
            jwt_expires_in=jwt_expires_in,
            scoped_access=scoped_access,
            flags=flags,
        )
        config_path.write_text(json.dumps(settings, indent=2))
        proc = spawn(
            "verdaccio",
            [program, "--config", config_path],
            log_path=state_dir / f"verdaccio-{attempt}.log",
            env=env,
            cwd=state_dir,
        )
        server = Verdaccio(port, state_dir, proc, config_path)
        try:
            wait_until(
                server.ping,
                timeout=timeout,
                what=f"Verdaccio to answer {server.url}-/ping",
                proc=proc,
                interval=0.1,
            )
        except RealPartsError as err:
            proc.stop()
            last_error = err
            # Another process may have taken the port between probe and
            # bind; only that case is worth another try.
            if "EADDRINUSE" not in proc.log_tail(200):
                raise
            continue
        return server
    assert last_error is not None
    raise last_error


# --------------------------------------------------------------------------
# Guard against touching the real home directory, the outer session bus, or
# any host but loopback. Audit hooks see only this Python process; children
# are kept away by the environment the conftest gives them.


class GuardViolation(RuntimeError):
    """A test touched the real home, the outer session bus or a remote host."""


# event -> pairs of (index of a path argument, index of its dir_fd or None)
_PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "open": ((0, None),),
    "os.chdir": ((0, None),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.link": ((0, 2), (1, 3)),
    "os.listdir": ((0, None),),
    "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),),
    "os.rename": ((0, 2), (1, 3)),
    "os.rmdir": ((0, 1),),
    "os.scandir": ((0, None),),
    "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "glob.glob": ((0, None),),
    "glob.glob/2": ((0, 2),),
    "shutil.copyfile": ((0, None), (1, None)),
    "shutil.copymode": ((0, None), (1, None)),
    "shutil.copystat": ((0, None), (1, None)),
    "shutil.copytree": ((0, None), (1, None)),
    "shutil.move": ((0, None), (1, None)),
    "shutil.rmtree": ((0, 1),),
    "sqlite3.connect": ((0, None),),
    "tempfile.mkdtemp": ((0, None),),
    "tempfile.mkstemp": ((0, None),),
}
_NET_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.getaddrinfo"})
_LOCAL_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _session_bus_sockets(address: str | None, uid: int) -> set[str]:
    """Unix socket paths (abstract ones with a leading NUL) a session bus uses."""
    sockets = {f"/run/user/{uid}/bus", f"/var/run/user/{uid}/bus"}
    for entry in (address or "").split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        for pair in params.split(","):
            key, _, value = pair.partition("=")
            if key == "path" and value:
                sockets.add(value)
                sockets.add(os.path.realpath(value))
            elif key == "abstract" and value:
                sockets.add("\0" + value)
    return sockets


class AccessGuard:
    """The audit hook's brain: decide whether an event is allowed while armed.

    ``homes`` are forbidden except below ``allowed`` roots. An allowed root
    that is a home or contains one is dropped, since it would allow everything.
    """

    def __init__(
        self,
        homes: Sequence[Path],
        allowed: Sequence[Path],
        *,
        bus_address: str | None,
        uid: int | None = None,
    ) -> None:
        self.homes = [
            str(h) for h in dict.fromkeys(_norm(p) for p in homes) if h != "/"
        ]
        roots = {_norm(p) for p in allowed}
        self.allowed = sorted(
            r for r in roots if not any(_under(h, r) for h in self.homes)
        )
        self.forbidden_sockets = _session_bus_sockets(
            bus_address, os.getuid() if uid is None else uid
        )
        self.bus_address = bus_address
        self.armed = False
        self.violations: list[str] = []
        self._local = threading.local()

    def allow(self, root: Path) -> None:
        """Allow ``root`` too, unless it is a home or contains one."""
        path = _norm(root)
        if not any(_under(h, path) for h in self.homes) and path not in self.allowed:
            self.allowed = sorted([*self.allowed, path])

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        """The function given to ``sys.addaudithook``."""
        if not self.armed or (event not in _PATH_EVENTS and event not in _NET_EVENTS):
            return
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            problem = self.check(event, args)
        except Exception as err:  # noqa: BLE001 - report, never break the caller
            problem = f"the access guard could not inspect {event}: {err!r}"
        finally:
            self._local.busy = False
        if problem is not None:
            self.violations.append(problem)
            raise GuardViolation(problem)

    def check(self, event: str, args: tuple[Any, ...]) -> str | None:
        """Return a description of what is wrong with the event, or None."""
        if event in _NET_EVENTS:
            return self._check_net(event, args)
        for index, dir_fd_index in _PATH_EVENTS[event]:
            if index >= len(args):
                continue
            dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
            if dir_fd_index is not None and dir_fd_index >= len(args):
                dir_fd = None
            for candidate in _candidates(args[index], dir_fd):
                home = self._forbidden_home(candidate)
                if home is not None:
                    return (
                        f"{event} on {candidate}, which is under the real home "
                        f"{home}; tests must use the `home` fixture or tmp_path"
                    )
        return None

    def _forbidden_home(self, path: str) -> str | None:
        for home in self.homes:
            if _under(path, home) and not any(_under(path, r) for r in self.allowed):
                return home
        return None

    def _check_net(self, event: str, args: tuple[Any, ...]) -> str | None:
        if event == "socket.getaddrinfo":
            host = args[0]
            if isinstance(host, bytes):
                host = host.decode(errors="replace")
            if host is None or _is_loopback(host):
                return None
            return f"name lookup of {host!r}; tests talk to 127.0.0.1 only"
        sock, address = args[0], args[1]
        family = getattr(sock, "family", None)
        if family == socket.AF_UNIX:
            path = os.fsdecode(address) if isinstance(address, bytes) else str(address)
            if path in self.forbidden_sockets or (
                not path.startswith("\0")
                and os.path.realpath(path) in self.forbidden_sockets
            ):
                return (
                    f"connection to the outer session bus {path!r}; use the "
                    "keyring_bus fixture for a private one"
                )
            return None
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            host = str(address[0])
            if not _is_loopback(host):
                return f"{event} to {host}; tests talk to 127.0.0.1 only"
        return None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _norm(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _candidates(raw: object, dir_fd: object) -> list[str]:
    """The absolute forms of a path argument: as written, and with links resolved."""
    if isinstance(raw, int) or raw is None:
        return []
    try:
        path = os.fsdecode(os.fspath(raw))  # type: ignore[call-overload]
    except TypeError:
        return []
    if not os.path.isabs(path):
        if isinstance(dir_fd, int) and dir_fd >= 0:
            base = os.readlink(f"/proc/self/fd/{dir_fd}")
        else:
            try:
                base = os.getcwd()
            except OSError:
                return []
        path = os.path.join(base, path)
    plain = os.path.normpath(path)
    resolved = os.path.realpath(path)
    return [plain] if plain == resolved else [plain, resolved]


_GUARD: AccessGuard | None = None


def install_guard(
    homes: Sequence[Path], allowed: Sequence[Path], *, bus_address: str | None
) -> AccessGuard:
    """Install the audit hook once per process; later calls return the same guard."""
    global _GUARD
    if _GUARD is None:
        import sys

        _GUARD = AccessGuard(homes, allowed, bus_address=bus_address)
        sys.addaudithook(_GUARD.audit)
    return _GUARD


# --------------------------------------------------------------------------
# Children of a process, from /proc


def live_children(parent: int | None = None) -> dict[int, str]:
    """Map PID to command line for each running (not zombie) child of ``parent``."""
    parent = os.getpid() if parent is None else parent
    found: dict[int, str] = {}
    for pid in _child_pids(parent):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name in parentheses may contain spaces and ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2 or fields[0] == b"Z" or int(fields[1]) != parent:
            continue
        found[pid] = cmdline.strip() or "?"
    return found


def _child_pids(parent: int) -> set[int]:
    # Each thread's "children" file lists the children it forked. Reading
    # those is much cheaper than every /proc/*/stat, so the full scan is only
    # a fallback for kernels built without them.
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
        for tid in tasks:
            with open(f"/proc/{parent}/task/{tid}/children", "rb") as fh:
                pids.update(int(p) for p in fh.read().split())
        return pids
    except FileNotFoundError:
        pass
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pids.add(int(entry.name))
    return pids
