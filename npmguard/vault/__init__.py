"""Typed credential stores. Nothing outside this package imports ``keyring``."""

from npmguard.vault.base import CredentialStore, MemoryStore
from npmguard.vault.keychain import KeychainStore, open_default_store

__all__ = ["CredentialStore", "KeychainStore", "MemoryStore", "open_default_store"]
