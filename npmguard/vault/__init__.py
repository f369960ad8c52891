"""Typed credential stores: the OS keychain and the encrypted file vault.

Nothing outside this package imports ``keyring`` or ``cryptography``.
``open_default_store`` opens the store the settings select (see
``select``). The file vault's names are loaded on first use, so commands
that use the keychain never import ``cryptography``.
"""

from __future__ import annotations

from typing import Any

from npmguard.vault.base import CredentialStore, MemoryStore, require
from npmguard.vault.keychain import KeychainStore
from npmguard.vault.select import describe_vault, open_default_store, open_store

__all__ = [
    "CredentialStore",
    "DaemonStore",
    "FileVault",
    "KeychainStore",
    "MemoryStore",
    "describe_vault",
    "open_default_store",
    "open_store",
    "require",
]


def __getattr__(name: str) -> Any:
    if name == "FileVault":
        from npmguard.vault.filevault import FileVault

        return FileVault
    if name == "DaemonStore":
        from npmguard.vault.remote import DaemonStore

        return DaemonStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
