"""Look at the keychain without changing it, for ``npmguard doctor``.

``probe_keychain`` reports which keyring backend would be used, whether it
works and whether it is locked. It never stores anything and never prompts
for a password. For the Secret Service it reads the collection's ``Locked``
property over D-Bus (with a timeout) instead of opening the collection,
which would pop up an unlock prompt. Other backends are asked for an entry
that does not exist; the macOS Keychain may show its own unlock dialog then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from npmguard.vault.keychain import SERVICE
from npmguard.vault.select import backend_name, effective_backend

log = logging.getLogger(__name__)

SECRETS_NAME = "org.freedesktop.secrets"
SECRETS_PATH = "/org/freedesktop/secrets"
_PROBE_ENTRY = "npmguard-doctor-probe"


@dataclass(frozen=True)
class KeychainProbe:
    """Result of ``probe_keychain``.

    ``backend`` is the keyring backend's module and class, or None when
    keyring has none. ``locked`` is None when it could not be determined
    (no collection yet, or a backend without a lock state). ``error`` is one
    line, or None when the backend replied.
    """

    backend: str | None
    available: bool
    locked: bool | None
    error: str | None = None
    detail: str = ""


def probe_keychain(timeout: float = 5.0) -> KeychainProbe:
    """Find the keyring backend and its lock state; never raises."""
    try:
        import keyring
    except ImportError as err:  # pragma: no cover - keyring is a dependency
        return KeychainProbe(None, False, None, f"keyring is not installed: {err}")
    try:
        backend = keyring.get_keyring()
    except Exception as err:  # noqa: BLE001 - backends fail in their own ways
        return KeychainProbe(None, False, None, _first_line(err))
    inner = effective_backend(backend)
    if inner is None:
        return KeychainProbe(
            None, False, None, "keyring found no usable backend", backend_name(backend)
        )
    name = backend_name(inner)
    if type(inner).__module__ == "keyring.backends.SecretService":
        return _probe_secret_service(name, inner, timeout)
    return _probe_by_reading(name, inner)


def _probe_secret_service(name: str, backend: Any, timeout: float) -> KeychainProbe:
    try:
        from jeepney import DBusAddress, MessageType, Properties, new_method_call
        from jeepney.io.blocking import open_dbus_connection
        from jeepney.low_level import HeaderFields
    except ImportError as err:  # pragma: no cover - secretstorage needs jeepney
        return KeychainProbe(name, False, None, f"jeepney is not installed: {err}")

    def call(conn: Any, message: Any) -> Any:
        reply = conn.send_and_get_reply(message, timeout=timeout)
        if reply.header.message_type == MessageType.error:
            error_name = reply.header.fields.get(HeaderFields.error_name, "error")
            text = reply.body[0] if reply.body else ""
            raise _DBusError(f"{error_name}: {text}".rstrip(": "))
        return reply.body

    service = DBusAddress(SECRETS_PATH, SECRETS_NAME, "org.freedesktop.Secret.Service")
    try:
        conn = open_dbus_connection(bus="SESSION", auth_timeout=timeout)
    except Exception as err:  # noqa: BLE001 - no bus, refused, bad address
        reason = f"no D-Bus session bus: {_first_line(err)}"
        return KeychainProbe(name, False, None, reason)
    try:
        path = getattr(backend, "preferred_collection", None)
        if not path:
            read_alias = new_method_call(service, "ReadAlias", "s", ("default",))
            (path,) = call(conn, read_alias)
        if path == "/":
            return KeychainProbe(
                name,
                True,
                None,
                None,
                "no default collection yet; the first store creates it, "
                "which may ask for a new keyring password",
            )
        collection = DBusAddress(
            str(path), SECRETS_NAME, "org.freedesktop.Secret.Collection"
        )
        ((_, locked),) = call(conn, Properties(collection).get("Locked"))
    except _DBusError as err:
        return KeychainProbe(name, False, None, str(err))
    except Exception as err:  # noqa: BLE001 - timeouts, a daemon that left
        return KeychainProbe(name, False, None, _first_line(err))
    finally:
        conn.close()
    return KeychainProbe(name, True, bool(locked), None, f"collection {path}")


def _probe_by_reading(name: str, backend: Any) -> KeychainProbe:
    import keyring.errors

    try:
        backend.get_password(SERVICE, _PROBE_ENTRY)
    except keyring.errors.KeyringLocked as err:
        return KeychainProbe(name, True, True, None, _first_line(err))
    except Exception as err:  # noqa: BLE001 - each backend has its own errors
        return KeychainProbe(name, False, None, _first_line(err))
    return KeychainProbe(name, True, False, None)


class _DBusError(Exception):
    pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else "no detail"
    return f"{type(err).__name__}: {first}"
