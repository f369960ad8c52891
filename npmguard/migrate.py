"""Moving credentials between config files and the vault, crash-safely.

Securing one file is a small transaction, written down in a journal entry
before anything changes so that a killed run can be finished or undone by
the next one (``recover``). The order keeps every token in the file, in the
vault, or in both:

1. journal ``storing``: the planned edit and the vault names, no values;
2. store each value in the vault and read it back;
3. journal ``stored``;
4. replace the file atomically (``files.replace_file``);
5. update the credential index, drop the journal entry.

Restoring runs the other way: journal ``writing``, write the file back
with its values, journal ``written``, delete the vault entries, drop the
journal entry.

Recovery deletes a vault entry only when the file contains that value in
plaintext, and writes a file only when the vault contains every value the
new file refers to. Every change runs under ``state_lock``, so a journal
entry seen by the lock holder belongs to a run that died.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from npmguard import paths
from npmguard.errors import (
    ConfigFileError,
    FileChangedError,
    JournalError,
    NpmguardError,
    VaultError,
)
from npmguard.files import (
    ConfigFile,
    check_writable,
    create_file,
    parse_bytes,
    read_config,
    replace_file,
    sweep_temp_files,
    temp_path_for,
    write_private,
)
from npmguard.npmrc.credentials import (
    MARKER_PREFIX,
    PLACEHOLDER,
    Finding,
    find_credentials,
    parse_marker,
    restored_line,
    secured_line,
    vault_name,
)
from npmguard.npmrc.ini import Document
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore, LazyStore, require

log = logging.getLogger(__name__)

RAW_SUFFIX = "#raw"
# Names kept next to a token's own entry: the password a user chose to
# store for minting, and a rotation's new and previous values.
PASSWORD_SUFFIX = "#password"
NEXT_SUFFIX = "#next"
OLD_SUFFIX = "#old"
SUFFIXES = (PASSWORD_SUFFIX, NEXT_SUFFIX, OLD_SUFFIX)
_TXID = re.compile(r"[0-9a-f]{16}")


@dataclass
class FileResult:
    """The outcome of a secure or restore run on one file."""

    path: Path
    moved: list[Finding] = field(default_factory=list)
    changed: bool = False


def _sha(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _read_current(target: Path) -> bytes | None:
    try:
        return target.read_bytes()
    except FileNotFoundError:
        return None


def _current_sha(target: Path) -> str | None:
    """Return the hash of the file now, or None when it cannot be read."""
    try:
        return _sha(target.read_bytes())
    except OSError:
        return None


# --- journal -----------------------------------------------------------------


def _journal_path(txid: str) -> Path:
    return paths.journal_dir() / f"{txid}.json"


def _write_journal(record: dict[str, object]) -> None:
    write_private(_journal_path(str(record["txid"])), json.dumps(record).encode())


def _drop_journal(txid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_journal_path(txid))


def _new_txid() -> str:
    return secrets.token_hex(8)


def _new_record(
    op: str,
    target: Path,
    display: Path,
    before: bytes | None,
    after: bytes,
    *,
    names: list[str],
    phase: str = "writing",
    **extra: object,
) -> dict[str, object]:
    """Return a new journal record for ``op`` on ``target``, not yet written.

    ``extra`` contains the fields only one kind of transaction needs. They
    go before ``names``, in the order secure records already use.
    """
    return {
        "txid": _new_txid(),
        "op": op,
        "path": str(target),
        "display_path": str(display),
        "before": _sha(before),
        "after": _sha(after),
        **extra,
        "names": names,
        "phase": phase,
        "created": time.time(),
    }


# An flock lock belongs to an open file, so a second flock in the same
# process would wait for itself. These make state_lock reentrant instead.
_thread_lock = threading.RLock()
_lock_depth = 0


@contextmanager
def state_lock(*, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock so two npmguard runs never edit files at once.

    Reentrant within one process. With ``wait=False`` it yields False
    instead of waiting when another process holds the lock.
    """
    global _lock_depth
    if not _thread_lock.acquire(blocking=wait):
        yield False
        return
    try:
        if _lock_depth:
            _lock_depth += 1
            try:
                yield True
            finally:
                _lock_depth -= 1
            return
        directory = paths.state_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _flock(fd, wait):
                yield False
                return
            _lock_depth = 1
            try:
                yield True
            finally:
                _lock_depth = 0
                _funlock(fd)
        finally:
            os.close(fd)
    finally:
        _thread_lock.release()


def _flock(fd: int, wait: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        # NOTE: no cross-process lock on Windows yet; msvcrt.locking
        # would give one.
        return True
    flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        return False
    return True


def _funlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


# --- the credential index ----------------------------------------------------


def load_index() -> dict[str, dict[str, object]]:
    """Return vault name -> metadata for every credential npmguard moved."""
    path = paths.index_path()
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as err:
        raise _index_error(path) from err
    # Saving over an index of the wrong shape would lose what it lists.
    if not isinstance(data, dict) or not all(
        isinstance(meta, dict) for meta in data.values()
    ):
        raise _index_error(path)
    return data


def _index_error(path: Path) -> JournalError:
    return JournalError(
        "credential index is unreadable or not a JSON object of entries; move "
        "it aside and run the command again (restore then finds secured "
        "project files only when given their directories)",
        path=path,
    )


def save_index(index: dict[str, dict[str, object]]) -> None:
    data = json.dumps(index, indent=1, sort_keys=True).encode()
    write_private(paths.index_path(), data)


# --- planning ----------------------------------------------------------------


@dataclass
class _Move:
    finding: Finding
    vault_id: str
    raw: str

    @property
    def name(self) -> str:
        return vault_name(self.finding.key, self.vault_id)

    @property
    def value(self) -> Secret:
        assert self.finding.value is not None
        return self.finding.value

    @property
    def has_raw(self) -> bool:
        """Whether the file's text of the value differs from the decoded value."""
        return self.raw != self.value.reveal()

    def index_entry(self, path: Path, target: Path) -> dict[str, object]:
        return {
            "path": os.path.abspath(path),
            "target": str(target),
            "key": self.finding.key,
            "registry": self.finding.registry,
            "kind": self.finding.kind,
            "fingerprint": self.finding.fingerprint,
            "raw": self.has_raw,
            "created": time.time(),
        }


def _plan_secure(
    config: ConfigFile, ids: dict[int, str] | None = None
) -> tuple[list[_Move], bytes]:
    """Return the moves for every plaintext secret and the file's new bytes.

    ``ids`` maps line numbers to vault ids when replaying a journal entry.
    """
    document = config.document
    moves: list[_Move] = []
    for finding in find_credentials(config.path, document):
        if not finding.is_movable or finding.entry is None or finding.value is None:
            continue
        if ids is not None:
            if finding.line not in ids:
                continue
            vault_id = ids[finding.line]
        else:
            vault_id = secrets.token_hex(5)
        raw = document.raw(finding.entry)
        moves.append(_Move(finding, vault_id, raw))
    replacements: dict[int, str | None] = {
        move.finding.line: secured_line(document, move.finding.entry, move.vault_id)
        for move in moves
        if move.finding.entry is not None
    }
    return moves, _rebuild(document, replacements)


def _rebuild(document: Document, replacements: dict[int, str | None]) -> bytes:
    """Return the file bytes with some lines replaced (None removes a line)."""
    parts: list[str] = []
    pos = 0
    for line in document.lines:
        if line.number not in replacements:
            continue
        parts.append(document.text[pos : line.start])
        new = replacements[line.number]
        if new is None:
            pos = line.end + len(line.newline)
        else:
            parts.append(new)
            pos = line.end
    parts.append(document.text[pos:])
    text = "".join(parts)
    prefix = "\ufeff" if document.has_bom else ""
    return (prefix + text).encode("utf-8")


def _plaintext_values(path: Path, data: bytes | None) -> set[Secret]:
    """Return the plaintext secrets in ``data``; empty when it cannot be parsed."""
    if data is None:
        return set()
    try:
        document = parse_bytes(data, path)
    except NpmguardError:
        return set()
    return {f.value for f in find_credentials(path, document) if f.value is not None}


def _marker_ids(path: Path, data: bytes | None) -> set[str]:
    """Return the vault ids of the secured lines in ``data``."""
    if data is None:
        return set()
    try:
        document = parse_bytes(data, path)
    except NpmguardError:
        return set()
    return {
        f.vault_id
        for f in find_credentials(path, document)
        if f.state == "secured" and f.vault_id is not None
    }


# --- secure ------------------------------------------------------------------


def secure_file(
    path: Path, store: CredentialStore, *, dry_run: bool = False
) -> FileResult:
    """Move every plaintext secret in ``path`` into ``store``."""
    with state_lock():
        config = read_config(path)
        moves, new_data = _plan_secure(config)
        result = FileResult(path, [m.finding for m in moves])
        if not moves or dry_run:
            return result
        check_writable(config)
        # An unreadable index would fail the last step; fail before the first.
        load_index()
        _secure_transaction(config, store, moves, new_data)
        result.changed = True

    for move in moves:
        log.info(
            "secured %s %s at %s:%d (fingerprint %s) into %s",
            move.finding.registry or "-",
            move.finding.kind,
            path,
            move.finding.line,
            move.finding.fingerprint,
            store.description,
        )
    return result


def _secure_transaction(
    config: ConfigFile, store: CredentialStore, moves: list[_Move], new_data: bytes
) -> None:
    record = _new_record(
        "secure",
        config.target,
        config.path,
        config.data,
        new_data,
        # Every name this run may write, so a run killed mid-way can be undone.
        names=[n for m in moves for n in (m.name, m.name + RAW_SUFFIX)],
        phase="storing",
        ids={str(m.finding.line): m.vault_id for m in moves},
        index={m.name: m.index_entry(config.path, config.target) for m in moves},
    )
    txid = str(record["txid"])
    after = record["after"]
    _write_journal(record)
    stored: list[str] = []
    try:
        for move in moves:
            _store_verified(store, move.name, move.value, stored)
            if move.has_raw:
                raw_name = move.name + RAW_SUFFIX
                _store_verified(store, raw_name, Secret(move.raw), stored)
        record["phase"] = "stored"
        _write_journal(record)
    except BaseException:
        # The file is untouched and still contains every value.
        _delete_names(store, stored)
        _drop_journal(txid)
        raise

    try:
        replace_file(config, new_data, txid)
    except FileChangedError:
        _undo_after_change(config, store, moves)
        _drop_journal(txid)
        raise
    except BaseException:
        if _current_sha(config.target) == after:
            # Interrupted after the rename (during the directory fsync): the
            # file refers to the vault now, so keep the journal entry and
            # let the next run finish the index.
            raise
        _delete_names(store, stored)
        _drop_journal(txid)
        raise

    _index_moves(record["index"])  # type: ignore[arg-type]
    _drop_journal(txid)


def _store_verified(
    store: CredentialStore, name: str, value: Secret, written: list[str] | None = None
) -> None:
    """Store ``value`` and read it back; ``written`` gets ``name`` once it is set.

    A write that fails its read-back has still put something in the vault,
    so the name is listed before the check.
    """
    store.set(name, value)
    if written is not None:
        written.append(name)
    if store.get(name) != value:
        raise VaultError(
            f"the {store.description} returned a different value for {name} "
            "after storing it; nothing was changed"
        )


def _delete_names(store: CredentialStore, names: list[str]) -> None:
    for name in names:
        try:
            store.delete(name)
        except NpmguardError as err:
            log.warning("could not remove %s from the vault: %s", name, err)


def _undo_after_change(
    config: ConfigFile, store: CredentialStore, moves: list[_Move]
) -> None:
    """Drop vault copies whose value is still in the changed file; keep the rest."""
    present = _plaintext_values(config.path, _read_current(config.target))
    for move in moves:
        if move.value in present:
            _delete_names(store, [move.name, move.name + RAW_SUFFIX])
        else:
            log.warning(
                "%s changed and no longer contains %s (fingerprint %s); the "
                "keychain copy %s is kept",
                config.path,
                move.finding.key,
                move.finding.fingerprint,
                move.name,
            )


def _index_moves(entries: dict[str, dict[str, object]]) -> None:
    index = load_index()
    index.update(entries)
    save_index(index)


# --- restore -----------------------------------------------------------------


def restore_file(
    path: Path, store: CredentialStore, *, dry_run: bool = False
) -> FileResult:
    """Write the values of every secured line in ``path`` back into the file."""
    with state_lock():
        config = read_config(path)
        replacements, names, restored = _plan_restore(config, store)
        result = FileResult(path, restored)
        if not replacements or dry_run:
            return result
        new_data = _rebuild(config.document, replacements)
        check_writable(config)
        load_index()
        _restore_transaction(config, store, names, new_data)
        result.changed = True

    for finding in restored:
        log.info(
            "restored %s %s to %s:%d",
            finding.registry or "-",
            finding.kind,
            path,
            finding.line,
        )
    return result


def _plan_restore(
    config: ConfigFile, store: CredentialStore
) -> tuple[dict[int, str | None], list[str], list[Finding]]:
    """Return the line replacements, the vault names to drop and the findings."""
    document = config.document
    replacements: dict[int, str | None] = {}
    names: list[str] = []
    restored: list[Finding] = []
    for finding in find_credentials(config.path, document):
        if finding.state != "secured" or finding.vault_id is None:
            continue
        marker = parse_marker(document, document.lines[finding.line - 1])
        assert marker is not None
        name = vault_name(marker.entry.key, marker.vault_id)
        value = require(store, name)
        raw_secret = store.get(name + RAW_SUFFIX)
        raw = raw_secret.reveal() if raw_secret is not None else value.reveal()
        line = restored_line(marker, raw, document)
        if not _line_holds(line, marker.entry.key, value):
            raise VaultError(
                f"the stored raw and decoded values of {name} disagree; "
                "not restored",
                path=config.path,
                line=finding.line,
            )
        replacements[finding.line] = line
        names += [name, name + RAW_SUFFIX]
        restored.append(finding)
    return replacements, names, restored


def restore_orphans(
    store: CredentialStore, *, dry_run: bool = False
) -> tuple[list[str], list[str]]:
    """Put back vault values whose marker line is gone from their file.

    ``npm config set`` and ``npm login`` rewrite the whole user config and
    drop comments, npmguard's marker lines included. For each indexed entry
    whose file no longer mentions it and sets no value of its own for that
    key, the line ``key=value`` is appended. Returns (what was restored,
    warnings about entries that are kept).
    """
    done: list[str] = []
    warnings: list[str] = []
    with state_lock():
        by_path: dict[str, list[tuple[str, dict[str, object]]]] = {}
        for name, meta in load_index().items():
            by_path.setdefault(str(meta.get("path", "")), []).append((name, meta))
        for path_text, entries in by_path.items():
            path = Path(path_text)
            try:
                config = read_config(path)
            except NpmguardError as err:
                warnings += [
                    f"{path}: cannot read it ({err.args[0] if err.args else err}); "
                    f"keychain entry {name} is kept"
                    for name, _ in entries
                ]
                continue
            findings = find_credentials(path, config.document)
            present = {f.vault_name for f in findings if f.vault_name}
            active = {f.key for f in findings if f.state != "secured"}
            lines: list[str] = []
            names: list[str] = []
            appended: set[str] = set()
            for name, meta in entries:
                key = str(meta.get("key", ""))
                if name in present:
                    continue
                if key in active or key in appended:
                    warnings.append(
                        f"{path}: sets {key} itself now; keychain entry {name} "
                        "is kept"
                    )
                    continue
                value = store.get(name)
                if value is None:
                    warnings.append(f"{path}: keychain entry {name} is missing")
                    continue
                raw = store.get(name + RAW_SUFFIX)
                text = f"{key}={(raw or value).reveal()}"
                if not _line_holds(text, key, value):
                    warnings.append(f"{path}: cannot rebuild the line for {name}")
                    continue
                lines.append(text)
                appended.add(key)
                names += [name, name + RAW_SUFFIX]
                done.append(f"restored {key} to {path} (its npmguard line was gone)")
            if not lines or dry_run:
                continue
            newline = config.document.newline_style()
            body = config.data
            if body and not body.endswith((b"\n", b"\r")):
                body += newline.encode()
            new_data = body + "".join(
                line + newline for line in lines
            ).encode("utf-8")
            check_writable(config)
            _restore_transaction(config, store, names, new_data)
    return done, warnings


def _line_holds(text: str, key: str, value: Secret) -> bool:
    """Tell whether ``text`` would be secured again as ``key`` with ``value``.

    The raw text is checked in its line, not alone: ``'abc' ;note`` keeps
    its quotes in npm's reading, while ``'abc'`` alone loses them.
    """
    # A line break in the raw text would add lines to the file.
    if any(char in text for char in "\r\n"):
        return False
    findings = find_credentials(Path(".npmrc"), Document(text))
    return (
        len(findings) == 1
        and findings[0].key == key
        and findings[0].value is not None
        and findings[0].value == value
    )


def _restore_transaction(
    config: ConfigFile, store: CredentialStore, names: list[str], new_data: bytes
) -> None:
    record = _new_record(
        "restore", config.target, config.path, config.data, new_data, names=names
    )
    txid = str(record["txid"])
    after = record["after"]
    _write_journal(record)
    try:
        replace_file(config, new_data, txid)
    except BaseException:
        if _current_sha(config.target) != after:
            # Still secured and the vault is untouched: nothing to undo.
            _drop_journal(txid)
        raise
    record["phase"] = "written"
    _write_journal(record)
    _finish_restore(store, names)
    _drop_journal(txid)


def _finish_restore(store: CredentialStore, names: list[str]) -> None:
    _delete_names(store, names)
    # A stored password or a rotation's copies mean nothing without the token.
    _delete_names(store, [n + x for n in names if "#" in n for x in SUFFIXES
                          if not n.endswith(RAW_SUFFIX)])
    index = load_index()
    for name in names:
        index.pop(name, None)
    save_index(index)


# --- a credential that never was in a file -----------------------------------


@dataclass
class Added:
    """The result of ``add_secured``: the new vault name and the lines it replaced."""

    name: str
    replaced: list[Finding] = field(default_factory=list)


def add_secured(
    path: Path,
    key: str,
    value: Secret,
    store: CredentialStore,
    meta: dict[str, object],
    extra: dict[str, Secret] | None = None,
) -> Added:
    """Store ``value`` for ``key`` and put a marker line for it into ``path``.

    This is how ``npmguard login`` keeps a token it got from the registry:
    the value goes only to the vault, the file gets the same marker comment
    ``secure`` writes, so ``exec``, ``token`` and ``restore`` treat it like
    any other secured credential. Top-level lines for the same key are
    replaced (as ``npm login`` does); the vault entries behind replaced
    markers are deleted last. ``extra`` maps name suffixes (``#password``)
    to values kept next to the token. The journal entry is a secure record
    that never reaches ``stored``, so recovery either finishes the index (the
    file has the marker) or deletes the new vault entries (it does not).
    """
    vault_id = secrets.token_hex(5)
    name = vault_name(key, vault_id)
    extra = extra or {}
    with state_lock():
        load_index()
        try:
            config: ConfigFile | None = read_config(path)
        except ConfigFileError:
            if path.exists() or path.is_symlink():
                raise
            config = None
        document = config.document if config else Document("")
        replaced = [
            f for f in find_credentials(path, document)
            if f.key == key and f.section is None and f.entry is not None
        ]
        newline = document.newline_style()
        marker = f"{MARKER_PREFIX}{vault_id} {key}={PLACEHOLDER}"
        removals: dict[int, str | None] = {f.line: None for f in replaced}
        body = _rebuild(document, removals).decode("utf-8")
        bom = body.startswith("\ufeff")
        new_text = ("\ufeff" if bom else "") + marker + newline + body[int(bom):]
        new_data = new_text.encode("utf-8")
        target = config.target if config else path
        names = [name, *(name + suffix for suffix in extra)]
        entry = {
            "path": os.path.abspath(path),
            "target": str(target),
            "key": key,
            "registry": key.rsplit(":", 1)[0],
            "kind": key.rsplit(":", 1)[1],
            "fingerprint": value.fingerprint,
            "raw": False,
            "created": time.time(),
            **meta,
        }
        record = _new_record(
            "secure", target, path, config.data if config else None, new_data,
            names=names, phase="storing", origin="add", index={name: entry},
        )
        txid = str(record["txid"])
        _write_journal(record)
        stored: list[str] = []
        try:
            _store_verified(store, name, value, stored)
            for suffix, secret in extra.items():
                _store_verified(store, name + suffix, secret, stored)
            if config is None:
                create_file(path, new_data, txid)
            else:
                check_writable(config)
                replace_file(config, new_data, txid)
        except BaseException:
            if _current_sha(target) != record["after"]:
                _delete_names(store, stored)
                _drop_journal(txid)
            raise
        index = load_index()
        index[name] = entry
        old_names = [f.vault_name for f in replaced if f.vault_name]
        for old in old_names:
            index.pop(old, None)
        save_index(index)
        _drop_journal(txid)
        for old in old_names:
            _delete_names(store, [old, old + RAW_SUFFIX, *(old + x for x in SUFFIXES)])
    log.info("stored %s (fingerprint %s) in the %s; marker added to %s",
             key, value.fingerprint, store.description, path)
    return Added(name, replaced)


# --- rewrites of the user config ---------------------------------------------


def replace_journaled(config: ConfigFile, new_data: bytes) -> None:
    """Replace a file that moves no secret, journaled so a crash leaves no temp.

    Used for the token-helper lines: the temp file can hold whatever
    plaintext the user config still has, so a killed run must not leave it.
    """
    with state_lock():
        txid = _journal_rewrite(config.target, config.path, config.data, new_data)
        try:
            replace_file(config, new_data, txid)
        finally:
            _drop_journal(txid)


def create_journaled(path: Path, data: bytes) -> None:
    """Create a file that holds no secret, journaled so a crash leaves no temp."""
    with state_lock():
        txid = _journal_rewrite(path, path, None, data)
        try:
            create_file(path, data, txid)
        finally:
            _drop_journal(txid)


def _journal_rewrite(
    target: Path, display: Path, before: bytes | None, after: bytes
) -> str:
    record = _new_record("rewrite", target, display, before, after, names=[])
    _write_journal(record)
    return str(record["txid"])


# --- recovery ----------------------------------------------------------------


def pending_journal() -> list[Path]:
    try:
        return sorted(paths.journal_dir().glob("*.json"))
    except OSError:
        return []


def recover(store_factory: Callable[[], CredentialStore]) -> list[str]:
    """Finish or undo every interrupted transaction; return what was done.

    ``store_factory`` is called only when some entry needs the vault, so a
    clean start never opens the keychain. When another npmguard process
    holds the state lock, its journal entries are live, not interrupted,
    and nothing is done.
    """
    with state_lock(wait=False) as held:
        if not held:
            log.debug("another npmguard run holds the state lock; not recovering")
            return []
        # Leftovers of a killed write_private; none of them holds a secret.
        sweep_temp_files(paths.journal_dir())
        sweep_temp_files(paths.state_dir())
        sweep_temp_files(paths.data_dir() / "bin")
        store = LazyStore(store_factory)
        messages: list[str] = []
        for entry in pending_journal():
            record = _load_record(entry)
            message = _recover_one(record, store)
            _drop_journal(str(record["txid"]))
            log.info("recovery: %s", message)
            messages.append(message)
        return messages


def _load_record(entry: Path) -> dict[str, object]:
    try:
        record = json.loads(entry.read_bytes())
        valid = (
            isinstance(record, dict)
            and _TXID.fullmatch(str(record["txid"])) is not None
            and entry.name == f"{record['txid']}.json"
            and record["op"] in ("secure", "restore", "rewrite")
            and isinstance(record["path"], str)
            and isinstance(record["names"], list)
            and all(key in record for key in ("before", "after", "phase"))
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _journal_error(entry) from err
    if not valid:
        raise _journal_error(entry)
    return record  # type: ignore[no-any-return]


def _journal_error(entry: Path) -> JournalError:
    return JournalError(
        "cannot read an interrupted change's journal entry; inspect it, "
        "then delete it",
        path=entry,
    )


def _recover_one(record: dict[str, object], store: CredentialStore) -> str:
    txid = str(record["txid"])
    target = Path(str(record["path"]))
    display = str(record.get("display_path", target))
    # The temp file of an interrupted replace; a restore's holds plaintext.
    with contextlib.suppress(FileNotFoundError):
        temp_path_for(target, txid).unlink()
    current = _read_current(target)
    state = _sha(current)

    if record["op"] == "rewrite":
        return f"cleaned up an interrupted rewrite of {display}"
    if record["op"] == "secure":
        return _recover_secure(record, store, target, display, current, state)
    return _recover_restore(record, store, target, display, current, state)


def _recover_secure(
    record: dict[str, object],
    store: CredentialStore,
    target: Path,
    display: str,
    current: bytes | None,
    state: str | None,
) -> str:
    names = [str(n) for n in record["names"]]  # type: ignore[attr-defined]
    index_entries = dict(record.get("index", {}))  # type: ignore[call-overload]
    if state == record["after"]:
        # Killed after the rename: the vault was verified before it.
        _index_moves(index_entries)
        return f"finished securing {display}"
    if state == record["before"] and record["phase"] == "stored":
        return _finish_secure(record, store, target, display)
    if state == record["before"]:
        _delete_names(store, names)
        return f"undid securing {display}; the file still has its values"
    return _reconcile(store, target, display, current, names, index_entries, "secure")


def _finish_secure(
    record: dict[str, object], store: CredentialStore, target: Path, display: str
) -> str:
    """Redo the rename of a secure that stored every value but was killed."""
    names = [str(n) for n in record["names"]]  # type: ignore[attr-defined]
    ids = {int(k): str(v) for k, v in dict(record["ids"]).items()}  # type: ignore[call-overload]
    try:
        config = read_config(target)
        moves, new_data = _plan_secure(config, ids)
        if _sha(new_data) != record["after"] or not moves:
            raise FileChangedError("the planned edit no longer applies", path=target)
        # The vault entries may be gone (a killed undo, a user's cleanup):
        # store them again from the file, which still holds every value.
        for move in moves:
            _store_verified(store, move.name, move.value)
            if move.has_raw:
                _store_verified(store, move.name + RAW_SUFFIX, Secret(move.raw))
        replace_file(config, new_data, str(record["txid"]))
    except (ConfigFileError, FileChangedError, OSError) as err:
        log.warning("could not finish securing %s: %s", display, err)
        current = _read_current(target)
        if _sha(current) == record["after"]:
            raise
        if _sha(current) != record["before"]:
            # Changed (or removed) while recovery worked: keep what may be
            # the only copy of a value.
            return _reconcile(store, target, display, current, names, {}, "secure")
        _delete_names(store, names)
        return f"undid securing {display}; the file still has its values"
    _index_moves({m.name: m.index_entry(Path(display), target) for m in moves})
    return f"finished securing {display}"


def _recover_restore(
    record: dict[str, object],
    store: CredentialStore,
    target: Path,
    display: str,
    current: bytes | None,
    state: str | None,
) -> str:
    names = [str(n) for n in record["names"]]  # type: ignore[attr-defined]
    if state == record["after"]:
        _finish_restore(store, names)
        return f"finished restoring {display}"
    if state == record["before"]:
        return f"undid restoring {display}; it is still secured"
    return _reconcile(store, target, display, current, names, {}, "restore")


def _reconcile(
    store: CredentialStore,
    target: Path,
    display: str,
    current: bytes | None,
    names: list[str],
    index_entries: dict[str, dict[str, object]],
    op: str,
) -> str:
    """Settle an interrupted change to a file that was edited (or removed) since.

    A vault entry whose line is still secured in the file is kept and
    indexed. One whose value is in the file in plaintext is deleted. Any
    other is kept, because the vault may contain the only copy.
    """
    secured = _marker_ids(target, current)
    plaintext = _plaintext_values(target, current)
    keep: dict[str, dict[str, object]] = {}
    dropped: list[str] = []
    for name in names:
        if name.endswith(RAW_SUFFIX):
            continue
        vault_id = name.rsplit("#", 1)[-1]
        if vault_id in secured:
            if name in index_entries:
                keep[name] = index_entries[name]
            continue
        value = store.get(name)
        if value is not None and value in plaintext:
            _delete_names(store, [name, name + RAW_SUFFIX])
            dropped.append(name)
        elif value is not None:
            log.warning(
                "%s changed during an interrupted %s; its value for %s "
                "(fingerprint %s) is kept in the vault",
                display,
                op,
                name,
                value.fingerprint,
            )
    if keep:
        _index_moves(keep)
    if dropped:
        index = load_index()
        for name in dropped:
            index.pop(name, None)
        save_index(index)
    return (
        f"{display} changed since an interrupted {op}; vault entries still in "
        "use are kept, run `npmguard scan` to check it"
    )
