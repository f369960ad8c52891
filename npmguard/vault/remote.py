"""The daemon's file vault, used from another process over the daemon socket.

``npmguard unlock`` hands the passphrase to the daemon, which derives the
key and keeps the vault unlocked. Later commands read and write through
``DaemonStore``, which sends the ``vault.*`` requests that ``daemon_ops``
serves: one JSON object per line, ``{"op": ...}`` in, ``{"ok": true, ...}``
or ``{"ok": false, "error": "...", "error_type": "..."}`` back.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from npmguard.daemon import protocol
from npmguard.errors import (
    CredentialNotFoundError,
    VaultError,
    VaultLockedError,
    VaultUnavailableError,
)
from npmguard.secret import Secret
from npmguard.vault.base import (
    VaultCorruptError,
    VaultMissingError,
    WrongPassphraseError,
)

# Long enough for a request that waits behind a key derivation (under a
# second) on a loaded machine.
TIMEOUT_SECONDS = 10.0
# Unlocking derives the key in the daemon, which is slow on purpose.
UNLOCK_TIMEOUT_SECONDS = 30.0

# error_type values in error replies, and the exception each one becomes.
ERROR_TYPES: dict[str, type[VaultError]] = {
    "locked": VaultLockedError,
    "wrong_passphrase": WrongPassphraseError,
    "corrupt": VaultCorruptError,
    "missing": VaultMissingError,
    "not_found": CredentialNotFoundError,
    "unavailable": VaultUnavailableError,
    "error": VaultError,
}


class DaemonNotRunning(Exception):
    """No daemon listens on the socket."""


class VaultNotServed(Exception):
    """A daemon runs but does not serve the ``vault.*`` requests."""


def socket_path() -> str:
    return protocol.socket_path()


def request(
    message: dict[str, Any], *, path: str | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Send one request line and return the reply object.

    Raise ``DaemonNotRunning`` when nothing listens on the socket and
    ``VaultUnavailableError`` when the daemon fails to reply properly.
    """
    address = path or socket_path()
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        # NOTE: Python on Windows has no AF_UNIX, so there the file vault is
        # unlocked per command only.
        raise DaemonNotRunning("no Unix sockets on this platform")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonNotRunning(address) from None
        except OSError as err:
            raise VaultUnavailableError(
                f"cannot connect to the npmguard daemon at {address}: "
                f"{err.strerror or err}"
            ) from None
        _check_peer(sock, address)
        try:
            sock.sendall(protocol.encode(message))
            line = protocol.read_line(sock)
        except TimeoutError:
            raise VaultUnavailableError(
                f"the npmguard daemon at {address} did not reply within "
                f"{timeout:g} s"
            ) from None
        except OSError as err:
            raise VaultUnavailableError(
                f"the connection to the npmguard daemon at {address} failed: "
                f"{err.strerror or err}"
            ) from None
    finally:
        sock.close()
    try:
        reply = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        reply = None
    if not isinstance(reply, dict):
        raise VaultUnavailableError(
            f"the npmguard daemon at {address} sent a reply that is not a JSON "
            "object"
        )
    return reply


def _check_peer(sock: socket.socket, address: str) -> None:
    """Refuse a server of another user, and this process's own server.

    A passphrase or a token must never go to a socket that another user
    created, for example under an ``NPMGUARD_SOCKET`` in a shared /tmp. And
    the daemon must not ask itself: its request would wait for a handler
    thread that waits for it.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        # NOTE: only Linux reports the server's credentials this way; on
        # macOS only the socket directory's 0700 mode protects the client.
        return
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    if uid != os.getuid():
        raise VaultUnavailableError(
            f"the socket {address} belongs to a process of uid {uid}, not to "
            "this user; nothing was sent to it. Remove it or point "
            "NPMGUARD_SOCKET elsewhere"
        )
    if pid == os.getpid():
        raise DaemonNotRunning("this process serves the socket itself")


def raise_for_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Return an ``ok`` reply; raise the ``VaultError`` an error reply names."""
    if reply.get("ok") is True:
        return reply
    error = reply.get("error")
    message = error if isinstance(error, str) and error else "the daemon failed"
    if _is_unknown_op(reply):
        raise VaultNotServed(message)
    cls = ERROR_TYPES.get(str(reply.get("error_type")), VaultError)
    raise cls(message)


def _is_unknown_op(reply: dict[str, Any]) -> bool:
    """Tell whether the daemon rejected the op because it does not know it."""
    error = reply.get("error")
    return (
        "error_type" not in reply
        and isinstance(error, str)
        and "unknown op" in error
    )


def vault_status(
    *, path: str | None = None, raise_unsupported: bool = False
) -> dict[str, Any] | None:
    """Return the daemon's ``vault.status`` reply, or None with no daemon.

    A daemon that does not serve the vault counts as none, unless
    ``raise_unsupported`` is set: then it raises ``VaultNotServed``. A daemon
    that fails to reply raises ``VaultUnavailableError``.
    """
    if os.environ.get("NPMGUARD_NO_DAEMON"):
        return None
    try:
        return raise_for_reply(request({"op": "vault.status"}, path=path))
    except DaemonNotRunning:
        return None
    except VaultNotServed:
        if raise_unsupported:
            raise
        return None


def unlock(
    passphrase: Secret, *, create: bool = False, path: str | None = None
) -> dict[str, Any]:
    """Hand the passphrase to the daemon, which derives and keeps the key."""
    message = {"op": "vault.unlock", "passphrase": passphrase.reveal(),
               "create": create}
    return raise_for_reply(
        request(message, path=path, timeout=UNLOCK_TIMEOUT_SECONDS)
    )


def lock(*, path: str | None = None) -> dict[str, Any]:
    """Make the daemon forget the key; raise ``DaemonNotRunning`` with none."""
    return raise_for_reply(request({"op": "vault.lock"}, path=path))


class DaemonStore:
    """A ``CredentialStore`` that reads and writes the daemon's unlocked vault."""

    def __init__(self, path: str | None = None,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self._path = path or socket_path()
        self._timeout = timeout
        self.description = "file vault (unlocked in the npmguard daemon)"

    def get(self, name: str) -> Secret | None:
        reply = self._call({"op": "vault.get", "name": name})
        value = reply.get("value")
        if value is None:
            return None
        if not isinstance(value, str):
            raise VaultError("the npmguard daemon sent a value that is not a string")
        return Secret(value)

    def set(self, name: str, value: Secret) -> None:
        self._call({"op": "vault.set", "name": name, "value": value.reveal()})

    def delete(self, name: str) -> None:
        self._call({"op": "vault.delete", "name": name})

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = request(message, path=self._path, timeout=self._timeout)
            return raise_for_reply(reply)
        except DaemonNotRunning:
            raise VaultUnavailableError(
                "the npmguard daemon that held the unlocked file vault stopped; "
                "start it again and run `npmguard unlock`"
            ) from None
        except VaultNotServed:
            raise VaultUnavailableError(
                "the npmguard daemon no longer serves the file vault; run "
                "`npmguard unlock` again"
            ) from None
