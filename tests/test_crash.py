"""SIGKILL at every step of secure and restore, then the next run repairs it.

Each case runs the real ``npmguard`` in a child process through a fault
injection fake: a ``python -c`` wrapper around ``npmguard.cli.main``. It
wraps one step of the product (a keychain write, a journal write, the
rename of a config file, ...), and the child kills itself with SIGKILL the
N-th time it reaches that step. SIGKILL runs no handler and no
``finally``, so what is left on disk is what a power cut or an OOM kill
would leave.

After every kill the invariant must hold: each token is in a config file,
in the keychain, or in both, and every secured line in a file has its
keychain entry. The next ordinary run must finish or undo the change:
fully secured (or fully restored) files, an empty journal, no temp file,
no token in any file npmguard wrote, and a final restore that gives back
the original bytes, mode included.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import realparts

from npmguard.files import read_config
from npmguard.npmrc.credentials import HELPER_MARKER, find_credentials

# Wraps steps of npmguard so the process SIGKILLs itself at one of them.
# argv: KILL_POINT COUNT npmguard-args... ; KILL_POINT "none" never kills.
# With NPMGUARD_TEST_READY=1 it prints "ready" once the imports are done,
# so a test can time a kill from there.
FAULT_INJECTION_WRAPPER = r"""
import os
import signal
import sys

point, count = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]

import npmguard.commands.restore as restore_cmd
import npmguard.commands.secure as secure_cmd
from npmguard import cli, files, migrate
from npmguard.vault import keychain

hits = {}


def hit(name):
    hits[name] = hits.get(name, 0) + 1
    if name == point and hits[name] == count:
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, attr, label):
    real = getattr(owner, attr)

    def fake(*a, **k):
        name = label(*a, **k) if callable(label) else label
        hit(name + ":before")
        result = real(*a, **k)
        hit(name + ":after")
        return result

    setattr(owner, attr, fake)


wrap(keychain.KeychainStore, "set", "vault.set")
wrap(keychain.KeychainStore, "delete", "vault.delete")
wrap(migrate, "_write_journal",
     lambda record: "journal:%s:%s" % (record["op"], record["phase"]))
wrap(migrate, "_drop_journal", "journal.drop")
wrap(migrate, "save_index", "index")
wrap(secure_cmd, "sync_token_helpers", "helpers")
wrap(restore_cmd, "sync_token_helpers", "helpers")

real_replace = os.replace


def replace(src, dst, *a, **k):
    # Only renames onto config files; npmguard's state files also use it.
    config = files.TEMP_SUFFIX in str(src) and "/npmguard/" not in str(dst)
    if config:
        hit("replace:before")
    real_replace(src, dst, *a, **k)
    if config:
        hit("replace:after")


os.replace = replace

real_link = os.link
real_unlink = os.unlink


def link(src, dst, *a, **k):
    # create_file links a finished temp file into place.
    hit("link:before")
    real_link(src, dst, *a, **k)
    hit("link:after")


def unlink(path, *a, **k):
    # Only a config file itself, which restore removes if npmguard made it.
    config = str(path).endswith("/.npmrc")
    if config:
        hit("unlink-config:before")
    real_unlink(path, *a, **k)
    if config:
        hit("unlink-config:after")


os.link = link
os.unlink = unlink

if os.environ.get("NPMGUARD_TEST_READY") == "1":
    sys.stdout.write("ready\n")
    sys.stdout.flush()
sys.exit(cli.main(args))
"""

AUTH = "dXNlcjpzM2NyZXQtcGFzc3dvcmQ="
PASSWORD = "c2VjcmV0LXBhc3N3b3Jk"
RUN_TIMEOUT = 60


@dataclass
class Scene:
    """Two config files with six credentials, and the keychain they go to."""

    home: Path
    work: Path
    chain: realparts.Keychain
    originals: dict[Path, bytes]
    modes: dict[Path, int]
    tokens: set[str]
    env: dict[str, str]

    @property
    def user(self) -> Path:
        return self.home / ".npmrc"

    @property
    def project(self) -> Path:
        return self.work / "app" / ".npmrc"


@pytest.fixture
def scene(
    crash_keyring_bus: realparts.Keychain, home: Path, tmp_path: Path, canary: str
) -> Scene:
    work = tmp_path / "work"
    token_b = "npm_" + secrets.token_hex(18)
    semi = "tok;semi-" + secrets.token_hex(8)
    user = (
        "\ufeff; company settings\r\n"
        f"//registry.npmjs.org/:_authToken={canary}\r\n"
        f'//npm.example.com:8443/repo/:_auth="{AUTH}"\r\n'
        "\r\n"
        "[ci]\r\n"
        f"//npm.example.com:8443/repo/:_password={PASSWORD} ; base64\r\n"
    ).encode()
    # npm keeps the quotes of a quoted value that an inline comment follows.
    quoted = f"'npm_{secrets.token_hex(18)}'"
    project = (
        "@acme:registry=https://npm.acme.test/\n"
        f"//npm.acme.test/:_authToken={token_b}\n"
        f"//npm.acme.test/other/:_authToken={semi.replace(';', chr(92) + ';')}\n"
        f"//npm.acme.test/third/:_authToken={quoted} ; note\n"
    ).encode()
    scene = Scene(
        home=home,
        work=work,
        chain=crash_keyring_bus,
        originals={},
        modes={},
        tokens={canary, AUTH, PASSWORD, token_b, semi, quoted},
        env=_child_env(),
    )
    for path, data, mode in (
        (scene.user, user, 0o600),
        (scene.project, project, 0o644),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
        scene.originals[path] = data
        scene.modes[path] = mode
    return scene


def _child_env() -> dict[str, str]:
    names = (
        "PATH",
        "LANG",
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR",
        "NPM_CONFIG_USERCONFIG",
        "NPM_CONFIG_GLOBALCONFIG",
        "DBUS_SESSION_BUS_ADDRESS",
        "PYTHON_KEYRING_BACKEND",
    )
    return {name: os.environ[name] for name in names if name in os.environ}


def _args(scene: Scene, op: str) -> list[str]:
    if op == "secure":
        return ["secure", "--token-helper", "always", str(scene.work)]
    return ["restore"]


def _run(
    scene: Scene, op: str, point: str = "none", count: int = 1
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FAULT_INJECTION_WRAPPER,
            point,
            str(count),
            *_args(scene, op),
        ],
        cwd=scene.home,
        env=scene.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    _assert_no_token(scene, result.stdout + result.stderr, f"output of {op}")
    return result


def _npmguard(scene: Scene, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "npmguard", *args],
        cwd=scene.home,
        env=scene.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    _assert_no_token(scene, result.stdout + result.stderr, f"output of {args[0]}")
    return result


def _assert_no_token(scene: Scene, text: str, where: str) -> None:
    for token in scene.tokens:
        assert token not in text, f"a token (…{token[-4:]}) is in the {where}"


# --- reading the state -------------------------------------------------------


def _vault(scene: Scene) -> dict[str, str]:
    """Every npmguard entry in the keychain, read over D-Bus, not via npmguard."""
    with scene.chain.default_collection() as collection:
        entries = {}
        for item in collection.get_all_items():
            attributes = item.get_attributes()
            if attributes.get("service") == "npmguard":
                entries[attributes["username"]] = item.get_secret().decode()
    return entries


def _findings(path: Path) -> list:  # type: ignore[type-arg]
    config = read_config(path)
    return find_credentials(path, config.document)


def _plaintext(scene: Scene) -> set[str]:
    return {
        f.value.reveal()
        for path in scene.originals
        for f in _findings(path)
        if f.value is not None
    }


def _markers(scene: Scene) -> dict[str, str]:
    """Vault name -> file for every secured line."""
    return {
        f.vault_name: str(path)
        for path in scene.originals
        for f in _findings(path)
        if f.state == "secured"
    }


def _state_dir(scene: Scene) -> Path:
    return Path(scene.env["XDG_STATE_HOME"]) / "npmguard"


def _journal(scene: Scene) -> list[str]:
    directory = _state_dir(scene) / "journal"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _temp_files(scene: Scene) -> list[Path]:
    found = []
    for root in (scene.home, scene.work):
        found += [p for p in root.rglob("*") if p.name.endswith(".npmguard-tmp")]
    return sorted(found)


def _files_with_token(scene: Scene) -> list[str]:
    """Files under HOME or the project root holding a token's text."""
    hits = []
    for root in (scene.home, scene.work):
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            for token in scene.tokens:
                raw_forms = {token, token.replace(";", "\\;")}
                if any(form.encode() in data for form in raw_forms):
                    hits.append(f"{path.relative_to(root.parent)} (…{token[-4:]})")
    return sorted(hits)


def _assert_invariant(scene: Scene, when: str) -> None:
    vault = _vault(scene)
    plaintext = _plaintext(scene)
    for token in scene.tokens:
        assert token in plaintext or token in vault.values(), (
            f"{when}: a token (…{token[-4:]}) is in neither a file nor the vault"
        )
    for name, path in _markers(scene).items():
        assert name in vault, f"{when}: secured line {name} in {path} has no entry"
        assert vault[name] in scene.tokens, f"{when}: {name} holds a wrong value"


def _assert_secured(scene: Scene, when: str) -> None:
    vault = _vault(scene)
    markers = _markers(scene)
    assert _plaintext(scene) == set(), f"{when}: plaintext left"
    assert {vault[name] for name in markers} == scene.tokens, when
    assert len(markers) == len(scene.tokens), when
    raw_names = {n for n in vault if n.endswith("#raw")}
    assert set(vault) - raw_names == set(markers), f"{when}: orphan vault entries"
    assert _journal(scene) == [], when
    assert _temp_files(scene) == [], when
    assert _files_with_token(scene) == [], when
    user = scene.user.read_bytes().decode("utf-8-sig")
    assert user.startswith(HELPER_MARKER + "\r\n"), when
    # One helper per registry: npmjs, npm.example.com, three on npm.acme.test.
    assert user.count(HELPER_MARKER) == 5, when


def _assert_restored(scene: Scene, when: str) -> None:
    for path, data in scene.originals.items():
        assert path.read_bytes() == data, f"{when}: {path.name} differs"
        assert path.stat().st_mode & 0o7777 == scene.modes[path], when
    assert _vault(scene) == {}, f"{when}: vault entries left"
    assert _journal(scene) == [], when
    assert _temp_files(scene) == [], when


def _wipe(scene: Scene) -> None:
    # The originals hold tokens in plaintext; they must not outlive the test.
    for path in scene.originals:
        path.unlink(missing_ok=True)


# --- kill points -------------------------------------------------------------

# (kill point, which hit of it) in a secure of the user config (first), then
# the project file, then the helper lines in the user config.
SECURE_KILLS = [
    ("journal:secure:storing:before", 1),
    ("journal:secure:storing:after", 1),
    ("vault.set:before", 1),
    ("vault.set:after", 1),
    ("vault.set:after", 2),
    ("vault.set:after", 3),
    ("journal:secure:stored:before", 1),
    ("journal:secure:stored:after", 1),
    ("replace:before", 1),
    ("replace:after", 1),
    ("index:before", 1),
    ("index:after", 1),
    ("journal.drop:before", 1),
    ("journal:secure:storing:after", 2),
    ("vault.set:after", 5),
    ("journal:secure:stored:after", 2),
    ("replace:before", 2),
    ("replace:after", 2),
    ("index:after", 2),
    ("helpers:before", 1),
    ("journal:rewrite:writing:after", 1),
    ("replace:before", 3),
    ("replace:after", 3),
    ("journal.drop:before", 3),
]

RESTORE_KILLS = [
    ("journal:restore:writing:before", 1),
    ("journal:restore:writing:after", 1),
    ("replace:before", 1),
    ("replace:after", 1),
    ("journal:restore:written:before", 1),
    ("journal:restore:written:after", 1),
    ("vault.delete:after", 1),
    ("vault.delete:after", 3),
    ("index:before", 1),
    ("index:after", 1),
    ("journal.drop:before", 1),
    ("replace:before", 2),
    ("replace:after", 2),
    ("vault.delete:after", 9),
    ("helpers:before", 1),
    ("journal:rewrite:writing:after", 1),
    ("replace:before", 3),
    ("replace:after", 3),
]


def _ids(kills: list[tuple[str, int]]) -> list[str]:
    return [f"{point}#{count}" for point, count in kills]


@pytest.mark.parametrize(("point", "count"), SECURE_KILLS, ids=_ids(SECURE_KILLS))
def test_secure_killed(scene: Scene, point: str, count: int) -> None:
    try:
        killed = _run(scene, "secure", point, count)
        assert killed.returncode == -signal.SIGKILL, (
            f"the run never reached {point} #{count}: {killed.stderr}"
        )
        _assert_invariant(scene, f"after SIGKILL at {point} #{count}")

        again = _run(scene, "secure")
        assert again.returncode == 0, again.stderr
        _assert_invariant(scene, "after the next secure")
        _assert_secured(scene, "after the next secure")

        scan = _npmguard(scene, "scan", str(scene.work))
        assert scan.returncode == 0, scan.stdout

        restored = _run(scene, "restore")
        assert restored.returncode == 0, restored.stderr
        _assert_restored(scene, "after restore")
    finally:
        _wipe(scene)


@pytest.mark.parametrize(("point", "count"), RESTORE_KILLS, ids=_ids(RESTORE_KILLS))
def test_restore_killed(scene: Scene, point: str, count: int) -> None:
    try:
        secured = _run(scene, "secure")
        assert secured.returncode == 0, secured.stderr
        killed = _run(scene, "restore", point, count)
        assert killed.returncode == -signal.SIGKILL, (
            f"the run never reached {point} #{count}: {killed.stderr}"
        )
        _assert_invariant(scene, f"after SIGKILL at {point} #{count}")

        again = _run(scene, "restore")
        assert again.returncode == 0, again.stderr
        _assert_invariant(scene, "after the next restore")
        _assert_restored(scene, "after the next restore")
    finally:
        _wipe(scene)


# A second kill during the recovery of the first.
DOUBLE_KILLS = [
    ("secure", ("journal:secure:stored:after", 1), ("replace:before", 1)),
    ("secure", ("journal:secure:stored:after", 1), ("vault.set:after", 1)),
    ("secure", ("replace:after", 1), ("index:before", 1)),
    ("secure", ("vault.set:after", 2), ("vault.delete:after", 1)),
    ("restore", ("journal:restore:written:after", 1), ("vault.delete:after", 1)),
    ("restore", ("replace:after", 1), ("index:before", 1)),
]


@pytest.mark.parametrize(
    ("op", "first", "second"),
    DOUBLE_KILLS,
    ids=[f"{op}-{a[0]}#{a[1]}-{b[0]}#{b[1]}" for op, a, b in DOUBLE_KILLS],
)
def test_recovery_killed(
    scene: Scene, op: str, first: tuple[str, int], second: tuple[str, int]
) -> None:
    try:
        if op == "restore":
            assert _run(scene, "secure").returncode == 0
        assert _run(scene, op, *first).returncode == -signal.SIGKILL
        _assert_invariant(scene, f"after SIGKILL at {first}")
        assert _run(scene, op, *second).returncode == -signal.SIGKILL
        _assert_invariant(scene, f"after SIGKILL in recovery at {second}")

        final = _run(scene, op)
        assert final.returncode == 0, final.stderr
        if op == "secure":
            _assert_secured(scene, "after the third run")
            assert _run(scene, "restore").returncode == 0
        _assert_restored(scene, "at the end")
    finally:
        _wipe(scene)


# A user config that did not exist: secure creates it for the helper lines
# of a project's registry, and restore removes it again.
CREATED_KILLS = [
    ("secure", "helpers:before", 1),
    ("secure", "link:before", 1),
    ("secure", "link:after", 1),
    ("secure", "helpers:after", 1),
    ("restore", "helpers:before", 1),
    ("restore", "unlink-config:before", 1),
    ("restore", "unlink-config:after", 1),
]


@pytest.mark.parametrize(
    ("op", "point", "count"),
    CREATED_KILLS,
    ids=[f"{op}-{point}#{count}" for op, point, count in CREATED_KILLS],
)
def test_created_config_killed(scene: Scene, op: str, point: str, count: int) -> None:
    scene.tokens -= {f.value.reveal() for f in _findings(scene.user) if f.value}
    del scene.originals[scene.user]
    scene.user.unlink()
    try:
        if op == "restore":
            assert _run(scene, "secure").returncode == 0
            assert scene.user.exists()
        killed = _run(scene, op, point, count)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        _assert_invariant(scene, f"after SIGKILL at {point}")
        assert _run(scene, "secure").returncode == 0
        assert _plaintext(scene) == set()
        assert _journal(scene) == []
        assert _temp_files(scene) == []
        restored = _run(scene, "restore")
        assert restored.returncode == 0, restored.stderr
        assert not scene.user.exists()
        _assert_restored(scene, "after restore")
    finally:
        _wipe(scene)


def test_secure_twice_same(scene: Scene) -> None:
    try:
        assert _run(scene, "secure").returncode == 0
        files = {path: path.read_bytes() for path in scene.originals}
        vault = _vault(scene)
        assert _run(scene, "secure").returncode == 0
        assert {path: path.read_bytes() for path in scene.originals} == files
        assert _vault(scene) == vault
    finally:
        _wipe(scene)


@pytest.mark.parametrize("command", ["token", "exec"])
def test_other_commands_recover(scene: Scene, command: str) -> None:
    # Any command that reads credentials finishes an interrupted change first.
    try:
        killed = _run(scene, "secure", "replace:after", 1)
        assert killed.returncode == -signal.SIGKILL
        assert _journal(scene) != []
        if command == "token":
            args = ["token", "--registry", "https://registry.npmjs.org/"]
        else:
            args = ["exec", "--", sys.executable, "-c", "pass"]
        # stdout of `token` is the token itself, so it is not kept.
        result = subprocess.run(
            [sys.executable, "-m", "npmguard", *args],
            cwd=scene.home,
            env=scene.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        _assert_no_token(scene, result.stderr, f"stderr of {command}")
        assert result.returncode == 0, result.stderr
        assert _journal(scene) == []
        assert _temp_files(scene) == []
        _assert_invariant(scene, f"after {command}")
    finally:
        _wipe(scene)


# --- kills at random moments -------------------------------------------------

RANDOM_ROUNDS = 30


def _run_killed_at_random(scene: Scene, op: str, delay: float) -> int:
    """Run ``op``, SIGKILL it ``delay`` seconds after its imports; return its code."""
    env = scene.env | {"NPMGUARD_TEST_READY": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", FAULT_INJECTION_WRAPPER, "none", "1", *_args(scene, op)],
        cwd=scene.home,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        assert ready == b"ready\n", ready
        time.sleep(delay)
        if child.poll() is None:
            # Our own child, not yet reaped, so the PID is still its own.
            child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=RUN_TIMEOUT)
    except BaseException:
        child.kill()
        child.wait()
        raise
    _assert_no_token(scene, (out + err).decode(errors="replace"), f"output of {op}")
    return child.returncode


def _timed_run(scene: Scene, op: str) -> float:
    """Seconds ``op`` takes from the end of its imports; it runs to the end."""
    env = scene.env | {"NPMGUARD_TEST_READY": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", FAULT_INJECTION_WRAPPER, "none", "1", *_args(scene, op)],
        cwd=scene.home,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert child.stdout is not None
    child.stdout.readline()
    started = time.monotonic()
    child.communicate(timeout=RUN_TIMEOUT)
    assert child.returncode == 0
    return time.monotonic() - started


def test_random_kills(scene: Scene) -> None:
    seed = int(os.environ.get("NPMGUARD_TEST_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    try:
        # Calibrate on whole runs, so delays land inside the work.
        secure_time = _timed_run(scene, "secure")
        restore_time = _timed_run(scene, "restore")
        _assert_restored(scene, f"seed {seed}: calibration")
        killed = 0
        for round_number in range(RANDOM_ROUNDS):
            op = rng.choice(["secure", "restore"])
            span = secure_time if op == "secure" else restore_time
            delay = rng.uniform(0, span)
            code = _run_killed_at_random(scene, op, delay)
            killed += code == -signal.SIGKILL
            where = f"seed {seed} round {round_number}: {op} killed at {delay:.3f}s"
            assert code in (0, -signal.SIGKILL), where
            _assert_invariant(scene, where)
        final = _run(scene, "secure")
        assert final.returncode == 0, final.stderr
        _assert_secured(scene, f"seed {seed}: final secure")
        assert _run(scene, "restore").returncode == 0
        _assert_restored(scene, f"seed {seed}: final restore")
        # Some delays must land inside a run, or the loop tests nothing. Runs
        # with little left to do end early, so not every round kills.
        assert killed >= RANDOM_ROUNDS // 5, f"seed {seed}: only {killed} kills"
    finally:
        _wipe(scene)
