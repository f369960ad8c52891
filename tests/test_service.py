"""``npmguard service``: the unit files and their install on this machine.

On Linux the real ``systemctl`` runs against the test's own HOME and
XDG_RUNTIME_DIR, where no systemd user manager listens, as in a container:
install must write and enable the unit, say that it could not start it, and
exit 0. ``systemd-analyze verify`` checks the written unit offline. The
launchd and Task Scheduler backends run here with fake ``launchctl`` and
``schtasks`` runners, since those OSes are absent; their files are checked
with plistlib and ElementTree.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import pytest

from npmguard import service
from npmguard.service import (
    CommandResult,
    LaunchAgent,
    ScheduledTask,
    SystemdUser,
    systemd_quote,
)
from tests.npmcli import npmguard

REPO = Path(__file__).resolve().parent.parent
NS = {"t": service.TASK_NS}
PYTHON_M = [sys.executable, "-m", "npmguard"]

needs_systemctl = pytest.mark.skipif(
    shutil.which("systemctl") is None, reason="systemctl is not installed"
)
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_path(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / "npmguard.service"


def exec_start(path: Path) -> str:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1
    return lines[0]


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of a user unit; it needs XDG_RUNTIME_DIR."""
    return subprocess.run(
        ["systemd-analyze", "verify", "--user", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --------------------------------------------------------------------------
# The templates


@pytest.mark.parametrize("name", sorted(service.TEMPLATES))
def test_templates_match_files(name: str) -> None:
    assert (REPO / "service" / name).read_text() == service.TEMPLATES[name]


def test_quote_plain() -> None:
    assert systemd_quote("/usr/bin/python3") == "/usr/bin/python3"


def test_quote_space() -> None:
    assert systemd_quote("/a b/python") == '"/a b/python"'


def test_quote_percent() -> None:
    assert systemd_quote("/a%b") == "/a%%b"


def test_quote_dollar_argument() -> None:
    assert systemd_quote("a$b") == '"a$$b"'


def test_quote_dollar_program() -> None:
    assert systemd_quote("/a$b", program=True) == '"/a$b"'


def test_quote_newline_refused() -> None:
    with pytest.raises(service.ServiceError):
        systemd_quote("/a\nb")


# --------------------------------------------------------------------------
# systemd: install through the CLI on this machine


@needs_systemctl
def test_install_exit_zero(home: Path) -> None:
    done = npmguard("service", "install", cwd=home)
    assert done.returncode == 0, done.stderr


@needs_systemctl
def test_install_writes_unit(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    assert unit_path(home).is_file()


@needs_systemctl
def test_install_unit_mode(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    assert stat.S_IMODE(unit_path(home).stat().st_mode) == 0o644


@needs_systemctl
def test_install_execstart(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    expected = f"ExecStart={sys.executable} -m npmguard daemon"
    assert exec_start(unit_path(home)) == expected


@needs_systemctl
def test_install_console_script(home: Path) -> None:
    script = Path(sys.executable).parent / "npmguard"
    if not script.is_file():
        pytest.skip("the npmguard console script is not installed next to python")
    subprocess.run(
        [str(script), "service", "install"], cwd=home, capture_output=True, timeout=60
    )
    assert exec_start(unit_path(home)) == f"ExecStart={script} daemon"


@needs_systemctl
def test_install_says_systemd_absent(home: Path) -> None:
    done = npmguard("service", "install", cwd=home)
    assert "systemd is not running for this user" in done.stderr


@needs_systemctl
def test_install_says_what_to_run(home: Path) -> None:
    done = npmguard("service", "install", cwd=home)
    assert "`npmguard daemon`" in done.stderr


@needs_systemctl
def test_install_enables_offline(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    link = unit_path(home).parent / "default.target.wants" / "npmguard.service"
    assert link.resolve() == unit_path(home)


@needs_systemctl
def test_install_twice_unchanged(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    first = unit_path(home).read_bytes()
    done = npmguard("service", "install", cwd=home)
    assert done.returncode == 0
    assert unit_path(home).read_bytes() == first


@needs_systemctl
def test_install_twice_says_up_to_date(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    done = npmguard("service", "install", cwd=home)
    assert "is up to date" in done.stdout


def test_install_dry_run_writes_nothing(home: Path) -> None:
    npmguard("service", "install", "--dry-run", cwd=home)
    assert not unit_path(home).parent.exists()


def test_install_dry_run_shows_unit(home: Path) -> None:
    done = npmguard("service", "install", "--dry-run", cwd=home)
    assert f"ExecStart={sys.executable} -m npmguard daemon" in done.stdout


def test_install_dry_run_lists_commands(home: Path) -> None:
    done = npmguard("service", "install", "--dry-run", cwd=home)
    assert "would run: systemctl --user enable npmguard.service" in done.stdout


def test_install_without_systemctl(home: Path, tmp_path: Path) -> None:
    # A PATH with no systemctl on it, as on a system without systemd.
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))
    done = npmguard("service", "install", cwd=home, env=env)
    assert "systemctl was not found" in done.stderr


def test_install_without_systemctl_writes(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))
    done = npmguard("service", "install", cwd=home, env=env)
    assert done.returncode == 0
    assert unit_path(home).is_file()


def test_install_unwritable_exit(home: Path) -> None:
    # A file where the systemd directory should be: writing must fail.
    (home / ".config" / "systemd").write_text("not a directory\n")
    done = npmguard("service", "install", cwd=home)
    assert done.returncode == 2


def test_install_unwritable_one_line(home: Path) -> None:
    (home / ".config" / "systemd").write_text("not a directory\n")
    done = npmguard("service", "install", cwd=home)
    blocker = home / ".config" / "systemd"
    assert done.stderr.strip().splitlines() == [
        f"npmguard: {unit_path(home)}: cannot write the service unit: "
        f"{blocker} is a file, not a directory"
    ]


@needs_systemctl
@needs_analyze
def test_unit_verifies(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    done = verify(unit_path(home))
    assert done.returncode == 0
    assert done.stderr == ""


@needs_analyze
def test_unit_verify_odd_path(home: Path, tmp_path: Path) -> None:
    # Spaces, % and $ in the program's path must survive systemd's parser.
    odd = tmp_path / "dir with space %h $HOME"
    odd.mkdir()
    (odd / "py").symlink_to(sys.executable)
    SystemdUser().install([str(odd / "py"), "-m", "npmguard"])
    done = verify(unit_path(home))
    assert done.returncode == 0
    assert done.stderr == ""


@needs_analyze
def test_unit_verify_catches_missing_program(home: Path, tmp_path: Path) -> None:
    # The check is not vacuous: a unit that runs a missing program fails it.
    SystemdUser().install([str(tmp_path / "gone" / "python"), "-m", "npmguard"])
    assert verify(unit_path(home)).returncode != 0


@needs_analyze
def test_unit_verify_catches_unknown_key(tmp_path: Path) -> None:
    unit = tmp_path / "npmguard.service"
    text = service.SYSTEMD_TEMPLATE.replace("@NPMGUARD@", sys.executable)
    unit.write_text(text.replace("Restart=on-failure", "Restart=on-failure\nBogus=1"))
    assert "Unknown key" in verify(unit).stderr


def test_unit_hardening_user_safe() -> None:
    # Settings that need a user namespace in a user unit must stay out.
    keys = {
        line.split("=", 1)[0]
        for line in service.SYSTEMD_TEMPLATE.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert not keys & {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateUsers"}


# --------------------------------------------------------------------------
# systemd: uninstall and status


@needs_systemctl
def test_uninstall_removes_unit(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    npmguard("service", "uninstall", cwd=home)
    assert not unit_path(home).exists()


@needs_systemctl
def test_uninstall_removes_link(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    npmguard("service", "uninstall", cwd=home)
    link = unit_path(home).parent / "default.target.wants" / "npmguard.service"
    assert not link.is_symlink()


def test_uninstall_not_installed(home: Path) -> None:
    done = npmguard("service", "uninstall", cwd=home)
    assert done.returncode == 0
    assert "not installed" in done.stdout


@needs_systemctl
def test_uninstall_dry_run_keeps_unit(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    npmguard("service", "uninstall", "--dry-run", cwd=home)
    assert unit_path(home).is_file()


@needs_systemctl
def test_uninstall_dry_run_lists_reload(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    done = npmguard("service", "uninstall", "--dry-run", cwd=home)
    assert done.stdout.splitlines()[-1] == "would run: systemctl --user daemon-reload"


def test_status_not_installed(home: Path) -> None:
    assert npmguard("service", "status", cwd=home).returncode == 4


@needs_systemctl
def test_status_installed_unknown(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    assert npmguard("service", "status", cwd=home).returncode == 3


@needs_systemctl
def test_status_json_running_unknown(home: Path) -> None:
    import json

    npmguard("service", "install", cwd=home)
    done = npmguard("service", "status", "--json", cwd=home)
    assert json.loads(done.stdout)["running"] is None


@needs_systemctl
def test_status_enabled(home: Path) -> None:
    npmguard("service", "install", cwd=home)
    assert SystemdUser().status().enabled is True


def test_status_stale_program(home: Path, tmp_path: Path) -> None:
    program = tmp_path / "old-venv" / "python"
    program.parent.mkdir()
    program.symlink_to(sys.executable)
    SystemdUser().install([str(program), "-m", "npmguard"])
    program.unlink()
    assert "no longer exists" in (SystemdUser().status().problem or "")


# --------------------------------------------------------------------------
# Fault injection: a service manager that fails


class FakeRunner:
    """A fake service manager command runner: records argv, scripted results.

    ``fail`` maps a word of the command (such as ``start``) to the exit
    status and output to return for it; everything else succeeds.
    """

    def __init__(
        self, fail: dict[str, tuple[int, str]] | None = None, output: str = ""
    ) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail or {}
        self.output = output

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        args = tuple(argv)
        self.calls.append(args)
        for word, (code, text) in self.fail.items():
            if word in args:
                return CommandResult(args, code, text)
        return CommandResult(args, 0, self.output)

    def ran(self, *words: str) -> bool:
        return any(all(w in call for w in words) for call in self.calls)


def test_fake_systemd_start_failure_warns(home: Path) -> None:
    runner = FakeRunner(fail={"restart": (1, "Job failed. See journalctl.")})
    report = SystemdUser(runner).install(PYTHON_M)
    assert any("journalctl --user -u npmguard.service" in w for w in report.warnings)


def test_fake_systemd_start_failure_not_started(home: Path) -> None:
    runner = FakeRunner(fail={"restart": (1, "Job failed.")})
    assert SystemdUser(runner).install(PYTHON_M).started is False


def test_fake_systemd_started(home: Path) -> None:
    assert SystemdUser(FakeRunner()).install(PYTHON_M).started is True


def test_fake_systemd_restart_when_changed(home: Path) -> None:
    runner = FakeRunner()
    SystemdUser(runner).install(PYTHON_M)
    assert runner.ran("restart", "npmguard.service")


def test_fake_systemd_start_when_unchanged(home: Path) -> None:
    SystemdUser(FakeRunner()).install(PYTHON_M)
    runner = FakeRunner()
    SystemdUser(runner).install(PYTHON_M)
    assert runner.ran("start", "npmguard.service")


def test_fake_systemd_status_running(home: Path) -> None:
    SystemdUser(FakeRunner()).install(PYTHON_M)
    assert SystemdUser(FakeRunner(output="active\n")).status().running is True


# --------------------------------------------------------------------------
# launchd (macOS is absent: fake launchctl)


def launch_agent(home: Path, runner: FakeRunner | None = None) -> LaunchAgent:
    return LaunchAgent(
        runner or FakeRunner(), home=home, uid=501, path_env="/usr/bin:/opt/a&b"
    )


def rendered_plist(home: Path, command: list[str] | None = None) -> dict[str, object]:
    data = launch_agent(home).render(command or ["/Users/me/.local/bin/npmguard"])
    return plistlib.loads(data)


def test_plist_label(home: Path) -> None:
    assert rendered_plist(home)["Label"] == "com.npmguard.daemon"


def test_plist_program(home: Path) -> None:
    plist = rendered_plist(home, ["/a b/python", "-m", "npmguard"])
    assert plist["ProgramArguments"] == ["/a b/python", "-m", "npmguard", "daemon"]


def test_plist_run_at_load(home: Path) -> None:
    assert rendered_plist(home)["RunAtLoad"] is True


def test_plist_keep_alive(home: Path) -> None:
    assert rendered_plist(home)["KeepAlive"] == {"SuccessfulExit": False}


@pytest.mark.parametrize("key", ["StandardOutPath", "StandardErrorPath"])
def test_plist_logs(home: Path, key: str) -> None:
    log_dir = home / "Library" / "Logs" / "npmguard"
    assert Path(str(rendered_plist(home)[key])).parent == log_dir


def test_plist_path_escaped(home: Path) -> None:
    env = rendered_plist(home)["EnvironmentVariables"]
    assert env == {"PATH": "/usr/bin:/opt/a&b"}


def test_plist_no_placeholder(home: Path) -> None:
    assert b"@" not in launch_agent(home).render(["/usr/local/bin/npmguard"])


def test_fake_launchctl_install_writes(home: Path) -> None:
    runner = FakeRunner(fail={"print": (113, "Could not find service")})
    launch_agent(home, runner).install(["/usr/local/bin/npmguard"])
    path = home / "Library" / "LaunchAgents" / "com.npmguard.daemon.plist"
    assert plistlib.loads(path.read_bytes())["Label"] == "com.npmguard.daemon"


def test_fake_launchctl_install_bootstraps(home: Path) -> None:
    runner = FakeRunner(fail={"print": (113, "Could not find service")})
    launch_agent(home, runner).install(["/usr/local/bin/npmguard"])
    assert runner.ran("launchctl", "bootstrap", "gui/501")


def test_fake_launchctl_bootstrap_failure(home: Path) -> None:
    runner = FakeRunner(
        fail={
            "print": (113, "Could not find service"),
            "bootstrap": (5, "Bootstrap failed: 5: Input/output error"),
        }
    )
    report = launch_agent(home, runner).install(["/usr/local/bin/npmguard"])
    assert any("Bootstrap failed" in w for w in report.warnings)


def test_fake_launchctl_status_running(home: Path) -> None:
    launch_agent(home).install(["/usr/local/bin/npmguard"])
    runner = FakeRunner(output="gui/501/com.npmguard.daemon = {\n\tstate = running\n")
    assert launch_agent(home, runner).status().running is True


def test_fake_launchctl_uninstall(home: Path) -> None:
    launch_agent(home).install(["/usr/local/bin/npmguard"])
    runner = FakeRunner()
    launch_agent(home, runner).uninstall()
    assert runner.ran("bootout")
    assert not launch_agent(home).unit_path.exists()


# --------------------------------------------------------------------------
# Task Scheduler (Windows is absent: fake schtasks)


def task(tmp_path: Path, runner: FakeRunner | None = None) -> ScheduledTask:
    return ScheduledTask(
        runner or FakeRunner(), xml_path=tmp_path / "task.xml", user_id="PC\\al&ice"
    )


def task_root(tmp_path: Path) -> ET.Element:
    data = task(tmp_path).render([r"C:\Py 3\pythonw.exe", "-m", "npmguard"])
    return ET.fromstring(data)


def test_task_utf16(tmp_path: Path) -> None:
    assert task(tmp_path).render([r"C:\npmguard.exe"])[:2] == b"\xff\xfe"


def test_task_root(tmp_path: Path) -> None:
    assert task_root(tmp_path).tag == f"{{{service.TASK_NS}}}Task"


def test_task_logon_trigger(tmp_path: Path) -> None:
    trigger = task_root(tmp_path).find("t:Triggers/t:LogonTrigger/t:UserId", NS)
    assert trigger is not None
    assert trigger.text == "PC\\al&ice"


def test_task_principal(tmp_path: Path) -> None:
    node = task_root(tmp_path).find("t:Principals/t:Principal/t:LogonType", NS)
    assert node is not None
    assert node.text == "InteractiveToken"


def test_task_hidden(tmp_path: Path) -> None:
    node = task_root(tmp_path).find("t:Settings/t:Hidden", NS)
    assert node is not None
    assert node.text == "true"


def test_task_no_time_limit(tmp_path: Path) -> None:
    node = task_root(tmp_path).find("t:Settings/t:ExecutionTimeLimit", NS)
    assert node is not None
    assert node.text == "PT0S"


def test_task_restart_on_failure(tmp_path: Path) -> None:
    node = task_root(tmp_path).find("t:Settings/t:RestartOnFailure", NS)
    assert node is not None
    assert [c.tag.split("}")[1] for c in node] == ["Interval", "Count"]


def test_task_command(tmp_path: Path) -> None:
    node = task_root(tmp_path).find("t:Actions/t:Exec/t:Command", NS)
    assert node is not None
    assert node.text == r"C:\Py 3\pythonw.exe"


def test_task_arguments(tmp_path: Path) -> None:
    node = task_root(tmp_path).find("t:Actions/t:Exec/t:Arguments", NS)
    assert node is not None
    assert node.text == "-m npmguard daemon"


def test_task_script_arguments(tmp_path: Path) -> None:
    root = ET.fromstring(task(tmp_path).render([r"C:\bin\npmguard.exe"]))
    node = root.find("t:Actions/t:Exec/t:Arguments", NS)
    assert node is not None
    assert node.text == "daemon"


def test_fake_schtasks_install_creates(tmp_path: Path) -> None:
    runner = FakeRunner()
    task(tmp_path, runner).install([r"C:\bin\npmguard.exe"])
    assert runner.ran("schtasks", "/Create", "/XML", str(tmp_path / "task.xml"))


def test_fake_schtasks_create_failure(tmp_path: Path) -> None:
    runner = FakeRunner(fail={"/Create": (1, "ERROR: Access is denied.")})
    report = task(tmp_path, runner).install([r"C:\bin\npmguard.exe"])
    assert any("Access is denied" in w for w in report.warnings)


def test_fake_schtasks_status_running(tmp_path: Path) -> None:
    runner = FakeRunner(output="TaskName: \\npmguard\nStatus: Running\n")
    assert task(tmp_path, runner).status().running is True


def test_fake_schtasks_uninstall(tmp_path: Path) -> None:
    task(tmp_path).install([r"C:\bin\npmguard.exe"])
    runner = FakeRunner()
    task(tmp_path, runner).uninstall()
    assert runner.ran("schtasks", "/Delete", "/TN", "npmguard")


# --------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize(
    ("platform", "kind"),
    [("linux", SystemdUser), ("darwin", LaunchAgent), ("win32", ScheduledTask)],
)
def test_backend_for_platform(platform: str, kind: type, home: Path) -> None:
    assert isinstance(service.backend_for_platform(platform), kind)


def test_backend_unknown_platform() -> None:
    with pytest.raises(service.ServiceError):
        service.backend_for_platform("sunos5")
