"""The daemon: the socket server, the watcher with the guardian, and the tray.

``Daemon`` composes the parts behind small interfaces and imports the
optional ones (watcher, guardian, tray, notifications) only when it starts
them. A part that is missing or fails to start is logged once and left
out, and the rest keeps running: the socket server alone still serves
tokens.

All parts share one ``DaemonState`` and one ``DaemonVault``. The vault is
opened once and keeps values it read for ``CACHE_SECONDS``. The cache is
there because each keychain read through keyring 25's Secret Service
backend opens a new D-Bus connection and session. That took about 10 ms
per read with gnome-keyring here, more than the rest of a token request.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npmguard import __version__
from npmguard.config import Settings
from npmguard.daemon import protocol
from npmguard.daemon.server import Handler, Peer, SocketServer
from npmguard.daemon.state import DaemonState
from npmguard.daemon.worker import Worker
from npmguard.errors import NpmguardError, VaultLockedError, VaultUnavailableError
from npmguard.logsetup import REDACTOR, register_secret
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore

log = logging.getLogger(__name__)

# How long a value read from the vault is served from memory. A value read
# less than this long ago is still served after the keychain is locked.
CACHE_SECONDS = 60.0
# Paths the guardian could not handle yet (another npmguard run held the
# state lock) are offered again after this many seconds.
RETRY_SECONDS = 2.0
# SIGTERM must end the daemon within a second; the workers share this.
STOP_SECONDS = 0.9
# Ops of the token lifecycle: ``invalidate`` drops cached values and minted
# tokens (``npmguard rotate`` sends it), ``rotate`` runs a rotation in the
# daemon's rotator thread (``{"registry": URL|null, "exposed": bool}``).
LIFECYCLE_OPS = ("invalidate", "rotate")
# A ``rotate`` request replies after this long at most, and the rotation
# goes on.
ROTATE_REPLY_SECONDS = 25.0


class DaemonVault:
    """The daemon's credential store: opened once, shared, with a short cache.

    Every value read or written is registered with the log redactor. A
    locked keychain sets ``vault_locked`` in the state and empties the
    cache, and a later successful read clears the flag.
    """

    def __init__(
        self,
        factory: Callable[[], CredentialStore],
        state: DaemonState,
        *,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self._factory = factory
        self._state = state
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._store: CredentialStore | None = None
        self._cache: dict[str, tuple[Secret, float]] = {}
        self.description = "keychain"

    def _open(self) -> CredentialStore:
        with self._lock:
            if self._store is None:
                self._store = self._factory()
                self.description = self._store.description
            return self._store

    def get(self, name: str) -> Secret | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and now - cached[1] < self._cache_seconds:
            return cached[0]
        try:
            value = self._open().get(name)
        except VaultLockedError:
            self._locked()
            raise
        except VaultUnavailableError:
            # Open again next time: the keyring daemon may come back.
            with self._lock:
                self._store = None
            raise
        if self._state.snapshot.vault_locked:
            self._state.update(vault_locked=False)
        if value is not None:
            register_secret(value)
            with self._lock:
                self._cache[name] = (value, now)
        return value

    def set(self, name: str, value: Secret) -> None:
        register_secret(value)
        try:
            self._open().set(name, value)
        except VaultLockedError:
            self._locked()
            raise
        with self._lock:
            self._cache[name] = (value, time.monotonic())

    def delete(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
        self._open().delete(name)

    def forget(self) -> None:
        """Drop every cached value."""
        with self._lock:
            self._cache.clear()

    def backend(self) -> CredentialStore:
        """Return the store itself, without the cache. Rotation writes and reads
        back through it, so that a value it verifies came from the keychain."""
        return self._open()

    def _locked(self) -> None:
        self.forget()
        if not self._state.snapshot.vault_locked:
            log.warning("the %s is locked; token requests fail until it is "
                        "unlocked", self.description)
            self._state.update(vault_locked=True)


def _audit_rejected(peer: Peer, count: int) -> None:
    """Record a refused peer; the server calls this for the first few per uid."""
    _audit_refused("connect", peer, f"peer uid {peer.uid} is not the daemon's "
                   f"({count} refused from it)")


class GuardianRunner(Worker):
    """Feeds the guardian: the watcher's changes, "Secure now", and pauses.

    ``on_change`` is the watcher's callback. It calls the guardian at once
    and returns the paths to offer again, as the watcher expects, except
    while paused: then it holds them, and ``resumed`` hands them over. The
    thread runs what must not block its caller: the first full scan when
    no watcher runs, "Secure now" from the tray, the held changes, and the
    retries those return.
    """

    name = "guardian"

    def __init__(self, guardian: Any, state: DaemonState) -> None:
        super().__init__()
        self.guardian = guardian
        self.state = state
        self.initial_scan = True
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._held: set[Path] = set()
        self._rescan_held = False
        self._retry: set[Path] = set()

    def on_change(self, paths: set[Path]) -> set[Path]:
        if self.state.snapshot.paused:
            with self._lock:
                self._held |= paths
                # A Rescan (a set type of the watcher) means "this is every
                # config"; after a pause a full scan gives the same.
                self._rescan_held |= type(paths) is not set
            return set()
        return self._call("handling changed files", self.guardian.handle, paths)

    def secure_now(self) -> None:
        self._queue.put("secure_now")

    def resumed(self) -> None:
        self._queue.put("resume")

    def rescan(self) -> None:
        """Check every config file again, as after the vault was unlocked."""
        self._queue.put("rescan")

    def stop(self) -> None:
        super().stop()
        self._queue.put(None)

    def run(self) -> None:
        if self.initial_scan and not self.state.snapshot.paused:
            self._retry |= self._call("the first full scan", self.guardian.full_scan)
        elif self.initial_scan:
            with self._lock:
                self._rescan_held = True
        while not self.stopping.is_set():
            try:
                item = self._queue.get(timeout=RETRY_SECONDS if self._retry else None)
            except queue.Empty:
                item = "retry"
            if item is None:
                return
            if item == "secure_now":
                self._call("securing exposed tokens", self.guardian.secure_now)
            elif item == "resume":
                self._release_held()
            elif item == "rescan" and not self.state.snapshot.paused:
                self._retry |= self._call("the full scan after an unlock",
                                          self.guardian.full_scan)
            elif item == "retry" and not self.state.snapshot.paused:
                paths, self._retry = self._retry, set()
                self._retry |= self._call("retrying busy files", self.guardian.handle,
                                          paths)

    def _release_held(self) -> None:
        with self._lock:
            held, self._held = self._held, set()
            rescan, self._rescan_held = self._rescan_held, False
        if rescan:
            self._retry |= self._call("the full scan after resuming",
                                      self.guardian.full_scan)
        elif held:
            self._retry |= self._call("handling changes made while paused",
                                      self.guardian.handle, held)

    def _call(self, what: str, function: Callable[..., object], *args: object
              ) -> set[Path]:
        """Call the guardian; return the paths it returned for another try."""
        try:
            result = function(*args)
        except Exception:  # noqa: BLE001 - logged; the next change is handled anyway
            log.exception("the guardian failed while %s", what)
            return set()
        return set(result) if isinstance(result, (set, frozenset)) else set()


class Daemon:
    """The running daemon; also the tray's actions (secure_now, pause, ...)."""

    def __init__(
        self,
        settings: Settings,
        *,
        tray: bool = True,
        socket_path: str | None = None,
        store_factory: Callable[[], CredentialStore] | None = None,
        log_path: Path | None = None,
        rotation: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        # Keyword arguments for the rotator (its check interval and back-off),
        # for tests that cannot wait minutes.
        self.rotation_options = dict(rotation or {})
        self.state = DaemonState()
        if store_factory is None:
            store_factory = self._open_store
        self.vault = DaemonVault(store_factory, self.state)
        # Tokens minted for jobs, in memory only; a part with a sweeper thread
        # that revokes them (npmguard.inject.mint).
        from npmguard.inject.mint import MintService

        self.mint_cache = MintService(settings, self.vault)
        # Ops that other modules serve through the daemon, by name.
        self.handlers: dict[str, Handler] = {}
        self._vault_service: Any = None
        explicit = socket_path or os.environ.get(protocol.SOCKET_ENV)
        self.socket_path = socket_path or protocol.socket_path()
        self.server = SocketServer(
            self.socket_path, self.handle_request, private_dir=not explicit,
            on_reject=_audit_rejected,
        )
        self.log_path = log_path
        self.want_tray = tray and settings.tray_enabled
        self.guardian: GuardianRunner | None = None
        # The scheduled rotation worker (npmguard.daemon.rotator), once started.
        self.rotator: Any = None
        self.server.ops.update(LIFECYCLE_OPS)
        self.parts: list[Worker] = []
        self._stop_requested = threading.Event()
        self._signal_name: str | None = None
        self._started = False

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (or fail), finish interrupted changes, start the parts."""
        self.server.bind()
        self._started = True
        try:
            # Before recovery: a file vault store opened from here on is the
            # vault this daemon hosts.
            self._start_vault_service()
            self._recover_at_start()
            # The server goes last: once it replies, every part is running, so
            # a stop requested from then on only has to stop threads, not wait
            # for a slow start (importing pystray can take a second under load).
            self._start_optional_parts()
            # Stopped with the other parts: revokes what it holds, in time.
            self._start_part(self.mint_cache)
            self.handlers["release"] = self.mint_cache.handle_release
            self.server.ops.add("release")
            self.server.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "daemon started: pid %d, version %s, socket %s, parts: %s",
            os.getpid(), __version__, self.socket_path,
            ", ".join(["server", *(p.name for p in self.parts)]),
        )

    def request_stop(self) -> None:
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested; return True when it was."""
        return self._stop_requested.wait(timeout)

    def stop(self) -> None:
        """Stop every part within ``STOP_SECONDS`` and remove the socket."""
        if not self._started:
            return
        self._started = False
        workers: list[Worker] = [*reversed(self.parts), self.server]
        for worker in workers:
            try:
                worker.stop()
            except Exception:  # noqa: BLE001 - the others must still stop
                log.exception("stopping the %s failed", worker.name)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in workers:
            if not worker.join(max(0.05, deadline - time.monotonic())):
                log.warning("the %s did not stop within %.1f s", worker.name,
                            STOP_SECONDS)
        self.server.close()
        self._stop_vault_service()
        self.parts = []
        self.guardian = None
        self.rotator = None
        self.vault.forget()
        log.info("daemon stopped")

    def run(self) -> int:
        """Run until SIGTERM, SIGINT or the tray's Quit; return the exit code."""
        _raise_open_file_limit()
        previous = self._install_signal_handlers()
        try:
            self.start()
            self.wait()
            if self._signal_name:
                log.info("received %s; stopping", self._signal_name)
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: object) -> None:
            # No logging here: the handler runs between two bytecodes of the
            # main thread, which may be inside a log handler itself.
            self._signal_name = signal.Signals(signum).name
            self.request_stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    def _recover_at_start(self) -> None:
        try:
            self._recover_pending()
        except NpmguardError as err:
            log.error("could not finish the changes an earlier run left: %s", err)
            self.state.update(error=str(err))

    def _recover_pending(self) -> None:
        from npmguard.migrate import pending_journal, recover

        if pending_journal():
            for message in recover(lambda: self.vault):
                log.info("finished an interrupted change: %s", message)

    # --- the store and the file vault service ---------------------------------

    def _open_store(self) -> CredentialStore:
        import npmguard.vault as vault

        open_store = getattr(vault, "open_store", None)
        if open_store is None:
            return vault.open_default_store()
        store: CredentialStore = open_store(self.settings)
        return store

    def _start_vault_service(self) -> None:
        """Serve the file vault's ``vault.*`` ops, so one unlock lasts."""
        module = _load_part("npmguard.vault.daemon_ops", None,
                            "the file vault service")
        if module is None:
            return
        try:
            module.register(self.handlers, on_change=self._file_vault_changed)
        except Exception as err:  # noqa: BLE001 - the daemon runs without it
            log.warning("could not start the file vault service (%s); running "
                        "without it", _describe(err))
            return
        self._vault_service = module
        self.server.ops.update(self.handlers)

    def _stop_vault_service(self) -> None:
        if self._vault_service is None:
            return
        try:
            self._vault_service.unregister()
        except Exception:  # noqa: BLE001 - the daemon is stopping anyway
            log.exception("stopping the file vault service failed")
        self._vault_service = None
        self.handlers.clear()

    def _file_vault_changed(self, unlocked: bool) -> None:
        if not unlocked:
            self.vault.forget()
        if not self.vault.description.startswith("file vault"):
            return
        self.state.update(vault_locked=not unlocked)
        if unlocked and self.guardian is not None:
            # Files the guardian could not secure while the vault was locked.
            self.guardian.rescan()

    # --- optional parts ----------------------------------------------------

    def _start_optional_parts(self) -> None:
        from npmguard.npmrc.locate import global_config_path, user_config_path

        user_config = user_config_path(os.environ)
        global_config = global_config_path(os.environ)
        locations = {"user_config": user_config, "global_config": global_config}

        guardian_class = _load_part("npmguard.daemon.guardian", "Guardian",
                                    "the guardian (securing on change)")
        guardian = None
        if guardian_class is not None:
            guardian = _construct(
                "the guardian", guardian_class, self.settings, self.state,
                lambda: self.vault, **locations,
            )
        if guardian is None:
            log.warning("not watching config files: there is no guardian to act "
                        "on changes")
        else:
            runner = GuardianRunner(guardian, self.state)
            watcher_class = _load_part("npmguard.daemon.watcher", "Watcher",
                                       "the config file watcher")
            watcher = None
            if watcher_class is not None:
                watcher = _construct("the watcher", watcher_class, self.settings,
                                     runner.on_change, **locations)
            # A running watcher starts with a full scan of its own.
            runner.initial_scan = not (watcher is not None
                                       and self._start_part(watcher))
            if self._start_part(runner):
                self.guardian = runner

        self._start_notifications()
        self._start_rotator()
        if self.want_tray:
            tray_class = _load_part("npmguard.tray", "Tray", "the tray icon")
            if tray_class is not None:
                tray = _construct("the tray icon", tray_class, self.state, self)
                if tray is not None:
                    self._start_part(tray)
        else:
            log.info("tray icon disabled")

    def _start_part(self, part: Worker) -> bool:
        if self._stop_requested.is_set():
            return False
        try:
            part.start()
        except Exception as err:  # noqa: BLE001 - the daemon runs without it
            log.warning("could not start the %s (%s); running without it",
                        part.name, _describe(err))
            return False
        self.parts.append(part)
        return True

    def _start_notifications(self) -> None:
        module = _load_part("npmguard.notify", None, "desktop notifications")
        if module is None:
            return
        try:
            notifier = module.Notifier(on_action=self.notification_action)
            worker = module.notify_on_changes(self.state, notifier)
        except Exception as err:  # noqa: BLE001 - the daemon runs without it
            log.warning("could not set up desktop notifications (%s); running "
                        "without them", _describe(err))
            return
        if isinstance(worker, Worker):
            self.parts.append(worker)

    def _start_rotator(self) -> None:
        rotator_class = _load_part("npmguard.daemon.rotator", "RotationWorker",
                                   "scheduled token rotation")
        if rotator_class is None:
            return
        notify = None
        notify_module = _load_part("npmguard.notify", None, "rotation notifications")
        if notify_module is not None:
            notify = notify_module.Notifier().notify
        rotator = _construct(
            "scheduled token rotation", rotator_class, self.settings, self.state,
            self.vault.backend, notify=notify, invalidate=self.invalidate_caches,
            **self.rotation_options,
        )
        if rotator is not None and self._start_part(rotator):
            self.rotator = rotator

    def invalidate_caches(self) -> None:
        """Drop cached vault values and minted tokens (after a rotation)."""
        self.vault.forget()
        mint_cache = getattr(self, "mint_cache", None)
        clear = getattr(mint_cache, "clear", None)
        if callable(clear):
            clear()

    # --- tray actions ------------------------------------------------------

    def secure_now(self) -> None:
        if self.guardian is None:
            log.warning("secure now: no guardian is running; use `npmguard secure`")
            return
        log.info("secure now requested")
        self.guardian.secure_now()

    def pause(self) -> None:
        if not self.state.snapshot.paused:
            log.info("paused: config file changes are held until resumed")
            self.state.update(paused=True)

    def resume(self) -> None:
        if self.state.snapshot.paused:
            log.info("resumed")
            self.state.update(paused=False)
            if self.guardian is not None:
                self.guardian.resumed()

    def notification_action(self, key: str) -> None:
        """Run the action of a button chosen on a notification."""
        if key == "rotate-exposed":
            self.rotate_exposed()
        else:
            log.warning("unknown notification action %r", key)

    def rotate_exposed(self) -> None:
        if self.rotator is None:
            log.warning("rotate exposed tokens: the rotator is not running; use "
                        "`npmguard rotate --exposed`")
            return
        log.info("rotation of exposed tokens requested")
        self.rotator.rotate_exposed()

    def open_log(self) -> None:
        if self.log_path is None:
            log.warning("open log: this daemon has no log file")
            return
        open_in_desktop(self.log_path)

    def quit(self) -> None:
        log.info("quit requested")
        self.request_stop()

    # --- requests ------------------------------------------------------------

    def handle_request(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Serve one checked request from ``peer``; errors become error replies."""
        op = request["op"]
        try:
            handler = self.handlers.get(op)
            if handler is not None:
                return handler(request, peer)
            if op == "status":
                return self._status()
            if op == "pause":
                self.pause()
                return {"ok": True, "paused": True}
            if op == "resume":
                self.resume()
                return {"ok": True, "paused": False}
            if op == "invalidate":
                self.invalidate_caches()
                if self.rotator is not None:
                    self.rotator.refresh()
                log.info("dropped cached tokens at the request of %s",
                         peer.describe())
                return {"ok": True}
            if op == "rotate":
                return self._rotate(request, peer)
            if op == "token":
                return self._serve_token(request, peer)
            if op == "env":
                return self._serve_env(request, peer)
        except VaultLockedError as err:
            log.info("%s request from %s rejected: %s", op, peer.describe(), err)
            _audit_refused(op, peer, "the vault is locked")
            return protocol.error_reply(REDACTOR.redact(str(err)))
        except NpmguardError as err:
            log.info("%s request from %s failed: %s", op, peer.describe(), err)
            return protocol.error_reply(REDACTOR.redact(str(err)))
        return protocol.error_reply(f"unknown op {op!r}")

    def _rotate(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        registry = request.get("registry")
        exposed = request.get("exposed", False)
        if registry is not None and not isinstance(registry, str):
            return protocol.error_reply("invalid request: registry must be a "
                                        "string or null")
        if not isinstance(exposed, bool):
            return protocol.error_reply("invalid request: exposed must be true "
                                        "or false")
        if self.rotator is None:
            return protocol.error_reply("the daemon's rotator is not running; "
                                        "run `npmguard rotate` without the daemon")
        log.info("rotation of %s requested by %s", registry or "every stored token"
                 + (" (exposed only)" if exposed else ""), peer.describe())
        job = self.rotator.request(registry, exposed=exposed)
        if not job.done.wait(ROTATE_REPLY_SECONDS):
            return {"ok": True, "done": False,
                    "message": "still running; `npmguard status` shows the outcome"}
        if job.error:
            return protocol.error_reply(job.error)
        return {"ok": True, "done": True, "rotations": job.results,
                "messages": job.messages}

    def _status(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": True}
        reply.update(self.state.snapshot.to_json())
        reply.update(
            pid=os.getpid(),
            version=__version__,
            socket=str(self.socket_path),
            log=str(self.log_path) if self.log_path else None,
            parts=["server", *(p.name for p in self.parts)],
        )
        return reply

    def _serve_token(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        from npmguard.inject.resolve import Effective, resolve

        env = request.get("env", os.environ)
        self._recover_pending()
        effective = Effective(env, Path(request["cwd"]))
        registry = request.get("registry") or effective.default_registry()
        findings = effective.lookup(registry)
        if findings and findings[0].state == "reference":
            # The value is in the client's environment, not the daemon's.
            return {"ok": False, "local": True,
                    "error": "the credential is an environment reference"}
        credential = resolve(registry, effective, self.vault, env)
        register_secret(credential.value)
        # A token minted for the job that runs the helper, where possible.
        grant = self.mint_cache.for_token(
            credential, findings[0] if findings else None, peer.pid, env=env,
            cwd=Path(request["cwd"]),
        )
        credential = grant.credential
        value = credential.auth_header() if request.get("header") else credential.value
        register_secret(credential.value)
        register_secret(value)
        log.info(
            "handed out the %s%s for %s (fp %s, from %s) to %s",
            f"{grant.minted.scope} token minted for the job, not the stored "
            if grant.minted else "", credential.kind, credential.registry,
            credential.value.fingerprint, credential.source, peer.describe(),
        )
        return {
            "ok": True,
            "value": value.reveal(),
            "registry": credential.registry,
            "fingerprint": credential.value.fingerprint,
            "minted": grant.minted is not None,
        }

    def _serve_env(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        from npmguard.inject.resolve import Effective, exec_environment

        env = request.get("env", os.environ)
        self._recover_pending()
        effective = Effective(env, Path(request["cwd"]))
        variables: dict[str, str] = {}
        if effective.secured():
            variables = exec_environment(effective, self.vault, request.get("registry"))
        for value in variables.values():
            register_secret(value)
        # Tokens minted for this job with the scope exec asks for; the reply's
        # lease is what exec's ``release`` names when the job ends.
        grant = self.mint_cache.for_exec(effective, variables, request, peer.pid)
        variables = grant.variables
        fingerprints = [Secret(value).fingerprint for value in variables.values()]
        if variables:
            log.info(
                "handed out %d credential(s) for exec (fp %s; %d minted for the "
                "job) to %s", len(variables), ", ".join(fingerprints),
                len(grant.minted), peer.describe(),
            )
        reply: dict[str, Any] = {
            "ok": True,
            "variables": variables,
            "warnings": [REDACTOR.redact(str(e)) for e in effective.errors]
            + [REDACTOR.redact(w) for w in grant.warnings],
            "notes": [REDACTOR.redact(n) for n in grant.notes],
        }
        if grant.lease is not None:
            reply["lease"] = grant.lease
            reply["minted"] = [m.summary() for m in grant.minted]
        return reply


def peer_fields(peer: Peer) -> dict[str, Any]:
    """Return the audit trail's view of a peer, as hand-outs record it: pid,
    executable name and parents' names, never a command line."""
    from npmguard.inject.mint import ancestors, peer_summary

    return peer_summary(ancestors(peer.pid), peer.pid)


def _audit_refused(op: str, peer: Peer, reason: str) -> None:
    from npmguard import audit

    # note() logs a failure instead of raising, because the request is
    # rejected either way.
    audit.note("refused", op=op, peer=peer_fields(peer), reason=reason)


def _load_part(module_name: str, attribute: str | None, what: str) -> Any:
    """Import an optional part; log once and return None when it is unusable."""
    try:
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            log.warning("%s is not part of this installation; running without it",
                        what)
        else:
            log.warning("%s needs the missing module %s; running without it",
                        what, err.name)
    except Exception as err:  # noqa: BLE001 - e.g. Xlib raising on import
        log.warning("%s could not be loaded (%s); running without it",
                    what, _describe(err))
    return None


def _construct(what: str, cls: Any, *args: Any, **optional: Any) -> Any:
    """Create a part, passing only the keyword arguments its class takes."""
    try:
        parameters = inspect.signature(cls).parameters
        accepted = {k: v for k, v in optional.items() if k in parameters}
        return cls(*args, **accepted)
    except Exception as err:  # noqa: BLE001 - the daemon runs without it
        log.warning("could not create %s (%s); running without it", what,
                    _describe(err))
        return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def open_in_desktop(path: Path) -> None:
    """Open ``path`` with the desktop's default application."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    try:
        # xdg-open and open return once the viewer is launched, so waiting
        # leaves no child process behind.
        subprocess.run(
            [opener, os.fspath(path)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not open %s with %s: %s", path, opener, err)


def _raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one, for many clients."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
