"""Restore: the original file back byte for byte, or nothing changed at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import realparts

from npmguard import cli, files, migrate, paths
from npmguard.errors import (
    ConfigFileError,
    CredentialNotFoundError,
    FileChangedError,
    VaultError,
)
from npmguard.npmrc.credentials import find_credentials
from npmguard.secret import Secret
from npmguard.vault import KeychainStore, MemoryStore

TOKEN_A = "npm_" + "c3" * 18
TOKEN_B = "npm_" + "d4" * 18
AUTH = "dXNlcjpzM2NyZXQtcGFzcw=="

ORIGINAL = (
    "\ufeff; company settings\r\n"
    "registry=https://registry.npmjs.org/\r\n"
    f"//registry.npmjs.org/:_authToken={TOKEN_A}\r\n"
    f"//npm.example.com:8443/repo/:_auth='{AUTH}' ; legacy\r\n"
    "\r\n"
    "[ci]\r\n"
    f'//npm.example.com:8443/repo/:_authToken="{TOKEN_B}"\r\n'
    "save-exact=true"
).encode()


def _write(path: Path, data: bytes = ORIGINAL, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _secured(path: Path, store: MemoryStore) -> bytes:
    migrate.secure_file(path, store)
    return path.read_bytes()


def _journal_entries() -> list[Path]:
    directory = paths.journal_dir()
    return sorted(directory.iterdir()) if directory.exists() else []


def _states(path: Path) -> list[str]:
    config = files.read_config(path)
    return [f.state for f in find_credentials(path, config.document)]


# --- round trips -------------------------------------------------------------


def test_restore_byte_for_byte(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == ORIGINAL


def test_restore_empties_vault(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert store.names() == []


def test_restore_empties_index(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert migrate.load_index() == {}


def test_restore_journal_dropped(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert _journal_entries() == []


def test_restore_twice_nothing(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    again = migrate.restore_file(npmrc, store)
    assert not again.changed
    assert npmrc.read_bytes() == ORIGINAL


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_restore_keeps_mode(home: Path, mode: int) -> None:
    npmrc = _write(home / ".npmrc", mode=mode)
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert npmrc.stat().st_mode & 0o7777 == mode


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a file away")
def test_restore_keeps_owner(home: Path) -> None:
    npmrc = _write(home / ".npmrc", mode=0o640)
    os.chown(npmrc, 23456, 34567)
    store = MemoryStore()
    _secured(npmrc, store)
    migrate.restore_file(npmrc, store)
    info = npmrc.stat()
    assert (info.st_uid, info.st_gid) == (23456, 34567)
    assert info.st_mode & 0o7777 == 0o640


def test_restore_symlink_stays(home: Path) -> None:
    target = _write(home / "dotfiles" / "npmrc")
    link = home / ".npmrc"
    link.symlink_to(target)
    store = MemoryStore()
    _secured(link, store)
    migrate.restore_file(link, store)
    assert link.is_symlink()
    assert target.read_bytes() == ORIGINAL


def test_restore_temp_mode_private(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The temp file of a restore contains plaintext, so it must never be
    # more readable than the file it replaces.
    npmrc = _write(home / ".npmrc", mode=0o600)
    store = MemoryStore()
    _secured(npmrc, store)
    modes: list[int] = []
    real_check = files.ensure_unchanged

    def record_temp_mode(config: files.ConfigFile) -> None:
        [temp] = home.glob(".*npmguard-tmp")
        modes.append(temp.stat().st_mode & 0o777)
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", record_temp_mode)
    migrate.restore_file(npmrc, store)
    assert modes == [0o600]


# --- backing off -------------------------------------------------------------


def test_restore_missing_entry(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    store.delete(store.names()[0])
    kept = store.names()
    with pytest.raises(CredentialNotFoundError):
        migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == secured
    assert store.names() == kept


def test_restore_tampered_raw(home: Path) -> None:
    npmrc = _write(home / ".npmrc", f"//r.example/:_authToken='{TOKEN_A}'\n".encode())
    store = MemoryStore()
    secured = _secured(npmrc, store)
    [raw] = [n for n in store.names() if n.endswith(migrate.RAW_SUFFIX)]
    # A line break in the raw text would inject config lines into the file.
    store.set(raw, Secret(f"'{TOKEN_A}'\nregistry=https://evil.test/"))
    with pytest.raises(VaultError):
        migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == secured


def test_restore_mismatched_raw(home: Path) -> None:
    npmrc = _write(home / ".npmrc", f"//r.example/:_authToken='{TOKEN_A}'\n".encode())
    store = MemoryStore()
    secured = _secured(npmrc, store)
    [raw] = [n for n in store.names() if n.endswith(migrate.RAW_SUFFIX)]
    store.set(raw, Secret(f"'{TOKEN_B}'"))
    with pytest.raises(VaultError):
        migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == secured


def test_restore_readonly(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    names = store.names()
    os.chmod(npmrc, 0o444)
    with pytest.raises(ConfigFileError):
        migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == secured
    assert store.names() == names


def test_restore_changed_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    names = store.names()
    real_check = files.ensure_unchanged

    def edit_then_check(config: files.ConfigFile) -> None:
        with open(npmrc, "ab") as handle:
            handle.write(b"\r\nfund=false")
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", edit_then_check)
    with pytest.raises(FileChangedError):
        migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == secured + b"\r\nfund=false"
    assert store.names() == names
    assert _journal_entries() == []
    assert list(home.glob(".*npmguard-tmp")) == []


def test_restore_dry_run(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    names = store.names()
    result = migrate.restore_file(npmrc, store, dry_run=True)
    assert len(result.moved) == 3
    assert npmrc.read_bytes() == secured
    assert store.names() == names


# --- recovery of an interrupted restore --------------------------------------


class _Interrupted(BaseException):
    """Stands for a signal that stops the run between two steps."""


def test_interrupted_before_rename(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    names = store.names()

    def stop(config: files.ConfigFile) -> None:
        raise _Interrupted

    monkeypatch.setattr(files, "ensure_unchanged", stop)
    with pytest.raises(_Interrupted):
        migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == secured
    assert store.names() == names
    assert _journal_entries() == []
    assert list(home.glob(".*npmguard-tmp")) == []


def test_interrupted_after_rename(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    real_fsync_dir = files.fsync_dir

    def fsync_then_stop(directory: Path) -> None:
        real_fsync_dir(directory)
        if directory == home:
            raise _Interrupted

    monkeypatch.setattr(files, "fsync_dir", fsync_then_stop)
    with pytest.raises(_Interrupted):
        migrate.restore_file(npmrc, store)
    monkeypatch.setattr(files, "fsync_dir", real_fsync_dir)
    assert len(_journal_entries()) == 1
    assert migrate.recover(lambda: store) == [f"finished restoring {npmrc}"]
    assert npmrc.read_bytes() == ORIGINAL
    assert store.names() == []


def _journal_of_killed_restore(npmrc: Path, store: MemoryStore, phase: str) -> bytes:
    """Journal a restore of ``npmrc`` killed right after its journal write."""
    config = files.read_config(npmrc)
    replacements, names, _ = migrate._plan_restore(config, store)
    new_data = migrate._rebuild(config.document, replacements)
    migrate._write_journal(
        {
            "txid": "0badc0ffee0ddf00",
            "op": "restore",
            "path": str(npmrc),
            "display_path": str(npmrc),
            "before": migrate._sha(config.data),
            "after": migrate._sha(new_data),
            "names": names,
            "phase": phase,
            "created": 0,
        }
    )
    return new_data


def test_recover_writing_undoes(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    names = store.names()
    _journal_of_killed_restore(npmrc, store, "writing")
    migrate.recover(lambda: store)
    assert npmrc.read_bytes() == secured
    assert store.names() == names


def test_recover_written_finishes(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    new_data = _journal_of_killed_restore(npmrc, store, "written")
    npmrc.write_bytes(new_data)
    migrate.recover(lambda: store)
    assert npmrc.read_bytes() == ORIGINAL
    assert store.names() == []
    assert migrate.load_index() == {}


def test_recover_written_old_editor_save(home: Path) -> None:
    # After the rename, an editor that still had the secured text open saves
    # it back: the markers need their vault entries again.
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    secured = _secured(npmrc, store)
    names = store.names()
    new_data = _journal_of_killed_restore(npmrc, store, "written")
    npmrc.write_bytes(new_data)
    npmrc.write_bytes(secured + b"\r\n")
    migrate.recover(lambda: store)
    assert store.names() == names


def test_recover_written_edited(home: Path) -> None:
    # Restored, then edited: the values are in the file, the copies can go.
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    new_data = _journal_of_killed_restore(npmrc, store, "written")
    npmrc.write_bytes(new_data + b"\r\nfund=false")
    migrate.recover(lambda: store)
    assert store.names() == []
    assert migrate.load_index() == {}


def test_recover_restore_temp_removed(home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = MemoryStore()
    _secured(npmrc, store)
    new_data = _journal_of_killed_restore(npmrc, store, "writing")
    temp = files.temp_path_for(npmrc, "0badc0ffee0ddf00")
    temp.write_bytes(new_data)
    migrate.recover(lambda: store)
    assert not temp.exists()


# --- the command line --------------------------------------------------------


def test_cli_restore_round_trip(keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(home / ".npmrc", mode=0o644)
    assert cli.main(["secure", "--token-helper", "always"]) == 0
    assert "plaintext" not in _states(npmrc)
    assert cli.main(["restore"]) == 0
    assert npmrc.read_bytes() == ORIGINAL


def test_cli_restore_empties_keychain(
    keyring_bus: realparts.Keychain, home: Path
) -> None:
    _write(home / ".npmrc")
    cli.main(["secure", "--token-helper", "always"])
    cli.main(["restore"])
    with keyring_bus.default_collection() as collection:
        assert list(collection.get_all_items()) == []


def test_cli_restore_one_file(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    user = _write(home / ".npmrc")
    project = _write(
        tmp_path / "app" / ".npmrc", f"//r.example/:_auth={AUTH}\n".encode()
    )
    cli.main(["secure", "--token-helper", "never", str(tmp_path / "app")])
    assert cli.main(["restore", str(project)]) == 0
    assert project.read_bytes() == f"//r.example/:_auth={AUTH}\n".encode()
    assert "plaintext" not in _states(user)


def test_cli_restore_nothing(
    keyring_bus: realparts.Keychain, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(home / ".npmrc", b"save-exact=true\n")
    assert cli.main(["restore"]) == 0
    assert "Nothing to restore." in capsys.readouterr().out


def test_cli_restore_without_index(keyring_bus: realparts.Keychain, home: Path) -> None:
    # The index is metadata: the user config is found without it.
    npmrc = _write(home / ".npmrc")
    cli.main(["secure", "--token-helper", "never"])
    paths.index_path().unlink()
    assert cli.main(["restore"]) == 0
    assert npmrc.read_bytes() == ORIGINAL


def test_cli_restore_locked(locked_keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(
        home / ".npmrc", b"; npmguard:0123456789 //r.example/:_auth=<keychain>\n"
    )
    env = {
        name: os.environ[name]
        for name in (
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
        if name in os.environ
    }
    result = subprocess.run(
        [sys.executable, "-m", "npmguard", "restore"],
        cwd=home,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "locked" in result.stderr
    assert npmrc.read_bytes().startswith(b"; npmguard:0123456789 ")


def test_keychain_round_trip(keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(home / ".npmrc")
    store = KeychainStore()
    migrate.secure_file(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == ORIGINAL
