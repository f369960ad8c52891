"""``npmguard doctor [--json] [--strict]``: check what works and what to fix.

Each check ends as ``ok``, ``warn`` or ``fail``. A warning means that
npmguard works with less: no tray icon, polling instead of inotify, no
service. A failure means that something it needs is broken: an invalid
config file, a locked or missing keychain, a daemon that does not reply.
Every warning and failure comes with a fix. Exit
status: 1 when a check failed (with ``--strict``, also when one warned),
else 0.

Nothing here reads a credential: the keychain is probed through
``npmguard.vault.probe``, which only asks whether it is there and locked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from npmguard.commands.common import display_path
from npmguard.config import ConfigError, Settings, config_path, load_settings

OK, WARN, FAIL = "ok", "warn", "fail"
SKIP_DIRS = frozenset({"node_modules", ".git"})
# The watcher puts one inotify watch on each directory it watches.
INOTIFY_DIR = Path("/proc/sys/fs/inotify")
SUBPROCESS_TIMEOUT = 10.0
DAEMON_TIMEOUT = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 on warnings too"
    )


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    failed = any(c.status == FAIL for c in checks)
    warned = any(c.status == WARN for c in checks)
    if args.json:
        print(json.dumps(to_json(checks), indent=2))
    else:
        print(render_text(checks))
    return 1 if failed or (args.strict and warned) else 0


def run_checks(platform: str | None = None) -> list[Check]:
    """Run every check that applies to ``platform`` (default: this one).

    This is doctor's one dispatch on the platform. The session bus, the
    display and inotify are checked on Linux only, because macOS and Windows
    have one keychain, one desktop and no watch limit worth checking.
    """
    platform = sys.platform if platform is None else platform
    linux = platform.startswith("linux")
    config, settings = check_config()
    vault = describe_vault(settings)
    checks = [config, check_keychain(settings, vault), check_vault(vault)]
    if linux:
        checks.append(check_session_bus(settings))
        checks.append(check_display(settings))
        checks.append(check_inotify(settings))
    checks.append(check_service())
    checks.append(check_daemon())
    return checks


# --------------------------------------------------------------------------
# Output


def to_json(checks: list[Check]) -> dict[str, object]:
    counts = {s: sum(1 for c in checks if c.status == s) for s in (OK, WARN, FAIL)}
    return {
        "version": 1,
        "ok": counts[FAIL] == 0,
        "checks": [asdict(c) for c in checks],
        "summary": counts,
    }


def render_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        label = {OK: "ok", WARN: "warn", FAIL: "FAIL"}[check.status]
        lines.append(f"{label:<5} {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    fails = sum(1 for c in checks if c.status == FAIL)
    warns = sum(1 for c in checks if c.status == WARN)
    if fails:
        lines.append(f"{fails} to fix, {warns} warning(s)")
    elif warns:
        lines.append(f"all needed parts work; {warns} warning(s)")
    else:
        lines.append("all good")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------
# config and vault


def check_config() -> tuple[Check, Settings]:
    """Load the settings; on an error the other checks use the defaults."""
    path = config_path()
    try:
        settings = load_settings(path)
    except ConfigError as err:
        return (
            Check(
                "config",
                FAIL,
                _one_line(str(_with_line(err))),
                "correct that line, or move the file away to run with the "
                "defaults; the daemon does not start with an invalid file",
            ),
            Settings(),
        )
    if settings.path is None:
        detail = f"no config file at {display_path(path)}; using the defaults"
    else:
        detail = display_path(path)
    return Check("config", OK, detail), settings


def _with_line(err: ConfigError) -> ConfigError:
    """Add the line number of a TOML syntax error when the error lacks it.

    tomllib gives the line as an attribute only from Python 3.14; before
    that it is only in the message, which ``load_settings`` cuts off.
    """
    if err.line is not None or err.path is None:
        return err
    found = re.search(r"\(at line (\d+), column \d+\)", str(err.__cause__ or ""))
    if not found:
        return err
    message = Exception.__str__(err)
    return ConfigError(message, path=err.path, line=int(found[1]))


def describe_vault(settings: Settings) -> dict[str, Any]:
    """Return which store the commands use, and its state (``npmguard.vault``)."""
    from npmguard.vault import describe_vault as describe

    return describe(settings)


def check_keychain(settings: Settings, vault: dict[str, Any]) -> Check:
    if settings.vault_backend == "file":
        return Check("keychain", OK, 'not used: [vault] backend = "file"')
    from npmguard.vault.probe import probe_keychain

    probe = probe_keychain()
    backend = probe.backend or "none"
    # With [vault] backend = "auto", a missing keychain only means that the
    # file vault is used instead.
    in_use = vault.get("backend") != "file"
    if not probe.available:
        detail = f"no usable keychain ({backend}): {probe.error}"
        if not in_use:
            detail += "; npmguard uses the encrypted file vault instead"
        return Check(
            "keychain",
            FAIL if in_use else WARN,
            _one_line(detail),
            "run a Secret Service provider such as gnome-keyring or KeePassXC "
            "in your desktop session (its D-Bus session bus), or set "
            '[vault] backend = "file" in the config file',
        )
    if probe.locked:
        return Check(
            "keychain",
            FAIL if in_use else WARN,
            f"locked ({backend})",
            "unlock it: log in to the desktop session, or unlock the login "
            "keyring in your keyring manager (Passwords and Keys, KWallet); "
            "on a headless machine, `gnome-keyring-daemon --unlock` reads "
            "the password from stdin",
        )
    state = "unlocked" if probe.locked is False else "lock state unknown"
    extra = f"; {probe.detail}" if probe.detail else ""
    return Check("keychain", OK, _one_line(f"{state} ({backend}){extra}"))


def check_vault(vault: dict[str, Any]) -> Check:
    setting = f'[vault] backend = "{vault.get("configured") or "auto"}"'
    if vault.get("backend") is None:
        return Check(
            "vault", FAIL, _one_line(f"cannot tell: {vault.get('error')}"),
            "see the config check",
        )
    if vault["backend"] == "keychain":
        if vault.get("unlocked") is False or vault.get("error"):
            return Check(
                "vault", FAIL, f"the OS keychain ({setting}), which is not usable",
                "see the keychain check",
            )
        return Check("vault", OK, f"the OS keychain ({setting})")

    path = display_path(Path(vault.get("path") or "?"))
    why = "" if vault.get("configured") == "file" else f"; {vault.get('reason')}"
    where = f"the encrypted file vault {path} ({setting}{why})"
    if vault.get("error"):
        # No KDF means the file's header could not be read; otherwise the
        # error came from asking the daemon about it.
        unreadable = vault.get("exists") and vault.get("kdf") is None
        fix = (
            "check the file's owner and mode; if it is damaged, restore it from "
            "a backup, or move it away and run `npmguard unlock` to make a new "
            "one (the credentials in it are lost)"
            if unreadable
            else "see the daemon check"
        )
        return Check("vault", FAIL, _one_line(f"{where}: {vault['error']}"), fix)

    if not vault.get("exists"):
        return Check(
            "vault", WARN, _one_line(f"{where}, not created yet"),
            "npmguard unlock (with the daemon running) creates it",
        )
    if vault.get("unlocked"):
        unlocked_in = vault.get("unlocked_in") or "the daemon"
        return Check("vault", OK, _one_line(f"{where}, unlocked in {unlocked_in}"))
    daemon = vault.get("daemon")
    if daemon == "no vault support":
        return Check(
            "vault", FAIL, _one_line(f"{where}, locked; {vault.get('detail')}"),
            "restart the daemon with this npmguard version",
        )
    return Check(
        "vault", FAIL, _one_line(f"{where}, locked (daemon {daemon})"),
        "npmguard unlock (start the daemon first with `npmguard daemon` or "
        "`npmguard service install`)",
    )


# --------------------------------------------------------------------------
# Session bus, display, inotify (Linux)


def check_session_bus(settings: Settings) -> Check:
    # Only a forced keychain cannot do without the bus; "auto" falls back to
    # the file vault.
    needed = FAIL if settings.vault_backend == "keychain" else WARN
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not address:
        if runtime and Path(runtime, "bus").exists():
            socket = Path(runtime, "bus")
            return Check(
                "session bus",
                needed,
                f"DBUS_SESSION_BUS_ADDRESS is unset, though a bus listens at "
                f"{socket}; the keychain library does not look there",
                f"export DBUS_SESSION_BUS_ADDRESS=unix:path={socket}",
            )
        return Check(
            "session bus",
            needed,
            "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset); the "
            "keychain and desktop notifications need one",
            "use npmguard from a desktop session, or start a bus for this "
            "shell with `dbus-run-session -- $SHELL`",
        )
    try:
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection
    except ImportError as err:
        return Check("session bus", WARN, f"cannot check: {err}", "pip install jeepney")
    try:
        conn = open_dbus_connection(bus="SESSION", auth_timeout=DAEMON_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - refused, bad address, auth
        return Check(
            "session bus",
            needed,
            _one_line(f"cannot connect to {address}: {type(err).__name__}: {err}"),
            "DBUS_SESSION_BUS_ADDRESS points at a bus that is gone; log in "
            "again, or unset it and start a new one with `dbus-run-session`",
        )
    try:
        services = {}
        activatable = conn.send_and_get_reply(
            message_bus.ListActivatableNames(), timeout=DAEMON_TIMEOUT
        ).body[0]
        for name, label in (
            ("org.freedesktop.secrets", "Secret Service"),
            ("org.freedesktop.Notifications", "notifications"),
        ):
            owned = conn.send_and_get_reply(
                message_bus.NameHasOwner(name), timeout=DAEMON_TIMEOUT
            ).body[0]
            services[label] = "yes" if owned or name in activatable else "no"
    except Exception as err:  # noqa: BLE001 - a bus that stops answering
        return Check(
            "session bus",
            needed,
            _one_line(f"the bus at {address} does not answer: {err}"),
            "log in again, or start a new bus with `dbus-run-session`",
        )
    finally:
        conn.close()
    found = ", ".join(f"{k}: {v}" for k, v in services.items())
    return Check("session bus", OK, f"{address} ({found})")


def check_display(settings: Settings) -> Check:
    if not settings.tray_enabled:
        return Check("tray", OK, "turned off ([tray] enabled = false)")
    shown = [
        f"{name}={os.environ[name]}"
        for name in ("DISPLAY", "WAYLAND_DISPLAY")
        if os.environ.get(name)
    ]
    if not shown:
        return Check(
            "tray",
            WARN,
            "no display (DISPLAY and WAYLAND_DISPLAY are unset); the daemon "
            "runs without a tray icon",
            "to get the icon, run the daemon in a desktop session; a desktop "
            "must hand its display to systemd user services with "
            "`systemctl --user import-environment DISPLAY WAYLAND_DISPLAY` "
            "(GNOME and KDE do)",
        )
    where = " ".join(shown)
    backend, error = pystray_backend()
    if error is not None:
        fix = (
            "pip install pystray pillow into npmguard's environment"
            if "No module named" in error
            else "pystray cannot reach the display; check that it accepts "
            "clients (xhost, XAUTHORITY)"
        )
        return Check("tray", WARN, _one_line(f"{where}; pystray: {error}"), fix)
    if backend == "xorg":
        return Check(
            "tray",
            WARN,
            f"{where}; pystray uses its xorg backend: icon only, no menu",
            "install PyGObject (python3-gi) where npmguard runs, so that "
            "pystray uses the appindicator or gtk backend, which has the menu",
        )
    return Check("tray", OK, f"{where}; pystray backend {backend}")


def pystray_backend() -> tuple[str | None, str | None]:
    """Import pystray in a child process: return (backend, None) or (None, error).

    A child, because pystray connects to the display while it is imported
    and can hang there; doctor's own process stays clean either way.
    """
    code = (
        "import pystray, sys; "
        "sys.stdout.write(pystray.Icon.__module__.rsplit('.', 1)[-1].lstrip('_'))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"importing pystray took over {SUBPROCESS_TIMEOUT:.0f} s"
    if done.returncode == 0:
        return done.stdout.strip(), None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return None, lines[-1].strip() if lines else f"exit status {done.returncode}"


@dataclass(frozen=True)
class InotifyUse:
    max_watches: int
    max_instances: int
    used_watches: int
    used_instances: int


def read_inotify_use() -> InotifyUse | None:
    """Return the per-user limits and this user's use of them, or None."""
    try:
        max_watches = int((INOTIFY_DIR / "max_user_watches").read_text())
        max_instances = int((INOTIFY_DIR / "max_user_instances").read_text())
    except (OSError, ValueError):
        return None
    watches, instances = _inotify_in_use()
    return InotifyUse(max_watches, max_instances, watches, instances)


def _inotify_in_use() -> tuple[int, int]:
    # The limits count per user, so only this user's processes matter; other
    # users' /proc entries are unreadable anyway.
    uid = os.getuid()
    watches = instances = 0
    try:
        pids = [entry for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return 0, 0
    for pid in pids:
        try:
            if pid.stat().st_uid != uid:
                continue
            fds = os.scandir(f"/proc/{pid.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) != "anon_inode:inotify":
                        continue
                    with open(f"/proc/{pid.name}/fdinfo/{fd.name}") as info:
                        watches += sum(1 for ln in info if ln.startswith("inotify wd:"))
                except OSError:
                    continue
                instances += 1
    return watches, instances


def count_dirs(roots: Iterable[Path], limit: int) -> int:
    """Count the directories the watcher would watch under ``roots``, to ``limit``."""
    count = 0
    stack = [r for r in roots if r.is_dir()]
    while stack and count <= limit:
        top = stack.pop()
        count += 1
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    if entry.name in SKIP_DIRS:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                    except OSError:
                        continue
        except OSError:
            continue
    return count


def check_inotify(
    settings: Settings, use: Callable[[], InotifyUse | None] = read_inotify_use
) -> Check:
    found = use()
    if found is None:
        return Check("inotify", WARN, "cannot read the inotify limits in /proc",
                     "none needed if the watcher starts; it polls otherwise")
    # Two more for the directories of the user and global npm config files.
    needed = count_dirs((r.path for r in settings.roots), found.max_watches) + 2
    free_watches = found.max_watches - found.used_watches
    free_instances = found.max_instances - found.used_instances
    detail = (
        f"{needed} dirs to watch; {found.used_watches} of {found.max_watches} "
        f"watches and {found.used_instances} of {found.max_instances} "
        "instances in use"
    )
    if needed > free_watches:
        want = _round_up(found.used_watches + needed * 2)
        return Check(
            "inotify",
            WARN,
            f"{detail}: too few watches, so the watcher polls instead",
            f"raise the limit: echo fs.inotify.max_user_watches={want} | sudo "
            "tee /etc/sysctl.d/60-npmguard-inotify.conf && sudo sysctl --system",
        )
    if free_instances < 1:
        want = max(256, found.max_instances * 2)
        return Check(
            "inotify",
            WARN,
            f"{detail}: no inotify instance left, so the watcher polls instead",
            f"raise the limit: echo fs.inotify.max_user_instances={want} | sudo "
            "tee /etc/sysctl.d/60-npmguard-inotify.conf && sudo sysctl --system",
        )
    return Check("inotify", OK, detail)


def _round_up(value: int) -> int:
    step = 65536
    return max(step, -(-value // step) * step)


# --------------------------------------------------------------------------
# Service and daemon


def check_service() -> Check:
    from npmguard.service import ServiceError, backend_for_platform

    try:
        status = backend_for_platform().status()
    except ServiceError as err:
        return Check("service", WARN, str(err), "run `npmguard daemon` at login")
    where = f"{status.manager}, {display_path(status.unit_path)}"
    if not status.installed:
        return Check("service", WARN, f"not installed ({status.manager})",
                     "npmguard service install")
    if status.problem:
        return Check("service", FAIL, status.problem, "npmguard service install")
    if status.running:
        return Check("service", OK, f"installed and running ({where})")
    if status.running is None:
        return Check(
            "service",
            WARN,
            _one_line(f"installed ({where}); cannot tell whether it runs: "
                      f"{status.detail}"),
            f"start it in a session that has the service manager: "
            f"{status.start_hint}; or run `npmguard daemon`",
        )
    return Check(
        "service",
        WARN,
        _one_line(f"installed but not running ({where}): {status.detail}"),
        status.start_hint,
    )


def check_daemon() -> Check:
    try:
        from npmguard.daemon import client, protocol
    except ImportError as err:
        return Check("daemon", WARN, f"cannot check: {err}", None)
    path = protocol.socket_path()
    shown = display_path(Path(path))
    try:
        reply = client.request({"op": "status"}, path=path, timeout=DAEMON_TIMEOUT)
    except client.DaemonUnavailable as err:
        if err.quiet:
            return Check(
                "daemon",
                WARN,
                f"not running (nothing listens at {shown}); commands read "
                "the vault themselves",
                "npmguard service install, or run `npmguard daemon`",
            )
        return Check(
            "daemon",
            FAIL,
            _one_line(f"does not answer at {shown}: {err}"),
            "restart it (systemctl --user restart npmguard.service, or stop "
            "its process and run `npmguard daemon`)",
        )
    if not reply.get("ok"):
        return Check(
            "daemon",
            FAIL,
            _one_line(f"answers at {shown} with an error: {client.reply_error(reply)}"),
            "see the daemon's log (npmguard.log in the state directory)",
        )
    pid = reply.get("pid", "?")
    state = reply.get("status", "?")
    return Check("daemon", OK, f"answers at {shown} (pid {pid}, status {state})")
