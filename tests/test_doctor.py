"""``npmguard doctor``: each check against the real parts it looks at.

The keychain checks run on the private buses (an unlocked and a locked
gnome-keyring, a bus with no keyring), the tray check with and without
Xvfb, the daemon check against a real ``npmguard daemon``. Only the inotify
limits are faked, since the real ones are the machine's and cannot be
lowered for a test, and a hung daemon is a fake socket that never replies.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import realparts

from npmguard.commands import doctor
from npmguard.config import Root, Settings
from tests.npmcli import NPMGUARD, npmguard


def run_doctor(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return npmguard("doctor", *args, cwd=home)


def checks(home: Path) -> dict[str, dict[str, str]]:
    done = run_doctor(home, "--json")
    return {c["name"]: c for c in json.loads(done.stdout)["checks"]}


def write_config(home: Path, text: str) -> Path:
    path = home / ".config" / "npmguard" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------
# keychain and vault


@pytest.mark.usefixtures("keyring_bus")
def test_keychain_unlocked_ok(home: Path) -> None:
    assert checks(home)["keychain"]["status"] == "ok"


@pytest.mark.usefixtures("keyring_bus")
def test_keychain_unlocked_detail(home: Path) -> None:
    assert checks(home)["keychain"]["detail"].startswith("unlocked (keyring.backends")


@pytest.mark.usefixtures("keyring_bus")
def test_vault_keychain_ok(home: Path) -> None:
    assert checks(home)["vault"]["detail"].startswith("the OS keychain")


@pytest.mark.usefixtures("locked_keyring_bus")
def test_keychain_locked_fails(home: Path) -> None:
    assert checks(home)["keychain"]["status"] == "fail"


@pytest.mark.usefixtures("locked_keyring_bus")
def test_keychain_locked_detail(home: Path) -> None:
    assert checks(home)["keychain"]["detail"].startswith("locked")


@pytest.mark.usefixtures("locked_keyring_bus")
def test_keychain_locked_fix_unlock(home: Path) -> None:
    assert checks(home)["keychain"]["fix"].startswith("unlock it")


def test_keychain_locked_stays_locked(
    locked_keyring_bus: realparts.Keychain, home: Path
) -> None:
    # doctor only looks: no unlock prompt, no unlock.
    run_doctor(home)
    assert locked_keyring_bus.is_locked()


@pytest.mark.usefixtures("locked_keyring_bus")
def test_keychain_locked_exit_one(home: Path) -> None:
    assert run_doctor(home).returncode == 1


@pytest.mark.usefixtures("bare_bus")
def test_keychain_bare_bus_warns(home: Path) -> None:
    # "auto" falls back to the file vault, so this is not fatal.
    assert checks(home)["keychain"]["status"] == "warn"


@pytest.mark.usefixtures("bare_bus")
def test_keychain_bare_bus_detail(home: Path) -> None:
    assert "no usable keychain" in checks(home)["keychain"]["detail"]


@pytest.mark.usefixtures("bare_bus")
def test_keychain_bare_bus_fix(home: Path) -> None:
    assert "Secret Service provider" in checks(home)["keychain"]["fix"]


@pytest.mark.usefixtures("bare_bus")
def test_keychain_bare_bus_forced_fails(home: Path) -> None:
    write_config(home, '[vault]\nbackend = "keychain"\n')
    assert checks(home)["keychain"]["status"] == "fail"


@pytest.mark.usefixtures("bare_bus")
def test_vault_bare_bus_file_vault(home: Path) -> None:
    assert "the encrypted file vault" in checks(home)["vault"]["detail"]


@pytest.mark.usefixtures("bare_bus")
def test_vault_bare_bus_not_created(home: Path) -> None:
    assert checks(home)["vault"]["fix"].startswith("npmguard unlock")


def test_keychain_file_vault_not_used(home: Path) -> None:
    write_config(home, '[vault]\nbackend = "file"\n')
    assert checks(home)["keychain"]["detail"].startswith("not used")


def test_vault_file(home: Path) -> None:
    write_config(home, '[vault]\nbackend = "file"\n')
    assert "the encrypted file vault" in checks(home)["vault"]["detail"]


# --------------------------------------------------------------------------
# session bus


@pytest.mark.usefixtures("keyring_bus")
def test_bus_ok(home: Path) -> None:
    assert checks(home)["session bus"]["status"] == "ok"


@pytest.mark.usefixtures("keyring_bus")
def test_bus_sees_secret_service(home: Path) -> None:
    assert "Secret Service: yes" in checks(home)["session bus"]["detail"]


@pytest.mark.usefixtures("bare_bus")
def test_bus_bare_no_secret_service(home: Path) -> None:
    assert "Secret Service: no" in checks(home)["session bus"]["detail"]


def test_bus_absent_warns(home: Path) -> None:
    assert checks(home)["session bus"]["status"] == "warn"


def test_bus_absent_keychain_fails(home: Path) -> None:
    write_config(home, '[vault]\nbackend = "keychain"\n')
    assert checks(home)["session bus"]["status"] == "fail"


def test_bus_absent_fix(home: Path) -> None:
    assert "dbus-run-session" in checks(home)["session bus"]["fix"]


def test_bus_unset_but_listening(
    bare_bus: realparts.Keychain, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bus listens at $XDG_RUNTIME_DIR/bus, but its address is not exported.
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS")
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])
    (runtime / "bus").symlink_to(bare_bus.bus.socket_path)
    fix = checks(home)["session bus"]["fix"]
    assert fix == f"export DBUS_SESSION_BUS_ADDRESS=unix:path={runtime / 'bus'}"


# --------------------------------------------------------------------------
# tray


def test_tray_no_display_warns(home: Path) -> None:
    assert checks(home)["tray"]["status"] == "warn"


def test_tray_no_display_detail(home: Path) -> None:
    assert checks(home)["tray"]["detail"].startswith("no display")


def test_tray_no_display_fix(home: Path) -> None:
    assert "import-environment DISPLAY" in checks(home)["tray"]["fix"]


def test_tray_display_named(display: realparts.VirtualDisplay, home: Path) -> None:
    assert f"DISPLAY={display.display}" in checks(home)["tray"]["detail"]


def test_tray_disabled(home: Path) -> None:
    write_config(home, "[tray]\nenabled = false\n")
    assert checks(home)["tray"] == {
        "name": "tray",
        "status": "ok",
        "detail": "turned off ([tray] enabled = false)",
        "fix": None,
    }


# --------------------------------------------------------------------------
# config


def test_config_missing_ok(home: Path) -> None:
    assert checks(home)["config"]["status"] == "ok"


def test_config_invalid_fails(home: Path) -> None:
    write_config(home, 'log_level = "INFO"\n[watch]\nroots = [\n')
    assert checks(home)["config"]["status"] == "fail"


def test_config_invalid_names_line(home: Path) -> None:
    path = write_config(home, 'log_level = "INFO"\n\nlog_level "x"\n')
    assert checks(home)["config"]["detail"].startswith(f"{path}:3: invalid TOML")


def test_config_invalid_exit_one(home: Path) -> None:
    write_config(home, "[policy\n")
    assert run_doctor(home).returncode == 1


def test_config_invalid_one_line(home: Path) -> None:
    path = write_config(home, 'log_level = "INFO"\n\nlog_level "x"\n')
    lines = run_doctor(home).stdout.splitlines()
    config_lines = [ln for ln in lines if "config.toml" in ln]
    assert config_lines == [
        f"FAIL  config       {path}:3: invalid TOML: Expected '=' after a key "
        "in a key/value pair"
    ]


def test_config_invalid_setting(home: Path) -> None:
    write_config(home, '[policy]\nuser = "sometimes"\n')
    assert "policy.user must be one of" in checks(home)["config"]["detail"]


def test_config_hides_canary(home: Path, canary: str) -> None:
    write_config(home, f"token = {canary}\n")
    done = run_doctor(home, "--json")
    assert canary not in done.stdout + done.stderr


# --------------------------------------------------------------------------
# inotify


def test_inotify_counts_dirs(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    for sub in ("a", "b/c", "node_modules/x", ".git/objects"):
        (root / sub).mkdir(parents=True)
    write_config(home, f'[watch]\nroots = ["{root}"]\n')
    # src, a, b, b/c, plus the two npm config dirs.
    assert checks(home)["inotify"]["detail"].startswith("6 dirs to watch")


def test_inotify_ok(home: Path) -> None:
    assert checks(home)["inotify"]["status"] == "ok"


def fake_limits(
    watches: int, instances: int, used_instances: int = 0
) -> Callable[[], doctor.InotifyUse]:
    """A fake reading of the inotify limits: the real ones are the machine's."""
    return lambda: doctor.InotifyUse(watches, instances, 0, used_instances)


def few_watches_check(tmp_path: Path) -> doctor.Check:
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    settings = Settings(roots=(Root(tmp_path, "ask"),))
    return doctor.check_inotify(settings, fake_limits(4, 128))


def test_inotify_fake_few_watches_warns(tmp_path: Path) -> None:
    assert few_watches_check(tmp_path).status == "warn"


def test_inotify_fake_few_watches_fix(tmp_path: Path) -> None:
    fix = few_watches_check(tmp_path).fix or ""
    assert "fs.inotify.max_user_watches=65536" in fix


def test_inotify_fake_no_instances_warns() -> None:
    check = doctor.check_inotify(Settings(), fake_limits(8192, 128, 128))
    assert check.status == "warn"


def test_inotify_fake_no_instances_fix() -> None:
    check = doctor.check_inotify(Settings(), fake_limits(8192, 128, 128))
    assert "fs.inotify.max_user_instances=256" in (check.fix or "")


def test_inotify_real_limits() -> None:
    use = doctor.read_inotify_use()
    assert use is not None
    assert use.max_watches > 0


# --------------------------------------------------------------------------
# service


def test_service_not_installed(home: Path) -> None:
    assert checks(home)["service"]["fix"] == "npmguard service install"


def test_service_installed_not_started(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    assert "installed" in checks(home)["service"]["detail"]


def test_service_stale_program_fails(home: Path, tmp_path: Path) -> None:
    from npmguard.service import SystemdUser

    program = tmp_path / "old" / "python"
    program.parent.mkdir()
    program.symlink_to(os.path.realpath(NPMGUARD[0]))
    SystemdUser().install([str(program), "-m", "npmguard"])
    program.unlink()
    assert checks(home)["service"]["status"] == "fail"


# --------------------------------------------------------------------------
# daemon


def socket_path() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "npmguard" / "daemon.sock"


@pytest.fixture
def running_daemon(home: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from npmguard.daemon.client import DaemonUnavailable, request

    with open(tmp_path / "daemon.out", "wb") as out:
        popen = subprocess.Popen(
            [*NPMGUARD, "daemon", "--no-tray"],
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and popen.poll() is None:
            try:
                if request({"op": "status"}, path=str(socket_path()), timeout=2)["ok"]:
                    break
            except DaemonUnavailable:
                time.sleep(0.05)
        else:
            output = (tmp_path / "daemon.out").read_text()
            pytest.fail(f"the daemon did not start: {output}")
        yield popen
    finally:
        # Popen signals this exact child, and nothing once it is reaped.
        popen.terminate()
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


@pytest.fixture
def hung_daemon_fake() -> Iterator[socket.socket]:
    """A fake daemon that accepts connections and never replies."""
    path = socket_path()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    try:
        yield listener
    finally:
        listener.close()


def test_daemon_not_running(home: Path) -> None:
    assert checks(home)["daemon"]["detail"].startswith("not running")


def test_daemon_not_running_warns(home: Path) -> None:
    assert checks(home)["daemon"]["status"] == "warn"


@pytest.mark.usefixtures("keyring_bus")
def test_daemon_answers(
    running_daemon: subprocess.Popen[bytes], home: Path
) -> None:
    assert f"(pid {running_daemon.pid}," in checks(home)["daemon"]["detail"]


@pytest.mark.usefixtures("hung_daemon_fake")
def test_daemon_fake_hung(home: Path) -> None:
    # One run: each waits out the client timeouts.
    found = checks(home)
    assert found["daemon"]["status"] == "fail"
    assert found["vault"]["fix"] == "see the daemon check"


# --------------------------------------------------------------------------
# Overall


@pytest.mark.usefixtures("keyring_bus")
def test_exit_zero_with_warnings(home: Path) -> None:
    done = run_doctor(home)
    assert done.returncode == 0, done.stdout


@pytest.mark.usefixtures("keyring_bus")
def test_strict_exit_one(home: Path) -> None:
    assert run_doctor(home, "--strict").returncode == 1


@pytest.mark.usefixtures("keyring_bus")
def test_json_summary(home: Path) -> None:
    report = json.loads(run_doctor(home, "--json").stdout)
    assert report["ok"] is True


def test_text_fix_lines(home: Path) -> None:
    lines = run_doctor(home).stdout.splitlines()
    assert any(ln.strip().startswith("fix: npmguard service install") for ln in lines)


def test_platform_macos_skips_linux_checks(home: Path) -> None:
    names = {c.name for c in doctor.run_checks("darwin")}
    assert names.isdisjoint({"session bus", "tray", "inotify"})


def test_vault_damaged_file(home: Path) -> None:
    write_config(home, '[vault]\nbackend = "file"\n')
    vault = Path(os.environ["XDG_DATA_HOME"]) / "npmguard" / "vault.bin"
    vault.parent.mkdir(parents=True, exist_ok=True)
    vault.write_bytes(b"not a vault\n")
    assert checks(home)["vault"]["fix"].startswith("check the file's owner and mode")
