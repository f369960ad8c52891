"""Noticing every change to an npm config file, as soon as it is saved.

What is watched:

- the user and the global config: their directories, not recursively,
  with events filtered by file name. For a symlinked config the directory
  of each link target is watched too. An event on any link in the chain
  re-plans the watches, so re-pointing ``~/.npmrc`` is noticed. Until a
  missing directory appears, its nearest existing ancestor is watched.
- each root from the settings, recursively, for ``.npmrc`` files. No watch
  is placed in ``node_modules`` or ``.git``, and events from inside them
  are dropped by a string test.

Every way of saving shows up as an event on the config's name:

- a write in place (npm 11's ``config set`` and ``login`` truncate and
  rewrite the file, then chmod it);
- a temp file renamed over it (the rename's destination);
- a delete, then a create;
- vim's default, which renames the file away and writes a new one.

Once a new directory under a root has its watch, it is walked for
``.npmrc`` files, so a config written right after its project folder was
made is caught too.

Events are collected until ``settings.debounce_seconds`` pass without a
new one (at most ``MAX_DELAY_SECONDS``). Then ``on_change`` gets the set of
config paths once. It may return the paths it could not handle yet, for
example because another npmguard run held the state lock, and these are
offered again after ``RETRY_SECONDS``.

Every ``settings.rescan_seconds``, and when the kernel reports lost events,
``on_change`` gets a ``Rescan``: a set of every config path that exists
now. The type tells the receiver that the set is complete, so a recorded
path that is missing from it is gone. A receiver that ignores the type
still gets every path to read.

When the inotify watch or instance limit is reached, one WARNING names the
sysctl to raise, and whatever could not be watched is polled every
``poll_seconds`` instead (watchdog's polling observer).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchdog.events
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserverVFS

from npmguard.config import Settings
from npmguard.daemon.worker import Worker
from npmguard.npmrc.locate import CONFIG_NAME, SKIPPED_DIRS, walk_project_configs

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
RETRY_SECONDS = 0.25
# The longest a change waits while saves keep coming.
MAX_DELAY_SECONDS = 1.0
_LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EMFILE})
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
_MAX_LINK_HOPS = 40
_MAX_PLAN_ROUNDS = 8
# Only the events a save can cause, because opens and reads would flood the
# queue. watchdog 7 reports a kernel queue overflow as EventsLostEvent.
_LOST: type[FileSystemEvent] | None = getattr(watchdog.events, "EventsLostEvent", None)
_EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
    *([_LOST] if _LOST is not None else []),
]
_LIMIT_WARNING = (
    "%s, so %s is polled every %.1fs instead of watched; raise the limit with "
    "`sudo sysctl fs.inotify.%s=%d` (add the setting to /etc/sysctl.d/ to keep "
    "it) and restart the npmguard daemon"
)

OnChange = Callable[[set[Path]], set[Path] | None]
ObserverFactory = Callable[[Callable[[str], None]], BaseObserver]


class Rescan(set[Path]):
    """A complete set of the config paths that exist now, not a change list."""


def known_configs(
    settings: Settings,
    user_config: Path,
    global_config: Path | None,
    errors: list[tuple[Path, str]] | None = None,
) -> Rescan:
    """Return the user and global configs that exist and every project config
    under the roots. Unreadable directories are appended to ``errors``."""
    found = Rescan()
    for path in (user_config, global_config):
        if path is not None and (path.exists() or path.is_symlink()):
            found.add(path)
    walk_errors = errors if errors is not None else []
    found.update(walk_project_configs([r.path for r in settings.roots], walk_errors))
    return found


# --- watchdog observers --------------------------------------------------------


def _skipped(path: str, base: str) -> bool:
    """Return whether ``path`` is in a node_modules or .git dir below ``base``."""
    rest = path[len(base) :]
    if "node_modules" not in rest and ".git" not in rest:
        return False
    return any(part in SKIPPED_DIRS for part in rest.split(os.sep))


def _kept(dirnames: list[bytes]) -> list[bytes]:
    return [d for d in dirnames if os.fsdecode(d) not in SKIPPED_DIRS]


def _native_observer_factory() -> ObserverFactory:
    """Return the observer for this platform (on Linux, the pruned inotify one)."""
    if sys.platform.startswith("linux"):
        pruned = pruned_inotify_observer_class()
        if pruned is not None:
            return pruned
        log.debug("this watchdog's inotify internals differ; node_modules is "
                  "watched and its events dropped")
    from watchdog.observers import Observer

    # NOTE: FSEvents, kqueue and ReadDirectoryChangesW watch node_modules too,
    # and its events are dropped. watchdog cannot leave out a subtree there.
    return lambda _on_unwatched: Observer()


def _polling_observer(poll_seconds: float) -> BaseObserver:
    def listdir(path: str | None) -> Iterator[os.DirEntry[str]]:
        with os.scandir(path) as entries:
            return iter([e for e in entries if e.name not in SKIPPED_DIRS])

    # With lstat a directory link is not entered, so a link loop cannot trap
    # the walk, and a re-pointed link shows as a change of the link itself.
    # The targets of linked configs are watched as directories of their own.
    return PollingObserverVFS(os.lstat, listdir, polling_interval=poll_seconds)


@functools.lru_cache(maxsize=1)
def pruned_inotify_observer_class() -> type[BaseObserver] | None:
    """Return watchdog's inotify observer changed to leave node_modules and
    .git unwatched, or None when watchdog's internals differ from 7.1's.

    watchdog has no option to leave a subtree out of a recursive watch, and
    a node_modules tree can contain tens of thousands of directories, each
    an inotify watch counted against the user's limit. So the watch group's
    tree walks are replaced by ones that prune those directories. The
    observer takes a callback for a directory that the watch limit left
    unwatched after the start.
    """
    import dataclasses

    from watchdog.observers import inotify

    try:
        from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, Mask
    except ImportError:  # watchdog 6
        return None
    group_cls = getattr(inotify, "InotifyWatchGroup", None)
    needed = ("_add_all_callbacks", "_recursive_simulate", "_add_callback",
              "_find_node_by_path", "_insert_node", "_callback")
    if group_cls is None or not all(hasattr(group_cls, n) for n in needed):
        return None
    fields = {f.name for f in dataclasses.fields(group_cls)}
    if not {"_inotify_fd", "_id", "path", "event_mask"} <= fields:
        return None
    invalid_wd = -1

    def ignore(_path: str) -> None:
        return None

    class PrunedWatchGroup(group_cls):  # type: ignore[misc, valid-type]
        on_unwatched: Callable[[str], None] = staticmethod(ignore)

        def _pruned(self, path: bytes) -> bool:
            return _skipped(os.fsdecode(path), os.fsdecode(self.path))

        def _add_all_callbacks(self, path: bytes) -> None:
            if self._pruned(path):
                return
            is_dir = os.path.isdir(path)
            self._add_callback(path)
            if not (is_dir and self.is_recursive):
                return
            for root, dirnames, _ in os.walk(path, followlinks=self.follow_symlink):
                dirnames[:] = _kept(dirnames)
                for dirname in dirnames:
                    full = os.path.join(root, dirname)
                    if self.follow_symlink or not os.path.islink(full):
                        self._add_callback(full)

        def _recursive_simulate(self, src_path: bytes) -> list[Any]:
            events: list[Any] = []
            if self._pruned(src_path):
                return events
            created_dir = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_ISDIR)
            for root, dirnames, filenames in os.walk(
                src_path, followlinks=self.follow_symlink
            ):
                dirnames[:] = _kept(dirnames)
                node = self._find_node_by_path(root)
                if node is None:
                    continue
                events += [InotifyEvent(node.wd, created_dir, 0, d) for d in dirnames]
                events += [
                    InotifyEvent(node.wd, InotifyConstants.IN_CREATE, 0, f)
                    for f in filenames
                ]
            return events

        def _add_callback(self, path: bytes) -> None:
            existing = self._find_node_by_path(path)
            if existing is not None and existing.wd != invalid_wd:
                return
            try:
                wd = self._inotify_fd.add_callback(
                    path, self.event_mask, self._callback, self._id
                )
            except OSError as err:
                # A failure on the root, or the limit during the first walk,
                # fails the whole watch, and the watcher polls it instead.
                limit = err.errno in _LIMIT_ERRNOS
                if path == self.path or (limit and not self.is_active):
                    raise
                if limit:
                    self.on_unwatched(os.fsdecode(path))
                return  # The directory was deleted during the walk.
            if self._insert_node(path, wd) is None:
                self._inotify_fd.remove_callbacks([(wd, self._id)])

    class PrunedEmitter(inotify.InotifyEmitter):
        def __init__(
            self, *args: Any, on_unwatched: Callable[[str], None] = ignore,
            **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self._on_unwatched = on_unwatched

        def on_thread_start(self) -> None:
            group = PrunedWatchGroup(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )
            group.on_unwatched = self._on_unwatched
            self._inotify = group

    class PrunedInotifyObserver(inotify.InotifyObserver):
        def __init__(self, on_unwatched: Callable[[str], None] = ignore) -> None:
            super().__init__()
            self._emitter_class = PrunedEmitter
            self._emitter_kwargs["on_unwatched"] = on_unwatched

    return PrunedInotifyObserver


# --- the watcher -------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """A watch request: a directory, and for a root its configured path."""

    directory: str
    recursive: bool
    display: str = ""

    def shown(self, path: str) -> Path:
        """Return ``path`` under the root's configured name."""
        if not self.display or self.display == self.directory:
            return Path(path)
        return Path(self.display + path[len(self.directory) :])


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, spec: _Spec) -> None:
        super().__init__()
        self.watcher = watcher
        self.spec = spec

    def dispatch(self, event: FileSystemEvent) -> None:
        # An exception here would end watchdog's dispatch thread.
        try:
            self.watcher._on_event(self.spec, event)
        except Exception:  # noqa: BLE001 - logged; the watch must go on
            log.exception("could not handle a file event for %s", self.spec.directory)


@dataclass
class _Scheduled:
    """A watch in place, and the identity of the directory it was placed on."""

    observer: BaseObserver
    watch: ObservedWatch
    identity: tuple[int, int] | None

    def stale(self, directory: str) -> bool:
        """Return whether the directory was deleted, replaced or moved since."""
        return _identity(directory) != self.identity


class Watcher(Worker):
    """A worker that watches the configs and roots and reports changed paths.

    ``ready`` is set once the first watches are in place. With
    ``initial_scan`` (the default) ``on_change`` then gets a ``Rescan``
    first, so nothing saved before the watches existed is missed and the
    caller needs no scan of its own. ``inotify_observer`` builds the native
    observer from a callback for directories the watch limit left out; it
    exists so tests can inject faults.
    """

    name = "watcher"

    def __init__(
        self,
        settings: Settings,
        on_change: OnChange,
        *,
        user_config: Path,
        global_config: Path | None,
        poll_seconds: float = POLL_SECONDS,
        initial_scan: bool = True,
        inotify_observer: ObserverFactory | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.on_change = on_change
        self.user_config = Path(os.path.abspath(user_config))
        self.global_config = (
            Path(os.path.abspath(global_config)) if global_config is not None else None
        )
        self.poll_seconds = poll_seconds
        self.ready = threading.Event()
        self._observer_factory = inotify_observer or _native_observer_factory()
        self._native: BaseObserver | None = None
        self._polling: BaseObserver | None = None
        self._scheduled: dict[_Spec, _Scheduled] = {}
        # Polled subtrees that inotify could not watch, by the root they are in.
        self._extra: dict[_Spec, _Spec] = {}
        # Directory -> file name -> config paths to report. An empty set
        # means that the name only re-plans the watches.
        self._fixed: dict[str, dict[str, frozenset[Path]]] = {}
        self._linked_projects: set[Path] = set()
        self._limit_warned = False
        self._logged: set[tuple[str, str]] = set()

        self._cond = threading.Condition()
        self._pending: set[Path] = set()
        self._pending_dirs: set[Path] = set()
        self._first_event = 0.0
        self._last_event = 0.0
        self._retry: set[Path] = set()
        self._retry_at = 0.0
        self._replan = False
        self._rescan = initial_scan
        self._unwatched: list[tuple[_Spec, str]] = []
        # Watches whose directory was deleted, which watchdog has ended.
        self._dead: set[_Spec] = set()

    # -- lifetime ----------------------------------------------------------

    def stop(self) -> None:
        super().stop()
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:
        try:
            self._native = self._observer_factory(self._report_unwatched)
            self._native.start()
            self._apply_plan(initial=True)
            self.ready.set()
            self._loop()
        finally:
            self._stop_observers()

    def _loop(self) -> None:
        next_rescan = time.monotonic() + self.settings.rescan_seconds
        while not self.stopping.is_set():
            with self._cond:
                now = time.monotonic()
                due = [next_rescan]
                if self._pending or self._pending_dirs:
                    due.append(self._flush_time())
                if self._retry:
                    due.append(self._retry_at)
                if not (self._replan or self._rescan or self._unwatched):
                    timeout = max(0.0, min(due) - now)
                    if timeout:
                        self._cond.wait(timeout)
                if self.stopping.is_set():
                    return
                now = time.monotonic()
                replan, self._replan = self._replan, False
                rescan, self._rescan = self._rescan or now >= next_rescan, False
                unwatched, self._unwatched = self._unwatched, []
                dead, self._dead = self._dead, set()
                changed: set[Path] = set()
                dirs: set[Path] = set()
                if (self._pending or self._pending_dirs) and now >= self._flush_time():
                    changed, self._pending = self._pending, set()
                    dirs, self._pending_dirs = self._pending_dirs, set()
                if self._retry and now >= self._retry_at:
                    changed |= self._retry
                    self._retry = set()

            for spec in dead:
                if spec in self._scheduled:
                    self._unschedule(spec)
            for spec, path in unwatched:
                self._poll_unwatched(spec, path)
            if replan or rescan:
                self._apply_plan()
            if rescan:
                next_rescan = time.monotonic() + self.settings.rescan_seconds
                self._deliver(self._rescan_set())
                continue
            if dirs:
                changed |= self._walk(dirs)
            if changed:
                self._deliver(changed)

    def _flush_time(self) -> float:
        quiet = self._last_event + self.settings.debounce_seconds
        return min(quiet, self._first_event + MAX_DELAY_SECONDS)

    def _stop_observers(self) -> None:
        observers = [o for o in (self._native, self._polling) if o is not None]
        for observer in observers:
            if observer.is_alive():
                observer.stop()
        for observer in observers:
            with contextlib.suppress(RuntimeError):
                observer.join(timeout=1.0)
        self._scheduled.clear()

    # -- delivering --------------------------------------------------------

    def _deliver(self, paths: set[Path]) -> None:
        log.debug("config change: %s", ", ".join(sorted(map(str, paths))) or "none")
        try:
            again = self.on_change(paths)
        except Exception:  # noqa: BLE001 - a failing callback must not stop the watch
            log.exception("handling changed config files failed")
            return
        if again:
            with self._cond:
                self._retry |= set(again)
                self._retry_at = time.monotonic() + RETRY_SECONDS

    def _rescan_set(self) -> Rescan:
        errors: list[tuple[Path, str]] = []
        found = known_configs(
            self.settings, self.user_config, self.global_config, errors
        )
        for path, reason in errors:
            self._log_once(str(path), reason, "cannot scan %s: %s", path, reason)
        linked = {p for p in found if p.is_symlink()} - {self.user_config}
        if linked != self._linked_projects:
            # Project configs that are links get their targets watched too.
            self._linked_projects = linked
            self._apply_plan()
        return found

    def _walk(self, directories: set[Path]) -> set[Path]:
        # A directory inside another one of the set is walked with it.
        tops: list[Path] = []
        for directory in sorted(directories):
            if not tops or not directory.is_relative_to(tops[-1]):
                tops.append(directory)
        errors: list[tuple[Path, str]] = []
        found = set(walk_project_configs(tops, errors))
        for path, reason in errors:
            if reason != "not found":
                self._log_once(str(path), reason, "cannot read %s: %s", path, reason)
        return found

    # -- events (watchdog's threads) ---------------------------------------

    def _on_event(self, spec: _Spec, event: FileSystemEvent) -> None:
        if _LOST is not None and isinstance(event, _LOST):
            log.warning("the kernel dropped file events; rescanning every config")
            self._notify(rescan=True)
            return
        raw = [event.src_path]
        if isinstance(event, (FileMovedEvent, DirMovedEvent)) and event.dest_path:
            raw.append(event.dest_path)
        for item in raw:
            path = os.fsdecode(item)
            if spec.recursive:
                self._on_root_event(spec, event, path)
            else:
                self._on_fixed_event(spec, event, path)

    def _on_root_event(self, spec: _Spec, event: FileSystemEvent, path: str) -> None:
        if path == spec.directory:
            if isinstance(event, (DirDeletedEvent, DirMovedEvent)):
                self._notify(dead=spec)
            return
        if _skipped(path, spec.directory):
            return
        if event.is_directory:
            appeared = isinstance(event, (DirCreatedEvent, DirMovedEvent))
            if appeared and os.path.isdir(path):
                self._notify(directory=spec.shown(path))
            return
        if os.path.basename(path) == CONFIG_NAME:
            self._notify(path=spec.shown(path))

    def _on_fixed_event(self, spec: _Spec, event: FileSystemEvent, path: str) -> None:
        if path == spec.directory:
            if isinstance(event, (DirDeletedEvent, DirMovedEvent)):
                self._notify(dead=spec)
            return
        if os.path.dirname(path) != spec.directory:
            return
        configs = self._fixed.get(spec.directory, {}).get(os.path.basename(path))
        if configs is None:
            return
        # Any event on a watched name may have re-pointed a link or made a
        # missing directory. A re-plan costs a few readlink calls.
        self._notify(replan=True, paths=configs)

    def _notify(
        self,
        *,
        path: Path | None = None,
        paths: frozenset[Path] = frozenset(),
        directory: Path | None = None,
        replan: bool = False,
        rescan: bool = False,
        dead: _Spec | None = None,
    ) -> None:
        with self._cond:
            now = time.monotonic()
            if not (self._pending or self._pending_dirs):
                self._first_event = now
            self._last_event = now
            if path is not None:
                self._pending.add(path)
            self._pending.update(paths)
            if directory is not None:
                self._pending_dirs.add(directory)
            self._replan |= replan or dead is not None
            self._rescan |= rescan
            if dead is not None:
                self._dead.add(dead)
            self._cond.notify_all()

    def _report_unwatched(self, path: str) -> None:
        """Queue ``path``, a new directory that inotify could not watch, for
        polling. The inotify observer calls this from its own thread."""
        # A copy, because the watcher's thread may change the dict meanwhile.
        scheduled = list(self._scheduled)
        spec = next(
            (
                s
                for s in scheduled
                if s.recursive and (path + os.sep).startswith(s.directory + os.sep)
            ),
            None,
        )
        if spec is not None:
            with self._cond:
                self._unwatched.append((spec, path))
                self._cond.notify_all()

    # -- planning the watches ----------------------------------------------

    def _apply_plan(self, *, initial: bool = False) -> None:
        """Bring the watches in line with the plan; with ``initial``, report
        nothing for the first watches."""
        # A watch follows its directory's inode, so a directory moved away,
        # or deleted and made again, needs a new watch. A deletion also
        # arrives as an event, which covers a new directory that got the
        # old one's inode number.
        for spec, scheduled in list(self._scheduled.items()):
            if scheduled.stale(spec.directory):
                self._unschedule(spec)
        # A directory awaited through its parent may have appeared before the
        # parent's watch existed. Planning again until nothing changes closes
        # that gap.
        tried: list[_Spec] = []
        for _round in range(_MAX_PLAN_ROUNDS):
            fixed, roots = self._plan()
            self._fixed = fixed
            planned = {_Spec(d, False) for d in fixed}
            planned |= {_Spec(real, True, shown) for real, shown in roots.items()}
            for spec in list(self._scheduled):
                if self._extra.get(spec, spec) not in planned:
                    self._unschedule(spec)
            new = sorted(planned - set(self._scheduled), key=lambda s: s.directory)
            if not new or new == tried:
                return
            tried = new
            for spec in new:
                if not self._schedule(spec) or initial:
                    continue
                # Whatever changed before the watch existed is read now.
                if spec.recursive:
                    self._notify(directory=Path(spec.display))
                else:
                    configs = frozenset().union(*fixed[spec.directory].values())
                    self._notify(paths=configs)
            initial = False

    def _plan(self) -> tuple[dict[str, dict[str, frozenset[Path]]], dict[str, str]]:
        """Return the directories to watch by name, and the roots to watch
        recursively (real path -> configured path)."""
        fixed: dict[str, dict[str, set[Path]]] = {}
        files = [self.user_config, self.global_config, *self._linked_projects]
        for config in files:
            if config is None:
                continue
            for hop in _link_chain(config):
                directory, name, present = _nearest_dir(os.path.dirname(hop),
                                                        os.path.basename(hop))
                names = fixed.setdefault(directory, {})
                reported = names.setdefault(name, set())
                if present:
                    reported.add(config)
        roots: dict[str, str] = {}
        for root in self.settings.roots:
            shown = os.path.abspath(root.path)
            real = os.path.realpath(shown)
            # NOTE: the recursive watch does not follow directory symlinks
            # inside a root, so projects behind one are seen by rescans only.
            if os.path.isdir(real):
                roots[real] = shown
            # The root's own name is watched in its parent, so a root that is
            # made, moved away, deleted or re-pointed re-plans the watches.
            directory, name, _ = _nearest_dir(
                os.path.dirname(shown), os.path.basename(shown)
            )
            fixed.setdefault(directory, {}).setdefault(name, set())
        frozen = {
            d: {n: frozenset(c) for n, c in names.items()} for d, names in fixed.items()
        }
        return frozen, roots

    def _schedule(self, spec: _Spec) -> bool:
        handler = _Handler(self, spec)
        assert self._native is not None
        try:
            watch = self._native.schedule(
                handler, spec.directory, recursive=spec.recursive,
                event_filter=_EVENT_TYPES,
            )
        except OSError as err:
            if err.errno in _GONE_ERRNOS:
                return False
            if err.errno not in _LIMIT_ERRNOS:
                self._log_once(spec.directory, str(err), "cannot watch %s (%s), "
                               "so it is polled instead", spec.directory, err.strerror)
            else:
                self._warn_limit(err.errno, spec.directory)
            return self._schedule_polling(spec)
        self._scheduled[spec] = _Scheduled(
            self._native, watch, _identity(spec.directory)
        )
        return True

    def _schedule_polling(self, spec: _Spec) -> bool:
        if self._polling is None:
            self._polling = _polling_observer(self.poll_seconds)
            self._polling.start()
        try:
            watch = self._polling.schedule(
                _Handler(self, spec), spec.directory, recursive=spec.recursive
            )
        except OSError as err:
            if err.errno not in _GONE_ERRNOS:
                self._log_once(spec.directory, str(err), "cannot poll %s: %s",
                               spec.directory, err.strerror)
            return False
        self._scheduled[spec] = _Scheduled(
            self._polling, watch, _identity(spec.directory)
        )
        return True

    def _unschedule(self, spec: _Spec) -> None:
        scheduled = self._scheduled.pop(spec)
        self._extra.pop(spec, None)
        with contextlib.suppress(KeyError):
            scheduled.observer.unschedule(scheduled.watch)

    def _poll_unwatched(self, root: _Spec, path: str) -> None:
        spec = _Spec(path, True, str(root.shown(path)))
        if spec in self._scheduled:
            return
        self._warn_limit(errno.ENOSPC, path)
        if self._schedule_polling(spec):
            self._extra[spec] = root
            self._notify(directory=Path(spec.display))

    def _warn_limit(self, code: int | None, path: str) -> None:
        # The suggested values are common choices, not derived from anything.
        if code == errno.EMFILE:
            reached = "the inotify instance limit is reached"
            setting, value = "max_user_instances", 1024
        else:
            reached = "the inotify watch limit is reached"
            setting, value = "max_user_watches", 524288
        if self._limit_warned:
            log.info("%s: polling %s too", reached, path)
            return
        self._limit_warned = True
        log.warning(_LIMIT_WARNING, reached, path, self.poll_seconds, setting, value)

    def _log_once(self, key: str, cause: str, message: str, *args: Any) -> None:
        if (key, cause) in self._logged:
            return
        self._logged.add((key, cause))
        log.warning(message, *args)


def _identity(directory: str) -> tuple[int, int] | None:
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _link_chain(path: Path) -> list[str]:
    """Return ``path`` and each symlink target it leads to, as absolute paths."""
    chain = [os.path.abspath(path)]
    for _ in range(_MAX_LINK_HOPS):
        current = chain[-1]
        try:
            target = os.readlink(current)
        except OSError:
            break
        following = os.path.normpath(os.path.join(os.path.dirname(current), target))
        if following in chain:
            break
        chain.append(following)
    return chain


def _nearest_dir(directory: str, name: str) -> tuple[str, str, bool]:
    """Return the real directory to watch for ``directory/name``, the name to
    watch in it, and whether that is ``name`` itself (the directory exists).

    When ``directory`` is missing, its nearest existing ancestor is watched
    for the first missing component, whose creation re-plans the watches.
    """
    present = True
    while not os.path.isdir(directory):
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        name = os.path.basename(directory)
        directory = parent
        present = False
    return os.path.realpath(directory), name, present
