"""Drive the real npm, pnpm and npmguard command lines from tests."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

NPMGUARD = [sys.executable, "-m", "npmguard"]


def run(
    argv: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with the test's environment and capture its output."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env if env is not None else dict(os.environ),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def npmguard(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run([*NPMGUARD, *args], cwd, env=env, timeout=timeout)


def npm_adduser(
    registry: str,
    username: str,
    password: str,
    email: str,
    cwd: Path,
    timeout: float = 60,
) -> int:
    """Run the interactive ``npm adduser`` on a pseudo-terminal, as a user would.

    npm reads the password with echo off, which needs a terminal, so the
    answers are typed into a pty when each prompt appears.
    """
    code, _ = on_terminal(
        ["npm", "adduser", "--registry", registry, "--auth-type=legacy"],
        cwd,
        [
            (b"Username", f"{username}\r".encode()),
            (b"Password", f"{password}\r".encode()),
            (b"Email", f"{email}\r".encode()),
        ],
        timeout=timeout,
    )
    return code


def on_terminal(
    argv: list[str],
    cwd: Path,
    answers: list[tuple[bytes, bytes]],
    *,
    timeout: float = 60,
) -> tuple[int, bytes]:
    """Run ``argv`` on a pseudo-terminal, typing each answer after its prompt.

    Returns the exit code and everything the program wrote to the terminal.
    """
    answers = list(answers)
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.chdir(cwd)
        os.execvp(argv[0], argv)
    seen = b""
    transcript = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            transcript += chunk
            if answers and answers[0][0] in seen:
                prompt, answer = answers.pop(0)
                seen = seen.split(prompt, 1)[1]
                os.write(fd, answer)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), transcript


def write_package(
    directory: Path,
    name: str,
    version: str = "1.0.0",
    dependencies: dict[str, str] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {
        "name": name,
        "version": version,
        "main": "index.js",
        "license": "MIT",
    }
    if dependencies:
        manifest["dependencies"] = dependencies
    (directory / "package.json").write_text(json.dumps(manifest))
    (directory / "index.js").write_text("module.exports = 42;\n")
    return directory


def files_containing(root: Path, needle: str) -> list[Path]:
    """Return every regular file under ``root`` whose bytes contain ``needle``."""
    data = needle.encode()
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                if data in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found
