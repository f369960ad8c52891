"""``npmguard scan`` run as a subprocess on real files in a temp dir."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NOBODY = 65534


@dataclass
class Scan:
    code: int
    stdout: str
    stderr: str

    def report(self) -> dict:  # type: ignore[type-arg]
        data: dict = json.loads(self.stdout)  # type: ignore[type-arg]
        return data


@pytest.fixture
def token(request: pytest.FixtureRequest) -> str:
    """The session's canary token when the suite has one, else a fresh fake."""
    try:
        value = request.getfixturevalue("canary")
    except pytest.FixtureLookupError:
        value = None
    if isinstance(value, str) and len(value) >= 12:
        return value
    return "npm_" + secrets.token_hex(18)


class World:
    """A temp HOME, an empty global config and a tree to scan under ``root``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.root = base / "tree"
        # The suite's guard fixture may have made HOME already.
        self.home.mkdir(mode=0o755, exist_ok=True)
        self.root.mkdir(mode=0o755)
        self.env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "NPM_CONFIG_USERCONFIG": str(self.home / ".npmrc"),
            "NPM_CONFIG_GLOBALCONFIG": str(base / "global-npmrc"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
        }

    def write(self, relative: str, data: str | bytes, mode: int = 0o600) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def scan(self, *args: str, user: int | None = None) -> Scan:
        command = [sys.executable, "-m", "npmguard", "scan", *args]
        if user is not None:
            setpriv = shutil.which("setpriv")
            assert setpriv is not None
            command = [
                setpriv,
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                *command,
            ]
        result = subprocess.run(
            command,
            cwd=self.base,
            env=self.env,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        return Scan(
            result.returncode,
            result.stdout.decode("utf-8", "replace"),
            result.stderr.decode("utf-8", "replace"),
        )

    def git(self, *args: str, cwd: Path | None = None) -> None:
        subprocess.run(
            ["git", *args],
            cwd=cwd or self.root,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def open_world() -> Iterator[World]:
    """A World in a directory that other users may enter, for setpriv runs."""
    base = Path(tempfile.mkdtemp(prefix="npmguard-scan-"))
    try:
        base.chmod(0o755)
        yield World(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path, follow_symlinks=False).st_mtime_ns


def error_lines(scan: Scan, path: Path) -> list[str]:
    return [line for line in scan.stderr.splitlines() if str(path) in line]


def paths_in(scan: Scan) -> set[str]:
    return {c["path"] for c in scan.report()["credentials"]}


def plaintext(value: str, host: str = "r.example") -> str:
    return f"//{host}/:_authToken={value}\n"


# --- exit codes and output ---------------------------------------------------


def test_exit_clean_empty(world: World) -> None:
    assert world.scan(str(world.root)).code == 0


def test_exit_clean_reference(world: World) -> None:
    world.write("app/.npmrc", "//r.example/:_authToken=${NPM_TOKEN}\n")
    assert world.scan(str(world.root)).code == 0


def test_exit_plaintext(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext(token))
    assert world.scan(str(world.root)).code == 1


def test_exit_user_config(world: World, token: str) -> None:
    (world.home / ".npmrc").write_text(plaintext(token))
    assert world.scan().code == 1


def test_exit_missing_root(world: World) -> None:
    assert world.scan(str(world.root / "nope")).code == 2


def test_missing_root_message(world: World) -> None:
    scan = world.scan(str(world.root / "nope"))
    assert scan.stderr == f"npmguard: {world.root / 'nope'}: not found\n"


def test_json_top_keys(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext(token))
    report = world.scan("--json", str(world.root)).report()
    assert sorted(report) == ["credentials", "errors", "files", "summary", "version"]


def test_json_version(world: World) -> None:
    assert world.scan("--json", str(world.root)).report()["version"] == 1


def test_json_summary(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext(token) + "//r.example/:username=me\n")
    summary = world.scan("--json", str(world.root)).report()["summary"]
    assert summary == {"files": 1, "credentials": 2, "plaintext": 1, "errors": 0}


def test_json_credential_keys(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext(token))
    credential = world.scan("--json", str(world.root)).report()["credentials"][0]
    assert sorted(credential) == [
        "detail",
        "fingerprint",
        "flags",
        "key",
        "kind",
        "line",
        "path",
        "registry",
        "scopes",
        "section",
        "shadowed",
        "state",
        "vault_id",
    ]


def test_json_credential(world: World, token: str) -> None:
    path = world.write("app/.npmrc", "; c\n" + plaintext(token))
    credential = world.scan("--json", str(world.root)).report()["credentials"][0]
    assert (
        credential["path"],
        credential["line"],
        credential["registry"],
        credential["kind"],
        credential["state"],
    ) == (str(path), 2, "//r.example/", "_authToken", "plaintext")


def test_json_file_entry(world: World, token: str) -> None:
    path = world.write("app/.npmrc", plaintext(token))
    files = world.scan("--json", str(world.root)).report()["files"]
    assert files == [
        {"path": str(path), "level": "project", "credentials": 1, "flags": []}
    ]


def test_json_user_level(world: World, token: str) -> None:
    (world.home / ".npmrc").write_text(plaintext(token))
    (world.home / ".npmrc").chmod(0o600)
    files = world.scan("--json").report()["files"]
    assert [f["level"] for f in files] == ["user"]


def test_json_error_entry(world: World) -> None:
    path = world.write("app/.npmrc", b"a=1\n\x00\n")
    errors = world.scan("--json", str(world.root)).report()["errors"]
    assert errors == [
        {
            "path": str(path),
            "line": 2,
            "message": (
                "binary data (NUL byte); not scanned or changed, "
                "check this file by hand"
            ),
        }
    ]


def test_table_header(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext(token))
    first = world.scan(str(world.root)).stdout.splitlines()[0]
    assert first.split() == [
        "FILE:LINE",
        "REGISTRY",
        "KIND",
        "STATE",
        "FINGERPRINT",
        "FLAGS",
    ]


def test_table_row(world: World, token: str) -> None:
    path = world.write("app/.npmrc", plaintext(token))
    row = world.scan(str(world.root)).stdout.splitlines()[1].split()
    assert row[:4] == [f"{path}:1", "//r.example/", "_authToken", "plaintext"]


def test_table_home_tilde(world: World, token: str) -> None:
    (world.home / ".npmrc").write_text(plaintext(token))
    (world.home / ".npmrc").chmod(0o600)
    row = world.scan().stdout.splitlines()[1]
    assert row.startswith("~/.npmrc:1 ")


def test_table_summary(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext(token))
    lines = world.scan(str(world.root)).stdout.splitlines()
    assert "1 config file(s) read, 1 credential line(s), 1 in plaintext." in lines


def test_table_section(world: World, token: str) -> None:
    world.write("app/.npmrc", "[]\n" + plaintext(token))
    row = world.scan(str(world.root)).stdout.splitlines()[1]
    assert "[in section ]" in row


def test_table_shadowed(world: World, token: str) -> None:
    world.write("app/.npmrc", plaintext("old-value-1234") + plaintext(token))
    row = world.scan(str(world.root)).stdout.splitlines()[1]
    assert "plaintext (shadowed)" in row


# --- risk flags ----------------------------------------------------------------


def flags_of(world: World) -> list[str]:
    files = world.scan("--json", str(world.root)).report()["files"]
    assert len(files) == 1, files
    flags: list[str] = files[0]["flags"]
    return flags


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        (0o600, []),
        (0o640, ["group-readable"]),
        (0o644, ["world-readable"]),
        (0o604, ["world-readable"]),
        (0o400, []),
    ],
)
def test_flag_mode(world: World, token: str, mode: int, flags: list[str]) -> None:
    world.write("app/.npmrc", plaintext(token), mode=mode)
    assert flags_of(world) == flags


def test_flag_symlink(world: World, token: str) -> None:
    target = world.write("shared/npmrc", plaintext(token))
    (world.root / "app").mkdir()
    (world.root / "app" / ".npmrc").symlink_to(target)
    assert flags_of(world) == ["symlink"]


def test_flag_synced(world: World, token: str) -> None:
    world.write("Dropbox/app/.npmrc", plaintext(token))
    assert flags_of(world) == ["synced:Dropbox"]


def git_repo(world: World) -> Path:
    repo = world.root / "repo"
    repo.mkdir()
    world.git("init", "-q", "-b", "main", cwd=repo)
    return repo


def test_flag_git_untracked(world: World, token: str) -> None:
    repo = git_repo(world)
    (repo / ".npmrc").write_text(plaintext(token))
    (repo / ".npmrc").chmod(0o600)
    assert flags_of(world) == []


def test_flag_git_tracked(world: World, token: str) -> None:
    repo = git_repo(world)
    (repo / ".npmrc").write_text("registry=https://r.example/\n")
    (repo / ".npmrc").chmod(0o600)
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "config", cwd=repo)
    (repo / ".npmrc").write_text(plaintext(token))
    assert flags_of(world) == ["git-tracked"]


def test_flag_git_history(world: World, token: str) -> None:
    repo = git_repo(world)
    (repo / ".npmrc").write_text(plaintext(token))
    (repo / ".npmrc").chmod(0o600)
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "token", cwd=repo)
    assert flags_of(world) == ["git-tracked", "git-history"]


def test_flag_git_history_removed(world: World, token: str) -> None:
    repo = git_repo(world)
    config = repo / "sub" / ".npmrc"
    config.parent.mkdir()
    config.write_text(plaintext(token))
    config.chmod(0o600)
    world.git("add", ".", cwd=repo)
    world.git("commit", "-q", "-m", "token", cwd=repo)
    config.write_text("//r.example/:_authToken=${NPM_TOKEN}\n")
    assert flags_of(world) == ["git-tracked", "git-history"]


def test_flag_git_history_deleted(world: World, token: str) -> None:
    # The token left the file in a later commit; it is still in the first.
    repo = git_repo(world)
    config = repo / ".npmrc"
    config.write_text(plaintext(token))
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "token", cwd=repo)
    config.write_text("registry=https://r.example/\n")
    config.chmod(0o600)
    world.git("commit", "-q", "-am", "no token", cwd=repo)
    assert flags_of(world) == ["git-tracked", "git-history"]


def test_history_note(world: World, token: str) -> None:
    repo = git_repo(world)
    config = repo / ".npmrc"
    config.write_text(plaintext(token))
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "token", cwd=repo)
    config.write_text("registry=https://r.example/\n")
    stdout = world.scan(str(world.root)).stdout
    assert f"{config}: a credential is in its git history" in stdout


def test_flag_git_history_other_branch(world: World, token: str) -> None:
    repo = git_repo(world)
    config = repo / ".npmrc"
    config.write_text("registry=https://r.example/\n")
    config.chmod(0o600)
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "base", cwd=repo)
    world.git("checkout", "-q", "-b", "leak", cwd=repo)
    config.write_text(plaintext(token))
    world.git("commit", "-q", "-am", "token", cwd=repo)
    world.git("checkout", "-q", "main", cwd=repo)
    config.chmod(0o600)
    assert flags_of(world) == ["git-tracked", "git-history"]


def test_flag_git_reference_only(world: World) -> None:
    repo = git_repo(world)
    config = repo / ".npmrc"
    config.write_text("//r.example/:_authToken=${NPM_TOKEN}\n")
    config.chmod(0o600)
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "reference", cwd=repo)
    assert flags_of(world) == ["git-tracked"]


def test_git_many_files(world: World, token: str) -> None:
    repo = git_repo(world)
    for name in ("a", "b", "c"):
        (repo / name).mkdir()
        (repo / name / ".npmrc").write_text(plaintext(token + name))
        (repo / name / ".npmrc").chmod(0o600)
    world.git("add", "a", "b", cwd=repo)
    world.git("commit", "-q", "-m", "two", cwd=repo)
    files = world.scan("--json", str(world.root)).report()["files"]
    flags = {Path(f["path"]).parent.name: f["flags"] for f in files}
    assert flags == {
        "a": ["git-tracked", "git-history"],
        "b": ["git-tracked", "git-history"],
        "c": [],
    }


# --- bad input -------------------------------------------------------------------


def assert_bad_input(
    world: World, scan: Scan, path: Path, message: str, good: Path
) -> None:
    """One stderr line names ``path``; ``good`` was still scanned; exit 2."""
    assert scan.code == 2, scan
    assert "Traceback" not in scan.stderr, scan.stderr
    lines = error_lines(scan, path)
    assert len(lines) == 1, scan.stderr
    assert lines[0].startswith(f"npmguard: {path}"), lines
    assert message in lines[0], lines
    assert str(good) in scan.stdout, scan.stdout


@pytest.fixture
def good(world: World, token: str) -> Path:
    return world.write("good/.npmrc", plaintext(token))


def test_bad_binary(world: World, good: Path) -> None:
    path = world.write("bin/.npmrc", b"a=1\nb=2\n\x00\x01\x02binary\n")
    before = snapshot(path)
    scan = world.scan(str(world.root))
    assert_bad_input(world, scan, path, f"{path}:3: binary data", good)
    assert snapshot(path) == before


def test_bad_utf8(world: World, good: Path) -> None:
    path = world.write("latin/.npmrc", "a=1\nuser=caf\u00e9\n".encode("latin-1"))
    before = snapshot(path)
    scan = world.scan(str(world.root))
    assert_bad_input(world, scan, path, f"{path}:2: not valid UTF-8", good)
    assert snapshot(path) == before


def test_bad_large(world: World, good: Path, token: str) -> None:
    line = plaintext(token).encode()
    path = world.write("big/.npmrc", line * (10 * 1024 * 1024 // len(line) + 1))
    before = snapshot(path)
    scan = world.scan(str(world.root))
    assert_bad_input(world, scan, path, "over the 1048576-byte limit", good)
    assert snapshot(path) == before


def test_bad_self_loop(world: World, good: Path) -> None:
    path = world.root / "loop" / ".npmrc"
    path.parent.mkdir()
    path.symlink_to(".npmrc")
    scan = world.scan(str(world.root))
    assert_bad_input(world, scan, path, "symlink loop", good)


def test_bad_dir_loop(world: World, good: Path) -> None:
    (world.root / "a").symlink_to("b")
    (world.root / "b").symlink_to("a")
    scan = world.scan(str(world.root))
    assert_bad_input(world, scan, world.root / "a", "symlink loop", good)


def test_bad_dangling(world: World, good: Path) -> None:
    path = world.root / "dangling" / ".npmrc"
    path.parent.mkdir()
    path.symlink_to(world.root / "missing-file")
    scan = world.scan(str(world.root))
    assert_bad_input(world, scan, path, "file not found", good)


def test_bad_all_reported(world: World, good: Path) -> None:
    world.write("bin/.npmrc", b"\x00")
    world.write("latin/.npmrc", b"\xff\n")
    scan = world.scan("--json", str(world.root))
    assert (scan.report()["summary"]["errors"], paths_in(scan)) == (2, {str(good)})


def test_bad_unreadable(open_world: World, token: str) -> None:
    world = open_world
    probe = world.scan("--json", str(world.root), user=NOBODY)
    if probe.code != 0:
        pytest.skip(f"cannot run npmguard as uid {NOBODY}: {probe.stderr[-300:]}")
    good = world.write("good/.npmrc", plaintext(token), mode=0o644)
    path = world.write("secret/.npmrc", plaintext(token), mode=0o000)
    before = snapshot(path)
    scan = world.scan(str(world.root), user=NOBODY)
    assert_bad_input(world, scan, path, "permission denied", good)
    assert snapshot(path) == before


def test_bad_unreadable_dir(open_world: World, token: str) -> None:
    world = open_world
    probe = world.scan("--json", str(world.root), user=NOBODY)
    if probe.code != 0:
        pytest.skip(f"cannot run npmguard as uid {NOBODY}: {probe.stderr[-300:]}")
    good = world.write("good/.npmrc", plaintext(token), mode=0o644)
    world.write("closed/app/.npmrc", plaintext(token), mode=0o644)
    (world.root / "closed").chmod(0o000)
    try:
        scan = world.scan(str(world.root), user=NOBODY)
    finally:
        (world.root / "closed").chmod(0o755)
    assert_bad_input(world, scan, world.root / "closed", "permission denied", good)


def test_read_only_file(world: World, token: str) -> None:
    path = world.write("ro/.npmrc", plaintext(token), mode=0o400)
    before = snapshot(path)
    scan = world.scan("--json", str(world.root))
    assert (scan.code, scan.stderr, paths_in(scan)) == (1, "", {str(path)})
    assert snapshot(path) == before


def test_scan_leaves_files(world: World, token: str) -> None:
    path = world.write("app/.npmrc", plaintext(token), mode=0o644)
    before = snapshot(path)
    world.scan(str(world.root))
    assert snapshot(path) == before


# --- the walk --------------------------------------------------------------------


def test_walk_skips_node_modules(world: World, token: str) -> None:
    world.write("app/node_modules/pkg/.npmrc", plaintext(token))
    assert world.scan("--json", str(world.root)).report()["files"] == []


def test_walk_skips_git(world: World, token: str) -> None:
    world.write("app/.git/.npmrc", plaintext(token))
    assert world.scan("--json", str(world.root)).report()["files"] == []


def test_walk_nested(world: World, token: str) -> None:
    paths = {
        str(world.write(f"{d}/.npmrc", plaintext(token)))
        for d in ("a", "a/b", "a/b/c/d")
    }
    assert paths_in(world.scan("--json", str(world.root))) == paths


def test_walk_npmrc_directory(world: World, token: str) -> None:
    (world.root / "odd" / ".npmrc").mkdir(parents=True)
    inner = world.write("odd/.npmrc/app/.npmrc", plaintext(token))
    scan = world.scan("--json", str(world.root))
    assert (scan.code, paths_in(scan)) == (1, {str(inner)})


def test_walk_dir_link(world: World, token: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".npmrc").write_text(plaintext(token))
    (world.root / "link").symlink_to(outside)
    scan = world.scan("--json", str(world.root))
    assert paths_in(scan) == {str(world.root / "link" / ".npmrc")}


def test_walk_dir_link_once(world: World, token: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / ".npmrc").write_text(plaintext(token))
    (world.root / "one").symlink_to(outside)
    (world.root / "two").symlink_to(outside)
    (world.root / "three").symlink_to(outside / "sub")
    files = world.scan("--json", str(world.root)).report()["files"]
    assert len(files) == 1


def test_walk_link_to_ancestor(world: World, token: str) -> None:
    path = world.write("app/.npmrc", plaintext(token))
    (world.root / "app" / "up").symlink_to(world.root)
    scan = world.scan("--json", str(world.root))
    assert (scan.code, paths_in(scan)) == (1, {str(path)})


def test_walk_root_file(world: World, token: str) -> None:
    path = world.write("custom-npmrc", plaintext(token))
    assert paths_in(world.scan("--json", str(path))) == {str(path)}


def test_walk_user_once(world: World, token: str) -> None:
    # HOME is walked too, but the user config is listed once, as "user".
    (world.home / ".npmrc").write_text(plaintext(token))
    files = world.scan("--json", str(world.home)).report()["files"]
    assert [f["level"] for f in files] == ["user"]


def test_cwd_project(world: World, token: str) -> None:
    # With no PATH argument npm's project is the cwd when no package.json
    # is above it.
    (world.base / ".npmrc").write_text(plaintext(token))
    files = world.scan("--json").report()["files"]
    assert [f["level"] for f in files] == ["project"]


# --- secrets stay out of the output ----------------------------------------------


def leaked(token: str, text: str) -> list[str]:
    """Return every 5-character piece of ``token`` that appears in ``text``."""
    return sorted(
        {token[i : i + 5] for i in range(len(token) - 4) if token[i : i + 5] in text}
    )


def leak_world(world: World, token: str) -> None:
    world.write("a/.npmrc", plaintext(token))
    world.write(
        "b/.npmrc", f"//r.example/:_auth={token}\n//r.example/:_password={token}\n"
    )
    world.write("c/.npmrc", f'[sec]\n//r.example/:key="{token}"\n')
    world.write("d/.npmrc", f"_authToken={token}\n" + plaintext(token) * 2)
    world.write("e/.npmrc", f"//r.example/:_authToken={token}\x00\n".encode())
    world.write("f/.npmrc", f"//r.example/:_authToken={token}\xff\n".encode("latin-1"))


def test_secret_table(world: World, token: str) -> None:
    leak_world(world, token)
    scan = world.scan(str(world.root))
    assert leaked(token, scan.stdout + scan.stderr) == []


def test_secret_json(world: World, token: str) -> None:
    leak_world(world, token)
    scan = world.scan("--json", str(world.root))
    assert leaked(token, scan.stdout + scan.stderr) == []


def test_secret_git(world: World, token: str) -> None:
    repo = git_repo(world)
    (repo / ".npmrc").write_text(plaintext(token))
    world.git("add", ".npmrc", cwd=repo)
    world.git("commit", "-q", "-m", "token", cwd=repo)
    scan = world.scan("--json", str(world.root))
    assert leaked(token, scan.stdout + scan.stderr) == []
