"""``npmguard token``: print one registry credential for a helper or script.

This runs on every pnpm request through the token helper, so it imports
only what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from npmguard.inject.resolve import Effective, resolve
from npmguard.migrate import pending_journal, recover
from npmguard.vault import open_default_store


def run(args: argparse.Namespace) -> int:
    effective = Effective(os.environ, Path.cwd())
    if pending_journal():
        recover(open_default_store)
    registry = args.registry or effective.default_registry()
    credential = resolve(registry, effective, _LazyStore(), os.environ)
    value = credential.auth_header() if args.header else credential.value
    sys.stdout.write(value.reveal() + "\n")
    sys.stdout.flush()
    return 0


class _LazyStore:
    """Opens the keychain only when a secured value is actually needed."""

    description = "keychain"

    def __init__(self) -> None:
        self._store = None

    def _open(self):  # type: ignore[no-untyped-def]
        if self._store is None:
            self._store = open_default_store()
            self.description = self._store.description
        return self._store

    def get(self, name):  # type: ignore[no-untyped-def]
        return self._open().get(name)

    def set(self, name, value):  # type: ignore[no-untyped-def]
        self._open().set(name, value)

    def delete(self, name):  # type: ignore[no-untyped-def]
        self._open().delete(name)
