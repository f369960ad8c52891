"""Logging for the daemon: a rotating file, stderr, and redaction of secrets.

Every handler gets a ``RedactingFilter``. It rewrites each record's message,
exception text and stack before any formatter sees them. It replaces every
value registered with ``register_secret`` (the daemon registers each value
it reads from the vault or hands out), npm tokens (``npm_`` and 36
letters or digits), and the value after ``_authToken=``, ``_auth=``,
``_password=``, ``Bearer`` and ``Basic``. A replaced value shows as
``<redacted fp=…>`` with the value's fingerprint, so an operator can still
tell which credential a line is about.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from npmguard.errors import NpmguardError
from npmguard.secret import Secret, fingerprint

LOG_NAME = "npmguard.log"
MAX_BYTES = 1024 * 1024
BACKUP_COUNT = 3
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STDERR_FORMAT = "npmguard: %(levelname)s: %(message)s"

# Shorter values are not registered: redacting every "abc" in the log would
# make it unreadable, and a credential that short is not worth hiding.
MIN_SECRET_LENGTH = 6
# Registered values are kept in memory for the daemon's life; the bound
# stops a long-running daemon from growing without limit.
MAX_SECRETS = 4096

_PATTERNS = (
    # npm's granular and classic tokens.
    re.compile(r"npm_[A-Za-z0-9]{36}"),
    # npmrc lines: the value after the key, up to a space or quote. The
    # classes exclude "<", so a placeholder is never redacted twice.
    re.compile(r"(?<=_authToken=)[^\s\"'<>,;]+"),
    re.compile(r"(?<=_auth=)[^\s\"'<>,;]+"),
    re.compile(r"(?<=_password=)[^\s\"'<>,;]+"),
    # Authorization headers.
    re.compile(r"(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?<=Basic )[A-Za-z0-9+/=]{8,}"),
)


def _placeholder(value: str) -> str:
    return f"<redacted fp={fingerprint(value)}>"


class Redactor:
    """The set of secret values to remove from log text, and the removal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: OrderedDict[str, None] = OrderedDict()
        self._pattern: re.Pattern[str] | None = None

    def register(self, value: str | Secret) -> None:
        text = value.reveal() if isinstance(value, Secret) else value
        if len(text) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            if text in self._values:
                self._values.move_to_end(text)
                return
            self._values[text] = None
            while len(self._values) > MAX_SECRETS:
                self._values.popitem(last=False)
            self._pattern = None

    def _registered_pattern(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._values:
                # Longest first, so a value that contains another is
                # replaced whole.
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(map(re.escape, ordered)))
            return self._pattern

    def redact(self, text: str) -> str:
        pattern = self._registered_pattern()
        if pattern is not None:
            text = pattern.sub(lambda m: _placeholder(m.group(0)), text)
        for known in _PATTERNS:
            text = known.sub(lambda m: _placeholder(m.group(0)), text)
        return text

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None


REDACTOR = Redactor()


def register_secret(value: str | Secret) -> None:
    """Remove ``value`` from every later log line of this process."""
    REDACTOR.register(value)


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites a record so that no secret is in its text."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_npmguard_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not stop logging
            message = f"{record.msg!r} (unformattable log arguments)"
        record.msg = self.redactor.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        # The same record passes every handler; rewrite it once.
        record._npmguard_redacted = True
        return True


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file handler whose files are created with mode 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def log_path() -> Path:
    from npmguard.paths import state_dir

    return state_dir() / LOG_NAME


def setup_logging(
    level: str = "INFO", *, path: Path | None = None, stderr: bool = True
) -> Path:
    """Send the root logger to the rotating log file and stderr; return the file.

    Handlers set up earlier (the CLI's stderr handler) are removed so that
    nothing unfiltered stays attached.
    """
    path = path or log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        file_handler = _PrivateRotatingFileHandler(
            path, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT, encoding="utf-8"
        )
    except OSError as err:
        raise NpmguardError(
            f"cannot open the log file: {err.strerror or err}", path=path
        ) from err
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file_handler.setFormatter(logging.Formatter(FORMAT))
    handlers: list[logging.Handler] = [file_handler]
    if stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(STDERR_FORMAT))
        handlers.append(stream)
    for handler in handlers:
        install_redaction(handler)
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return path


def install_redaction(handler: logging.Handler) -> None:
    """Add the redacting filter to ``handler`` unless it has one already."""
    if not any(isinstance(f, RedactingFilter) for f in handler.filters):
        handler.addFilter(RedactingFilter())


def teardown_logging() -> None:
    """Close and remove the root logger's handlers (the daemon's last step)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
