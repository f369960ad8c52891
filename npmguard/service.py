"""The user service that runs ``npmguard daemon``, one backend per OS.

This module is the one place that looks at ``sys.platform`` for services
(``backend_for_platform``): a systemd user unit on Linux, a launchd agent on
macOS, a scheduled task on Windows. Each backend renders its template from
``service/`` with the path of the npmguard that is running, writes it, and
has the OS service manager enable and start it.

The templates are kept here as well as in ``service/``, because a wheel
installs only the ``npmguard`` package; a test checks that the two copies are
the same. Placeholders: ``@NPMGUARD@`` is the command that runs npmguard
(quoted for the format), ``@NPMGUARD_ARGS@`` its arguments after the program
(Windows, where program and arguments are separate elements), ``@LOG_DIR@``
and ``@PATH@`` (launchd) and ``@USER_ID@`` (Windows).

Writing the unit is what counts: when the service manager cannot be reached
(no systemd user instance in a container, say), install still succeeds and
says how to start the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from npmguard.errors import NpmguardError

log = logging.getLogger(__name__)

LABEL = "com.npmguard.daemon"
UNIT_NAME = "npmguard.service"
TASK_NAME = "npmguard"
COMMAND_TIMEOUT = 30.0
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
TASK_NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"


class ServiceError(NpmguardError):
    """The service unit could not be written or removed."""


# --------------------------------------------------------------------------
# Running the service manager's commands


@dataclass(frozen=True)
class CommandResult:
    """Result of one service manager command; ``output`` holds stdout and stderr."""

    argv: tuple[str, ...]
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def first_line(self) -> str:
        for line in self.output.splitlines():
            if line.strip():
                return line.strip()
        return f"exit status {self.returncode}"

    def describe(self) -> str:
        """``systemctl --user start npmguard.service: <first line>``."""
        return f"{' '.join(self.argv)}: {self.first_line()}"


Runner = Callable[[Sequence[str]], CommandResult]
NOT_FOUND = 127
TIMED_OUT = 124


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run a service manager command; a missing program is exit status 127."""
    args = tuple(argv)
    log.debug("running %s", " ".join(args))
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return CommandResult(args, NOT_FOUND, f"{args[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CommandResult(
            args, TIMED_OUT, f"no answer within {COMMAND_TIMEOUT:.0f} s"
        )
    except OSError as err:
        return CommandResult(args, NOT_FOUND, f"{args[0]}: {err.strerror}")
    return CommandResult(args, done.returncode, done.stdout or "")


# --------------------------------------------------------------------------
# What the backends report


@dataclass(frozen=True)
class ServiceStatus:
    """Installed and running state of the service.

    ``running`` and ``enabled`` are None when the service manager could not
    be queried. ``problem`` names what stops an installed service from
    working, such as a unit that runs an npmguard that was removed.
    """

    manager: str
    unit_path: Path
    installed: bool
    enabled: bool | None
    running: bool | None
    detail: str
    problem: str | None = None
    start_hint: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "manager": self.manager,
            "unit_path": str(self.unit_path),
            "installed": self.installed,
            "enabled": self.enabled,
            "running": self.running,
            "detail": self.detail,
            "problem": self.problem,
        }


@dataclass
class ActionReport:
    """Lines for the user about what install or uninstall did.

    ``notes`` are progress lines. ``warnings`` describe what did not happen
    and what to do about it. ``started`` is True only when the service
    manager confirmed the start.
    """

    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: bool = False
    changed: bool = False


# --------------------------------------------------------------------------
# The command the service runs


def npmguard_command(*, windowless: bool = False) -> list[str]:
    """Return the argv prefix that runs this npmguard: its script, or ``python -m``.

    The console script is used when it is what is running, so that the
    service shows up as ``npmguard`` in process lists. Paths are made
    absolute but not resolved: a venv's python must keep its own path to
    find the venv. ``windowless`` picks pythonw.exe on Windows, where the
    console script would open a console window for the life of the daemon.
    """
    python = Path(sys.executable)
    if windowless:
        pythonw = python.with_name("pythonw.exe")
        if pythonw.is_file():
            return [os.path.abspath(pythonw), "-m", "npmguard"]
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0:
        script = Path(argv0)
        if script.name in ("npmguard", "npmguard.exe") and script.is_file():
            return [os.path.abspath(script)]
    return [os.path.abspath(python), "-m", "npmguard"]


def systemd_quote(arg: str, *, program: bool = False) -> str:
    """Quote one ExecStart word.

    ``%`` starts a specifier everywhere, ``$`` a variable in the arguments
    but not in the program path, which systemd takes literally.
    """
    if any(c in arg for c in "\n\r\0"):
        raise ServiceError(f"cannot put {arg!r} in a systemd unit: it has a newline")
    text = arg.replace("%", "%%")
    if not program:
        text = text.replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg) and arg != ";":
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def windows_cmdline(args: Sequence[str]) -> str:
    """Join arguments the way the Windows C runtime splits them."""
    return subprocess.list2cmdline(list(args))


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace each placeholder in one pass; inserted values are not rescanned."""

    def value(match: re.Match[str]) -> str:
        if match[0] not in values:
            raise ServiceError(
                f"the service template has an unknown placeholder {match[0]}"
            )
        return values[match[0]]

    return _PLACEHOLDER.sub(value, template)


# --------------------------------------------------------------------------
# Backends


class Backend:
    """Common install/uninstall flow; subclasses talk to one service manager."""

    manager = "service manager"
    unit_path: Path

    def __init__(self, runner: Runner | None = None, *, dry_run: bool = False):
        self._runner = runner or run_command
        self.dry_run = dry_run
        self.planned: list[str] = []

    # -- to implement ---------------------------------------------------------

    def render(self, command: Sequence[str]) -> bytes:
        raise NotImplementedError

    def activate(self, report: ActionReport) -> None:
        raise NotImplementedError

    def deactivate(self, report: ActionReport) -> None:
        raise NotImplementedError

    def status(self) -> ServiceStatus:
        raise NotImplementedError

    def program_in_unit(self, data: bytes) -> str | None:
        """Return the program an installed unit runs, to check that it exists."""
        raise NotImplementedError

    def start_hint(self) -> str:
        """Return the command that starts the installed service by hand."""
        raise NotImplementedError

    def is_installed(self) -> bool:
        return self.unit_path.is_file()

    # -- shared -----------------------------------------------------------------

    def run(self, *argv: str) -> CommandResult:
        """Run a command, or in a dry run record it and pretend it worked."""
        if self.dry_run:
            self.planned.append(" ".join(argv))
            return CommandResult(tuple(argv), 0, "")
        return self._runner(argv)

    def make_status(
        self,
        *,
        installed: bool,
        enabled: bool | None,
        running: bool | None,
        detail: str,
        has_unit: bool,
    ) -> ServiceStatus:
        """Build this backend's status; ``has_unit`` means the unit file exists.

        Only an existing unit file is checked for a stale program.
        """
        return ServiceStatus(
            manager=self.manager,
            unit_path=self.unit_path,
            installed=installed,
            enabled=enabled,
            running=running,
            detail=detail,
            problem=self.stale_program() if has_unit else None,
            start_hint=self.start_hint(),
        )

    def done(self, report: ActionReport, text: str) -> None:
        """Note a step that was carried out; a dry run lists its commands instead."""
        if not self.dry_run:
            report.notes.append(text)

    def install(self, command: Sequence[str] | None = None) -> ActionReport:
        report = ActionReport()
        argv = list(command) if command is not None else self.default_command()
        data = self.render(argv)
        try:
            old = self.unit_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            old = None
        except OSError as err:
            raise ServiceError(
                f"cannot read the installed unit: {err.strerror}", path=self.unit_path
            ) from err
        report.changed = old != data
        shown = " ".join(argv)
        if self.dry_run:
            verb = "would write" if report.changed else "would keep (unchanged)"
            report.notes.append(f"{verb} {self.unit_path}, which runs {shown} daemon:")
            report.notes.append(self.printable(data))
        elif report.changed:
            self.write_unit(data)
            log.info("service unit written to %s; it runs %s daemon",
                     self.unit_path, shown)
            report.notes.append(f"wrote {self.unit_path} (runs {shown} daemon)")
        else:
            report.notes.append(f"{self.unit_path} is up to date (runs {shown} daemon)")
        self.activate(report)
        if self.dry_run:
            report.notes.extend(f"would run: {step}" for step in self.planned)
        return report

    def uninstall(self) -> ActionReport:
        report = ActionReport()
        self.deactivate(report)
        if self.unit_path.exists() or self.unit_path.is_symlink():
            report.changed = True
            if self.dry_run:
                report.notes.append(f"would remove {self.unit_path}")
            else:
                self.remove_unit()
                log.info("service unit %s removed", self.unit_path)
                report.notes.append(f"removed {self.unit_path}")
            self.after_removal(report)
        if self.dry_run:
            report.notes.extend(f"would run: {step}" for step in self.planned)
        return report

    def after_removal(self, report: ActionReport) -> None:
        """Tell the service manager that the unit file is gone, if it needs that."""

    def default_command(self) -> list[str]:
        return npmguard_command()

    def printable(self, data: bytes) -> str:
        return data.decode("utf-8")

    def write_unit(self, data: bytes) -> None:
        from npmguard.files import write_private

        try:
            write_private(self.unit_path, data, mode=0o644)
        except OSError as err:
            blocker = _file_in_the_way(self.unit_path.parent)
            reason = (
                f"{blocker} is a file, not a directory"
                if blocker is not None
                else err.strerror or str(err)
            )
            raise ServiceError(
                f"cannot write the service unit: {reason}", path=self.unit_path
            ) from err

    def remove_unit(self) -> None:
        try:
            self.unit_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise ServiceError(
                f"cannot remove the service unit: {err.strerror or err}",
                path=self.unit_path,
            ) from err

    def stale_program(self) -> str | None:
        """Return a problem line when the installed unit's program is missing."""
        try:
            program = self.program_in_unit(self.unit_path.read_bytes())
        except (OSError, ValueError):
            return None
        if program and not os.path.isfile(program):
            return (
                f"the service runs {program}, which no longer exists; "
                "run `npmguard service install` again"
            )
        return None


SYSTEMD_TEMPLATE = """\
# npmguard as a systemd user service. `npmguard service install` writes it
# to ~/.config/systemd/user/npmguard.service from the template in npmguard's
# service/ directory, with the path of the installed npmguard filled in (see
# service/README.md); run that command again after moving npmguard.

[Unit]
Description=npmguard: keep npm registry credentials in the OS keychain
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
# exec: systemd reports a failure when the program cannot be started at all,
# for example after the npmguard it points at was uninstalled.
Type=exec
ExecStart=@NPMGUARD@ daemon
Restart=on-failure
RestartSec=5
TimeoutStopSec=10
WorkingDirectory=%h
UMask=0077

# Hardening that works in a user unit. Each of these is enforced with
# seccomp or a process flag that an unprivileged user manager can set.
# They also apply to every program the daemon starts, such as the viewer
# the tray's "Open log" opens, so nothing here may stop an ordinary desktop
# program from running.
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
#
# Left out on purpose:
# - ProtectSystem, ProtectHome, PrivateTmp, PrivateDevices, ProtectKernel*,
#   ProtectControlGroups, ProtectHostname, ProtectClock: in a user unit they
#   need an unprivileged user namespace (systemd turns on PrivateUsers= for
#   them) and the unit fails to start where those are disabled. They would
#   also get in the daemon's way: it rewrites .npmrc files anywhere under the
#   watched roots and the global npm config, and the tray needs the X11
#   socket in /tmp.
# - RestrictNamespaces, SystemCallFilter, RestrictAddressFamilies,
#   MemoryDenyWriteExecute: inherited by the programs the tray opens; browser
#   and Electron sandboxes need namespaces, their own seccomp filters,
#   netlink sockets and JIT memory.
# - CapabilityBoundingSet: a user manager cannot change it.

[Install]
WantedBy=default.target
"""


class SystemdUser(Backend):
    """A unit in ``$XDG_CONFIG_HOME/systemd/user``, run by ``systemd --user``."""

    manager = "systemd --user"

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        dry_run: bool = False,
        config_home: Path | None = None,
    ) -> None:
        super().__init__(runner, dry_run=dry_run)
        if config_home is None:
            xdg = os.environ.get("XDG_CONFIG_HOME")
            config_home = Path(xdg) if xdg else Path.home() / ".config"
        self.unit_dir = config_home / "systemd" / "user"
        self.unit_path = self.unit_dir / UNIT_NAME

    def systemctl(self, *args: str) -> CommandResult:
        return self.run("systemctl", "--user", *args)

    def render(self, command: Sequence[str]) -> bytes:
        words = [systemd_quote(command[0], program=True)]
        words += [systemd_quote(arg) for arg in command[1:]]
        return _fill(SYSTEMD_TEMPLATE, {"@NPMGUARD@": " ".join(words)}).encode()

    def start_hint(self) -> str:
        return (
            "systemctl --user daemon-reload && "
            f"systemctl --user enable --now {UNIT_NAME}"
        )

    def activate(self, report: ActionReport) -> None:
        reload = self.systemctl("daemon-reload")
        # enable only makes a symlink, which systemctl can do without a
        # running manager. The service then starts at the next login that
        # has one.
        enable = self.systemctl("enable", UNIT_NAME)
        if enable.ok:
            self.done(report, f"enabled {UNIT_NAME}: it starts at each login")

        if not reload.ok:
            report.warnings.append(
                f"could not start it now: {_systemd_reason(reload)}"
            )
            report.warnings.append(
                "start the daemon yourself with `npmguard daemon`, or, in a "
                f"session that has systemd, with `{self.start_hint()}`"
            )
            if not enable.ok and enable.returncode != NOT_FOUND:
                report.warnings.append(f"could not enable it: {enable.describe()}")
            return

        if not enable.ok:
            report.warnings.append(f"could not enable it: {enable.describe()}")
        # restart picks up a changed unit; start leaves a running one alone.
        start = self.systemctl("restart" if report.changed else "start", UNIT_NAME)
        if start.ok:
            report.started = True
            self.done(report, f"started {UNIT_NAME}")
            return
        report.warnings.append(f"could not start it: {start.describe()}")
        report.warnings.append(
            f"see why with `systemctl --user status {UNIT_NAME}` and "
            f"`journalctl --user -u {UNIT_NAME}`"
        )

    def deactivate(self, report: ActionReport) -> None:
        if not self.is_installed() and not self._wants_link().is_symlink():
            report.notes.append(f"{UNIT_NAME} is not installed")
            return
        stop = self.systemctl("stop", UNIT_NAME)
        if stop.ok:
            self.done(report, f"stopped {UNIT_NAME}")
        elif not _systemd_absent(stop):
            report.warnings.append(f"could not stop it: {stop.describe()}")
        disable = self.systemctl("disable", UNIT_NAME)
        if disable.ok:
            self.done(report, f"disabled {UNIT_NAME}")
        else:
            self._drop_wants_link(report)

    def after_removal(self, report: ActionReport) -> None:
        # After the file is gone, so that systemd drops the unit.
        reload = self.systemctl("daemon-reload")
        if not reload.ok and not _systemd_absent(reload):
            report.warnings.append(f"could not reload systemd: {reload.describe()}")

    def _wants_link(self) -> Path:
        return self.unit_dir / "default.target.wants" / UNIT_NAME

    def _drop_wants_link(self, report: ActionReport) -> None:
        # systemctl is missing or failed; the symlink is all that enable made.
        link = self._wants_link()
        if not link.is_symlink():
            return
        if self.dry_run:
            report.notes.append(f"would remove {link}")
            return
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        report.notes.append(f"removed {link}")

    def status(self) -> ServiceStatus:
        installed = self.is_installed()
        enabled_out = self.systemctl("is-enabled", UNIT_NAME)
        active_out = self.systemctl("is-active", UNIT_NAME)
        enabled: bool | None = None
        if enabled_out.returncode != NOT_FOUND:
            enabled = enabled_out.first_line() in ("enabled", "enabled-runtime")
        running: bool | None
        if _systemd_absent(active_out):
            running = None
            detail = _systemd_reason(active_out)
        else:
            state = active_out.first_line()
            running = state in ("active", "reloading", "activating")
            detail = state
        if not installed:
            detail = f"not installed ({self.unit_path} does not exist)"
        return self.make_status(
            installed=installed,
            enabled=enabled,
            running=running,
            detail=detail,
            has_unit=installed,
        )

    def program_in_unit(self, data: bytes) -> str | None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith("ExecStart="):
                value = line[len("ExecStart="):].strip()
                if value.startswith('"'):
                    end = value.find('"', 1)
                    while end > 0 and value[end - 1] == "\\":
                        end = value.find('"', end + 1)
                    word = value[1:end] if end > 0 else value[1:]
                    word = re.sub(r"\\(.)", r"\1", word)
                else:
                    word = value.split()[0] if value.split() else ""
                return word.replace("%%", "%") or None
        return None


def _systemd_absent(result: CommandResult) -> bool:
    """True when no systemd user manager could be reached at all."""
    text = result.output
    return (
        result.returncode in (NOT_FOUND, TIMED_OUT)
        or "Failed to connect to bus" in text
        or "System has not been booted with systemd" in text
        or "Failed to connect to user scope bus" in text
    )


def _systemd_reason(result: CommandResult) -> str:
    if result.returncode == NOT_FOUND:
        return "systemctl was not found; this system does not run systemd"
    if _systemd_absent(result):
        return (
            "systemd is not running for this user "
            f"({result.describe()})"
        )
    return result.describe()


LAUNCHD_TEMPLATE = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
    '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
) + """\
<!--
  npmguard as a launchd agent. `npmguard service install` writes it to
  ~/Library/LaunchAgents/com.npmguard.daemon.plist from the template in
  npmguard's service/ directory, with the path of the installed npmguard,
  the log directory and the PATH of the installing shell filled in (see
  service/README.md). launchd gives agents only /usr/bin:/bin:/usr/sbin:/sbin
  as PATH, and the daemon looks for pnpm.
-->
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>com.npmguard.daemon</string>
    <key>ProgramArguments</key>
    <array>
        <string>@NPMGUARD@</string>
        <string>daemon</string>
    </array>
    <key>RunAtLoad</key>
    <true/>
    <!-- Restart after a crash, but not after Quit from the menu. -->
    <key>KeepAlive</key>
    <dict>
        <key>SuccessfulExit</key>
        <false/>
    </dict>
    <key>ThrottleInterval</key>
    <integer>10</integer>
    <key>ProcessType</key>
    <string>Interactive</string>
    <key>Umask</key>
    <integer>63</integer>
    <key>EnvironmentVariables</key>
    <dict>
        <key>PATH</key>
        <string>@PATH@</string>
    </dict>
    <key>StandardOutPath</key>
    <string>@LOG_DIR@/daemon.out.log</string>
    <key>StandardErrorPath</key>
    <string>@LOG_DIR@/daemon.err.log</string>
</dict>
</plist>
"""


def _queried_state(
    out: CommandResult, running_pattern: str, known: str
) -> tuple[bool | None, bool | None, str]:
    """Return (enabled, running, detail) from the manager's query output.

    ``known`` is the manager's word for a service it has (loaded, registered).
    Both flags are None when the manager's command itself was not found.
    """
    if out.returncode == NOT_FOUND:
        return None, None, out.first_line()
    if not out.ok:
        return False, False, f"not {known}"
    running = bool(re.search(running_pattern, out.output, re.M))
    return True, running, "running" if running else f"{known}, not running"


class LaunchAgent(Backend):
    """A launchd agent in ``~/Library/LaunchAgents``, in the ``gui/UID`` domain."""

    manager = "launchd"

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        dry_run: bool = False,
        home: Path | None = None,
        uid: int | None = None,
        path_env: str | None = None,
    ) -> None:
        super().__init__(runner, dry_run=dry_run)
        home = home or Path.home()
        self.unit_path = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.log_dir = home / "Library" / "Logs" / "npmguard"
        self.uid = _getuid() if uid is None else uid
        self.path_env = path_env if path_env is not None else os.environ.get(
            "PATH", "/usr/bin:/bin:/usr/sbin:/sbin"
        )

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{LABEL}"

    def render(self, command: Sequence[str]) -> bytes:
        values = {
            "@LOG_DIR@": escape(str(self.log_dir)),
            "@PATH@": escape(self.path_env),
        }
        lines = []
        for line in LAUNCHD_TEMPLATE.splitlines(keepends=True):
            if line.strip() == "<string>@NPMGUARD@</string>":
                # One array element per word of the command.
                indent = line[: len(line) - len(line.lstrip())]
                lines += [f"{indent}<string>{escape(a)}</string>\n" for a in command]
            else:
                lines.append(_fill(line, values))
        return "".join(lines).encode()

    def start_hint(self) -> str:
        return f"launchctl bootstrap {self.domain} {self.unit_path}"

    def _loaded(self) -> CommandResult:
        return self.run("launchctl", "print", self.target)

    def activate(self, report: ActionReport) -> None:
        if not self.dry_run:
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as err:
                raise ServiceError(
                    f"cannot create the log directory: {err.strerror}",
                    path=self.log_dir,
                ) from err
        loaded = self._loaded()
        if loaded.ok and not report.changed and not self.dry_run:
            # Loaded with this very plist: start it if it is not running.
            kick = self.run("launchctl", "kickstart", self.target)
            if kick.ok:
                report.started = True
                self.done(report, f"{LABEL} is loaded and running")
            else:
                report.warnings.append(f"could not start it: {kick.describe()}")
            return
        if loaded.ok:
            # A changed plist takes effect only after the agent is unloaded.
            self.run("launchctl", "bootout", self.target)
        # A disabled agent cannot be bootstrapped; enabling is remembered.
        self.run("launchctl", "enable", self.target)
        boot = self.run("launchctl", "bootstrap", self.domain, str(self.unit_path))
        if boot.ok:
            report.started = True
            self.done(report, f"loaded {LABEL}: it runs now and at each login")
        else:
            report.warnings.append(f"could not load it: {boot.describe()}")
            report.warnings.append(
                f"it loads at the next login; or run `{self.start_hint()}`"
            )

    def deactivate(self, report: ActionReport) -> None:
        if not self.is_installed():
            report.notes.append(f"{LABEL} is not installed")
            return
        out = self.run("launchctl", "bootout", self.target)
        if out.ok:
            self.done(report, f"unloaded {LABEL}")

    def status(self) -> ServiceStatus:
        installed = self.is_installed()
        enabled, running, detail = _queried_state(
            self._loaded(), r"^\s*state = running", "loaded"
        )
        if not installed:
            detail = f"not installed ({self.unit_path} does not exist)"
        return self.make_status(
            installed=installed,
            enabled=enabled,
            running=running,
            detail=detail,
            has_unit=installed,
        )

    def program_in_unit(self, data: bytes) -> str | None:
        import plistlib

        try:
            args = plistlib.loads(data).get("ProgramArguments") or []
        except plistlib.InvalidFileException as err:
            raise ValueError(str(err)) from err
        return str(args[0]) if args else None


TASK_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!--
  npmguard as a Windows scheduled task, started at logon.
  `npmguard service install` writes it from the template in npmguard's
  service/ directory, with the program (pythonw.exe when there is one, so
  that no console window stays open), its arguments and the user filled in
  (see service/README.md), as UTF-16 like Task Scheduler's own exports, and
  registers it with `schtasks /Create /TN npmguard /XML FILE`.
-->
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>npmguard: keeps npm credentials in the Credential Locker</Description>
    <URI>\\npmguard</URI>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger>
      <Enabled>true</Enabled>
      <UserId>@USER_ID@</UserId>
    </LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>@USER_ID@</UserId>
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>true</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>true</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>7</Priority>
    <!-- Task Scheduler documents this as a restart "if the task fails for
         any reason"; whether a daemon that exits with an error counts as a
         failure on every Windows version is untested, for want of a
         Windows machine in CI. -->
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>255</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>@NPMGUARD@</Command>
      <Arguments>@NPMGUARD_ARGS@daemon</Arguments>
    </Exec>
  </Actions>
</Task>
"""


class ScheduledTask(Backend):
    """A Task Scheduler task that runs the daemon at logon, without a window."""

    manager = "Task Scheduler"

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        dry_run: bool = False,
        xml_path: Path | None = None,
        user_id: str | None = None,
    ) -> None:
        super().__init__(runner, dry_run=dry_run)
        if xml_path is None:
            from npmguard.paths import data_dir

            xml_path = data_dir() / "npmguard-task.xml"
        self.unit_path = xml_path
        self.user_id = user_id or _windows_user()

    def default_command(self) -> list[str]:
        return npmguard_command(windowless=True)

    def render(self, command: Sequence[str]) -> bytes:
        rest = windows_cmdline(command[1:])
        values = {
            "@NPMGUARD_ARGS@": escape(rest + " ") if rest else "",
            "@NPMGUARD@": escape(command[0]),
            "@USER_ID@": escape(self.user_id),
        }
        text = _fill(TASK_TEMPLATE, values)
        text = text.replace('encoding="UTF-8"', 'encoding="UTF-16"', 1)
        return text.encode("utf-16")

    def printable(self, data: bytes) -> str:
        return data.decode("utf-16")

    def start_hint(self) -> str:
        return f"schtasks /Run /TN {TASK_NAME}"

    def _query(self) -> CommandResult:
        return self.run("schtasks", "/Query", "/TN", TASK_NAME, "/FO", "LIST")

    def is_installed(self) -> bool:
        return self.unit_path.is_file() or self._query().ok

    def activate(self, report: ActionReport) -> None:
        create = self.run(
            "schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(self.unit_path), "/F"
        )
        if not create.ok:
            report.warnings.append(f"could not register the task: {create.describe()}")
            report.warnings.append(
                f"register it by hand: schtasks /Create /TN {TASK_NAME} "
                f'/XML "{self.unit_path}" /F'
            )
            return
        self.done(report, f"registered the task {TASK_NAME}: it runs at each logon")
        start = self.run("schtasks", "/Run", "/TN", TASK_NAME)
        if start.ok:
            report.started = True
            self.done(report, f"started the task {TASK_NAME}")
        else:
            report.warnings.append(f"could not start it: {start.describe()}")

    def deactivate(self, report: ActionReport) -> None:
        if not self.is_installed():
            report.notes.append(f"the task {TASK_NAME} is not installed")
            return
        self.run("schtasks", "/End", "/TN", TASK_NAME)
        delete = self.run("schtasks", "/Delete", "/TN", TASK_NAME, "/F")
        if delete.ok:
            self.done(report, f"deleted the task {TASK_NAME}")
        elif self._query().ok:
            report.warnings.append(f"could not delete the task: {delete.describe()}")

    def status(self) -> ServiceStatus:
        out = self._query()
        installed = out.ok or self.unit_path.is_file()
        # schtasks prints its labels in the system language; the word
        # "Running" is matched only as a best effort.
        enabled, running, detail = _queried_state(out, r"\bRunning\b", "registered")
        return self.make_status(
            installed=installed,
            enabled=enabled,
            running=running,
            detail=detail,
            has_unit=self.unit_path.is_file(),
        )

    def program_in_unit(self, data: bytes) -> str | None:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(data)
        except ET.ParseError as err:
            raise ValueError(str(err)) from err
        node = root.find(f"{{{TASK_NS}}}Actions/{{{TASK_NS}}}Exec/{{{TASK_NS}}}Command")
        return node.text.strip() if node is not None and node.text else None


def _file_in_the_way(directory: Path) -> Path | None:
    """Return the nearest existing ancestor of ``directory`` if it is not a dir."""
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def _getuid() -> int:
    getuid: Callable[[], int] | None = getattr(os, "getuid", None)
    return getuid() if getuid is not None else 0


def _windows_user() -> str:
    user = os.environ.get("USERNAME") or ""
    if not user:
        import getpass

        user = getpass.getuser()
    domain = os.environ.get("USERDOMAIN")
    return f"{domain}\\{user}" if domain else user


TEMPLATES: dict[str, str] = {
    "npmguard.service": SYSTEMD_TEMPLATE,
    f"{LABEL}.plist": LAUNCHD_TEMPLATE,
    "npmguard-task.xml": TASK_TEMPLATE,
}


def backend_for_platform(
    platform: str | None = None, runner: Runner | None = None, *, dry_run: bool = False
) -> Backend:
    """Return the service backend for ``platform`` (default: this one)."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return LaunchAgent(runner, dry_run=dry_run)
    if platform in ("win32", "cygwin"):
        return ScheduledTask(runner, dry_run=dry_run)
    if platform.startswith("linux"):
        return SystemdUser(runner, dry_run=dry_run)
    raise ServiceError(
        f"npmguard has no user service for {platform}; run `npmguard daemon` "
        "from your session's startup programs instead"
    )
