"""installers/install.sh, run for real in the test's own HOME.

The slow test installs npmguard from this checkout into a new venv with
pip, as a user would, then installs the service, runs it again, and
uninstalls. The others check the script's refusals, which stop before pip.
install.ps1 is not run: there is no PowerShell on the test machines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "installers" / "install.sh"
PIP_TIMEOUT = 900
SH = shutil.which("sh") or "/bin/sh"


def install_sh(
    *args: str, cwd: Path, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(
        [SH, str(SCRIPT), *args],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def data_dir(home: Path) -> Path:
    return Path(os.environ["XDG_DATA_HOME"]) / "npmguard"


def test_posix_syntax() -> None:
    done = subprocess.run([SH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stderr == ""


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck")
def test_shellcheck_clean() -> None:
    done = subprocess.run(
        ["shellcheck", "-s", "sh", str(SCRIPT)], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout == ""


def test_help(home: Path) -> None:
    done = install_sh("--help", cwd=home)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: install.sh")


def test_bad_option_exit(home: Path) -> None:
    assert install_sh("--bogus", cwd=home).returncode == 2


def test_bad_option_one_line(home: Path) -> None:
    done = install_sh("--bogus", cwd=home)
    assert done.stderr.splitlines() == [
        "npmguard-install: error: unknown option: --bogus (see --help)"
    ]


def test_from_not_source(home: Path, tmp_path: Path) -> None:
    done = install_sh("--venv", "--from", str(tmp_path), cwd=home)
    assert "not an npmguard source tree" in done.stderr


def test_from_not_source_exit(home: Path, tmp_path: Path) -> None:
    assert install_sh("--venv", "--from", str(tmp_path), cwd=home).returncode == 1


def test_pipx_missing(home: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("dirname", "cat"):
        (bare / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    done = install_sh("--pipx", cwd=home, PATH=str(bare))
    assert "pipx is not on PATH" in done.stderr


def test_link_conflict_refused(home: Path) -> None:
    link = home / ".local" / "bin" / "npmguard"
    link.parent.mkdir(parents=True)
    link.write_text("#!/bin/sh\necho someone else's npmguard\n")
    done = install_sh("--venv", cwd=home)
    assert "is not the link this script makes" in done.stderr


def test_link_conflict_kept(home: Path) -> None:
    link = home / ".local" / "bin" / "npmguard"
    link.parent.mkdir(parents=True)
    link.write_text("#!/bin/sh\necho someone else's npmguard\n")
    install_sh("--venv", cwd=home)
    assert link.read_text() == "#!/bin/sh\necho someone else's npmguard\n"


def test_uninstall_nothing(home: Path) -> None:
    done = install_sh("--uninstall", cwd=home)
    assert done.returncode == 0
    assert "nothing to uninstall" in done.stdout


def test_uninstall_refuses_with_credentials(home: Path) -> None:
    # An earlier install, and an index that lists a credential npmguard moved.
    data_dir(home).mkdir(parents=True)
    (data_dir(home) / "installed-with").write_text("venv\n")
    state = Path(os.environ["XDG_STATE_HOME"]) / "npmguard"
    state.mkdir(parents=True)
    (state / "credentials.json").write_text('{"//r/:_authToken#ab12": {}}')
    done = install_sh("--uninstall", cwd=home)
    assert done.returncode == 1
    assert "npmguard restore" in done.stderr


@pytest.mark.slow
def test_venv_install_roundtrip(home: Path) -> None:
    venv = data_dir(home) / "venv"
    link = home / ".local" / "bin" / "npmguard"
    unit = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user" / "npmguard.service"

    first = install_sh("--venv", cwd=home, timeout=PIP_TIMEOUT)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (venv / "pyvenv.cfg").is_file()
    assert os.readlink(link) == str(venv / "bin" / "npmguard")
    version = subprocess.run(
        [str(link), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.startswith("npmguard ")
    if shutil.which("systemctl"):
        assert f"ExecStart={link} daemon" in unit.read_text()

    # A second run upgrades in place and changes nothing else.
    again = install_sh(cwd=home, timeout=PIP_TIMEOUT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.readlink(link) == str(venv / "bin" / "npmguard")

    gone = install_sh("--uninstall", cwd=home)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not link.is_symlink()
    assert not venv.exists()
    assert not unit.exists()
    assert not (data_dir(home) / "installed-with").exists()
