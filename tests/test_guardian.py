"""The guardian's policies against real files and the real keychain on a
private bus: auto secures, ask records an exposure, off ignores, and the
exposures follow what is on disk."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import realparts

from npmguard import migrate
from npmguard.config import Root, Settings
from npmguard.daemon.guardian import Guardian
from npmguard.daemon.state import DaemonState, Snapshot
from npmguard.daemon.watcher import Rescan
from npmguard.npmrc.credentials import HELPER_MARKER
from npmguard.npmrc.locate import global_config_path, user_config_path
from npmguard.secret import Secret, fingerprint
from npmguard.vault import KeychainStore

REGISTRY = "//127.0.0.1:9/"


def _line(token: str) -> str:
    return f"{REGISTRY}:_authToken={token}\n"


def _guardian(
    *, roots: tuple[Root, ...] = (), state: DaemonState | None = None, **policies: str
) -> Guardian:
    settings = Settings(roots=roots, **{f"{k}_policy": v for k, v in policies.items()})
    return Guardian(
        settings,
        state or DaemonState(),
        KeychainStore,
        user_config=user_config_path(os.environ),
        global_config=global_config_path(os.environ),
    )


def _user() -> Path:
    return user_config_path(os.environ)


def _global() -> Path:
    path = global_config_path(os.environ)
    assert path is not None
    return path


def _keychain_holds(value: str) -> bool:
    store = KeychainStore()
    return any(store.get(name) == Secret(value) for name in migrate.load_index())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    directory = tmp_path / "src" / "app"
    directory.mkdir(parents=True)
    return directory / ".npmrc"


# --- auto --------------------------------------------------------------------


def test_auto_removes_token(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    _guardian(user="auto").handle({_user()})
    assert canary not in _user().read_text()


def test_auto_keychain_holds(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    _guardian(user="auto").handle({_user()})
    assert _keychain_holds(canary)


def test_auto_no_exposure(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    assert guardian.state.snapshot.exposures == ()


def test_auto_counts_secured(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary) + "//other.example/:_auth=dXNlcjpwYXNz\n")
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    assert guardian.state.snapshot.secured_count == 2


def test_auto_project_root(
    keyring_bus: realparts.Keychain, project: Path, canary: str
) -> None:
    project.write_text(_line(canary))
    guardian = _guardian(roots=(Root(project.parent.parent, "auto"),))
    guardian.handle({project})
    assert canary not in project.read_text()


def test_auto_twice_unchanged(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    once = _user().read_bytes()
    guardian.handle({_user()})
    assert _user().read_bytes() == once


def test_auto_logs_fingerprint(
    keyring_bus: realparts.Keychain, canary: str, caplog: pytest.LogCaptureFixture
) -> None:
    _user().write_text(_line(canary))
    with caplog.at_level(logging.INFO, logger="npmguard"):
        _guardian(user="auto").handle({_user()})
    assert f"fingerprint {fingerprint(canary)}" in caplog.text


def test_auto_logs_no_canary(
    keyring_bus: realparts.Keychain, canary: str, caplog: pytest.LogCaptureFixture
) -> None:
    _user().write_text(_line(canary))
    with caplog.at_level(logging.DEBUG):
        _guardian(user="auto").handle({_user()})
    assert canary not in caplog.text


def test_auto_pnpm_helper(
    keyring_bus: realparts.Keychain, canary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_bin = realparts.find_node_tool("pnpm").parent
    monkeypatch.setenv("PATH", f"{node_bin}{os.pathsep}{os.environ['PATH']}")
    _user().write_text(_line(canary))
    _guardian(user="auto").handle({_user()})
    assert _user().read_text().startswith(HELPER_MARKER + "\n" + REGISTRY)


def test_auto_no_pnpm_no_helper(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    if any(
        Path(d, "pnpm").exists() for d in os.environ["PATH"].split(os.pathsep) if d
    ):
        pytest.skip("pnpm is on PATH")
    _guardian(user="auto").handle({_user()})
    assert HELPER_MARKER not in _user().read_text()


def test_auto_paused_keeps_file(keyring_bus: realparts.Keychain, canary: str) -> None:
    state = DaemonState()
    state.update(paused=True)
    _user().write_text(_line(canary))
    _guardian(user="auto", state=state).handle({_user()})
    assert _user().read_text() == _line(canary)


def test_auto_paused_records(keyring_bus: realparts.Keychain, canary: str) -> None:
    state = DaemonState()
    state.update(paused=True)
    _user().write_text(_line(canary))
    _guardian(user="auto", state=state).handle({_user()})
    assert len(state.snapshot.exposures) == 1


def test_auto_resumed_scan(keyring_bus: realparts.Keychain, canary: str) -> None:
    state = DaemonState()
    state.update(paused=True)
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto", state=state)
    guardian.handle({_user()})
    state.update(paused=False)
    guardian.full_scan()
    assert canary not in _user().read_text()


# --- ask and off -------------------------------------------------------------


def test_ask_keeps_file(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    _guardian(user="ask").handle({_user()})
    assert _user().read_text() == _line(canary)


def test_ask_records_exposure(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text("fund=false\n" + _line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    (exposure,) = guardian.state.snapshot.exposures
    assert (exposure.path, exposure.line, exposure.registry, exposure.kind) == (
        str(_user()), 2, REGISTRY, "_authToken"
    )


def test_ask_exposure_fingerprint(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    assert guardian.state.snapshot.exposures[0].fingerprint == fingerprint(canary)


def test_ask_exposure_policy(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    assert guardian.state.snapshot.exposures[0].policy == "ask"


def test_ask_status_exposed(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    assert guardian.state.snapshot.status == "exposed"


def test_ask_notifies_listener(keyring_bus: realparts.Keychain, canary: str) -> None:
    state = DaemonState()
    seen: list[Snapshot] = []
    state.subscribe(lambda before, after: seen.append(after))
    _user().write_text(_line(canary))
    _guardian(user="ask", state=state).handle({_user()})
    assert [len(s.exposures) for s in seen] == [1]


def test_ask_logged_once(
    keyring_bus: realparts.Keychain, canary: str, caplog: pytest.LogCaptureFixture
) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    with caplog.at_level(logging.INFO, logger="npmguard"):
        guardian.handle({_user()})
        guardian.handle({_user()})
    assert caplog.text.count("found plaintext") == 1


def test_ask_global(keyring_bus: realparts.Keychain, canary: str) -> None:
    _global().write_text(_line(canary))
    guardian = _guardian(**{"global": "ask"})
    guardian.handle({_global()})
    assert guardian.state.snapshot.exposures[0].path == str(_global())


def test_off_ignores_file(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    _guardian(user="off").handle({_user()})
    assert _user().read_text() == _line(canary)


def test_off_records_nothing(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="off")
    guardian.handle({_user()})
    assert guardian.state.snapshot.exposures == ()


def test_off_root_inside_auto(
    keyring_bus: realparts.Keychain, project: Path, canary: str
) -> None:
    project.write_text(_line(canary))
    roots = (Root(project.parent.parent, "auto"), Root(project.parent, "off"))
    _guardian(roots=roots).handle({project})
    assert project.read_text() == _line(canary)


# --- keeping the exposures accurate ------------------------------------------


def test_exposure_gone_after_edit(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    _user().write_text("fund=false\n")
    guardian.handle({_user()})
    assert guardian.state.snapshot.exposures == ()


def test_exposure_gone_after_delete(
    keyring_bus: realparts.Keychain, canary: str
) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    _user().unlink()
    guardian.handle({_user()})
    assert guardian.state.snapshot.exposures == ()


def test_exposure_gone_from_rescan(
    keyring_bus: realparts.Keychain, project: Path, canary: str
) -> None:
    project.write_text(_line(canary))
    guardian = _guardian(roots=(Root(project.parent.parent, "ask"),))
    guardian.handle({project})
    project.unlink()
    guardian.handle(Rescan())
    assert guardian.state.snapshot.exposures == ()


def test_exposure_line_moves(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    _user().write_text("fund=false\naudit=false\n" + _line(canary))
    guardian.handle({_user()})
    assert [e.line for e in guardian.state.snapshot.exposures] == [3]


def test_full_scan_finds_all(
    keyring_bus: realparts.Keychain, project: Path, canary: str
) -> None:
    _user().write_text(_line(canary))
    project.write_text(_line(canary))
    guardian = _guardian(user="ask", roots=(Root(project.parent.parent, "ask"),))
    guardian.full_scan()
    assert {e.path for e in guardian.state.snapshot.exposures} == {
        str(_user()), str(project)
    }


def test_full_scan_secures_auto(
    keyring_bus: realparts.Keychain, project: Path, canary: str
) -> None:
    project.write_text(_line(canary))
    _guardian(roots=(Root(project.parent.parent, "auto"),)).full_scan()
    assert canary not in project.read_text()


# --- secure now --------------------------------------------------------------


def test_secure_now_moves(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    assert guardian.secure_now() == 1


def test_secure_now_file_clean(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    guardian.secure_now()
    assert canary not in _user().read_text()


def test_secure_now_clears(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="ask")
    guardian.handle({_user()})
    guardian.secure_now()
    assert guardian.state.snapshot.exposures == ()


def test_secure_now_nothing(keyring_bus: realparts.Keychain) -> None:
    assert _guardian(user="ask").secure_now() == 0


# --- errors ------------------------------------------------------------------


def test_locked_sets_state(locked_keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    assert guardian.state.snapshot.vault_locked


def test_locked_keeps_file(locked_keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    _guardian(user="auto").handle({_user()})
    assert _user().read_text() == _line(canary)


def test_locked_records_exposure(
    locked_keyring_bus: realparts.Keychain, canary: str
) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    assert [e.policy for e in guardian.state.snapshot.exposures] == ["auto"]


def test_locked_logged_once(
    locked_keyring_bus: realparts.Keychain, canary: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    guardian.handle({_user()})
    assert caplog.text.count("keychain is locked") == 1


def test_unlock_clears_locked(
    locked_keyring_bus: realparts.Keychain, canary: str
) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    locked_keyring_bus.unlock()
    guardian.handle({_user()})
    assert not guardian.state.snapshot.vault_locked


def test_unavailable_sets_error(bare_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    assert guardian.state.snapshot.status == "error"


def test_bad_file_logged_once(
    keyring_bus: realparts.Keychain, caplog: pytest.LogCaptureFixture
) -> None:
    _user().write_bytes(b"fund=false\n\x00\n")
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    guardian.handle({_user()})
    assert caplog.text.count("binary data") == 1


def test_bad_file_names_line(
    keyring_bus: realparts.Keychain, caplog: pytest.LogCaptureFixture
) -> None:
    _user().write_bytes(b"fund=false\n\x00\n")
    _guardian(user="auto").handle({_user()})
    assert f"{_user()}:2: binary data" in caplog.text


def test_bad_file_others_go_on(
    keyring_bus: realparts.Keychain, project: Path, canary: str
) -> None:
    _user().write_bytes(b"\x00")
    project.write_text(_line(canary))
    guardian = _guardian(user="auto", roots=(Root(project.parent.parent, "auto"),))
    guardian.handle({_user(), project})
    assert canary not in project.read_text()


def test_read_only_logged_once(
    keyring_bus: realparts.Keychain, canary: str, caplog: pytest.LogCaptureFixture
) -> None:
    _user().write_text(_line(canary))
    _user().chmod(0o400)
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    guardian.handle({_user()})
    assert caplog.text.count("read-only") == 1


def test_read_only_exposed(keyring_bus: realparts.Keychain, canary: str) -> None:
    _user().write_text(_line(canary))
    _user().chmod(0o400)
    guardian = _guardian(user="auto")
    guardian.handle({_user()})
    assert len(guardian.state.snapshot.exposures) == 1


@pytest.fixture
def lock_held() -> Iterator[None]:
    """Another thread of this process holds the state lock, as a CLI run would."""
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with migrate.state_lock():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(5)
    try:
        yield
    finally:
        release.set()
        thread.join(5)


def test_lock_busy_retry(
    keyring_bus: realparts.Keychain, canary: str, lock_held: None
) -> None:
    _user().write_text(_line(canary))
    assert _guardian(user="auto").handle({_user()}) == {_user()}


def test_lock_busy_file_kept(
    keyring_bus: realparts.Keychain, canary: str, lock_held: None
) -> None:
    _user().write_text(_line(canary))
    _guardian(user="auto").handle({_user()})
    assert _user().read_text() == _line(canary)


# --- places ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "expected"),
    [("user", ("user", "auto")), ("global", ("global", "ask"))],
)
def test_place_config(which: str, expected: tuple[str, str]) -> None:
    path = _user() if which == "user" else _global()
    assert _guardian(user="auto", **{"global": "ask"}).place(path) == expected


def test_place_nearest_root(tmp_path: Path) -> None:
    roots = (Root(tmp_path / "src", "auto"), Root(tmp_path / "src" / "work", "off"))
    guardian = _guardian(roots=roots)
    assert guardian.place(tmp_path / "src" / "work" / "a" / ".npmrc") == (
        "project", "off"
    )


def test_place_outside_roots(tmp_path: Path) -> None:
    guardian = _guardian(roots=(Root(tmp_path / "src", "auto"),), project="ask")
    assert guardian.place(tmp_path / "other" / ".npmrc") == ("project", "ask")


def test_place_root_symlink(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "src").symlink_to(tmp_path / "disk")
    guardian = _guardian(roots=(Root(tmp_path / "src", "off"),), project="auto")
    assert guardian.place(tmp_path / "disk" / "a" / ".npmrc") == ("project", "off")


def test_place_user_link(tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "npmrc"
    target.parent.mkdir()
    target.write_text("")
    _user().symlink_to(target)
    assert _guardian(user="off").place(target)[1] == "off"
