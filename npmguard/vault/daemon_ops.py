"""The daemon's side of the file vault: the ``vault.*`` request handlers.

The daemon calls ``register(handlers)`` once at start. That adds one
handler per op to its ``op -> handler`` table and makes ``open_store`` in
the daemon process use the vault held here, so the daemon's own token
requests read the same unlocked vault. Requests and replies::

    {"op": "vault.unlock", "passphrase": "...", "create": false}
        -> {"ok": true, "unlocked": true, "created": false, "path": "..."}
    {"op": "vault.lock"}    -> {"ok": true, "unlocked": false}
    {"op": "vault.status"}  -> {"ok": true, "path": "...", "exists": true,
                                "unlocked": true, "kdf": "Argon2id, ..."}
    {"op": "vault.get", "name": "..."}  -> {"ok": true, "value": "..." | null}
    {"op": "vault.set", "name": "...", "value": "..."}  -> {"ok": true}
    {"op": "vault.delete", "name": "..."}  -> {"ok": true}

An error reply is ``{"ok": false, "error": "one line", "error_type": T}``
with T one of ``remote.ERROR_TYPES``. The server admits only peers of the
daemon's own uid; a handler logs the peer of each unlock and lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npmguard.errors import (
    CredentialNotFoundError,
    NpmguardError,
    VaultLockedError,
    VaultUnavailableError,
)
from npmguard.secret import Secret
from npmguard.vault import select
from npmguard.vault.base import (
    Passphrase,
    VaultCorruptError,
    VaultMissingError,
    WrongPassphraseError,
)
from npmguard.vault.filevault import FileVault, read_header

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
# Called with True after an unlock and False after a lock, so the daemon can
# drop values it cached and update its state.
ChangeListener = Callable[[bool], None]

OPS = ("vault.unlock", "vault.lock", "vault.status", "vault.get", "vault.set",
       "vault.delete")


class VaultHost:
    """One ``FileVault`` shared by every request the daemon serves."""

    def __init__(self, path: Path | None = None,
                 on_change: ChangeListener | None = None) -> None:
        self.vault = FileVault(path)
        self._on_change = on_change
        # One unlock at a time: a second one waits instead of deriving twice.
        self._unlock_lock = threading.Lock()

    @property
    def unlocked(self) -> bool:
        return self.vault.unlocked

    def handlers(self) -> dict[str, Handler]:
        return {
            "vault.unlock": self.handle_unlock,
            "vault.lock": self.handle_lock,
            "vault.status": self.handle_status,
            "vault.get": self.handle_get,
            "vault.set": self.handle_set,
            "vault.delete": self.handle_delete,
        }

    # --- handlers ---------------------------------------------------------------

    def handle_unlock(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        passphrase = request.get("passphrase")
        create = request.get("create", False)
        if not isinstance(passphrase, str) or not passphrase:
            return _invalid("passphrase must be a non-empty string")
        if not isinstance(create, bool):
            return _invalid("create must be true or false")
        secret = Passphrase(passphrase)
        created = False
        try:
            with self._unlock_lock:
                if create and not self.vault.exists():
                    self.vault.create(secret)
                    created = True
                else:
                    self.vault.unlock(secret)
        except WrongPassphraseError as err:
            log.warning("wrong passphrase for the file vault from %s",
                        _describe(peer))
            return _error_reply(err)
        except NpmguardError as err:
            log.warning("unlocking the file vault for %s failed: %s",
                        _describe(peer), err)
            return _error_reply(err)
        verb = "created and unlocked" if created else "unlocked"
        log.info("file vault %s %s for %s", self.vault.path, verb, _describe(peer))
        self._notify(True)
        return {"ok": True, "unlocked": True, "created": created,
                "path": str(self.vault.path)}

    def handle_lock(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        was_unlocked = self.vault.unlocked
        self.vault.lock()
        if was_unlocked:
            log.info("file vault %s locked by %s", self.vault.path, _describe(peer))
        self._notify(False)
        return {"ok": True, "unlocked": False, "was_unlocked": was_unlocked}

    def handle_status(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "ok": True,
            "path": str(self.vault.path),
            "exists": self.vault.exists(),
            "unlocked": self.vault.unlocked,
            "kdf": None,
        }
        try:
            header = read_header(self.vault.path)
        except NpmguardError as err:
            reply["error"] = str(err)
        else:
            if header is not None:
                reply["kdf"] = header.kdf.describe()
        return reply

    def handle_get(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        name = request.get("name")
        if not isinstance(name, str) or not name:
            return _invalid("name must be a non-empty string")
        try:
            value = self.vault.get(name)
        except NpmguardError as err:
            return _error_reply(err)
        if value is None:
            return {"ok": True, "value": None}
        _register_secret(value)
        return {"ok": True, "value": value.reveal()}

    def handle_set(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        name = request.get("name")
        value = request.get("value")
        if not isinstance(name, str) or not name:
            return _invalid("name must be a non-empty string")
        if not isinstance(value, str):
            return _invalid("value must be a string")
        secret = Secret(value)
        _register_secret(secret)
        try:
            self.vault.set(name, secret)
        except NpmguardError as err:
            return _error_reply(err)
        log.info("stored %s in the file vault (fp %s) for %s", name,
                 secret.fingerprint, _describe(peer))
        return {"ok": True}

    def handle_delete(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        name = request.get("name")
        if not isinstance(name, str) or not name:
            return _invalid("name must be a non-empty string")
        try:
            self.vault.delete(name)
        except NpmguardError as err:
            return _error_reply(err)
        log.info("deleted %s from the file vault for %s", name, _describe(peer))
        return {"ok": True}

    def _notify(self, unlocked: bool) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(unlocked)
        except Exception:  # noqa: BLE001 - the request still succeeded
            log.exception("the file vault's change listener failed")


_host: VaultHost | None = None


def register(
    handlers: dict[str, Handler], *, on_change: ChangeListener | None = None,
    path: Path | None = None,
) -> VaultHost:
    """Add the ``vault.*`` handlers to ``handlers`` and host the vault here.

    Every handler is ``(request: dict, peer) -> dict``. After this call
    ``open_store`` in this process returns the hosted vault when the file
    vault is selected, so the daemon never sends requests to its own socket.
    ``on_change(unlocked)`` runs after each unlock and lock; the daemon
    should drop the values it cached when it gets False.
    """
    global _host
    host = VaultHost(path, on_change)
    handlers.update(host.handlers())
    _host = host
    select.set_hosted_store(HostedStore(host))
    return host


def unregister() -> None:
    """Lock the hosted vault and stop serving it; call when the daemon stops."""
    global _host
    if _host is not None:
        _host.vault.lock()
        _host = None
    select.set_hosted_store(None)


class HostedStore:
    """The ``CredentialStore`` the daemon itself uses: its hosted vault."""

    def __init__(self, host: VaultHost) -> None:
        self._host = host
        self.description = f"file vault ({host.vault.path})"

    @property
    def unlocked(self) -> bool:
        return self._host.unlocked

    def get(self, name: str) -> Secret | None:
        return self._host.vault.get(name)

    def set(self, name: str, value: Secret) -> None:
        self._host.vault.set(name, value)

    def delete(self, name: str) -> None:
        self._host.vault.delete(name)


# --- helpers -----------------------------------------------------------------------


def _error_type(err: NpmguardError) -> str:
    if isinstance(err, WrongPassphraseError):
        return "wrong_passphrase"
    if isinstance(err, VaultLockedError):
        return "locked"
    if isinstance(err, VaultCorruptError):
        return "corrupt"
    if isinstance(err, VaultMissingError):
        return "missing"
    if isinstance(err, CredentialNotFoundError):
        return "not_found"
    if isinstance(err, VaultUnavailableError):
        return "unavailable"
    return "error"


def _error_reply(err: NpmguardError) -> dict[str, Any]:
    message = " ".join(str(err).split()) or "the file vault failed"
    return {"ok": False, "error": message, "error_type": _error_type(err)}


def _invalid(message: str) -> dict[str, Any]:
    return {"ok": False, "error": f"invalid request: {message}",
            "error_type": "error"}


def _describe(peer: Any) -> str:
    describe = getattr(peer, "describe", None)
    if callable(describe):
        try:
            return str(describe())
        except Exception:  # noqa: BLE001 - a log line must not fail the request
            return "a client"
    return "a client"


def _register_secret(value: Secret) -> None:
    """Keep ``value`` out of the daemon's log lines."""
    from npmguard.logsetup import register_secret

    register_secret(value)
