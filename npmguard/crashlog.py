"""Crash logs for unexpected errors, written without exception messages.

An exception's message can quote data it choked on, and that data may be a
token, so the log keeps the exception type and the stack frames only.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from npmguard import paths
from npmguard.files import write_private


def write_crash_log(err: BaseException) -> Path:
    frames = "".join(traceback.format_tb(err.__traceback__))
    text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {type(err).__name__}\n{frames}"
    path = paths.state_dir() / "crash.log"
    try:
        write_private(path, text.encode())
    except OSError:
        return Path("(crash log could not be written)")
    return path
