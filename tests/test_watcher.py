"""The watcher against real files and real inotify, and with the guardian on
the real keychain: every way a config file gets saved is noticed, and with
policy auto the token leaves the disk.

Two fault-injection fakes stand in for the inotify observer: one whose
``schedule`` fails as when the kernel's watch limit is reached, and one
that accepts watches but never reports an event.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import realparts
from watchdog.observers.api import BaseObserver, EventEmitter, ObservedWatch

from npmguard import migrate
from npmguard.config import Root, Settings
from npmguard.daemon import watcher as watcher_mod
from npmguard.daemon.guardian import Guardian
from npmguard.daemon.state import DaemonState
from npmguard.daemon.watcher import Rescan, Watcher
from npmguard.npmrc.locate import global_config_path, user_config_path
from npmguard.secret import Secret
from npmguard.vault import KeychainStore

WAIT = 10.0


class Recorder:
    """An ``on_change`` callback that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[set[Path]] = []
        self.cond = threading.Condition()

    def __call__(self, paths: set[Path]) -> None:
        with self.cond:
            self.calls.append(paths)
            self.cond.notify_all()

    def changes(self) -> list[set[Path]]:
        """The calls that were change sets, not rescans."""
        with self.cond:
            return [set(c) for c in self.calls if not isinstance(c, Rescan)]

    def seen(self) -> set[Path]:
        return set().union(*self.changes())

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def wait_path(self, path: Path, timeout: float = WAIT) -> bool:
        return self.wait_for(lambda: path in self.seen(), timeout)

    def clear(self) -> None:
        with self.cond:
            self.calls.clear()


def _settings(root: Path | None = None, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "roots": (Root(root, "auto"),) if root is not None else (),
        "debounce_seconds": 0.05,
        "rescan_seconds": 300.0,
        "user_policy": "auto",
        "global_policy": "ask",
        "project_policy": "ask",
    }
    values.update(changes)
    return Settings(**values)


def _configs() -> tuple[Path, Path | None]:
    return user_config_path(os.environ), global_config_path(os.environ)


@contextlib.contextmanager
def running(
    settings: Settings, on_change: Callable[[set[Path]], Any], **kwargs: Any
) -> Iterator[Watcher]:
    user, global_ = _configs()
    kwargs.setdefault("initial_scan", False)
    watcher = Watcher(
        settings, on_change, user_config=user, global_config=global_, **kwargs
    )
    watcher.start()
    try:
        assert watcher.ready.wait(WAIT), "the watcher did not get ready"
        yield watcher
    finally:
        watcher.stop()
        assert watcher.join(1.0), "the watcher did not stop within 1 s"


# --- the ways to save a file -------------------------------------------------


def _in_place(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _temp_rename(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp-save")
    temp.write_text(text)
    os.replace(temp, path)


def _delete_create(path: Path, text: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.write_text(text)


def _vim(path: Path, text: str) -> None:
    # vim's default for a file with one link: move it to the backup name,
    # write a new file, then delete the backup.
    backup = path.with_name(path.name + "~")
    if path.exists():
        os.rename(path, backup)
    path.write_text(text)
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()


SAVES: dict[str, Callable[[Path, str], None]] = {
    "in_place": _in_place,
    "temp_rename": _temp_rename,
    "delete_create": _delete_create,
    "vim": _vim,
}


@pytest.mark.parametrize("save", SAVES)
def test_watcher_user_save(home: Path, save: str) -> None:
    user, _ = _configs()
    user.write_text("registry=http://127.0.0.1:9/\n")
    recorder = Recorder()
    with running(_settings(), recorder):
        SAVES[save](user, "fund=false\n")
        assert recorder.wait_path(user)


@pytest.mark.parametrize("save", SAVES)
def test_watcher_project_save(tmp_path: Path, save: str) -> None:
    project = tmp_path / "src" / "app"
    project.mkdir(parents=True)
    npmrc = project / ".npmrc"
    npmrc.write_text("fund=false\n")
    recorder = Recorder()
    with running(_settings(tmp_path / "src"), recorder):
        SAVES[save](npmrc, "audit=false\n")
        assert recorder.wait_path(npmrc)


def test_watcher_user_created(home: Path) -> None:
    user, _ = _configs()
    recorder = Recorder()
    with running(_settings(), recorder):
        user.write_text("fund=false\n")
        assert recorder.wait_path(user)


def test_watcher_user_deleted(home: Path) -> None:
    user, _ = _configs()
    user.write_text("fund=false\n")
    recorder = Recorder()
    with running(_settings(), recorder):
        user.unlink()
        assert recorder.wait_path(user)


def test_watcher_global_save(home: Path) -> None:
    _, global_ = _configs()
    assert global_ is not None
    recorder = Recorder()
    with running(_settings(), recorder):
        _temp_rename(global_, global_.read_text() + "fund=false\n")
        assert recorder.wait_path(global_)


def test_watcher_npm_config_set(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    recorder = Recorder()
    with running(_settings(), recorder):
        done = subprocess.run(
            ["npm", "config", "set", "fund=false", "--location=user"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert recorder.wait_path(user)


def test_watcher_other_file_ignored(home: Path) -> None:
    user, _ = _configs()
    recorder = Recorder()
    with running(_settings(), recorder):
        (home / ".bashrc").write_text("true\n")
        user.write_text("fund=false\n")
        assert recorder.wait_path(user)
        assert recorder.seen() == {user}


# --- symlinked configs -------------------------------------------------------


def test_watcher_link_target_write(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    target = tmp_path / "dotfiles" / "npmrc"
    target.parent.mkdir()
    target.write_text("fund=false\n")
    user.symlink_to(target)
    recorder = Recorder()
    with running(_settings(), recorder):
        _in_place(target, "audit=false\n")
        assert recorder.wait_path(user)


def test_watcher_link_target_rename(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    target = tmp_path / "dotfiles" / "npmrc"
    target.parent.mkdir()
    target.write_text("fund=false\n")
    user.symlink_to(target)
    recorder = Recorder()
    with running(_settings(), recorder):
        _temp_rename(target, "audit=false\n")
        assert recorder.wait_path(user)


def test_watcher_link_repointed(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    old = tmp_path / "old" / "npmrc"
    new = tmp_path / "new" / "npmrc"
    for target in (old, new):
        target.parent.mkdir()
        target.write_text("fund=false\n")
    user.symlink_to(old)
    recorder = Recorder()
    with running(_settings(), recorder):
        temp_link = home / ".npmrc.new-link"
        temp_link.symlink_to(new)
        os.replace(temp_link, user)
        assert recorder.wait_path(user)


def test_watcher_repointed_target_write(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    old = tmp_path / "old" / "npmrc"
    new = tmp_path / "new" / "npmrc"
    for target in (old, new):
        target.parent.mkdir()
        target.write_text("fund=false\n")
    user.symlink_to(old)
    recorder = Recorder()
    with running(_settings(), recorder):
        user.unlink()
        user.symlink_to(new)
        assert recorder.wait_path(user)
        # The re-plan runs before the change is delivered.
        recorder.clear()
        _in_place(new, "audit=false\n")
        assert recorder.wait_path(user)


def test_watcher_old_target_dropped(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    old = tmp_path / "old" / "npmrc"
    new = tmp_path / "new" / "npmrc"
    for target in (old, new):
        target.parent.mkdir()
        target.write_text("fund=false\n")
    user.symlink_to(old)
    recorder = Recorder()
    with running(_settings(), recorder):
        user.unlink()
        user.symlink_to(new)
        assert recorder.wait_path(user)
        recorder.clear()
        _in_place(old, "audit=false\n")
        (home / "marker").write_text("")
        _in_place(new, "audit=false\n")
        assert recorder.wait_path(user)
        assert len(recorder.changes()) == 1


def test_watcher_user_dir_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "later" / "deeper" / "npmrc"
    monkeypatch.setenv("NPM_CONFIG_USERCONFIG", str(user))
    recorder = Recorder()
    with running(_settings(), recorder):
        user.parent.mkdir(parents=True)
        user.write_text("fund=false\n")
        assert recorder.wait_path(user)


# --- roots -------------------------------------------------------------------


def test_watcher_new_project_dir(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    recorder = Recorder()
    with running(_settings(root), recorder):
        project = root / "fresh"
        project.mkdir()
        (project / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(project / ".npmrc")


def test_watcher_new_nested_dirs(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    recorder = Recorder()
    with running(_settings(root), recorder):
        project = root / "org" / "team" / "app"
        project.mkdir(parents=True)
        (project / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(project / ".npmrc")


def test_watcher_project_moved_in(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    outside = tmp_path / "elsewhere" / "app"
    outside.mkdir(parents=True)
    (outside / ".npmrc").write_text("fund=false\n")
    recorder = Recorder()
    with running(_settings(root), recorder):
        os.rename(outside, root / "app")
        assert recorder.wait_path(root / "app" / ".npmrc")


def test_watcher_root_appears(tmp_path: Path) -> None:
    root = tmp_path / "later" / "src"
    recorder = Recorder()
    with running(_settings(root), recorder):
        (root / "app").mkdir(parents=True)
        (root / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "app" / ".npmrc")


def test_watcher_root_recreated(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    recorder = Recorder()
    with running(_settings(root), recorder):
        shutil.rmtree(root)
        (root / "app").mkdir(parents=True)
        (root / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "app" / ".npmrc")


def test_watcher_root_moved_away(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    recorder = Recorder()
    with running(_settings(root), recorder):
        os.rename(root, tmp_path / "src-old")
        (root / "app").mkdir(parents=True)
        (root / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "app" / ".npmrc")


def test_watcher_global_dir_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    global_ = tmp_path / "prefix" / "etc" / "npmrc"
    monkeypatch.setenv("NPM_CONFIG_GLOBALCONFIG", str(global_))
    (tmp_path / "prefix" / "etc").mkdir(parents=True)
    recorder = Recorder()
    with running(_settings(), recorder):
        shutil.rmtree(tmp_path / "prefix" / "etc")
        global_.parent.mkdir()
        global_.write_text("fund=false\n")
        assert recorder.wait_path(global_)


def test_watcher_root_symlink_shown(tmp_path: Path) -> None:
    real = tmp_path / "disk" / "src"
    (real / "app").mkdir(parents=True)
    root = tmp_path / "src"
    root.symlink_to(real)
    recorder = Recorder()
    with running(_settings(root), recorder):
        (real / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "app" / ".npmrc")


def _inotify_inodes() -> set[int]:
    """The inodes of every directory this process has an inotify watch on."""
    inodes: set[int] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as handle:
                lines = handle.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("inotify wd:"):
                fields = dict(item.split(":", 1) for item in line.split()[1:])
                inodes.add(int(fields["ino"], 16))
    return inodes


def _project_with_skipped(root: Path) -> Path:
    project = root / "app"
    (project / "node_modules" / "left-pad" / "lib").mkdir(parents=True)
    (project / ".git" / "objects" / "ab").mkdir(parents=True)
    (project / "src").mkdir()
    return project


def test_watcher_no_watch_in_node_modules(tmp_path: Path) -> None:
    project = _project_with_skipped(tmp_path / "src")
    with running(_settings(tmp_path / "src"), Recorder()):
        watched = _inotify_inodes()
    assert (project / "node_modules").stat().st_ino not in watched


def test_watcher_no_watch_in_git(tmp_path: Path) -> None:
    project = _project_with_skipped(tmp_path / "src")
    with running(_settings(tmp_path / "src"), Recorder()):
        watched = _inotify_inodes()
    assert (project / ".git").stat().st_ino not in watched


def test_watcher_watches_source_dirs(tmp_path: Path) -> None:
    project = _project_with_skipped(tmp_path / "src")
    with running(_settings(tmp_path / "src"), Recorder()):
        watched = _inotify_inodes()
    assert (project / "src").stat().st_ino in watched


def test_watcher_new_node_modules_unwatched(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    recorder = Recorder()
    with running(_settings(root), recorder):
        (root / "app" / "node_modules" / "pkg").mkdir(parents=True)
        (root / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "app" / ".npmrc")
        watched = _inotify_inodes()
    assert (root / "app" / "node_modules").stat().st_ino not in watched


def test_watcher_skipped_events_dropped(tmp_path: Path) -> None:
    project = _project_with_skipped(tmp_path / "src")
    recorder = Recorder()
    with running(_settings(tmp_path / "src"), recorder):
        (project / "node_modules" / "left-pad" / ".npmrc").write_text("x=1\n")
        (project / ".git" / ".npmrc").write_text("x=1\n")
        (project / "node_modules" / "new-pkg").mkdir()
        (project / "node_modules" / "new-pkg" / ".npmrc").write_text("x=1\n")
        (project / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(project / ".npmrc")
        time.sleep(0.3)
    assert recorder.seen() == {project / ".npmrc"}


# --- debounce, rescan, callback failures -------------------------------------


def test_watcher_debounce_one_call(home: Path) -> None:
    user, _ = _configs()
    recorder = Recorder()
    with running(_settings(debounce_seconds=0.3), recorder):
        for number in range(10):
            _in_place(user, f"fund=false\n; save {number}\n")
            time.sleep(0.02)
        assert recorder.wait_path(user)
        time.sleep(0.6)
    assert len(recorder.changes()) == 1


def test_watcher_debounce_merges_paths(home: Path, tmp_path: Path) -> None:
    user, _ = _configs()
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    recorder = Recorder()
    with running(_settings(root, debounce_seconds=0.3), recorder):
        user.write_text("fund=false\n")
        (root / "a" / ".npmrc").write_text("fund=false\n")
        (root / "b" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "b" / ".npmrc")
    assert recorder.changes() == [{user, root / "a" / ".npmrc", root / "b" / ".npmrc"}]


def test_watcher_initial_rescan(home: Path, tmp_path: Path) -> None:
    user, global_ = _configs()
    user.write_text("fund=false\n")
    (tmp_path / "src" / "app").mkdir(parents=True)
    (tmp_path / "src" / "app" / ".npmrc").write_text("fund=false\n")
    recorder = Recorder()
    with running(_settings(tmp_path / "src"), recorder, initial_scan=True):
        assert recorder.wait_for(lambda: bool(recorder.calls))
    assert recorder.calls[0] == {user, global_, tmp_path / "src" / "app" / ".npmrc"}


def test_watcher_initial_rescan_type(home: Path) -> None:
    recorder = Recorder()
    with running(_settings(), recorder, initial_scan=True):
        assert recorder.wait_for(lambda: bool(recorder.calls))
    assert isinstance(recorder.calls[0], Rescan)


class DeafObserverFake(BaseObserver):
    """Fault injection: takes every watch and never reports an event, as if
    the kernel had dropped them all."""

    def __init__(self, _on_unwatched: Callable[[str], None]) -> None:
        super().__init__(EventEmitter)

    def schedule(self, event_handler: Any, path: Any, **kwargs: Any) -> ObservedWatch:
        return ObservedWatch(path, recursive=bool(kwargs.get("recursive")))

    def unschedule(self, watch: ObservedWatch) -> None:
        return None


def test_watcher_rescan_catches_lost(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    recorder = Recorder()
    settings = _settings(root, rescan_seconds=0.5)
    with running(settings, recorder, inotify_observer=DeafObserverFake):
        (root / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_for(
            lambda: any(root / "app" / ".npmrc" in c for c in recorder.calls)
        )
    rescans = [c for c in recorder.calls if root / "app" / ".npmrc" in c]
    assert isinstance(rescans[0], Rescan)


def test_watcher_callback_error_logged(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    user, _ = _configs()
    recorder = Recorder()
    failures = []

    def flaky(paths: set[Path]) -> None:
        if not failures:
            failures.append(paths)
            raise RuntimeError("callback broke")
        recorder(paths)

    with running(_settings(), flaky):
        user.write_text("fund=false\n")
        assert Recorder().wait_for(lambda: bool(failures))
        time.sleep(0.2)
        user.write_text("audit=false\n")
        assert recorder.wait_path(user)
    assert "handling changed config files failed" in caplog.text


def test_watcher_retries_returned(home: Path) -> None:
    user, _ = _configs()
    calls: list[set[Path]] = []
    recorder = Recorder()

    def busy_once(paths: set[Path]) -> set[Path] | None:
        calls.append(set(paths))
        recorder(paths)
        return set(paths) if len(calls) == 1 else None

    with running(_settings(), busy_once):
        user.write_text("fund=false\n")
        assert recorder.wait_for(lambda: len(calls) >= 2)
    assert calls[1] == {user}


# --- the inotify limit -------------------------------------------------------


def _failing_observer_class() -> type[BaseObserver]:
    base = watcher_mod.pruned_inotify_observer_class()
    assert base is not None

    class LimitReachedObserverFake(base):  # type: ignore[misc, valid-type]
        """Fault injection: every new watch fails as at the watch limit."""

        def schedule(self, *args: Any, **kwargs: Any) -> ObservedWatch:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    return LimitReachedObserverFake


def test_watcher_limit_polls_user(home: Path) -> None:
    user, _ = _configs()
    recorder = Recorder()
    with running(
        _settings(), recorder, inotify_observer=_failing_observer_class(),
        poll_seconds=0.1,
    ):
        user.write_text("fund=false\n")
        assert recorder.wait_path(user)


def test_watcher_limit_polls_root(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    recorder = Recorder()
    with running(
        _settings(root), recorder, inotify_observer=_failing_observer_class(),
        poll_seconds=0.1,
    ):
        (root / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "app" / ".npmrc")


def test_watcher_limit_polls_new_dir(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    recorder = Recorder()
    with running(
        _settings(root), recorder, inotify_observer=_failing_observer_class(),
        poll_seconds=0.1,
    ):
        (root / "new" / "app").mkdir(parents=True)
        (root / "new" / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "new" / "app" / ".npmrc")


def test_watcher_limit_warns_once(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "src").mkdir()
    with caplog.at_level(logging.INFO, logger="npmguard"), running(
        _settings(tmp_path / "src"), Recorder(),
        inotify_observer=_failing_observer_class(), poll_seconds=0.1,
    ):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_watcher_limit_names_sysctl(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running(
        _settings(), Recorder(), inotify_observer=_failing_observer_class(),
        poll_seconds=0.1,
    ):
        pass
    assert "sysctl fs.inotify.max_user_watches=" in caplog.text


def test_watcher_limit_after_start_polls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    recorder = Recorder()
    with running(_settings(root), recorder, poll_seconds=0.1) as watcher:
        # Fault injection: the callback the inotify observer makes when a
        # new directory cannot get a watch because the limit is reached.
        (root / "big").mkdir()
        watcher._report_unwatched(str(root / "big"))
        time.sleep(0.3)
        (root / "big" / "app").mkdir()
        (root / "big" / "app" / ".npmrc").write_text("fund=false\n")
        assert recorder.wait_path(root / "big" / "app" / ".npmrc")
    assert "sysctl fs.inotify.max_user_watches=" in caplog.text


# --- lifetime ----------------------------------------------------------------


def test_watcher_stops_in_time(home: Path, tmp_path: Path) -> None:
    (tmp_path / "src" / "app").mkdir(parents=True)
    watcher = Watcher(
        _settings(tmp_path / "src"), Recorder(),
        user_config=_configs()[0], global_config=_configs()[1],
    )
    watcher.start()
    assert watcher.ready.wait(WAIT)
    started = time.monotonic()
    watcher.stop()
    watcher.join(5.0)
    assert time.monotonic() - started < 1.0


def test_watcher_leaves_no_threads(home: Path, tmp_path: Path) -> None:
    (tmp_path / "src" / "app").mkdir(parents=True)
    before = set(threading.enumerate())
    with running(_settings(tmp_path / "src"), Recorder(), poll_seconds=0.1):
        (tmp_path / "src" / "app" / ".npmrc").write_text("fund=false\n")
    time.sleep(0.1)
    assert [t.name for t in set(threading.enumerate()) - before] == []


def test_watcher_polling_leaves_no_threads(home: Path) -> None:
    before = set(threading.enumerate())
    with running(
        _settings(), Recorder(), inotify_observer=_failing_observer_class(),
        poll_seconds=0.1,
    ):
        pass
    time.sleep(0.1)
    assert [t.name for t in set(threading.enumerate()) - before] == []


# --- with the guardian and the real keychain ---------------------------------


def _keychain_holds(value: str) -> bool:
    store = KeychainStore()
    return any(store.get(name) == Secret(value) for name in migrate.load_index())


@contextlib.contextmanager
def guarded(settings: Settings) -> Iterator[Guardian]:
    user, global_ = _configs()
    guardian = Guardian(
        settings, DaemonState(), KeychainStore, user_config=user, global_config=global_
    )
    with running(settings, guardian.handle):
        yield guardian


def _wait_gone(path: Path, value: str) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if value not in path.read_text():
                return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("save", SAVES)
def test_watcher_auto_secures(
    keyring_bus: realparts.Keychain, home: Path, canary: str, save: str
) -> None:
    user, _ = _configs()
    user.write_text("fund=false\n")
    with guarded(_settings()):
        SAVES[save](user, f"//127.0.0.1:9/:_authToken={canary}\n")
        assert _wait_gone(user, canary)
    assert _keychain_holds(canary)


@pytest.mark.parametrize("save", SAVES)
def test_watcher_auto_marker(
    keyring_bus: realparts.Keychain, home: Path, canary: str, save: str
) -> None:
    user, _ = _configs()
    user.write_text("fund=false\n")
    with guarded(_settings()):
        SAVES[save](user, f"//127.0.0.1:9/:_authToken={canary}\n")
        assert _wait_gone(user, canary)
    assert user.read_text().startswith("; npmguard:")


def test_watcher_auto_link_target(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path, canary: str
) -> None:
    user, _ = _configs()
    target = tmp_path / "dotfiles" / "npmrc"
    target.parent.mkdir()
    target.write_text("fund=false\n")
    user.symlink_to(target)
    with guarded(_settings()):
        _in_place(target, f"//127.0.0.1:9/:_authToken={canary}\n")
        assert _wait_gone(target, canary)
    assert user.is_symlink()


def test_watcher_auto_repointed_link(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path, canary: str
) -> None:
    user, _ = _configs()
    target = tmp_path / "dotfiles" / "npmrc"
    target.parent.mkdir()
    target.write_text(f"//127.0.0.1:9/:_authToken={canary}\n")
    user.symlink_to(tmp_path / "nowhere")
    with guarded(_settings()):
        user.unlink()
        user.symlink_to(target)
        assert _wait_gone(target, canary)
    assert _keychain_holds(canary)


def test_watcher_auto_new_project(
    keyring_bus: realparts.Keychain, tmp_path: Path, canary: str
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    with guarded(_settings(root)):
        project = root / "fresh"
        project.mkdir()
        (project / ".npmrc").write_text(f"//127.0.0.1:9/:_authToken={canary}\n")
        assert _wait_gone(project / ".npmrc", canary)
    assert _keychain_holds(canary)


def test_watcher_auto_npm_config_set(
    keyring_bus: realparts.Keychain, home: Path, tmp_path: Path
) -> None:
    # A token of its own: this one goes through npm's argv.
    token = "npm_" + "f" * 36
    user, _ = _configs()
    with guarded(_settings()):
        done = subprocess.run(
            ["npm", "config", "set", f"//127.0.0.1:9/:_authToken={token}",
             "--location=user"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert _wait_gone(user, token)
    assert _keychain_holds(token)


def test_watcher_auto_no_canary_logged(
    keyring_bus: realparts.Keychain, home: Path, canary: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, _ = _configs()
    with caplog.at_level(logging.DEBUG):
        with guarded(_settings()):
            _temp_rename(user, f"//127.0.0.1:9/:_authToken={canary}\n")
            assert _wait_gone(user, canary)
        assert "secured" in caplog.text
    assert canary not in caplog.text


def test_watcher_ask_leaves_file(
    keyring_bus: realparts.Keychain, tmp_path: Path, canary: str
) -> None:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    npmrc = root / "app" / ".npmrc"
    settings = _settings(root, roots=(Root(root, "ask"),))
    with guarded(settings) as guardian:
        npmrc.write_text(f"//127.0.0.1:9/:_authToken={canary}\n")
        assert Recorder().wait_for(lambda: bool(guardian.state.snapshot.exposures))
    assert canary in npmrc.read_text()
