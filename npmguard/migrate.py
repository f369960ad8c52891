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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
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
    parse_bytes,
    read_config,
    replace_file,
    temp_path_for,
    write_private,
)
from npmguard.npmrc.credentials import (
    Finding,
    find_credentials,
    parse_marker,
    restored_line,
    secured_line,
    vault_name,
)
from npmguard.npmrc.ini import Document, decode_value
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore, require

log = logging.getLogger(__name__)

RAW_SUFFIX = "#raw"


@dataclass
class FileResult:
    """What a secure or restore run did to one file."""

    path: Path
    moved: list[Finding] = field(default_factory=list)
    changed: bool = False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- journal -----------------------------------------------------------------


def _journal_path(txid: str) -> Path:
    return paths.journal_dir() / f"{txid}.json"


def _write_journal(record: dict[str, object]) -> None:
    write_private(_journal_path(str(record["txid"])), json.dumps(record).encode())


def _drop_journal(txid: str) -> None:
    try:
        os.unlink(_journal_path(txid))
    except FileNotFoundError:
        pass


@contextmanager
def state_lock() -> Iterator[None]:
    """Hold an exclusive lock so two npmguard runs never edit files at once."""
    directory = paths.state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            # NOTE: no cross-process lock on Windows yet; msvcrt.locking
            # would give one.
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- the credential index -----------------------------------------------------


def load_index() -> dict[str, dict[str, object]]:
    """Return vault name -> metadata for every credential npmguard moved."""
    try:
        data = json.loads(paths.index_path().read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise JournalError(
            "credential index is not valid JSON; move it aside and run "
            "`npmguard scan` to see what is secured",
            path=paths.index_path(),
        ) from err
    return data if isinstance(data, dict) else {}


def save_index(index: dict[str, dict[str, object]]) -> None:
    write_private(paths.index_path(), json.dumps(index, indent=1, sort_keys=True).encode())


# --- planning ------------------------------------------------------------------


@dataclass
class _Move:
    finding: Finding
    vault_id: str
    raw: str

    @property
    def name(self) -> str:
        return vault_name(self.finding.key, self.vault_id)


def _plan_secure(config: ConfigFile, ids: dict[int, str] | None = None) -> tuple[
    list[_Move], bytes
]:
    """Return the moves for every plaintext secret and the file's new bytes.

    ``ids`` maps line numbers to vault ids when replaying a journal entry.
    """
    document = config.document
    moves: list[_Move] = []
    for finding in find_credentials(config.path, document):
        if not finding.is_exposed or finding.entry is None:
            continue
        if ids is not None:
            if finding.line not in ids:
                continue
            vault_id = ids[finding.line]
        else:
            vault_id = secrets.token_hex(5)
        raw = document.text[finding.entry.value_start : finding.entry.value_end]
        moves.append(_Move(finding, vault_id, raw))
    replacements = {
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


# --- secure ----------------------------------------------------------------------


def secure_file(path: Path, store: CredentialStore, *, dry_run: bool = False) -> FileResult:
    """Move every plaintext secret in ``path`` into ``store``."""
    config = read_config(path)
    moves, new_data = _plan_secure(config)
    result = FileResult(path, [m.finding for m in moves])
    if not moves or dry_run:
        return result
    if not os.access(config.target, os.W_OK):
        raise ConfigFileError("file is read-only; not changed", path=path)

    txid = secrets.token_hex(8)
    record: dict[str, object] = {
        "txid": txid,
        "op": "secure",
        "path": str(config.target),
        "display_path": str(path),
        "before": _sha(config.data),
        "after": _sha(new_data),
        "ids": {str(m.finding.line): m.vault_id for m in moves},
        # Every name this run may write, so a run killed mid-way can be undone.
        "names": [n for m in moves for n in (m.name, m.name + RAW_SUFFIX)],
        "phase": "storing",
        "created": time.time(),
    }
    _write_journal(record)
    stored: list[str] = []
    try:
        for move in moves:
            value = move.finding.value
            assert value is not None
            _store_verified(store, move.name, value)
            stored.append(move.name)
            if move.raw != value.reveal():
                _store_verified(store, move.name + RAW_SUFFIX, Secret(move.raw))
                stored.append(move.name + RAW_SUFFIX)
        record["phase"] = "stored"
        _write_journal(record)
    except BaseException:
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
        # The file is unchanged (replace_file only renames last), so the
        # vault copies are spare; remove them.
        _delete_names(store, stored)
        _drop_journal(txid)
        raise

    _index_moves(path, config.target, moves)
    _drop_journal(txid)
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


def _store_verified(store: CredentialStore, name: str, value: Secret) -> None:
    store.set(name, value)
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


def _undo_after_change(config: ConfigFile, store: CredentialStore, moves: list[_Move]) -> None:
    """Drop vault copies whose value is still in the changed file; keep the rest."""
    try:
        current = read_config(config.path)
        present = {
            f.value for f in find_credentials(config.path, current.document) if f.value
        }
    except NpmguardError:
        present = set()
    for move in moves:
        if move.finding.value in present:
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


def _index_moves(path: Path, target: Path, moves: list[_Move]) -> None:
    index = load_index()
    for move in moves:
        index[move.name] = {
            "path": str(path),
            "target": str(target),
            "key": move.finding.key,
            "registry": move.finding.registry,
            "kind": move.finding.kind,
            "fingerprint": move.finding.fingerprint,
            "raw": move.raw != (move.finding.value.reveal() if move.finding.value else ""),
            "created": time.time(),
        }
    save_index(index)


# --- restore ---------------------------------------------------------------------


def restore_file(path: Path, store: CredentialStore, *, dry_run: bool = False) -> FileResult:
    """Write the values of every secured line in ``path`` back into the file."""
    config = read_config(path)
    document = config.document
    replacements: dict[int, str | None] = {}
    names: list[str] = []
    restored: list[Finding] = []
    for finding in find_credentials(path, document):
        if finding.state != "secured" or finding.vault_id is None:
            continue
        line = document.lines[finding.line - 1]
        marker = parse_marker(document, line)
        assert marker is not None
        name = vault_name(marker.entry.key, marker.vault_id)
        value = require(store, name)
        raw_secret = store.get(name + RAW_SUFFIX)
        raw = raw_secret.reveal() if raw_secret is not None else value.reveal()
        if decode_value(raw) != value.reveal():
            raise VaultError(
                f"the stored raw and decoded values of {name} disagree; "
                "not restored",
                path=path,
                line=finding.line,
            )
        replacements[finding.line] = restored_line(marker, raw, document)
        names += [name, name + RAW_SUFFIX]
        restored.append(finding)

    result = FileResult(path, restored)
    if not replacements or dry_run:
        return result
    new_data = _rebuild(document, replacements)
    if not os.access(config.target, os.W_OK):
        raise ConfigFileError("file is read-only; not changed", path=path)

    txid = secrets.token_hex(8)
    record: dict[str, object] = {
        "txid": txid,
        "op": "restore",
        "path": str(config.target),
        "display_path": str(path),
        "before": _sha(config.data),
        "after": _sha(new_data),
        "names": names,
        "phase": "writing",
        "created": time.time(),
    }
    _write_journal(record)
    try:
        replace_file(config, new_data, txid)
    except BaseException:
        _drop_journal(txid)
        raise
    record["phase"] = "written"
    _write_journal(record)
    _finish_restore(store, names)
    _drop_journal(txid)
    result.changed = True
    for finding in restored:
        log.info(
            "restored %s %s to %s:%d", finding.registry or "-", finding.kind, path,
            finding.line,
        )
    return result


def _finish_restore(store: CredentialStore, names: list[str]) -> None:
    _delete_names(store, names)
    index = load_index()
    for name in names:
        index.pop(name, None)
    save_index(index)


# --- recovery -----------------------------------------------------------------------


def pending_journal() -> list[Path]:
    try:
        return sorted(paths.journal_dir().glob("*.json"))
    except OSError:
        return []


def recover(store_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """Finish or undo every interrupted transaction; return what was done.

    ``store_factory`` is called only when some entry needs the vault, so a
    clean start never opens the keychain.
    """
    messages: list[str] = []
    entries = pending_journal()
    if not entries:
        return messages
    store = store_factory()
    for entry in entries:
        try:
            record = json.loads(entry.read_bytes())
        except (OSError, ValueError) as err:
            raise JournalError(
                "cannot read an interrupted change's journal entry; inspect it, "
                "then delete it",
                path=entry,
            ) from err
        messages.append(_recover_one(record, store))
    return messages


def _read_current(target: Path) -> bytes | None:
    try:
        return target.read_bytes()
    except FileNotFoundError:
        return None


def _recover_one(record: dict, store: CredentialStore) -> str:  # type: ignore[type-arg]
    txid = str(record["txid"])
    target = Path(str(record["path"]))
    display = str(record.get("display_path", target))
    names = [str(n) for n in record.get("names", [])]
    temp = temp_path_for(target, txid)
    if temp.exists():
        temp.unlink()
    current = _read_current(target)
    state = _sha(current) if current is not None else None
    phase = record["phase"]

    if record["op"] == "secure":
        if state == record["after"]:
            ids = {int(k): str(v) for k, v in dict(record["ids"]).items()}
            _reindex_after_recovery(Path(display), target, current, ids)
            message = f"finished securing {display}"
        elif state == record["before"] and phase == "stored":
            config = read_config(Path(display))
            ids = {int(k): str(v) for k, v in dict(record["ids"]).items()}
            moves, new_data = _plan_secure(config, ids)
            if _sha(new_data) != record["after"]:
                _delete_names(store, names)
                message = f"undid securing {display} (the plan no longer matched)"
            else:
                replace_file(config, new_data, txid)
                _index_moves(Path(display), config.target, moves)
                message = f"finished securing {display}"
        elif state == record["before"]:
            _delete_names(store, names)
            message = f"undid securing {display}; the file still has its values"
        else:
            message = (
                f"{display} changed since an interrupted secure; its keychain "
                "entries are kept, run `npmguard scan` to check it"
            )
    else:
        if state == record["after"] or phase == "written":
            _finish_restore(store, names)
            message = f"finished restoring {display}"
        else:
            message = f"undid restoring {display}; it is still secured"
    _drop_journal(txid)
    log.info("recovery: %s", message)
    return message


def _reindex_after_recovery(
    path: Path, target: Path, data: bytes | None, ids: dict[int, str]
) -> None:
    if data is None:
        return
    document = parse_bytes(data, path)
    index = load_index()
    for finding in find_credentials(path, document):
        if finding.vault_name and finding.vault_id in ids.values():
            index.setdefault(
                finding.vault_name,
                {
                    "path": str(path),
                    "target": str(target),
                    "key": finding.key,
                    "registry": finding.registry,
                    "kind": finding.kind,
                    "created": time.time(),
                },
            )
    save_index(index)
