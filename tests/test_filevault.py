"""The encrypted file vault, its selection, its daemon ops and the unlock CLI.

The vault tests use real files in the test's data dir. The ``vault.*`` ops
are served by ``StandInDaemon``, a small line-JSON Unix socket server
written here, because the real daemon does not take registered handlers
yet. The CLI runs in subprocesses, and under a pseudo-terminal where it
asks for a passphrase.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import realparts

import npmguard
from npmguard import migrate
from npmguard.daemon import protocol
from npmguard.errors import VaultError, VaultLockedError
from npmguard.secret import Secret
from npmguard.vault import DaemonStore, KeychainStore, daemon_ops, remote
from npmguard.vault import select as vault_select
from npmguard.vault.base import (
    Passphrase,
    VaultCorruptError,
    VaultMissingError,
    WrongPassphraseError,
)
from npmguard.vault.filevault import (
    ARGON2ID,
    ARGON2ID_DEFAULTS,
    MAGIC,
    SCRYPT,
    FileVault,
    Kdf,
    argon2id_available,
    vault_path,
)

PASSPHRASE = "correct horse battery staple"
OTHER_PASSPHRASE = "a different passphrase"
NAME = "//registry.example.com/:_authToken#0a1b2c3d4e"
REGISTRY = "https://registry.npmjs.org/"

# Most tests use a cheap KDF, so that they take milliseconds; the header
# test and the CLI tests use the real defaults.
if argon2id_available():
    CHEAP_KDF = Kdf(ARGON2ID, {"memory_kib": 256, "iterations": 1, "lanes": 1})
else:
    CHEAP_KDF = Kdf(SCRYPT, {"n": 2**10, "r": 8, "p": 1})


def _new_vault(passphrase: str = PASSPHRASE) -> FileVault:
    vault = FileVault()
    vault.create(Secret(passphrase), kdf=CHEAP_KDF)
    return vault


@pytest.fixture
def vault(home: Path) -> FileVault:
    return _new_vault()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _with_digest(content: bytes) -> bytes:
    return content + hashlib.sha256(content).digest()


def _header_json(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    _, length = struct.unpack_from(">BH", data, len(MAGIC))
    start = len(MAGIC) + 3
    return json.loads(data[start : start + length])  # type: ignore[no-any-return]


# --- the stand-in daemon ---------------------------------------------------------


def serve_stand_in(socket_path: str, ops_log: str, vault_ops: bool) -> None:
    """Serve ``daemon_ops``' handlers on ``socket_path`` until SIGTERM.

    The body of the stand-in daemon's process. One connection at a time,
    peers of this uid only. ``token`` and ``env`` requests get the
    protocol's ``local`` reply, which tells the CLI to resolve the
    credential itself through ``DaemonStore``. Each op is appended to
    ``ops_log``.
    """
    handlers = daemon_ops.VaultHost().handlers() if vault_ops else {}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener.bind(socket_path)
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                continue
            conn.settimeout(10)
            buffer = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        request = json.loads(line)
                        op = str(request.get("op"))
                        with open(ops_log, "a") as log:
                            log.write(op + "\n")
                        reply = _stand_in_reply(handlers, op, request)
                        conn.sendall(json.dumps(reply).encode() + b"\n")


def _stand_in_reply(handlers: dict[str, Any], op: str, request: dict[str, Any]
                    ) -> dict[str, Any]:
    if op in handlers:
        return handlers[op](request, None)  # type: ignore[no-any-return]
    if op in ("token", "env"):
        return {"ok": False, "local": True, "error": "resolve it yourself"}
    return {"ok": False, "error": f"invalid request: unknown op {op!r}"}


class StandInDaemon:
    """A stand-in for the npmguard daemon: ``serve_stand_in`` in a child process.

    The real daemon does not take registered handlers yet, so the tests
    serve the ``vault.*`` ops this way. A child process, because a client
    refuses to send requests to a server in its own process.
    """

    def __init__(self, workdir: Path, *, vault_ops: bool = True) -> None:
        self.socket_path = protocol.socket_path()
        self.ops_log = workdir / "stand-in-ops.log"
        self.log_path = workdir / "stand-in.log"
        self.vault_ops = vault_ops
        self.proc: realparts.ManagedProcess | None = None

    def start(self) -> StandInDaemon:
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import test_filevault; "
            "test_filevault.serve_stand_in(sys.argv[2], sys.argv[3], "
            "sys.argv[4] == 'vault')"
        )
        self.proc = realparts.spawn(
            "stand-in daemon",
            [sys.executable, "-c", code, str(Path(__file__).parent),
             self.socket_path, str(self.ops_log),
             "vault" if self.vault_ops else "none"],
            log_path=self.log_path,
            env=os.environ,
        )
        realparts.wait_until(self._listening, timeout=15,
                             what="the stand-in daemon's socket", proc=self.proc)
        return self

    def _listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    @property
    def requests(self) -> list[str]:
        try:
            return self.ops_log.read_text().split()
        except FileNotFoundError:
            return []

    @property
    def unlocked(self) -> bool:
        status = remote.vault_status()
        return bool(status and status.get("unlocked"))

    def unlock_new_vault(self) -> None:
        """Create a vault with the cheap KDF here and unlock it in the daemon."""
        _new_vault().lock()
        remote.unlock(Secret(PASSPHRASE))


@contextlib.contextmanager
def stand_in_daemon(workdir: Path, *, vault_ops: bool = True
                    ) -> Iterator[StandInDaemon]:
    daemon = StandInDaemon(workdir, vault_ops=vault_ops).start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def standin(home: Path, tmp_path: Path) -> Iterator[StandInDaemon]:
    with stand_in_daemon(tmp_path) as daemon:
        yield daemon


# --- the CLI in a subprocess -------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    names = (
        "PATH", "LANG", "HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
        "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR",
        "NPM_CONFIG_USERCONFIG", "NPM_CONFIG_GLOBALCONFIG",
        "DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND",
    )
    env = {name: os.environ[name] for name in names if name in os.environ}
    env.update(extra)
    return env


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "npmguard", *args],
        env=_env(),
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _use_file_vault() -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "npmguard" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[vault]\nbackend = "file"\n')


def _write_npmrc(home: Path, canary: str) -> Path:
    npmrc = home / ".npmrc"
    npmrc.write_text(f"//registry.npmjs.org/:_authToken={canary}\n")
    return npmrc


def _run_in_pty(args: list[str], answers: list[str], timeout: float = 60
                ) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its controlling terminal.

    Each time the output ends in a prompt (": "), the next answer is typed.
    """
    env = _env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the CLI
        try:
            os.execve(sys.executable, [sys.executable, "-m", "npmguard", *args], env)
        finally:
            os._exit(127)
    output = b""
    answered_at = 0
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if pending and output[answered_at:].rstrip(b" ").endswith(b":"):
                os.write(fd, pending.pop(0).encode() + b"\n")
                answered_at = len(output)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


# --- the vault file --------------------------------------------------------------


def test_vault_file_mode(vault: FileVault) -> None:
    assert stat.S_IMODE(vault.path.stat().st_mode) == 0o600


def test_vault_dir_mode(vault: FileVault) -> None:
    assert stat.S_IMODE(vault.path.parent.stat().st_mode) == 0o700


def test_vault_in_data_dir(vault: FileVault, home: Path) -> None:
    assert vault.path == home / ".local" / "share" / "npmguard" / "vault.bin"


def test_vault_mode_after_write(vault: FileVault, canary: str) -> None:
    vault.path.chmod(0o644)
    vault.set(NAME, Secret(canary))
    assert stat.S_IMODE(vault.path.stat().st_mode) == 0o600


def test_vault_reopens(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    other = FileVault()
    other.unlock(Secret(PASSPHRASE))
    assert other.get(NAME) == Secret(canary)


def test_vault_sees_other_writer(vault: FileVault, canary: str) -> None:
    other = FileVault()
    other.unlock(Secret(PASSPHRASE))
    other.set(NAME, Secret(canary))
    assert vault.get(NAME) == Secret(canary)


def test_vault_names(vault: FileVault) -> None:
    vault.set("b", Secret("value-b-0000"))
    vault.set("a", Secret("value-a-0000"))
    assert vault.names() == ["a", "b"]


def test_vault_size_hides_length(vault: FileVault) -> None:
    vault.set(NAME, Secret("x"))
    short = vault.path.stat().st_size
    vault.set(NAME, Secret("y" * 100))
    assert vault.path.stat().st_size == short


def test_vault_nonce_per_write(vault: FileVault) -> None:
    vault.set(NAME, Secret("same-value-0000"))
    first = vault.path.read_bytes()
    vault.set(NAME, Secret("same-value-0000"))
    assert vault.path.read_bytes() != first


def test_vault_concurrent_writers(vault: FileVault) -> None:
    writers = [FileVault() for _ in range(2)]
    for writer in writers:
        writer.unlock(Secret(PASSPHRASE))

    def write(index: int) -> None:
        for i in range(15):
            writers[index].set(f"name-{index}-{i}", Secret(f"value-{index}-{i}"))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(vault.names()) == 30


def test_vault_removed_while_unlocked(vault: FileVault, canary: str) -> None:
    vault.path.unlink()
    vault.set(NAME, Secret(canary))
    other = FileVault()
    other.unlock(Secret(PASSPHRASE))
    assert other.get(NAME) == Secret(canary)


def test_vault_sweeps_temp_files(vault: FileVault) -> None:
    leftover = vault.path.with_name(".vault.bin.99999.npmguard-tmp")
    leftover.write_bytes(b"ciphertext of a killed write")
    vault.set(NAME, Secret("value-after-kill"))
    assert not leftover.exists()


# --- locking and passphrases -------------------------------------------------------


def test_vault_locked_get(vault: FileVault) -> None:
    with pytest.raises(VaultLockedError) as caught:
        FileVault().get(NAME)
    assert "npmguard unlock" in str(caught.value)


def test_vault_lock_drops_key(vault: FileVault) -> None:
    vault.lock()
    with pytest.raises(VaultLockedError):
        vault.set(NAME, Secret("value-while-locked"))


def test_vault_lock_keeps_file(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    before = vault.path.read_bytes()
    vault.lock()
    assert vault.path.read_bytes() == before


def test_vault_wrong_passphrase(vault: FileVault) -> None:
    with pytest.raises(WrongPassphraseError) as caught:
        FileVault().unlock(Secret(OTHER_PASSPHRASE))
    assert "wrong passphrase" in str(caught.value)
    assert str(vault.path) in str(caught.value)


def test_vault_wrong_is_locked_error(vault: FileVault) -> None:
    with pytest.raises(VaultLockedError):
        FileVault().unlock(Secret(OTHER_PASSPHRASE))


def test_vault_wrong_keeps_key(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    with pytest.raises(WrongPassphraseError):
        vault.unlock(Secret(OTHER_PASSPHRASE))
    assert vault.get(NAME) == Secret(canary)


def test_vault_unlock_missing(home: Path) -> None:
    with pytest.raises(VaultMissingError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "npmguard unlock" in str(caught.value)


def test_vault_create_twice(vault: FileVault) -> None:
    with pytest.raises(VaultError) as caught:
        FileVault().create(Secret(PASSPHRASE), kdf=CHEAP_KDF)
    assert "exists already" in str(caught.value)


def test_vault_short_passphrase(home: Path) -> None:
    with pytest.raises(VaultError) as caught:
        FileVault().create(Secret("short"), kdf=CHEAP_KDF)
    assert "at least 8" in str(caught.value)
    assert not vault_path().exists()


def test_vault_change_passphrase(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    vault.change_passphrase(Secret(PASSPHRASE), Secret(OTHER_PASSPHRASE),
                            kdf=CHEAP_KDF)
    other = FileVault()
    other.unlock(Secret(OTHER_PASSPHRASE))
    assert other.get(NAME) == Secret(canary)


def test_vault_change_rejects_old(vault: FileVault) -> None:
    vault.change_passphrase(Secret(PASSPHRASE), Secret(OTHER_PASSPHRASE),
                            kdf=CHEAP_KDF)
    with pytest.raises(WrongPassphraseError):
        FileVault().unlock(Secret(PASSPHRASE))


def test_vault_change_new_salt(vault: FileVault) -> None:
    before = _header_json(vault.path)["salt"]
    vault.change_passphrase(Secret(PASSPHRASE), Secret(OTHER_PASSPHRASE),
                            kdf=CHEAP_KDF)
    assert _header_json(vault.path)["salt"] != before


def test_vault_change_wrong_old(vault: FileVault) -> None:
    before = vault.path.read_bytes()
    with pytest.raises(WrongPassphraseError):
        vault.change_passphrase(Secret(OTHER_PASSPHRASE), Secret("new passphrase"),
                                kdf=CHEAP_KDF)
    assert vault.path.read_bytes() == before


def test_vault_changed_elsewhere(vault: FileVault) -> None:
    other = FileVault()
    other.change_passphrase(Secret(PASSPHRASE), Secret(OTHER_PASSPHRASE),
                            kdf=CHEAP_KDF)
    with pytest.raises(VaultLockedError) as caught:
        vault.get(NAME)
    assert "passphrase was changed" in str(caught.value)


# --- the header ----------------------------------------------------------------------


def test_header_default_argon2id(home: Path) -> None:
    if not argon2id_available():
        pytest.skip("this cryptography build has no Argon2id")
    FileVault().create(Secret(PASSPHRASE))
    header = _header_json(vault_path())
    assert header["kdf"] == {"name": ARGON2ID, **ARGON2ID_DEFAULTS}


def test_header_fields(vault: FileVault) -> None:
    header = _header_json(vault.path)
    assert sorted(header) == ["check", "cipher", "format", "kdf", "salt"]
    assert header["cipher"] == "AES-256-GCM"
    assert header["format"] == 1
    assert len(base64.b64decode(header["salt"])) == 16


def test_header_scrypt(home: Path, canary: str) -> None:
    vault = FileVault()
    vault.create(Secret(PASSPHRASE), kdf=Kdf(SCRYPT, {"n": 2**10, "r": 8, "p": 1}))
    vault.set(NAME, Secret(canary))
    assert _header_json(vault.path)["kdf"] == {"name": SCRYPT, "n": 1024, "r": 8,
                                               "p": 1}
    other = FileVault()
    other.unlock(Secret(PASSPHRASE))
    assert other.get(NAME) == Secret(canary)


def test_header_raised_params(vault: FileVault, canary: str) -> None:
    # A later version may raise the parameters, and the header records the
    # ones each file was written with.
    vault.set(NAME, Secret(canary))
    stronger = Kdf(CHEAP_KDF.name, {k: v * 2 for k, v in CHEAP_KDF.params.items()})
    vault.change_passphrase(Secret(PASSPHRASE), Secret(PASSPHRASE), kdf=stronger)
    other = FileVault()
    other.unlock(Secret(PASSPHRASE))
    assert other.get(NAME) == Secret(canary)


def _rewrite_header(path: Path, change: dict[str, Any]) -> None:
    """Replace header fields and recompute the checksum, as an attacker could."""
    data = path.read_bytes()
    _, length = struct.unpack_from(">BH", data, len(MAGIC))
    start = len(MAGIC) + 3
    header = json.loads(data[start : start + length])
    header.update(change)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    rest = data[start + length : -32]
    content = MAGIC + struct.pack(">BH", 1, len(raw)) + raw + rest
    path.write_bytes(_with_digest(content))


def test_header_huge_memory(vault: FileVault) -> None:
    _rewrite_header(vault.path, {"kdf": {"name": ARGON2ID, "memory_kib": 2**40,
                                         "iterations": 1, "lanes": 1}})
    started = time.monotonic()
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "memory_kib" in str(caught.value)
    assert time.monotonic() - started < 1


def test_header_unknown_kdf(vault: FileVault) -> None:
    _rewrite_header(vault.path, {"kdf": {"name": "pbkdf2", "rounds": 1}})
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "unknown KDF" in str(caught.value)


def test_header_bound_to_body(vault: FileVault) -> None:
    # Same key (the check still matches), but the associated data differs.
    _rewrite_header(vault.path, {"extra": "field"})
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "failed authentication" in str(caught.value)


def test_header_newer_format(vault: FileVault) -> None:
    data = bytearray(vault.path.read_bytes())
    data[len(MAGIC)] = 2
    vault.path.write_bytes(_with_digest(bytes(data[:-32])))
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "upgrade npmguard" in str(caught.value)


# --- damaged files ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["magic", "header", "nonce", "body", "digest"])
def test_tampered_byte(vault: FileVault, canary: str, where: str) -> None:
    vault.set(NAME, Secret(canary))
    size = vault.path.stat().st_size
    header_end = len(MAGIC) + 3 + len(json.dumps(_header_json(vault.path),
                                                 sort_keys=True,
                                                 separators=(",", ":")))
    offset = {"magic": 3, "header": len(MAGIC) + 10, "nonce": header_end + 2,
              "body": header_end + 40, "digest": size - 5}[where]
    _flip(vault.path, offset)
    with pytest.raises(VaultCorruptError) as caught:
        vault.get(NAME)
    assert str(vault.path) in str(caught.value)


def test_tampered_unlock(vault: FileVault) -> None:
    _flip(vault.path, vault.path.stat().st_size - 40)
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "damaged" in str(caught.value)


def test_tampered_with_digest(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    data = bytearray(vault.path.read_bytes())
    data[-40] ^= 0x01
    vault.path.write_bytes(_with_digest(bytes(data[:-32])))
    with pytest.raises(VaultCorruptError) as caught:
        vault.get(NAME)
    assert "altered" in str(caught.value)


@pytest.mark.parametrize("keep", [0, 5, 18, 60, -33, -1])
def test_truncated(vault: FileVault, keep: int) -> None:
    data = vault.path.read_bytes()
    vault.path.write_bytes(data[:keep])
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert str(vault.path) in str(caught.value)


def test_truncated_one_line(vault: FileVault) -> None:
    vault.path.write_bytes(vault.path.read_bytes()[:100])
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "\n" not in str(caught.value)


def test_not_a_vault(home: Path) -> None:
    path = vault_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("//registry.npmjs.org/:_authToken=abc\n")
    with pytest.raises(VaultCorruptError) as caught:
        FileVault().unlock(Secret(PASSPHRASE))
    assert "not an npmguard file vault" in str(caught.value)


# --- secrets stay secret ------------------------------------------------------------


def test_canary_not_in_file(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    data = vault.path.read_bytes()
    assert canary.encode() not in data
    assert canary[-12:].encode() not in data
    assert PASSPHRASE.encode() not in data


def test_canary_not_in_temp_files(
    home: Path, canary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spy on the rename and the link that put each temp file in place.
    written: list[bytes] = []
    real_replace, real_link = os.replace, os.link

    def spy_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        written.append(Path(src).read_bytes())
        real_replace(src, dst, *args, **kwargs)

    def spy_link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        written.append(Path(src).read_bytes())
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "link", spy_link)
    vault = _new_vault()
    vault.set(NAME, Secret(canary))
    vault.change_passphrase(Secret(PASSPHRASE), Secret(OTHER_PASSPHRASE),
                            kdf=CHEAP_KDF)
    assert len(written) == 3
    assert not any(canary.encode() in data for data in written)


def test_no_temp_files_left(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    assert sorted(p.name for p in vault.path.parent.iterdir()) == [
        "vault.bin", "vault.lock"
    ]


def test_canary_not_in_errors(vault: FileVault, canary: str) -> None:
    vault.set(NAME, Secret(canary))
    messages = []
    for action in (
        lambda: FileVault().get(NAME),
        lambda: FileVault().unlock(Secret(OTHER_PASSPHRASE)),
    ):
        with pytest.raises(VaultError) as caught:
            action()
        messages.append(str(caught.value) + repr(caught.value))
    _flip(vault.path, 60)
    with pytest.raises(VaultError) as caught:
        vault.get(NAME)
    messages.append(str(caught.value) + repr(caught.value))
    assert not any(canary in message for message in messages)
    assert not any(PASSPHRASE in message for message in messages)


def test_canary_not_logged(
    home: Path, canary: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="npmguard")
    vault = _new_vault()
    vault.set(NAME, Secret(canary))
    vault.get(NAME)
    with contextlib.suppress(WrongPassphraseError):
        FileVault().unlock(Secret(OTHER_PASSPHRASE))
    vault.delete(NAME)
    assert "stored" in caplog.text
    assert canary not in caplog.text
    assert PASSPHRASE not in caplog.text


def test_key_not_in_repr(vault: FileVault) -> None:
    assert "encryption" not in repr(vault._key)


def test_passphrase_repr_hidden() -> None:
    passphrase = Passphrase(PASSPHRASE)
    assert PASSPHRASE[-4:] not in repr(passphrase)
    assert PASSPHRASE[-4:] not in str(passphrase)


def test_crypto_imports_confined() -> None:
    # Only the vault package may import keyring or cryptography.
    package = Path(npmguard.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(keyring|keyrings|cryptography)\b",
                         re.MULTILINE)
    offenders = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if "vault" not in path.relative_to(package).parts[:1]
        and pattern.search(path.read_text())
    ]
    assert offenders == []


# --- selection ---------------------------------------------------------------------


def test_select_auto_keyring_bus(keyring_bus: realparts.Keychain) -> None:
    assert vault_select.choose_backend().backend == "keychain"


def test_select_auto_bare_bus(bare_bus: realparts.Keychain) -> None:
    assert vault_select.choose_backend().backend == "file"


def test_select_bare_bus_forced_backend(
    bare_bus: realparts.Keychain, monkeypatch: pytest.MonkeyPatch
) -> None:
    # keyring 25 rejects a backend named in the environment that is not
    # viable, and the selection must still pick the file vault.
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", realparts.KEYRING_BACKEND)
    selection = vault_select.choose_backend()
    assert selection.backend == "file"
    assert "Secret Service" in selection.reason


def test_select_auto_no_bus(home: Path) -> None:
    assert vault_select.choose_backend().backend == "file"


def test_select_auto_locked_keychain(locked_keyring_bus: realparts.Keychain) -> None:
    assert vault_select.choose_backend().backend == "keychain"


def test_select_config_file(keyring_bus: realparts.Keychain) -> None:
    _use_file_vault()
    assert vault_select.choose_backend().backend == "file"


def test_select_config_keychain(bare_bus: realparts.Keychain) -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "npmguard" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[vault]\nbackend = "keychain"\n')
    assert vault_select.choose_backend().backend == "keychain"


def test_open_store_keychain(keyring_bus: realparts.Keychain) -> None:
    assert isinstance(vault_select.open_store(), KeychainStore)


def test_open_store_daemon(bare_bus: realparts.Keychain, standin: StandInDaemon
                           ) -> None:
    standin.unlock_new_vault()
    assert isinstance(vault_select.open_store(), DaemonStore)


def test_open_store_locked_daemon(
    bare_bus: realparts.Keychain, standin: StandInDaemon
) -> None:
    _new_vault().lock()
    with pytest.raises(VaultLockedError) as caught:
        vault_select.open_store()
    assert "the npmguard daemon has not unlocked it" in str(caught.value)


def test_open_store_no_daemon(bare_bus: realparts.Keychain) -> None:
    with pytest.raises(VaultLockedError) as caught:
        vault_select.open_store()
    message = str(caught.value)
    assert "npmguard unlock" in message
    assert "keychain" in message
    assert "\n" not in message


def test_open_store_hosted(home: Path) -> None:
    handlers: dict[str, Any] = {}
    host = daemon_ops.register(handlers)
    try:
        host.vault.create(Secret(PASSPHRASE), kdf=CHEAP_KDF)
        store = vault_select.open_store()
        store.set(NAME, Secret("hosted-value-1"))
        assert host.vault.get(NAME) == Secret("hosted-value-1")
    finally:
        daemon_ops.unregister()


def test_register_adds_ops(home: Path) -> None:
    handlers: dict[str, Any] = {"status": lambda request, peer: {"ok": True}}
    daemon_ops.register(handlers)
    try:
        assert sorted(handlers) == sorted(["status", *daemon_ops.OPS])
    finally:
        daemon_ops.unregister()


def test_unregister_locks(home: Path) -> None:
    host = daemon_ops.register({})
    host.vault.create(Secret(PASSPHRASE), kdf=CHEAP_KDF)
    daemon_ops.unregister()
    assert not host.vault.unlocked


# --- describe_vault ------------------------------------------------------------------


def test_describe_keychain(keyring_bus: realparts.Keychain) -> None:
    info = vault_select.describe_vault()
    assert info["backend"] == "keychain"
    assert info["unlocked"] is True


def test_describe_file_no_daemon(bare_bus: realparts.Keychain) -> None:
    info = vault_select.describe_vault()
    assert info["backend"] == "file"
    assert info["daemon"] == "not running"
    assert info["unlocked"] is False
    assert info["exists"] is False


def test_describe_file_unlocked(bare_bus: realparts.Keychain,
                                standin: StandInDaemon) -> None:
    standin.unlock_new_vault()
    info = vault_select.describe_vault()
    assert info["unlocked"] is True
    assert info["unlocked_in"] == "daemon"
    assert info["kdf"] == CHEAP_KDF.describe()


def test_describe_bad_settings(home: Path) -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "npmguard" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[vault]\nbackend = "floppy"\n')
    info = vault_select.describe_vault()
    assert info["backend"] is None
    assert "backend" in info["error"]


def test_describe_corrupt_file(bare_bus: realparts.Keychain) -> None:
    path = vault_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    info = vault_select.describe_vault()
    assert "not an npmguard file vault" in info["error"]


# --- daemon ops over the socket -------------------------------------------------------


def test_ops_unlock_creates(standin: StandInDaemon) -> None:
    reply = remote.unlock(Secret(PASSPHRASE), create=True)
    assert reply["created"] is True
    assert standin.unlocked


def test_ops_unlock_existing(standin: StandInDaemon) -> None:
    _new_vault().lock()
    reply = remote.unlock(Secret(PASSPHRASE))
    assert reply["created"] is False


def test_ops_unlock_missing(standin: StandInDaemon) -> None:
    with pytest.raises(VaultMissingError):
        remote.unlock(Secret(PASSPHRASE))


def test_ops_wrong_passphrase(standin: StandInDaemon) -> None:
    _new_vault()
    with pytest.raises(WrongPassphraseError) as caught:
        remote.unlock(Secret(OTHER_PASSPHRASE))
    assert "wrong passphrase" in str(caught.value)


def test_ops_status(standin: StandInDaemon) -> None:
    _new_vault()
    status = remote.vault_status()
    assert status is not None
    assert status["exists"] is True
    assert status["unlocked"] is False
    assert status["kdf"] == CHEAP_KDF.describe()


def test_ops_lock(standin: StandInDaemon) -> None:
    standin.unlock_new_vault()
    reply = remote.lock()
    assert reply["was_unlocked"] is True
    with pytest.raises(VaultLockedError):
        DaemonStore().get(NAME)


def test_ops_store_roundtrip(standin: StandInDaemon, canary: str) -> None:
    standin.unlock_new_vault()
    DaemonStore().set(NAME, Secret(canary))
    vault = FileVault()
    vault.unlock(Secret(PASSPHRASE))
    assert vault.get(NAME) == Secret(canary)


def test_ops_invalid_name(standin: StandInDaemon) -> None:
    reply = remote.request({"op": "vault.get", "name": 3})
    assert reply["ok"] is False
    assert "name must be" in reply["error"]


def test_ops_on_change(home: Path) -> None:
    seen: list[bool] = []
    host = daemon_ops.VaultHost(on_change=seen.append)
    _new_vault().lock()
    host.handle_unlock({"passphrase": PASSPHRASE}, None)
    host.handle_lock({}, None)
    assert seen == [True, False]


def test_ops_failing_listener(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(unlocked: bool) -> None:
        raise RuntimeError("listener broke")

    host = daemon_ops.VaultHost(on_change=broken)
    reply = host.handle_lock({}, None)
    assert reply["ok"] is True
    assert "change listener failed" in caplog.text


def test_ops_no_daemon(home: Path) -> None:
    assert remote.vault_status() is None


def test_ops_daemon_without_vault(home: Path, tmp_path: Path) -> None:
    # A daemon that does not know the vault ops counts as none.
    with stand_in_daemon(tmp_path, vault_ops=False):
        assert remote.vault_status() is None


_FOREIGN_SERVER = """
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
conn.settimeout(5)
try:
    received = conn.recv(65536)
except OSError:
    received = b""
print(f"received {len(received)} bytes", flush=True)
"""


def test_ops_foreign_socket(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket that another user made, e.g. under a shared /tmp.
    if os.getuid() != 0:
        pytest.skip("needs root to run a server as another user")
    # The test's own interpreter may live under root's home, which the other
    # user cannot enter; the server needs only the standard library.
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("needs /usr/bin/python3 for the other user's server")
    nobody = 65534
    shared = Path(tempfile.mkdtemp(prefix="npmguard-shared-"))
    try:
        shared.chmod(0o755)
        owned = shared / "other"
        owned.mkdir()
        os.chown(owned, nobody, nobody)
        address = owned / "daemon.sock"
        server = subprocess.Popen(
            [str(python), "-c", _FOREIGN_SERVER, str(address)],
            user=nobody, group=nobody, stdout=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, cwd="/",
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "listening"
            monkeypatch.setenv(protocol.SOCKET_ENV, str(address))
            with pytest.raises(VaultError) as caught:
                remote.unlock(Secret(PASSPHRASE))
            output, _ = server.communicate(timeout=10)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(5)
    finally:
        shutil.rmtree(shared)
    assert "not to this user" in str(caught.value)
    assert output.strip() == "received 0 bytes"


def test_ops_own_socket(home: Path, tmp_path: Path) -> None:
    # The daemon never asks itself: a server in this process counts as none.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = tmp_path / "own.sock"
    listener.bind(str(address))
    listener.listen(1)
    try:
        assert remote.vault_status(path=str(address)) is None
    finally:
        listener.close()


def test_ops_daemon_gone(standin: StandInDaemon) -> None:
    store = DaemonStore()
    standin.stop()
    with pytest.raises(VaultError) as caught:
        store.get(NAME)
    assert "stopped" in str(caught.value)


# --- the CLI --------------------------------------------------------------------------


def test_cli_secure_token_file_vault(
    home: Path, canary: str, standin: StandInDaemon
) -> None:
    _use_file_vault()
    npmrc = _write_npmrc(home, canary)
    unlock = _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    assert unlock.returncode == 0, unlock.stderr
    assert "Created and unlocked" in unlock.stdout
    secure = _cli("secure", "--token-helper", "never")
    assert secure.returncode == 0, secure.stderr
    assert canary not in npmrc.read_text()
    token = _cli("token", "--registry", REGISTRY)
    assert token.returncode == 0, token.stderr
    assert token.stdout == canary + "\n"
    assert canary.encode() not in vault_path().read_bytes()
    for result in (unlock, secure):
        assert canary not in result.stdout + result.stderr


def test_cli_bare_bus_auto(
    bare_bus: realparts.Keychain, home: Path, canary: str, standin: StandInDaemon
) -> None:
    _write_npmrc(home, canary)
    assert _cli("unlock", "--passphrase-stdin",
                stdin=PASSPHRASE + "\n").returncode == 0
    assert _cli("secure", "--token-helper", "never").returncode == 0
    token = _cli("token", "--registry", REGISTRY)
    assert token.stdout == canary + "\n"
    assert "vault.set" in standin.requests


def test_cli_unlock_wrong_passphrase(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    _new_vault().lock()
    result = _cli("unlock", "--passphrase-stdin", stdin=OTHER_PASSPHRASE + "\n")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "wrong passphrase" in result.stderr
    assert "Traceback" not in result.stderr
    assert OTHER_PASSPHRASE not in result.stderr


def test_cli_unlock_twice(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    _new_vault().lock()
    _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    result = _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    assert result.returncode == 0
    assert "unlocked already" in result.stdout


def test_cli_unlock_no_daemon(home: Path) -> None:
    _use_file_vault()
    result = _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "no npmguard daemon is running" in result.stderr


def test_cli_unlock_empty_stdin(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    result = _cli("unlock", "--passphrase-stdin", stdin="")
    assert result.returncode == 2
    assert "no passphrase on stdin" in result.stderr


def test_cli_unlock_no_terminal(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    result = _cli("unlock")
    assert result.returncode == 2
    assert "--passphrase-stdin" in result.stderr


def test_cli_unlock_short_passphrase(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    result = _cli("unlock", "--passphrase-stdin", stdin="short\n")
    assert result.returncode == 2
    assert "at least 8" in result.stderr
    assert not vault_path().exists()


def test_cli_unlock_keychain(keyring_bus: realparts.Keychain) -> None:
    result = _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    assert result.returncode == 2
    assert "OS keychain" in result.stderr


def test_cli_lock(home: Path, canary: str, standin: StandInDaemon) -> None:
    _use_file_vault()
    _write_npmrc(home, canary)
    _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    _cli("secure", "--token-helper", "never")
    lock = _cli("lock")
    assert lock.returncode == 0
    assert "dropped" in lock.stdout
    token = _cli("token", "--registry", REGISTRY)
    assert token.returncode == 2
    assert len(token.stderr.splitlines()) == 1, token.stderr
    assert "npmguard unlock" in token.stderr


def test_cli_lock_no_daemon(home: Path) -> None:
    result = _cli("lock")
    assert result.returncode == 0
    assert "No npmguard daemon" in result.stdout


def test_cli_secure_locked(bare_bus: realparts.Keychain, home: Path, canary: str
                           ) -> None:
    npmrc = _write_npmrc(home, canary)
    before = npmrc.read_bytes()
    result = _cli("secure", "--token-helper", "never")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "npmguard unlock" in result.stderr
    assert npmrc.read_bytes() == before


def test_cli_change_passphrase(home: Path, canary: str, standin: StandInDaemon
                               ) -> None:
    _use_file_vault()
    _write_npmrc(home, canary)
    _cli("unlock", "--passphrase-stdin", stdin=PASSPHRASE + "\n")
    _cli("secure", "--token-helper", "never")
    change = _cli("unlock", "--change-passphrase", "--passphrase-stdin",
                  stdin=f"{PASSPHRASE}\n{OTHER_PASSPHRASE}\n")
    assert change.returncode == 0, change.stderr
    assert "new key" in change.stdout
    assert _cli("token", "--registry", REGISTRY).stdout == canary + "\n"
    with pytest.raises(WrongPassphraseError):
        FileVault().unlock(Secret(PASSPHRASE))


def test_cli_change_wrong_old(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    _new_vault().lock()
    before = vault_path().read_bytes()
    result = _cli("unlock", "--change-passphrase", "--passphrase-stdin",
                  stdin=f"{OTHER_PASSPHRASE}\nthird passphrase\n")
    assert result.returncode == 2
    assert "wrong passphrase" in result.stderr
    assert vault_path().read_bytes() == before


# --- the CLI on a terminal ------------------------------------------------------------


def test_tty_unlock_asks_twice(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    code, output = _run_in_pty(["unlock"], [PASSPHRASE, PASSPHRASE])
    assert code == 0, output
    assert "Repeat it" in output
    assert standin.unlocked


def test_tty_unlock_mismatch(home: Path, standin: StandInDaemon) -> None:
    _use_file_vault()
    code, output = _run_in_pty(["unlock"], [PASSPHRASE, OTHER_PASSPHRASE])
    assert code == 2, output
    assert "differ" in output
    assert not vault_path().exists()


def test_tty_secure_asks_once(bare_bus: realparts.Keychain, home: Path,
                              canary: str) -> None:
    _new_vault().lock()
    npmrc = _write_npmrc(home, canary)
    code, output = _run_in_pty(["secure", "--token-helper", "never"], [PASSPHRASE])
    assert code == 0, output
    assert output.count("Passphrase for the file vault") == 1
    assert canary not in npmrc.read_text()
    assert canary not in output
    assert PASSPHRASE not in output


def test_tty_token_wrong(bare_bus: realparts.Keychain, home: Path, canary: str
                         ) -> None:
    vault = _new_vault()
    migrate.secure_file(_write_npmrc(home, canary), vault)
    vault.lock()
    code, output = _run_in_pty(["token", "--registry", REGISTRY], [OTHER_PASSPHRASE])
    assert code == 2, output
    assert "wrong passphrase" in output
    assert "Traceback" not in output
