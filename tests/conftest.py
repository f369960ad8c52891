"""Fixtures with real services, and guards that keep every test hermetic.

Every test runs with HOME, the XDG dirs and npm's config files inside its own
tmp dir, with no npm, proxy, display or session-bus variables from the outer
environment, and with the working directory in its tmp dir. While it runs, an
audit hook makes touching the real home directory, the outer session bus or a
non-loopback host an error. A test that leaves a non-daemon thread or a child
process running fails. A keyring daemon that dies during a test fails that
test too, and is restarted before the next one.

A passing test's tmp dir is deleted at teardown, and a failed test's is kept
for debugging. At the end of the run, a file under the pytest base temp dir
that contains the session's canary token fails the run, unless it is in a
test's own tmp dir. Service logs and state are under the base temp dir too.

npm and pnpm get a global npmrc whose default registry is a loopback port
that refuses connections, so a test that omits ``--registry`` fails fast
instead of reaching a public registry.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import site
import socket
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import realparts  # noqa: E402

pytest_plugins = ["pytester"]

CANARY_ENV = realparts.CANARY_ENV
CANARY_RE = realparts.CANARY_RE
BUS_FIXTURES = ("keyring_bus", "locked_keyring_bus", "bare_bus", "crash_keyring_bus")
# Keychains made for one test and stopped after it, so the guard only checks
# their daemon instead of resetting them.
_PER_TEST_BUSES = frozenset({"crash_keyring_bus"})

# Variables of the outer environment that would point npm, pnpm, keyring or
# a child process at the user's real configuration or credentials.
_OUTER_PREFIXES = ("npm_config_", "pnpm_config_", "keyring_property_")
_OUTER_NAMES = frozenset(
    {
        "NODE_AUTH_TOKEN",
        "NPM_TOKEN",
        "NODE_OPTIONS",
        "NODE_EXTRA_CA_CERTS",
        "PNPM_HOME",
        "DBUS_SESSION_BUS_ADDRESS",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "PYTHON_KEYRING_BACKEND",
        "GNOME_KEYRING_CONTROL",
        "SSH_AUTH_SOCK",
        "XAUTHORITY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    }
)


def _is_outer_variable(name: str) -> bool:
    if name in _OUTER_NAMES or name.lower().startswith(_OUTER_PREFIXES):
        return True
    # The product's own settings, but not this test harness's.
    return name.startswith("NPMGUARD_") and not name.startswith(
        ("NPMGUARD_TEST_", CANARY_ENV)
    )


@dataclass
class _Session:
    canary: str = ""
    canary_file: Path | None = None
    outer_bus: str | None = None
    basetemp: Path | None = None
    guard: realparts.AccessGuard | None = None
    # A bound, never-listening socket: connecting to its port is refused, and
    # no other program can take the port while the run lasts.
    dead_port: socket.socket | None = None
    saved_canary_env: str | None = None
    # tmp dirs of failed tests, kept for debugging; a test may write the
    # canary into its own tmp dir, so the sweep skips them.
    kept_dirs: list[Path] = field(default_factory=list)
    # One line per keyring daemon that died, for the end-of-run summary.
    daemon_deaths: list[str] = field(default_factory=list)


_SESSION = _Session()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _real_homes() -> list[Path]:
    homes = []
    if os.environ.get("HOME"):
        homes.append(Path(os.environ["HOME"]))
    with contextlib.suppress(KeyError):
        homes.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    # A home that contains the temp dir (HOME=/tmp in some CI containers)
    # cannot be guarded: every test's tmp_path and tempfile live there.
    temp = Path(tempfile.gettempdir()).resolve()
    return [h for h in homes if not temp.is_relative_to(h.resolve())]


def _allowed_roots(config: pytest.Config) -> list[Path]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    paths = [Path(r) for r in roots if r]
    paths.append(config.rootpath)
    return paths + [p.resolve() for p in paths]


def pytest_configure(config: pytest.Config) -> None:
    # Recorded before any fixture changes the environment.
    _SESSION.outer_bus = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    _SESSION.guard = realparts.install_guard(
        _real_homes(), _allowed_roots(config), bus_address=_SESSION.outer_bus
    )
    _SESSION.saved_canary_env = os.environ.get(CANARY_ENV)
    given = os.environ.get(CANARY_ENV, "")
    if CANARY_RE.fullmatch(given):
        _SESSION.canary = given
    else:
        alphabet = string.ascii_letters + string.digits
        _SESSION.canary = "npm_" + "".join(secrets.choice(alphabet) for _ in range(36))
        os.environ[CANARY_ENV] = _SESSION.canary
        # Only for a canary made here: a caller that passed one in has it
        # already, and every copy is one more place it can leak from.
        cache_dir = config.rootpath / ".pytest_cache"
        cache_dir.mkdir(exist_ok=True)
        _SESSION.canary_file = cache_dir / "npmguard-canary"
        fd = os.open(_SESSION.canary_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(_SESSION.canary + "\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION.saved_canary_env is None:
        os.environ.pop(CANARY_ENV, None)
    else:
        os.environ[CANARY_ENV] = _SESSION.saved_canary_env
    if _SESSION.dead_port is not None:
        _SESSION.dead_port.close()
        _SESSION.dead_port = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    item.stash.setdefault(_REPORTS, {})[report.when] = report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SESSION.daemon_deaths:
        return
    terminalreporter.section("keyring daemons that died", sep="-", red=True)
    for line in _SESSION.daemon_deaths:
        terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # trylast: after the runner has torn down the session fixtures, so the
    # services have flushed their logs.
    realparts.stop_all()
    if _SESSION.basetemp is None or not _SESSION.basetemp.exists():
        return
    leaks = _files_containing(
        _SESSION.basetemp, _SESSION.canary.encode(), skip=_SESSION.kept_dirs
    )
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        "CANARY LEAK: the session canary token is in plaintext in these files "
        "(tests may write it only below their own tmp_path or home):",
        *(f"  {path}" for path in leaks),
    ]
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True, bold=True)
        else:
            print(line, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _files_containing(root: Path, needle: bytes, skip: list[Path]) -> list[Path]:
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(dirpath, d) not in skip]
        for name in files:
            path = Path(dirpath, name)
            # Only regular files: opening a FIFO a service left would block.
            if not path.is_file() or path.is_symlink():
                continue
            if _file_contains(path, needle):
                found.append(path)
    return sorted(found)


def _file_contains(path: Path, needle: bytes) -> bool:
    overlap = len(needle) - 1
    tail = b""
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                if needle in tail + chunk:
                    return True
                tail = chunk[-overlap:]
    except OSError:
        return False
    return False


# --------------------------------------------------------------------------
# The per-test guard


@dataclass
class GuardedTest:
    """What the autouse guard set up for one test."""

    home: Path
    tmp_path: Path
    guard: realparts.AccessGuard

    @property
    def real_homes(self) -> list[Path]:
        return [Path(h) for h in self.guard.homes]

    @contextlib.contextmanager
    def expect_violation(self) -> Iterator[list[str]]:
        """Expect the guard to object inside the block; absorb what it reports."""
        start = len(self.guard.violations)
        seen: list[str] = []
        yield seen
        seen.extend(self.guard.violations[start:])
        del self.guard.violations[start:]
        if not seen:
            raise AssertionError("the access guard reported nothing inside the block")


def _dead_registry() -> str:
    if _SESSION.dead_port is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        _SESSION.dead_port = sock
    return f"http://127.0.0.1:{_SESSION.dead_port.getsockname()[1]}/"


@pytest.fixture(autouse=True)
def _npmguard_guard(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[GuardedTest]:
    assert _SESSION.guard is not None
    guard = _SESSION.guard
    if _SESSION.basetemp is None:
        _SESSION.basetemp = tmp_path_factory.getbasetemp()
        # Only matters when HOME contains the temp dir, as with HOME=/tmp.
        guard.allow(_SESSION.basetemp)

    for name in list(os.environ):
        if _is_outer_variable(name):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    for name, value in realparts.isolated_env(home).items():
        if name not in ("PATH", "LANG"):
            monkeypatch.setenv(name, value)
    npm_global = tmp_path / "npm-global"
    npm_global.mkdir()
    (npm_global / "npmrc").write_text(
        f"registry={_dead_registry()}\nupdate-notifier=false\nfund=false\naudit=false\n"
    )
    monkeypatch.setenv("NPM_CONFIG_USERCONFIG", str(home / ".npmrc"))
    monkeypatch.setenv("NPM_CONFIG_GLOBALCONFIG", str(npm_global / "npmrc"))
    monkeypatch.setenv("NO_UPDATE_NOTIFIER", "1")

    buses = [name for name in BUS_FIXTURES if name in request.fixturenames]
    if len(buses) > 1:
        pytest.fail(f"a test can use only one of {', '.join(buses)}")
    chain: realparts.Keychain | None = None
    if buses:
        chain = request.getfixturevalue(buses[0])
        # A daemon that died after the last reset is restarted, so that this
        # test does not fail for something it did not do.
        before = f"found dead before {request.node.nodeid}"
        _note_death(chain.revive(), buses[0], before)
        for name, value in chain.env.items():
            monkeypatch.setenv(name, value)
    if "display" in request.fixturenames:
        monkeypatch.setenv("DISPLAY", request.getfixturevalue("display").display)
    _reset_keyring_backend()

    state = GuardedTest(home=home, tmp_path=tmp_path, guard=guard)
    env_before = dict(os.environ)
    threads_before = set(threading.enumerate())
    children_before = set(realparts.live_children())
    old_cwd = os.getcwd()
    # Through monkeypatch, so that its undo returns to old_cwd even when a
    # later fixture (pytester) changes directory with it too.
    monkeypatch.chdir(tmp_path)
    del guard.violations[:]
    guard.armed = True
    try:
        yield state
    finally:
        guard.armed = False
        # Leave tmp_path before it may be deleted below.
        os.chdir(old_cwd)
    violations = list(guard.violations)
    del guard.violations[:]
    problems = list(violations)
    bus_now = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if _SESSION.outer_bus and bus_now == _SESSION.outer_bus:
        problems.append("the test pointed DBUS_SESSION_BUS_ADDRESS at the outer bus")
    # Changes a test made to os.environ without monkeypatch would otherwise
    # reach every later test.
    if dict(os.environ) != env_before:
        os.environ.clear()
        os.environ.update(env_before)
    problems += _leaked_threads(threads_before)
    problems += _leaked_children(children_before)
    _reset_keyring_backend()
    if chain is not None:
        # The next test gets the keychain that the fixture promises: emptied
        # and unlocked (or locked again after a test unlocked it), with a
        # running daemon even if the daemon died during this test.
        try:
            if buses[0] in _PER_TEST_BUSES:
                death = chain.check_daemon()
            else:
                death = chain.reset()
        except realparts.RealPartsError as err:
            problems.append(f"could not reset {buses[0]}: {err}")
        else:
            line = _note_death(death, buses[0], f"died during {request.node.nodeid}")
            if line is not None:
                # The test ran against a keychain that disappeared, so it
                # fails whatever it asserted.
                problems.append(line)

    reports = request.node.stash.get(_REPORTS, {})
    passed = all(
        r.passed or r.skipped for r in reports.values() if r.when in ("setup", "call")
    )
    # pytester's dir is a sibling of tmp_path, and its fixture has been torn
    # down already: take the object the test was given.
    inner = request.node.funcargs.get("pytester")
    own_dirs = [tmp_path] if inner is None else [tmp_path, inner.path]
    for path in own_dirs:
        if passed and not problems:
            _wipe(path)
        else:
            _SESSION.kept_dirs.append(path)
    call = reports.get("call")
    if violations and call is not None and call.failed:
        # The test failed already, most likely on the GuardViolation itself;
        # a second report at teardown would only repeat it.
        problems = problems[len(violations) :]
    if problems:
        pytest.fail("access or leak guard:\n  " + "\n  ".join(problems), pytrace=False)


def _note_death(
    death: realparts.DaemonDeath | None, bus: str, where: str
) -> str | None:
    """Record a dead keyring daemon for the end-of-run summary.

    Return the failure message with the daemon's last log lines, or None
    when no daemon died.
    """
    if death is None:
        return None
    subject = f"the keyring daemon of {bus} {where}"
    _SESSION.daemon_deaths.append(f"{subject}: {death.describe(with_log=False)}")
    return f"{subject}: {death.describe()}"


def _reset_keyring_backend() -> None:
    # keyring caches its backend for the process; each test must pick its
    # own from the bus (or absence of one) it runs with.
    core = sys.modules.get("keyring.core")
    if core is not None:
        core._keyring_backend = None  # type: ignore[attr-defined]


def _leak_grace() -> float:
    """Seconds a thread or child gets to finish after its test."""
    return float(os.environ.get("NPMGUARD_TEST_LEAK_GRACE", "2"))


def _leaked_threads(before: set[threading.Thread]) -> list[str]:
    deadline = time.monotonic() + _leak_grace()
    leaked = []
    for thread in threading.enumerate():
        if thread in before or thread.daemon or thread is threading.current_thread():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(f"left non-daemon thread {thread.name!r} running")
    return leaked


def _leaked_children(before: set[int]) -> list[str]:
    def new_children() -> dict[int, str]:
        exempt = realparts.leak_exempt_pids() | before
        return {
            pid: cmd
            for pid, cmd in realparts.live_children().items()
            if pid not in exempt
        }

    deadline = time.monotonic() + _leak_grace()
    leaked = new_children()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = new_children()
    for pid in leaked:
        _end_leaked_child(pid)
    return [f"left child process {pid} running: {cmd}" for pid, cmd in leaked.items()]


def _end_leaked_child(pid: int) -> None:
    # The process is this pytest's own child, so its PID cannot have been
    # reused before it is reaped here.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    for _ in range(40):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def home(_npmguard_guard: GuardedTest) -> Path:
    """This test's HOME (also NPM_CONFIG_USERCONFIG's dir); deleted if it passes."""
    return _npmguard_guard.home


@pytest.fixture
def home_guard(_npmguard_guard: GuardedTest) -> GuardedTest:
    """The guard of this test, for tests that check the guard itself."""
    return _npmguard_guard


@pytest.fixture(scope="session")
def canary() -> realparts.Canary:
    """A fake npm token, the same for the whole run; it must never reach a log."""
    return realparts.Canary(_SESSION.canary)


def _session_env(
    env: dict[str, str],
) -> Callable[[], None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore


@pytest.fixture(scope="session")
def keyring_bus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realparts.Keychain]:
    """A private bus with an unlocked gnome-keyring; emptied after each test."""
    chain = realparts.start_keychain(tmp_path_factory.mktemp("keyring"))
    restore = _session_env(chain.env)
    try:
        yield chain
    finally:
        restore()
        chain.stop()


@pytest.fixture
def crash_keyring_bus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realparts.Keychain]:
    """A private bus and unlocked gnome-keyring for one test, stopped after it.

    Tests that SIGKILL npmguard in the middle of its work use it, so that
    neither the state they leave nor a daemon that dies under them reaches
    another test.
    """
    chain = realparts.start_keychain(tmp_path_factory.mktemp("crash-keyring"))
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="session")
def locked_keyring_bus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realparts.Keychain]:
    """A private bus with gnome-keyring whose login collection is locked."""
    chain = realparts.start_keychain(tmp_path_factory.mktemp("locked"), locked=True)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="session")
def bare_bus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realparts.Keychain]:
    """A private bus with no keyring daemon on it."""
    chain = realparts.start_bare_bus(tmp_path_factory.mktemp("barebus"))
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="session")
def display(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realparts.VirtualDisplay]:
    """Xvfb; tests that use it get DISPLAY set."""
    screen = realparts.start_xvfb(tmp_path_factory.mktemp("xvfb"))
    try:
        yield screen
    finally:
        screen.stop()


VerdaccioFactory = Callable[..., realparts.Verdaccio]


@pytest.fixture(scope="session")
def verdaccio_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VerdaccioFactory]:
    """Start more registries, e.g. ``verdaccio_factory(jwt_expires_in="2s")``."""
    started: list[realparts.Verdaccio] = []

    def start(
        *,
        jwt_expires_in: str | None = None,
        scoped_access: str = "$authenticated",
        flags: dict[str, bool] | None = None,
    ) -> realparts.Verdaccio:
        server = realparts.start_verdaccio(
            tmp_path_factory.mktemp("verdaccio"),
            jwt_expires_in=jwt_expires_in,
            scoped_access=scoped_access,
            flags=flags,
        )
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="session")
def verdaccio(verdaccio_factory: VerdaccioFactory) -> realparts.Verdaccio:
    """A Verdaccio registry with no uplinks, shared by the whole run."""
    return verdaccio_factory()
