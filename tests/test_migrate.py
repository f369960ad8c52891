"""The secure transaction: what it writes, what it keeps, and when it backs off.

Most tests drive ``npmguard.migrate`` with a ``MemoryStore``; the ones that
go through the command line use the real keychain on a private bus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import realparts

from npmguard import cli, files, migrate, paths
from npmguard.errors import (
    ConfigFileError,
    FileChangedError,
    JournalError,
    NpmguardError,
)
from npmguard.npmrc.credentials import HELPER_MARKER, find_credentials
from npmguard.secret import Secret
from npmguard.vault import KeychainStore, MemoryStore

TOKEN_A = "npm_" + "a1" * 18
TOKEN_B = "npm_" + "b2" * 18
AUTH = "dXNlcjpzM2NyZXQtcGFzcw=="
PASSWORD = "c2VjcmV0LXBhc3N3b3Jk"
LINE_A = f"//registry.npmjs.org/:_authToken={TOKEN_A}\n".encode()
LINE_B = f"//r.example.com/:_authToken={TOKEN_B}\n".encode()


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _states(path: Path) -> list[str]:
    config = files.read_config(path)
    return [f.state for f in find_credentials(path, config.document)]


def _journal_entries() -> list[Path]:
    directory = paths.journal_dir()
    return sorted(directory.iterdir()) if directory.exists() else []


def _cli(*args: str) -> int:
    return cli.main(list(args))


# --- the basic move ----------------------------------------------------------


def test_secure_moves_values(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    result = migrate.secure_file(npmrc, store)
    assert result.changed
    assert TOKEN_A.encode() not in npmrc.read_bytes()
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]


def test_secure_marker_format(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    migrate.secure_file(npmrc, MemoryStore())
    text = npmrc.read_text()
    assert text.startswith("; npmguard:")
    assert text.endswith(" //registry.npmjs.org/:_authToken=<keychain>\n")


def test_secure_vault_name(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    vault_id = npmrc.read_text().split()[1].split(":")[1]
    assert store.names() == [f"//registry.npmjs.org/:_authToken#{vault_id}"]


def test_secure_indexes(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    index = migrate.load_index()
    assert list(index) == store.names()
    meta = index[store.names()[0]]
    assert meta["registry"] == "//registry.npmjs.org/"
    assert meta["kind"] == "_authToken"
    assert meta["path"] == str(npmrc)
    assert TOKEN_A not in paths.index_path().read_text()


def test_secure_twice_unchanged(home: Path) -> None:
    npmrc = _write(
        home / ".npmrc",
        f"//registry.npmjs.org/:_authToken={TOKEN_A}\n//r.example/:_auth={AUTH}\n".encode(),
    )
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    once = npmrc.read_bytes()
    names = store.names()
    index = paths.index_path().read_bytes()
    second = migrate.secure_file(npmrc, store)
    assert not second.changed
    assert second.moved == []
    assert npmrc.read_bytes() == once
    assert store.names() == names
    assert paths.index_path().read_bytes() == index


def test_secure_journal_dropped(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    migrate.secure_file(npmrc, MemoryStore())
    assert _journal_entries() == []


def test_secure_no_temp_left(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    migrate.secure_file(npmrc, MemoryStore())
    assert sorted(p.name for p in home.glob(".*npmguard-tmp")) == []


# --- what the file keeps -----------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_secure_keeps_mode(home: Path, mode: int) -> None:
    npmrc = _write(home / ".npmrc", LINE_A, mode)
    migrate.secure_file(npmrc, MemoryStore())
    assert npmrc.stat().st_mode & 0o7777 == mode


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a file away")
def test_secure_keeps_owner(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    os.chown(npmrc, 12345, 23456)
    migrate.secure_file(npmrc, MemoryStore())
    info = npmrc.stat()
    assert info.st_uid == 12345
    assert info.st_gid == 23456


def test_secure_symlink_stays(home: Path) -> None:
    target = _write(home / "dotfiles" / "npmrc", LINE_A)
    link = home / ".npmrc"
    link.symlink_to(target)
    migrate.secure_file(link, MemoryStore())
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert TOKEN_A.encode() not in target.read_bytes()


def test_secure_keeps_other_bytes(home: Path) -> None:
    original = (
        "\ufeff; my settings\r\n"
        "registry=https://registry.npmjs.org/\r\n"
        "\r\n"
        f"//registry.npmjs.org/:_authToken={TOKEN_A}\r\n"
        "save-exact=true"
    ).encode()
    npmrc = _write(home / ".npmrc", original)
    migrate.secure_file(npmrc, MemoryStore())
    lines = npmrc.read_bytes().split(b"\r\n")
    assert lines[:3] == original.split(b"\r\n")[:3]
    assert lines[3].startswith(b"; npmguard:")
    assert lines[4] == b"save-exact=true"


# --- backing off -------------------------------------------------------------


def test_readonly_file_rejected(home: Path) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original, 0o444)
    store = MemoryStore()
    with pytest.raises(ConfigFileError) as caught:
        migrate.secure_file(npmrc, store)
    assert "read-only" in str(caught.value)
    assert npmrc.read_bytes() == original
    assert store.names() == []
    assert _journal_entries() == []


def test_readonly_cli_one_line(
    keyring_bus: realparts.Keychain, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original, 0o444)
    code = _cli("secure", "--token-helper", "never")
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert npmrc.read_bytes() == original


def test_changed_file_backs_off(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original)
    real_check = files.ensure_unchanged

    def edit_then_check(config: files.ConfigFile) -> None:
        # Someone appends a line between npmguard's read and its rename.
        with open(npmrc, "ab") as handle:
            handle.write(b"save-exact=true\n")
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", edit_then_check)
    store = MemoryStore()
    with pytest.raises(FileChangedError):
        migrate.secure_file(npmrc, store)
    assert npmrc.read_bytes() == original + b"save-exact=true\n"
    assert store.names() == []
    assert _journal_entries() == []


def test_changed_file_keeps_copy(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    real_check = files.ensure_unchanged

    def remove_then_check(config: files.ConfigFile) -> None:
        # The user deletes the token line meanwhile: the vault copy is the
        # only one left, so it must stay.
        npmrc.write_bytes(b"save-exact=true\n")
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", remove_then_check)
    store = MemoryStore()
    with pytest.raises(FileChangedError):
        migrate.secure_file(npmrc, store)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]


def test_changed_mode_backs_off(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npmrc = _write(home / ".npmrc", LINE_A, 0o644)
    real_check = files.ensure_unchanged

    def chmod_then_check(config: files.ConfigFile) -> None:
        os.chmod(npmrc, 0o600)
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", chmod_then_check)
    with pytest.raises(FileChangedError):
        migrate.secure_file(npmrc, MemoryStore())
    assert npmrc.stat().st_mode & 0o777 == 0o600


def test_changed_file_cli_one_line(
    keyring_bus: realparts.Keychain,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    real_check = files.ensure_unchanged

    def edit_then_check(config: files.ConfigFile) -> None:
        with open(npmrc, "ab") as handle:
            handle.write(b"save-exact=true\n")
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", edit_then_check)
    code = _cli("secure", "--token-helper", "never")
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "changed" in err
    with keyring_bus.default_collection() as collection:
        assert list(collection.get_all_items()) == []


def test_vault_mismatch_rejected(home: Path) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original)

    class ForgetfulStore(MemoryStore):
        def set(self, name: str, value: Secret) -> None:
            super().set(name, Secret("something-else-entirely"))

    store = ForgetfulStore()
    with pytest.raises(NpmguardError):
        migrate.secure_file(npmrc, store)
    assert npmrc.read_bytes() == original
    assert store.names() == []


def test_vault_failure_undoes(home: Path) -> None:
    original = (
        f"//registry.npmjs.org/:_authToken={TOKEN_A}\n//r.example/:_auth={AUTH}\n"
    ).encode()
    npmrc = _write(home / ".npmrc", original)

    class FullStore(MemoryStore):
        def set(self, name: str, value: Secret) -> None:
            if self.names():
                raise migrate.VaultError("the keychain is full")
            super().set(name, value)

    store = FullStore()
    with pytest.raises(NpmguardError):
        migrate.secure_file(npmrc, store)
    assert npmrc.read_bytes() == original
    assert store.names() == []
    assert _journal_entries() == []


def test_corrupt_index_rejected(home: Path) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original)
    paths.index_path().parent.mkdir(parents=True, exist_ok=True)
    paths.index_path().write_text("{not json")
    store = MemoryStore()
    with pytest.raises(JournalError):
        migrate.secure_file(npmrc, store)
    assert npmrc.read_bytes() == original
    assert store.names() == []


def test_index_wrong_shape_rejected(home: Path) -> None:
    paths.index_path().parent.mkdir(parents=True, exist_ok=True)
    paths.index_path().write_text('["a list, not an object"]')
    with pytest.raises(JournalError):
        migrate.load_index()


def test_corrupt_journal_one_line(
    keyring_bus: realparts.Keychain, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.journal_dir().mkdir(parents=True)
    (paths.journal_dir() / "0123456789abcdef.json").write_text("{truncated")
    code = _cli("secure", "--token-helper", "never")
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "journal" in err


# --- dry run -----------------------------------------------------------------


def test_dry_run_changes_nothing(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original)

    def no_keychain() -> None:
        raise AssertionError("--dry-run opened the keychain")

    monkeypatch.setattr(KeychainStore, "__init__", no_keychain)
    code = _cli("secure", "--dry-run", "--token-helper", "always")
    out = capsys.readouterr().out
    assert code == 0
    assert "would secure _authToken" in out
    assert npmrc.read_bytes() == original
    assert not paths.index_path().exists()
    assert _journal_entries() == []


def test_dry_run_store_untouched(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    result = migrate.secure_file(npmrc, store, dry_run=True)
    assert len(result.moved) == 1
    assert store.names() == []


# --- kinds and where they sit ------------------------------------------------


KIND_FILES = {
    "auth": f"//r.example.com/npm/:_auth={AUTH}\n",
    "password": (
        "//r.example.com/npm/:username=builder\n"
        f"//r.example.com/npm/:_password={PASSWORD}\n"
    ),
    "legacy_top_level": f"registry=https://r.example.com/npm/\n_authToken={TOKEN_A}\n",
    "section": f"[work]\n//r.example.com/npm/:_authToken={TOKEN_A}\n",
    "scoped": (
        "@acme:registry=https://npm.acme.test/\n"
        f"//npm.acme.test/:_authToken={TOKEN_B}\n"
    ),
}


@pytest.mark.parametrize("case", sorted(KIND_FILES))
def test_kind_secured(home: Path, case: str) -> None:
    npmrc = _write(home / ".npmrc", KIND_FILES[case].encode())
    migrate.secure_file(npmrc, MemoryStore())
    assert "plaintext" not in _states(npmrc)


@pytest.mark.parametrize("case", sorted(KIND_FILES))
def test_kind_round_trip(home: Path, case: str) -> None:
    original = KIND_FILES[case].encode()
    npmrc = _write(home / ".npmrc", original)
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == original
    assert store.names() == []


def test_section_marker_in_section(home: Path) -> None:
    npmrc = _write(home / ".npmrc", KIND_FILES["section"].encode())
    migrate.secure_file(npmrc, MemoryStore())
    config = files.read_config(npmrc)
    [finding] = find_credentials(npmrc, config.document)
    assert finding.state == "secured"
    assert finding.section == "work"


def test_legacy_top_level_registry(home: Path) -> None:
    npmrc = _write(home / ".npmrc", KIND_FILES["legacy_top_level"].encode())
    migrate.secure_file(npmrc, MemoryStore())
    [meta] = migrate.load_index().values()
    assert meta["registry"] == "//r.example.com/npm/"


# --- raw values --------------------------------------------------------------

# (line, whether the file's text of the value differs from npm's reading)
RAW_CASES = {
    "plain": ("//r.example/:_authToken=plain-token-0001", False),
    "double_quoted": ('//r.example/:_authToken="quoted-token-0002"', True),
    "single_quoted": ("//r.example/:_authToken='single-token-0003'", True),
    "escapes": ("//r.example/:_authToken=tok\\;semi\\#hash-0004", True),
    "inline_comment": ("//r.example/:_authToken=inline-token-0005 ; a note", False),
    "trailing_comment": ("//r.example/:_authToken=tail-token-0006;note", False),
    "quoted_then_comment": ("//r.example/:_authToken='kept-quotes-0007' ;note", False),
    "json_escape": ('//r.example/:_authToken="tok\\u00e9n-0008"', True),
    "spaces": ("  //r.example/:_authToken =  spaced-token-0009   ", False),
    "hash_comment": ("//r.example/:_authToken=hash-token-0010 # note", False),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_round_trip(home: Path, case: str) -> None:
    line, _ = RAW_CASES[case]
    original = f"; before\n{line}\nsave-exact=true\n".encode()
    npmrc = _write(home / ".npmrc", original)
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    assert "plaintext" not in _states(npmrc)
    migrate.restore_file(npmrc, store)
    assert npmrc.read_bytes() == original


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_entry_kept(home: Path, case: str) -> None:
    line, differs = RAW_CASES[case]
    npmrc = _write(home / ".npmrc", f"{line}\n".encode())
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    has_raw = any(n.endswith(migrate.RAW_SUFFIX) for n in store.names())
    assert has_raw == differs


def test_raw_value_is_text(home: Path) -> None:
    npmrc = _write(home / ".npmrc", b"//r.example/:_authToken='single-token-0003'\n")
    store = MemoryStore()
    migrate.secure_file(npmrc, store)
    [name] = [n for n in store.names() if not n.endswith(migrate.RAW_SUFFIX)]
    assert store.get(name) == Secret("single-token-0003")
    assert store.get(name + migrate.RAW_SUFFIX) == Secret("'single-token-0003'")


# --- project files and the command line --------------------------------------


def test_project_path_secured(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    project = tmp_path / "work" / "app"
    original = LINE_B
    npmrc = _write(project / ".npmrc", original, 0o644)
    assert _cli("secure", "--token-helper", "never", str(tmp_path / "work")) == 0
    assert "plaintext" not in _states(npmrc)
    [name] = migrate.load_index()
    assert KeychainStore().get(name) == Secret(TOKEN_B)


def test_project_path_restored(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    project = tmp_path / "work" / "app"
    original = f"//r.example.com/:_authToken={TOKEN_B}\r\n".encode()
    npmrc = _write(project / ".npmrc", original, 0o644)
    _cli("secure", "--token-helper", "never", str(tmp_path / "work"))
    assert _cli("restore", str(tmp_path / "work")) == 0
    assert npmrc.read_bytes() == original


def test_restore_finds_indexed_project(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    # With no PATH, restore finds a project file through the index.
    original = LINE_B
    npmrc = _write(tmp_path / "work" / ".npmrc", original)
    _cli("secure", "--token-helper", "never", str(tmp_path / "work"))
    assert _cli("restore") == 0
    assert npmrc.read_bytes() == original


# --- pnpm token-helper lines -------------------------------------------------


def _helper_count(path: Path) -> int:
    return path.read_bytes().decode("utf-8-sig").count(HELPER_MARKER)


@pytest.mark.parametrize(
    "original",
    [
        pytest.param(f"//registry.npmjs.org/:_authToken={TOKEN_A}\n", id="plain"),
        pytest.param(f"//registry.npmjs.org/:_authToken={TOKEN_A}", id="no_newline"),
        pytest.param(
            f"\ufeff; mine\r\n//registry.npmjs.org/:_authToken={TOKEN_A}\r\n",
            id="bom_crlf",
        ),
        pytest.param(
            f"[work]\n//registry.npmjs.org/:_authToken={TOKEN_A}\n", id="section_only"
        ),
    ],
)
def test_helpers_round_trip(
    keyring_bus: realparts.Keychain, home: Path, original: str
) -> None:
    npmrc = _write(home / ".npmrc", original.encode(), 0o644)
    assert _cli("secure", "--token-helper", "always") == 0
    assert _helper_count(npmrc) == 1
    assert _cli("restore") == 0
    assert npmrc.read_bytes() == original.encode()


def test_helpers_at_top(keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(
        home / ".npmrc",
        f"\ufeff[work]\r\n//registry.npmjs.org/:_authToken={TOKEN_A}\r\n".encode(),
    )
    _cli("secure", "--token-helper", "always")
    lines = npmrc.read_bytes().decode("utf-8-sig").split("\r\n")
    assert lines[0] == HELPER_MARKER
    assert lines[1].startswith("//registry.npmjs.org/:tokenHelper=/")
    assert lines[2] == "[work]"


def test_helpers_added_once(keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    _cli("secure", "--token-helper", "always")
    once = npmrc.read_bytes()
    _cli("secure", "--token-helper", "always")
    assert npmrc.read_bytes() == once


def test_helpers_script_unchanged(keyring_bus: realparts.Keychain, home: Path) -> None:
    _write(home / ".npmrc", LINE_A)
    _cli("secure", "--token-helper", "always")
    [script] = (paths.data_dir() / "bin").iterdir()
    before = script.stat().st_mtime_ns
    time.sleep(0.01)
    _cli("secure", "--token-helper", "always")
    assert script.stat().st_mtime_ns == before


def test_helpers_script_removed(keyring_bus: realparts.Keychain, home: Path) -> None:
    _write(home / ".npmrc", LINE_A)
    _cli("secure", "--token-helper", "always")
    _cli("restore")
    assert list((paths.data_dir() / "bin").iterdir()) == []


def test_helpers_user_config_created(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    # The credential is only in a project file; pnpm reads helpers only from
    # the user config, so secure has to create it.
    _write(tmp_path / "work" / ".npmrc", LINE_B)
    user = home / ".npmrc"
    assert not user.exists()
    _cli("secure", "--token-helper", "always", str(tmp_path / "work"))
    assert _helper_count(user) == 1
    assert user.stat().st_mode & 0o777 == 0o600


def test_helpers_created_config_removed(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    original = LINE_B
    project = _write(tmp_path / "work" / ".npmrc", original)
    _cli("secure", "--token-helper", "always", str(tmp_path / "work"))
    assert _cli("restore", str(tmp_path / "work")) == 0
    assert project.read_bytes() == original
    assert not (home / ".npmrc").exists()


def test_helpers_created_config_grows(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    # A second secure adds a helper to the file npmguard made; it is still
    # npmguard's file, so the last restore removes it.
    _write(
        tmp_path / "one" / ".npmrc", f"//r.example.com/:_authToken={TOKEN_A}\n".encode()
    )
    _write(
        tmp_path / "two" / ".npmrc", f"//r.example.org/:_authToken={TOKEN_B}\n".encode()
    )
    _cli("secure", "--token-helper", "always", str(tmp_path / "one"))
    _cli("secure", "--token-helper", "always", str(tmp_path / "two"))
    assert _helper_count(home / ".npmrc") == 2
    _cli("restore", str(tmp_path / "one"), str(tmp_path / "two"))
    assert not (home / ".npmrc").exists()


def test_helpers_created_config_edited(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    # Once the user adds a line, the created file is theirs and stays.
    _write(tmp_path / "work" / ".npmrc", LINE_B)
    _cli("secure", "--token-helper", "always", str(tmp_path / "work"))
    user = home / ".npmrc"
    with open(user, "ab") as handle:
        handle.write(b"save-exact=true\n")
    _cli("restore", str(tmp_path / "work"))
    assert user.read_bytes() == b"save-exact=true\n"


def test_helpers_foreign_kept(keyring_bus: realparts.Keychain, home: Path) -> None:
    original = (
        "//registry.npmjs.org/:tokenHelper=/usr/local/bin/my-helper\n"
        f"//r.example.com/:_authToken={TOKEN_B}\n"
        f"//registry.npmjs.org/:_authToken={TOKEN_A}\n"
    ).encode()
    npmrc = _write(home / ".npmrc", original)
    _cli("secure", "--token-helper", "always")
    assert _helper_count(npmrc) == 1
    _cli("restore")
    assert npmrc.read_bytes() == original


# --- the state lock ----------------------------------------------------------


def test_state_lock_reentrant(home: Path) -> None:
    with migrate.state_lock() as outer, migrate.state_lock() as inner:
        assert outer
        assert inner


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


def test_state_lock_waits(keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    with migrate.state_lock():
        child = subprocess.Popen(
            [sys.executable, "-m", "npmguard", "secure", "--token-helper", "never"],
            cwd=home,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)
            assert child.poll() is None
            assert TOKEN_A.encode() in npmrc.read_bytes()
        except BaseException:
            child.kill()
            child.wait()
            raise
    assert child.wait(timeout=60) == 0
    assert TOKEN_A.encode() not in npmrc.read_bytes()


def test_two_secures_at_once(keyring_bus: realparts.Keychain, home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A + LINE_B)
    argv = [sys.executable, "-m", "npmguard", "secure", "--token-helper", "never"]
    children = [
        subprocess.Popen(
            argv,
            cwd=home,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    codes = [child.wait(timeout=60) for child in children]
    errors = [child.stderr.read() for child in children if child.stderr]
    for child in children:
        if child.stderr:
            child.stderr.close()
    assert codes == [0, 0], errors
    assert _states(npmrc) == ["secured", "secured"]
    with keyring_bus.default_collection() as collection:
        assert len(list(collection.get_all_items())) == 2


def test_recover_skips_live_journal(
    keyring_bus: realparts.Keychain, home: Path
) -> None:
    # A journal entry of a run that still holds the lock is not interrupted:
    # a concurrent `npmguard token` must not undo it.
    npmrc = _write(home / ".npmrc", LINE_A)
    store = KeychainStore()
    config = files.read_config(npmrc)
    moves, new_data = migrate._plan_secure(config)
    with migrate.state_lock():
        name = moves[0].name
        store.set(name, Secret(TOKEN_A))
        record = {
            "txid": "00112233aabbccdd",
            "op": "secure",
            "path": str(npmrc),
            "display_path": str(npmrc),
            "before": migrate._sha(config.data),
            "after": migrate._sha(new_data),
            "ids": {str(moves[0].finding.line): moves[0].vault_id},
            "names": [name, name + "#raw"],
            "phase": "storing",
            "created": 0,
        }
        migrate._write_journal(record)
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "npmguard",
                "token",
                "--registry",
                "https://registry.npmjs.org/",
            ],
            cwd=home,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0
        assert store.get(name) == Secret(TOKEN_A)
        assert len(_journal_entries()) == 1
        migrate._drop_journal(record["txid"])
        store.delete(name)


def test_recover_clean_start_no_vault(home: Path) -> None:
    def no_vault() -> MemoryStore:
        raise AssertionError("recover opened the vault with nothing to do")

    assert migrate.recover(no_vault) == []


def test_recover_rewrite_temp_removed(home: Path) -> None:
    npmrc = _write(home / ".npmrc", b"save-exact=true\n")
    temp = files.temp_path_for(npmrc, "0123456789abcdef")
    temp.write_bytes(b"half written\n")
    migrate._write_journal(
        {
            "txid": "0123456789abcdef",
            "op": "rewrite",
            "path": str(npmrc),
            "before": "x",
            "after": "y",
            "names": [],
            "phase": "writing",
        }
    )
    migrate.recover(MemoryStore)
    assert not temp.exists()
    assert _journal_entries() == []


def test_recover_journal_temp_swept(home: Path) -> None:
    paths.journal_dir().mkdir(parents=True)
    stale = paths.journal_dir() / ".0123456789abcdef.json.4242.npmguard-tmp"
    stale.write_text("{}")
    migrate._write_journal(
        {
            "txid": "0123456789abcdef",
            "op": "rewrite",
            "path": str(home / ".npmrc"),
            "before": "x",
            "after": "y",
            "names": [],
            "phase": "writing",
        }
    )
    migrate.recover(MemoryStore)
    assert list(paths.journal_dir().iterdir()) == []


# --- recovery of an interrupted secure, in process ---------------------------


class _Interrupted(BaseException):
    """Stands for a signal that stops the run between two steps."""


def _secure_interrupted_after_rename(
    npmrc: Path, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync_dir = files.fsync_dir

    def fsync_then_stop(directory: Path) -> None:
        real_fsync_dir(directory)
        if directory == npmrc.parent:
            raise _Interrupted

    monkeypatch.setattr(files, "fsync_dir", fsync_then_stop)
    with pytest.raises(_Interrupted):
        migrate.secure_file(npmrc, store)
    monkeypatch.setattr(files, "fsync_dir", real_fsync_dir)


def test_interrupt_after_rename_keeps(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _secure_interrupted_after_rename(npmrc, store, monkeypatch)
    assert "secured" in _states(npmrc)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]


def test_interrupt_after_rename_recovers(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _secure_interrupted_after_rename(npmrc, store, monkeypatch)
    messages = migrate.recover(lambda: store)
    assert messages == [f"finished securing {npmrc}"]
    assert list(migrate.load_index()) == store.names()
    assert _journal_entries() == []


def _journal_of_killed_secure(npmrc: Path, store: MemoryStore, phase: str) -> str:
    """Write the vault entries and journal a secure killed before its rename."""
    config = files.read_config(npmrc)
    moves, new_data = migrate._plan_secure(config)
    record: dict[str, object] = {
        "txid": "feedfacecafebeef",
        "op": "secure",
        "path": str(npmrc),
        "display_path": str(npmrc),
        "before": migrate._sha(config.data),
        "after": migrate._sha(new_data),
        "ids": {str(m.finding.line): m.vault_id for m in moves},
        "index": {m.name: m.index_entry(npmrc, npmrc) for m in moves},
        "names": [n for m in moves for n in (m.name, m.name + "#raw")],
        "phase": phase,
        "created": 0,
    }
    migrate._write_journal(record)
    for move in moves:
        store.set(move.name, move.value)
    return str(record["txid"])


def test_recover_storing_undoes(home: Path) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "storing")
    migrate.recover(lambda: store)
    assert npmrc.read_bytes() == original
    assert store.names() == []


def test_recover_stored_finishes(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    migrate.recover(lambda: store)
    assert _states(npmrc) == ["secured"]
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]


def test_recover_stored_refills_vault(home: Path) -> None:
    # A killed undo may have deleted some entries already; finishing must
    # store them again from the file before the file loses its values.
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    for name in store.names():
        store.delete(name)
    migrate.recover(lambda: store)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]


def test_recover_stored_readonly_undoes(home: Path) -> None:
    original = LINE_A
    npmrc = _write(home / ".npmrc", original)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    os.chmod(npmrc, 0o444)
    messages = migrate.recover(lambda: store)
    assert messages == [f"undid securing {npmrc}; the file still has its values"]
    assert npmrc.read_bytes() == original
    assert store.names() == []


def test_recover_edit_during_finish(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user removes the token line while recovery finishes the secure:
    # recovery backs off and the vault keeps the only copy.
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    real_check = files.ensure_unchanged

    def remove_then_check(config: files.ConfigFile) -> None:
        npmrc.write_bytes(b"save-exact=true\n")
        real_check(config)

    monkeypatch.setattr(files, "ensure_unchanged", remove_then_check)
    migrate.recover(lambda: store)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]
    assert npmrc.read_bytes() == b"save-exact=true\n"
    assert _journal_entries() == []


def test_recover_edited_keeps_only_copy(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    npmrc.write_bytes(b"save-exact=true\n")
    migrate.recover(lambda: store)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]
    assert _journal_entries() == []


def test_recover_edited_drops_duplicate(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    with open(npmrc, "ab") as handle:
        handle.write(b"save-exact=true\n")
    migrate.recover(lambda: store)
    assert TOKEN_A.encode() in npmrc.read_bytes()
    assert store.names() == []


def test_recover_edited_after_rename(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed after the rename, then the user edits another line: the marker
    # still needs its vault entry, and restore must find it in the index.
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _secure_interrupted_after_rename(npmrc, store, monkeypatch)
    with open(npmrc, "ab") as handle:
        handle.write(b"save-exact=true\n")
    migrate.recover(lambda: store)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]
    assert list(migrate.load_index()) == store.names()


def test_recover_file_deleted(home: Path) -> None:
    npmrc = _write(home / ".npmrc", LINE_A)
    store = MemoryStore()
    _journal_of_killed_secure(npmrc, store, "stored")
    npmrc.unlink()
    migrate.recover(lambda: store)
    assert [store.get(n) for n in store.names()] == [Secret(TOKEN_A)]


def test_recover_journal_record_valid(home: Path) -> None:
    paths.journal_dir().mkdir(parents=True)
    (paths.journal_dir() / "0123456789abcdef.json").write_text(
        json.dumps({"txid": "../../etc/x", "op": "secure"})
    )
    with pytest.raises(JournalError):
        migrate.recover(MemoryStore)
