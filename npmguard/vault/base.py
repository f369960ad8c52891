"""The store interface and an in-memory store for unit tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from npmguard.errors import (
    CredentialNotFoundError,
    VaultError,
    VaultLockedError,
)
from npmguard.secret import Secret


class Passphrase(Secret):
    """A vault passphrase; unlike a ``Secret``, its repr shows no characters."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Passphrase(<hidden>)"

    __str__ = __repr__


class WrongPassphraseError(VaultLockedError):
    """The passphrase does not open the file vault."""


class VaultCorruptError(VaultError):
    """The vault file is damaged, truncated, altered or not a vault file."""


class VaultMissingError(VaultError):
    """No vault file exists yet."""


class CredentialStore(Protocol):
    """A place that keeps credential values under string names.

    Names look like ``//registry.example/:_authToken#a1b2c3d4e5``: the
    config key the value came from plus a unique id.
    """

    description: str

    def get(self, name: str) -> Secret | None:
        """Return the stored value, or None when there is none."""

    def set(self, name: str, value: Secret) -> None:
        """Store ``value`` under ``name``, replacing any earlier value."""

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing entry is not an error."""


def require(store: CredentialStore, name: str) -> Secret:
    """Return the value under ``name`` or raise ``CredentialNotFoundError``."""
    value = store.get(name)
    if value is None:
        raise CredentialNotFoundError(
            f"credential {name} is not in the {store.description}; "
            "run `npmguard scan` to see what is stored, or `npmguard secure` again"
        )
    return value


class LazyStore:
    """A store that opens the real one, made by ``factory``, on first use.

    Until then ``description`` is the generic "keychain", so an error that
    names the store needs no keychain prompt to be written.
    """

    def __init__(self, factory: Callable[[], CredentialStore]) -> None:
        self._factory = factory
        self._store: CredentialStore | None = None
        self.description = "keychain"

    def _open(self) -> CredentialStore:
        if self._store is None:
            self._store = self._factory()
            self.description = self._store.description
        return self._store

    def get(self, name: str) -> Secret | None:
        return self._open().get(name)

    def set(self, name: str, value: Secret) -> None:
        self._open().set(name, value)

    def delete(self, name: str) -> None:
        self._open().delete(name)


class MemoryStore:
    """A dict-backed store for unit tests; it keeps nothing after the process."""

    description = "in-memory store"

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def get(self, name: str) -> Secret | None:
        value = self._values.get(name)
        return Secret(value) if value is not None else None

    def set(self, name: str, value: Secret) -> None:
        self._values[name] = value.reveal()

    def delete(self, name: str) -> None:
        self._values.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._values)
