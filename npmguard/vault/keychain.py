"""The OS keychain store, through the ``keyring`` package.

keyring picks the platform's backend: Secret Service on Linux (gnome-keyring,
KWallet), the macOS Keychain, or the Windows Credential Locker.
"""

from __future__ import annotations

import logging

from npmguard.errors import VaultError, VaultLockedError, VaultUnavailableError
from npmguard.secret import Secret

log = logging.getLogger(__name__)

SERVICE = "npmguard"

_LOCKED_HINT = (
    "the keychain is locked; unlock it (log in to the desktop session, or run "
    "`gnome-keyring-daemon --unlock` on Linux) and try again"
)
_UNAVAILABLE_HINT = (
    "no usable keychain backend was found ({detail}); on Linux start a Secret "
    "Service provider such as gnome-keyring in a D-Bus session, or set "
    "PYTHON_KEYRING_BACKEND to a working backend"
)


class KeychainStore:
    """A store over the keyring backend chosen for this platform."""

    def __init__(self, service: str = SERVICE) -> None:
        import keyring
        import keyring.errors

        self._keyring = keyring
        self._errors = keyring.errors
        self._service = service
        backend = keyring.get_keyring()
        self.description = f"keychain ({type(backend).__module__})"
        if _is_fail_backend(backend):
            raise VaultUnavailableError(
                _UNAVAILABLE_HINT.format(detail=type(backend).__module__)
            )

    def get(self, name: str) -> Secret | None:
        value = self._call("read", self._keyring.get_password, self._service, name)
        return Secret(value) if value is not None else None

    def set(self, name: str, value: Secret) -> None:
        self._call(
            "write", self._keyring.set_password, self._service, name, value.reveal()
        )

    def delete(self, name: str) -> None:
        try:
            self._call("delete", self._keyring.delete_password, self._service, name)
        except _MissingEntry:
            pass

    def _call(self, action: str, func, *args):  # type: ignore[no-untyped-def]
        errors = self._errors
        try:
            return func(*args)
        except errors.PasswordDeleteError as err:
            raise _MissingEntry from err
        except errors.KeyringLocked as err:
            raise VaultLockedError(_LOCKED_HINT) from err
        except errors.NoKeyringError as err:
            raise VaultUnavailableError(
                _UNAVAILABLE_HINT.format(detail="no backend")
            ) from err
        except errors.KeyringError as err:
            # keyring's messages never contain the value, but they can be
            # long; keep the type and the first line.
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise VaultError(f"keychain {action} failed: {detail}") from err
        except Exception as err:  # noqa: BLE001 - D-Bus and OS errors vary by backend
            raise VaultError(
                f"keychain {action} failed: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'no detail'}"
            ) from err


class _MissingEntry(Exception):
    pass


def _is_fail_backend(backend: object) -> bool:
    module = type(backend).__module__
    if module == "keyring.backends.fail":
        return True
    # The chainer wraps several backends; it is useless when it wraps none.
    backends = getattr(backend, "backends", None)
    return module == "keyring.backends.chainer" and not backends


def open_default_store() -> KeychainStore:
    """Open the keychain store, or raise a ``VaultError`` that says what to do."""
    return KeychainStore()
