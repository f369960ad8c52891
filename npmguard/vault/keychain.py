"""The OS keychain store, through the ``keyring`` package.

keyring picks the platform's backend: Secret Service on Linux (gnome-keyring,
KWallet), the macOS Keychain, or the Windows Credential Locker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from npmguard.errors import VaultError, VaultLockedError, VaultUnavailableError
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore

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
        try:
            backend = keyring.get_keyring()
        except Exception as err:  # noqa: BLE001 - backends fail in their own ways
            # keyring raises RuntimeError when a backend named in
            # PYTHON_KEYRING_BACKEND or keyringrc.cfg is not viable, for
            # example Secret Service with no daemon on the session bus.
            raise VaultUnavailableError(
                _UNAVAILABLE_HINT.format(detail=_first_line(err))
            ) from err
        self.description = f"keychain ({type(backend).__module__})"
        if _is_fail_backend(backend):
            raise VaultUnavailableError(
                _UNAVAILABLE_HINT.format(detail=type(backend).__module__)
            )
        self._get_password: Callable[[str, str], str | None] = keyring.get_password
        self._set_password: Callable[[str, str, str], None] = keyring.set_password
        self._delete_password: Callable[[str, str], None] = keyring.delete_password
        if _is_secret_service(backend):
            # keyring opens a D-Bus connection per call, which is slow and
            # can crash gnome-keyring. This client keeps one per store.
            from npmguard.vault.secretservice import SecretServiceClient

            client = SecretServiceClient(backend)
            self._get_password = client.get_password
            self._set_password = client.set_password
            self._delete_password = client.delete_password

    def get(self, name: str) -> Secret | None:
        value = self._call("read", self._get_password, self._service, name)
        return Secret(value) if value is not None else None

    def set(self, name: str, value: Secret) -> None:
        self._call("write", self._set_password, self._service, name, value.reveal())

    def delete(self, name: str) -> None:
        with contextlib.suppress(_MissingEntry):
            self._call("delete", self._delete_password, self._service, name)

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
        except errors.InitError as err:
            # Secret Service raises this when the collection cannot be
            # opened, for example after the daemon left the bus.
            raise VaultUnavailableError(
                _UNAVAILABLE_HINT.format(detail=_first_line(err))
            ) from err
        except errors.KeyringError as err:
            # keyring's messages never contain the value, but they can be
            # long; keep the first line.
            raise VaultError(f"keychain {action} failed: {_first_line(err)}") from err
        except Exception as err:  # noqa: BLE001 - D-Bus and OS errors vary by backend
            if _is_unavailable(err):
                raise VaultUnavailableError(
                    _UNAVAILABLE_HINT.format(detail=_first_line(err))
                ) from err
            raise VaultError(f"keychain {action} failed: {_first_line(err)}") from err


class _MissingEntry(Exception):
    pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else "no detail"
    return f"{type(err).__name__}: {first}"


def _is_unavailable(err: BaseException) -> bool:
    """Tell whether ``err`` means that no Secret Service is reachable at all.

    secretstorage raises SecretServiceNotAvailableException before keyring
    can wrap it, when there is no session bus address or no daemon on the
    bus. The class is matched by name, so platforms without secretstorage
    need not import it.
    """
    return any(
        cls.__name__ == "SecretServiceNotAvailableException"
        for cls in type(err).__mro__
    )


def _is_secret_service(backend: object) -> bool:
    # Only keyring's own class: a subclass or a chainer may behave otherwise.
    cls = type(backend)
    return (cls.__module__, cls.__qualname__) == (
        "keyring.backends.SecretService",
        "Keyring",
    )


def _is_fail_backend(backend: object) -> bool:
    module = type(backend).__module__
    if module == "keyring.backends.fail":
        return True
    # The chainer wraps several backends; it is useless when it wraps none.
    backends = getattr(backend, "backends", None)
    return module == "keyring.backends.chainer" and not backends


def open_default_store() -> CredentialStore:
    """Open the store the settings select; kept here for older imports."""
    from npmguard.vault.select import open_store

    return open_store()
