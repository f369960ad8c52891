"""The audit trail: an append-only, hash-chained JSONL log of token events.

Each line of ``<state_dir>/audit.jsonl`` (mode 0600, directory 0700) is one
record, written as canonical JSON (sorted keys, no spaces, ASCII only)::

    {"event":"handed-out","fingerprint":"2b7f0c4e91aa","hash":"…","prev":"…",
     "registry":"//registry.npmjs.org/","seq":7,"time":"2024-12-04T18:06:00.123Z"}

``seq`` counts from 1 with no gaps. ``prev`` is the SHA-256 of the previous
line's bytes (without its newline), or 64 zeros on the first record.
``hash`` is the SHA-256 of the canonical JSON of the record without
``hash``. So editing, deleting, inserting or reordering any line breaks the
chain at that line, and ``verify`` names it.

The end of the log is protected by ``audit.head`` next to it: one line
``<seq, 20 digits> <SHA-256 of the last line>``, rewritten after every
append. A log that ends before the head's record was cut short. ``record``
never hides such a cut. It appends a ``failed`` record that describes it
and continues the numbering after the head's ``seq``, so the gap stays in
the chain for ``verify`` to report.

What the chain cannot prove: there is no key. A local attacker who can
rewrite both files (any process running as the user) can forge a whole new
consistent history, and one who deletes both files leaves an empty trail.
The chain detects edits by tools and people who do not recompute it, and
accidental damage. A copy of the head kept elsewhere (a remote log, a
printed hash) would be needed against a determined local attacker.

Records never contain a secret. ``record`` rejects field names that suggest
one (token, password, auth, secret, otp, key, value and the like). It also
rejects string values that look like an npm token, an auth header or a URL
with a password, a ``fingerprint`` that is not 12 hex digits, and a
``command`` longer than two argv words. It cannot recognise every secret by
its value, so callers pass fingerprints (``Secret.fingerprint``), never
values.

Concurrency and crashes. Appends from the daemon's threads and from any
number of CLI processes are serialised by a thread lock plus an advisory
lock on ``audit.lock`` (``flock``; ``msvcrt.locking`` on Windows). Each
record is one ``os.write`` on an ``O_APPEND`` descriptor. The last line's
hash is cached in the process and the tail is read again when the log's
size or inode changed since this process last wrote it. A crash or a full
disk during a write can leave a torn last line. The next ``record``
terminates it with a newline and appends a ``failed`` record with
``problem: "torn-line"``, the line number and the SHA-256 of its bytes, so
the torn bytes stay in the file as evidence and ``verify`` accepts exactly
that line. Two or more trailing lines that are not records are not a
crash, and ``record`` raises AuditError until a person looks. A crash
between writing the log and writing the head leaves the head one record
behind, which the next ``record`` repairs; it cannot tell that from one
correctly chained line appended by another program. ``read`` and
``verify`` take the lock shared, so they never see half an append.

No fsync by default: on the development machine an ``fsync`` per record
cost about 0.2 ms, four times the rest of ``record`` and about 15% of the
daemon's time for a token request (``bench/audit_append.py``). A power
loss can therefore lose the last records or leave the head out of step
with the log. When the head outlived the records, ``verify`` reports the
loss and ``record`` records it, as for a cut; when both were lost, nothing
shows. Set ``FSYNC = True`` to sync the log before the head is written.

NOTE: the log is never rotated and grows by about 400 bytes per record.
Rotation would have to carry the chain into the next file (its first
``prev`` being the old file's last line) and keep the old head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from npmguard.errors import NpmguardError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

EVENTS = (
    "found",
    "secured",
    "restored",
    "login",
    "handed-out",
    "minted",
    "rotated",
    "revoked",
    "refused",
    "failed",
    "reminder",
)

LOG_NAME = "audit.jsonl"
ZERO_HASH = "0" * 64
# Sync the log to disk before the head is written; see the module docstring.
FSYNC = False

# Fields every record gets from ``record`` itself.
RESERVED_FIELDS = frozenset({"seq", "time", "event", "prev", "hash"})
# Bounds that keep a line cheap to write and read; a record is a few hundred
# bytes in practice.
MAX_STRING_CHARS = 4096
MAX_ITEMS = 64
MAX_LINE_BYTES = 64 * 1024
# How far back ``record`` reads to find the last complete line.
_TAIL_CHUNK = 8192

_HEAD_FORMAT = "{seq:020d} {digest}\n"
_HEAD_BYTES = 86
_HEAD_RE = re.compile(rb"(\d{20}) ([0-9a-f]{64})\n")

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Whole words of a field name that suggest it contains a secret, or
# something that often contains one (argv, the environment).
_SECRET_WORDS = frozenset(
    {
        "token", "tokens", "password", "passwords", "passwd", "pass", "pwd",
        "pw", "passphrase", "secret", "secrets", "auth", "otp", "totp", "value",
        "values", "key", "keys", "apikey", "privkey", "private", "cookie",
        "cookies", "bearer", "credential", "credentials", "cred", "creds",
        "pin", "argv", "args", "cmdline", "env", "environ", "environment",
    }
)
# Parts that suggest a secret wherever they appear in a name: "_authToken",
# "npmPassword", "clientSecret". "auth" also rejects "author"; rename such a
# field.
_SECRET_PARTS = ("token", "passw", "secret", "auth", "credential", "cookie")
# Values that look like a credential: an npm token, an npmrc credential
# line, an HTTP auth header, a URL with a password in it.
_SECRET_VALUE_RE = re.compile(
    r"npm_[A-Za-z0-9]{36}"
    r"|_(?:authToken|auth|password)\s*=\s*\S"
    r"|\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|://[^/\s@:]*:[^/\s@]+@"
)
# No newline translation on Windows; no following a planted symlink.
_OPEN_FLAGS = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{12}")
# "npm publish", never more: later argv words may carry an OTP or a token.
_COMMAND_RE = re.compile(r"[^\s=]+(?: [^\s=-][^\s=]*)?")


class AuditError(NpmguardError):
    """The audit log cannot be read or appended to as it is."""


@dataclass(frozen=True)
class Problem:
    """One finding of ``verify``: which file and line, what kind, what."""

    path: Path
    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


@dataclass
class VerifyResult:
    """The outcome of ``verify``.

    ``ok`` is true when no problem was found. ``count`` is the number of
    valid records. ``notes`` lists what was found but is not a problem, such
    as a torn line that a later record marked as recovered.
    """

    path: Path
    ok: bool
    count: int
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)


# --------------------------------------------------------------------------
# Public API


def audit_path() -> Path:
    """Return the path of the audit log, ``<state_dir>/audit.jsonl``."""
    global _path_cache
    # platformdirs takes about 10 us per call, a sixth of a record, so the
    # result is kept until a variable it reads changes (tests change them).
    key = tuple(os.environ.get(name) for name in _PATH_VARIABLES)
    cached = _path_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    from npmguard.paths import state_dir

    path = state_dir() / LOG_NAME
    _path_cache = (key, path)
    return path


# The variables paths.state_dir and platformdirs read on Linux and macOS.
# On Windows platformdirs calls the shell API, whose result does not change
# while a process runs.
_PATH_VARIABLES = ("NPMGUARD_STATE_DIR", "XDG_STATE_HOME", "HOME")
_path_cache: tuple[tuple[str | None, ...], Path] | None = None


def head_path(log_path: Path) -> Path:
    """Return the head file that goes with ``log_path`` (``audit.head``)."""
    return log_path.with_suffix(".head")


def lock_path(log_path: Path) -> Path:
    return log_path.with_suffix(".lock")


def record(event: str, **fields: object) -> None:
    """Append one record of ``event`` with ``fields`` to the audit log.

    Raises ValueError, naming the field but never its value, for an unknown
    event or a field that is reserved, suggests a secret or is not a JSON
    scalar, a list of scalars or a dict of those. Raises OSError when the
    log cannot be written, and AuditError when its last lines are not
    audit records.
    """
    checked = _checked_fields(event, fields)
    _APPENDER.append(audit_path(), event, checked)


def note(event: str, **fields: object) -> bool:
    """Record ``event`` like ``record``, but log a failure instead of raising.

    For callers in the middle of a change (a rotation, a login) that must
    not stop halfway because the audit log is full or a reason text looked
    like a secret. Returns whether the record was written.
    """
    try:
        record(event, **fields)
    except (ValueError, OSError, AuditError) as err:
        logging.getLogger(__name__).warning(
            "could not add a %s record to the audit trail: %s", event, err
        )
        return False
    return True


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """Return the records of the audit log, oldest first.

    A missing log has no records. A torn line that a later record marks as
    recovered is skipped, and so is a torn last line (with a warning).
    Any other line that is not a JSON object with a ``seq`` raises
    AuditError naming the file and line. The chain is not checked here;
    that is ``verify``.
    """
    log_path = audit_path() if path is None else path
    scan = _read_locked(log_path, lambda: _scan(log_path))
    records: list[dict[str, Any]] = []
    for number, entry in enumerate(scan.entries, 1):
        if entry.record is not None:
            records.append(entry.record)
            continue
        if _recovered_torn(scan, number):
            continue
        if number == len(scan.entries) and not scan.terminated:
            log.warning(
                "%s:%d: skipped a torn last line (an interrupted append)",
                log_path, number,
            )
            continue
        raise AuditError(entry.error, path=log_path, line=number)
    return records


def verify(path: Path | None = None) -> VerifyResult:
    """Check the whole chain and the head; report each problem by line.

    Raises OSError when the log exists but cannot be read.
    """
    log_path = audit_path() if path is None else path
    return _Verifier(log_path).run()


def command_words(argv: Sequence[str]) -> str:
    """Return the part of ``argv`` the audit log keeps: at most two words.

    The program's base name, then the subcommand when it is a plain word
    (``npm publish``). Options are dropped, because an option or a later
    word may carry an OTP or a token.
    """
    if not argv:
        return ""
    words = [os.path.basename(argv[0]) or argv[0]]
    if len(argv) > 1 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}", argv[1]):
        words.append(argv[1])
    text = " ".join(words)
    return text if _COMMAND_RE.fullmatch(text) else ""


def close() -> None:
    """Close the descriptors this process keeps open for appending."""
    _APPENDER.close()


# --------------------------------------------------------------------------
# Field checks


def _checked_fields(event: str, fields: dict[str, object]) -> dict[str, Any]:
    if event not in EVENTS:
        raise ValueError(
            f"audit field 'event': unknown event; expected one of {', '.join(EVENTS)}"
        )
    checked: dict[str, Any] = {}
    for name, value in fields.items():
        _check_name(name, name)
        if name in RESERVED_FIELDS:
            raise ValueError(f"audit field {name!r}: reserved, set by record()")
        checked[name] = _checked_value(name, value, depth=0)
    return checked


def _check_name(name: str, where: str) -> None:
    if name in _ACCEPTED_NAMES:
        return
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"audit field {where!r}: a name is a letter, then up to 39 letters, "
            "digits or underscores"
        )
    lowered = name.lower()
    words = {word.lower() for word in _WORD_RE.findall(name)}
    if words & _SECRET_WORDS or any(part in lowered for part in _SECRET_PARTS):
        raise ValueError(
            f"audit field {where!r}: the name suggests a secret; audit records "
            "hold fingerprints, never values"
        )
    if len(_ACCEPTED_NAMES) < _MAX_ACCEPTED_NAMES:
        _ACCEPTED_NAMES.add(name)


# Names that passed the check. Callers use a dozen names, so a hand-out
# skips the regular expressions; the bound only guards against a caller
# that makes names up.
_ACCEPTED_NAMES: set[str] = set()
_MAX_ACCEPTED_NAMES = 1024


def _checked_value(name: str, value: object, depth: int) -> Any:
    if isinstance(value, str):
        return _checked_string(name, value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {name!r}: not a finite number")
        return value
    if isinstance(value, list | tuple) and depth < 2:
        if len(value) > MAX_ITEMS:
            raise ValueError(f"audit field {name!r}: over {MAX_ITEMS} items")
        return [_checked_scalar(name, item) for item in value]
    if isinstance(value, dict) and depth == 0:
        if len(value) > MAX_ITEMS:
            raise ValueError(f"audit field {name!r}: over {MAX_ITEMS} items")
        checked = {}
        for key, item in value.items():
            where = f"{name}.{key}"
            if not isinstance(key, str):
                raise ValueError(f"audit field {name!r}: dict keys must be strings")
            _check_name(key, where)
            checked[key] = _checked_value(where, item, depth=1)
        return checked
    raise ValueError(
        f"audit field {name!r}: {type(value).__name__} is not allowed; use a "
        "JSON scalar, a list of scalars or a dict of those"
    )


def _checked_scalar(name: str, value: object) -> Any:
    if isinstance(value, list | tuple | dict):
        raise ValueError(f"audit field {name!r}: list items must be scalars")
    return _checked_value(name, value, depth=2)


def _checked_string(name: str, value: str) -> str:
    if len(value) > MAX_STRING_CHARS:
        raise ValueError(f"audit field {name!r}: over {MAX_STRING_CHARS} characters")
    if _SECRET_VALUE_RE.search(value):
        raise ValueError(
            f"audit field {name!r}: the value looks like a credential; record "
            "its fingerprint instead"
        )
    leaf = name.rsplit(".", 1)[-1]
    is_fingerprint = leaf in ("fingerprint", "fingerprints") or leaf.endswith(
        "_fingerprint"
    )
    if is_fingerprint and not _FINGERPRINT_RE.fullmatch(value):
        raise ValueError(
            f"audit field {name!r}: a fingerprint is 12 lower-case hex digits "
            "(Secret.fingerprint)"
        )
    if leaf == "command" and value and not _COMMAND_RE.fullmatch(value):
        raise ValueError(
            f"audit field {name!r}: at most two argv words with no options "
            "(see command_words)"
        )
    return value


# --------------------------------------------------------------------------
# Serialising


# One encoder for every record: json.dumps with these options builds a new
# one per call.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def _canonical(data: dict[str, Any]) -> bytes:
    return _ENCODER.encode(data).encode("ascii")


def _record_hash(entry: dict[str, Any]) -> str:
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _utc_now() -> str:
    now = time.time()
    seconds = int(now)
    millis = min(int((now - seconds) * 1000), 999)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{millis:03d}Z"


def _build_line(seq: int, prev: str, event: str, fields: dict[str, Any]) -> bytes:
    entry: dict[str, Any] = dict(fields)
    entry.update(seq=seq, time=_utc_now(), event=event, prev=prev)
    entry["hash"] = _record_hash(entry)
    line = _canonical(entry)
    if len(line) >= MAX_LINE_BYTES:
        raise ValueError(f"audit record is {len(line)} bytes, over {MAX_LINE_BYTES}")
    return line


def _parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """Return the record on ``raw`` or None and the reason it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    seq = data.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None, "not an audit record (no integer seq)"
    return data, ""


# --------------------------------------------------------------------------
# Locking: the one place that picks a cross-process lock per platform.

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]


def _lock(fd: int, *, shared: bool = False) -> None:
    if _fcntl is None:  # pragma: no cover - Windows
        # NOTE: not run in this project's tests, which run on Linux.
        # msvcrt has no shared lock, so readers exclude each other too.
        # LK_LOCK gives up after about 10 s, so it is retried.
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue
    _fcntl.flock(fd, _fcntl.LOCK_SH if shared else _fcntl.LOCK_EX)


def _unlock(fd: int) -> None:
    if _fcntl is None:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    _fcntl.flock(fd, _fcntl.LOCK_UN)


def _read_locked(log_path: Path, read: Callable[[], _T]) -> _T:
    """Call ``read`` under the shared lock, so it sees the files between appends.

    Without it a reader could see a half-written line, or a head one record
    ahead of the log it read. With no lock file no writer has run yet, and
    a reader creates nothing: it reads unlocked, and reads again under the
    lock if a writer created the file meanwhile.
    """
    lock_file = lock_path(log_path)
    for _ in range(3):
        try:
            fd = os.open(lock_file, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            result = read()
            if not os.path.exists(lock_file):
                return result
            continue
        try:
            _lock(fd, shared=True)
            try:
                return read()
            finally:
                _unlock(fd)
        finally:
            os.close(fd)
    return read()


# --------------------------------------------------------------------------
# Appending

def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CREAT | _OPEN_FLAGS, 0o600)
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o077 and hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_at(fd: int, size: int, offset: int) -> bytes:
    # Not os.pread, which Windows lacks. Callers hold both locks, and writes
    # on an O_APPEND descriptor go to the end wherever the offset is.
    os.lseek(fd, offset, os.SEEK_SET)
    parts = []
    while size > 0:
        block = os.read(fd, size)
        if not block:
            break
        parts.append(block)
        size -= len(block)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass
class _Tail:
    """The end of the chain: last seq, its line's digest and its ``prev``."""

    seq: int = 0
    digest: str = ZERO_HASH
    # ``prev`` of the last record, to recognise a head one record behind.
    prev: str | None = None


class _Appender:
    """The open descriptors and the cached chain end of one process."""

    def __init__(self) -> None:
        self._thread_lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._path: Path | None = None
        self._log_name = ""
        self._head_name = ""
        self._log_fd: int | None = None
        self._head_fd: int | None = None
        self._lock_fd: int | None = None
        # (st_dev, st_ino, st_size) of the log and (st_dev, st_ino) of the head
        # after this process's last append; None forces a read of the tail.
        self._log_id: tuple[int, int, int] | None = None
        self._head_id: tuple[int, int] | None = None
        self._tail = _Tail()

    def after_fork(self) -> None:
        # The child shares the parent's open file descriptions, and flock
        # treats a shared description as one owner, so the child must open
        # its own. The parent's thread lock may be held by a thread that
        # does not exist in the child.
        self._thread_lock = threading.Lock()
        for fd in (self._log_fd, self._head_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._reset()

    def close(self) -> None:
        with self._thread_lock:
            for fd in (self._log_fd, self._head_fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._reset()

    def append(self, path: Path, event: str, fields: dict[str, Any]) -> None:
        with self._thread_lock:
            if self._pid != os.getpid():
                self.after_fork()
            if path != self._path:
                self._open(path)
            assert self._lock_fd is not None
            _lock(self._lock_fd)
            try:
                self._append_locked(path, event, fields)
            finally:
                _unlock(self._lock_fd)

    def _open(self, path: Path) -> None:
        for fd in (self._log_fd, self._head_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._reset()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _open_private(lock_path(path), os.O_RDWR)
        self._path = path
        self._log_name = str(path)
        self._head_name = str(head_path(path))

    def _append_locked(self, path: Path, event: str, fields: dict[str, Any]) -> None:
        if not self._cache_valid():
            self._reload(path)
        line = _build_line(self._tail.seq + 1, self._tail.digest, event, fields)
        self._write_record(line)

    def _cache_valid(self) -> bool:
        if self._log_fd is None or self._head_fd is None or self._log_id is None:
            return False
        try:
            on_disk = os.stat(self._log_name)
            head = os.stat(self._head_name)
        except FileNotFoundError:
            return False
        info = os.fstat(self._log_fd)
        log_id = (info.st_dev, info.st_ino, info.st_size)
        return (
            log_id == self._log_id
            and (on_disk.st_dev, on_disk.st_ino) == log_id[:2]
            and (head.st_dev, head.st_ino) == self._head_id
        )

    def _reload(self, path: Path) -> None:
        """Reopen both files and read the chain's end from disk.

        Anything inconsistent (a torn line, a head that is missing or does
        not match the log) gets a ``failed`` record before the caller's.
        """
        for fd in (self._log_fd, self._head_fd):
            if fd is not None:
                os.close(fd)
        self._log_fd = self._head_fd = None
        self._log_id = None
        self._log_fd = _open_private(path, os.O_RDWR | os.O_APPEND)
        self._head_fd = _open_private(head_path(path), os.O_RDWR)
        head_info = os.fstat(self._head_fd)
        self._head_id = (head_info.st_dev, head_info.st_ino)

        notes = self._read_tail(path)
        notes += self._check_head(path)
        for fields in notes:
            log.warning(
                "audit log %s: %s; recording it as seq %d",
                path, fields["reason"], self._tail.seq + 1,
            )
            line = _build_line(self._tail.seq + 1, self._tail.digest, "failed", fields)
            self._write_record(line)

    def _read_tail(self, path: Path) -> list[dict[str, Any]]:
        """Set ``self._tail`` from the log's last lines; repair a torn end."""
        assert self._log_fd is not None
        size = os.fstat(self._log_fd).st_size
        self._tail = _Tail()
        if size == 0:
            return []

        data = self._read_back(size)
        lines = data.split(b"\n")
        terminated = lines[-1] == b""
        if terminated:
            lines.pop()
        last, _ = _parse_line(lines[-1])
        if last is not None:
            if not terminated:
                # The whole record reached the disk but its newline did not,
                # or another program appended a line without one: either way
                # it is chained onto, and verify checks it like any other.
                _write_all(self._log_fd, b"\n")
            self._set_tail(lines[-1], last)
            return []

        # The last line is torn; the one before it must be a record.
        before: dict[str, Any] | None = None
        if len(lines) >= 2:
            before, _ = _parse_line(lines[-2])
            if before is None:
                raise AuditError(
                    "the log ends in two or more lines that are not audit "
                    "records; check it with `npmguard audit --verify` and move "
                    "it aside to start a new one",
                    path=path,
                )
        torn = lines[-1]
        number = self._count_lines(size) + (0 if terminated else 1)
        if not terminated:
            _write_all(self._log_fd, b"\n")
        if before is not None:
            self._set_tail(lines[-2], before)
        reason = f"line {number} is a torn record from an interrupted append"
        return [
            {
                "problem": "torn-line",
                "reason": reason,
                "line": number,
                "line_bytes": len(torn),
                "line_sha256": _line_digest(torn),
            }
        ]

    def _read_back(self, size: int) -> bytes:
        """Read from the end until three line breaks or the file start."""
        assert self._log_fd is not None
        chunk = _TAIL_CHUNK
        while True:
            start = max(0, size - chunk)
            data = _read_at(self._log_fd, size - start, start)
            if start == 0 or data.count(b"\n") >= 3:
                if start:
                    # Drop the partial line at the front of the window.
                    data = data[data.index(b"\n") + 1 :]
                return data
            chunk *= 4

    def _count_lines(self, size: int) -> int:
        assert self._log_fd is not None
        count = 0
        offset = 0
        while offset < size:
            block = _read_at(self._log_fd, min(1 << 20, size - offset), offset)
            if not block:
                break
            count += block.count(b"\n")
            offset += len(block)
        return count

    def _set_tail(self, raw: bytes, entry: dict[str, Any]) -> None:
        prev = entry.get("prev")
        self._tail = _Tail(
            seq=int(entry["seq"]),
            digest=_line_digest(raw),
            prev=prev if isinstance(prev, str) else None,
        )

    def _check_head(self, path: Path) -> list[dict[str, Any]]:
        assert self._head_fd is not None
        data = _read_at(self._head_fd, _HEAD_BYTES + 1, 0)
        tail = self._tail

        if not data:
            if tail.seq == 0:
                return []
            return [{"problem": "head-missing", "reason": "audit.head was missing",
                     "log_seq": tail.seq}]
        match = _HEAD_RE.fullmatch(data)
        if match is None:
            return [{"problem": "head-unreadable",
                     "reason": "audit.head was not a seq and a hash",
                     "log_seq": tail.seq}]
        head_seq = int(match.group(1))
        head_digest = match.group(2).decode()

        if head_seq == tail.seq and head_digest == tail.digest:
            return []
        if head_seq == tail.seq - 1 and head_digest == (tail.prev or ZERO_HASH):
            log.info(
                "audit log %s: audit.head was one record behind (an interrupted "
                "append); updated it", path,
            )
            return []
        if head_seq > tail.seq:
            reason = (
                f"the log ended at seq {tail.seq} but audit.head recorded seq "
                f"{head_seq}: records were removed from the end"
            )
            fields = {"problem": "head-ahead", "reason": reason,
                      "head_seq": head_seq, "log_seq": tail.seq}
            # Continue after the head's number, so the gap stays visible.
            self._tail = _Tail(seq=head_seq, digest=tail.digest, prev=tail.prev)
            return [fields]
        reason = (
            f"audit.head (seq {head_seq}) did not match the log's last record "
            f"(seq {tail.seq})"
        )
        return [{"problem": "head-mismatch", "reason": reason,
                 "head_seq": head_seq, "log_seq": tail.seq}]

    def _write_record(self, line: bytes) -> None:
        assert self._log_fd is not None and self._head_fd is not None
        self._log_id = None
        _write_all(self._log_fd, line + b"\n")
        if FSYNC:
            os.fsync(self._log_fd)
        prev = self._tail.digest
        seq = self._tail.seq + 1
        self._tail = _Tail(seq=seq, digest=_line_digest(line), prev=prev)
        head = _HEAD_FORMAT.format(seq=seq, digest=self._tail.digest).encode()
        try:
            os.lseek(self._head_fd, 0, os.SEEK_SET)
            _write_all(self._head_fd, head)
            if os.fstat(self._head_fd).st_size != _HEAD_BYTES:
                os.ftruncate(self._head_fd, _HEAD_BYTES)
        except OSError as err:
            # The record is in the log; raising would make a caller retry
            # and write it twice. The stale head shows up in verify.
            log.error("audit log: could not update audit.head: %s", err)
            return
        info = os.fstat(self._log_fd)
        self._log_id = (info.st_dev, info.st_ino, info.st_size)


_APPENDER = _Appender()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_APPENDER.after_fork)


# --------------------------------------------------------------------------
# Reading and verifying


@dataclass
class _Entry:
    raw: bytes
    record: dict[str, Any] | None
    error: str


@dataclass
class _Scan:
    path: Path
    entries: list[_Entry]
    # False when the last line has no newline (a torn tail, or a record
    # whose newline was not written).
    terminated: bool
    exists: bool


def _scan(path: Path) -> _Scan:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return _Scan(path, [], True, exists=False)
    if not data:
        return _Scan(path, [], True, exists=True)
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    entries = []
    for raw in lines:
        parsed, error = _parse_line(raw)
        entries.append(_Entry(raw, parsed, error))
    return _Scan(path, entries, terminated, exists=True)


def _recovered_torn(scan: _Scan, number: int) -> bool:
    """Tell whether line ``number`` is a torn line the next record recovered."""
    if number >= len(scan.entries):
        return False
    torn = scan.entries[number - 1]
    marker = scan.entries[number].record
    return (
        marker is not None
        and marker.get("event") == "failed"
        and marker.get("problem") == "torn-line"
        and marker.get("line") == number
        and marker.get("line_sha256") == _line_digest(torn.raw)
    )


def _read_head(path: Path) -> tuple[int, str] | str | None:
    """Return the head's (seq, digest), None when missing, or a problem text."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_HEAD_BYTES + 1)
    except FileNotFoundError:
        return None
    if not data:
        # Created but never written: a first append that failed.
        return None
    match = _HEAD_RE.fullmatch(data)
    if match is None:
        return "not a seq and a hash"
    return int(match.group(1)), match.group(2).decode()


class _Verifier:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_file = head_path(path)
        self.problems: list[Problem] = []
        self.notes: list[Problem] = []

    def problem(self, line: int | None, kind: str, message: str) -> None:
        self.problems.append(Problem(self.path, line, kind, message))

    def run(self) -> VerifyResult:
        scan, head = _read_locked(
            self.path, lambda: (_scan(self.path), _read_head(self.head_file))
        )
        count = 0
        last_raw: bytes | None = None
        last_line = 0
        last_seq = 0
        for number, entry in enumerate(scan.entries, 1):
            if entry.record is None:
                self._bad_line(scan, number, entry)
                continue
            self._check_record(number, entry, last_raw, last_line, last_seq)
            if number == len(scan.entries) and not scan.terminated:
                self.notes.append(Problem(
                    self.path, number, "unterminated",
                    "the last record has no newline (an interrupted append); "
                    "the next record adds it",
                ))
            count += 1
            last_raw, last_line, last_seq = entry.raw, number, entry.record["seq"]
        self._check_head(scan, head, last_raw, last_line, last_seq)
        return VerifyResult(
            self.path, not self.problems, count, self.problems, self.notes
        )

    def _bad_line(self, scan: _Scan, number: int, entry: _Entry) -> None:
        if _recovered_torn(scan, number):
            self.notes.append(Problem(
                self.path, number, "torn-recovered",
                f"torn line from an interrupted append, marked as recovered by "
                f"line {number + 1}",
            ))
        elif number == len(scan.entries) and not scan.terminated:
            self.problem(
                number, "torn-tail",
                "torn last line: an append was interrupted (a crash or a full "
                "disk) and the record is incomplete; the next record marks it "
                "as recovered",
            )
        else:
            self.problem(number, "malformed", entry.error)

    def _check_record(
        self,
        number: int,
        entry: _Entry,
        last_raw: bytes | None,
        last_line: int,
        last_seq: int,
    ) -> None:
        record = entry.record
        assert record is not None
        for name in ("time", "event", "prev", "hash"):
            if not isinstance(record.get(name), str):
                self.problem(number, "malformed", f"field {name!r} is missing")
        if isinstance(record.get("hash"), str) and record["hash"] != _record_hash(
            record
        ):
            self.problem(
                number, "edited",
                f"record seq {record['seq']} does not match its hash: the line "
                "was edited",
            )
        seq = record["seq"]
        if seq != last_seq + 1:
            self.problem(number, "sequence", _sequence_message(seq, last_seq, record))
        expected_prev = ZERO_HASH if last_raw is None else _line_digest(last_raw)
        if record.get("prev") != expected_prev:
            before = "no record" if last_raw is None else f"line {last_line}"
            self.problem(
                number, "chain",
                f"prev does not match {before}: a line before this one was "
                "edited, deleted, inserted or moved",
            )

    def _check_head(
        self,
        scan: _Scan,
        head: tuple[int, str] | str | None,
        last_raw: bytes | None,
        last_line: int,
        last_seq: int,
    ) -> None:
        head_name = self.head_file.name
        if head is None:
            if scan.entries:
                self.problems.append(Problem(
                    self.head_file, None, "head",
                    "missing: records removed from the end of the log cannot "
                    "be detected",
                ))
            return
        if isinstance(head, str):
            self.problems.append(Problem(self.head_file, None, "head", head))
            return
        head_seq, head_digest = head
        if not scan.exists:
            self.problem(
                None, "head",
                f"missing, but {head_name} records {head_seq} records: the log "
                "was deleted or moved",
            )
            return
        last_digest = ZERO_HASH if last_raw is None else _line_digest(last_raw)
        if head_seq == last_seq and head_digest == last_digest:
            return
        if head_seq > last_seq:
            self.problem(
                last_line + 1, "truncated",
                f"missing: {head_name} records seq {head_seq} but the log ends "
                f"at seq {last_seq}: records were removed from the end",
            )
        elif head_seq == last_seq:
            self.problem(
                last_line, "head",
                f"differs from the record {head_name} records for seq {head_seq}",
            )
        else:
            self.problem(
                last_line, "head",
                f"{head_name} covers the log only up to seq {head_seq}: an "
                "append was interrupted before the head was written, or lines "
                "were added by another program",
            )


def _sequence_message(seq: int, last_seq: int, record: dict[str, Any]) -> str:
    text = f"seq {seq}, expected {last_seq + 1}"
    if seq > last_seq + 1:
        missing = seq - last_seq - 1
        text += f": {missing} record{'s' if missing > 1 else ''} missing before it"
    else:
        text += ": a record was duplicated or moved"
    if record.get("event") == "failed" and record.get("problem") == "head-ahead":
        text += " (this record notes that they were removed from the end)"
    return text
