"""The npmguard error family.

Every error a user can cause or fix is an ``NpmguardError``. The CLI prints
its message on one line and exits with ``exit_code``; anything else is a bug
and gets a short message plus a traceback in the log.
"""

from __future__ import annotations

from pathlib import Path


class NpmguardError(Exception):
    """Base of all expected failures; the message is shown to the user as is."""

    exit_code = 2

    def __init__(
        self, message: str, *, path: Path | str | None = None, line: int | None = None
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(message)

    def __str__(self) -> str:
        message = super().__str__()
        if self.path is None:
            return message
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {message}"


class ConfigFileError(NpmguardError):
    """A config file could not be read, parsed or written."""


class FileChangedError(NpmguardError):
    """A file changed between reading it and writing it back."""


class VaultError(NpmguardError):
    """The credential store failed."""


class VaultLockedError(VaultError):
    """The keychain exists but is locked."""


class VaultUnavailableError(VaultError):
    """No usable keychain backend is available."""


class CredentialNotFoundError(VaultError):
    """A referenced credential is missing from the vault."""


class JournalError(NpmguardError):
    """A pending change in the journal could not be finished or undone."""


class UsageError(NpmguardError):
    """The command line was invalid."""
