"""Where npmguard keeps its own files (never secrets)."""

from __future__ import annotations

import os
from pathlib import Path

APP = "npmguard"


def state_dir() -> Path:
    """Journal, credential index and logs: ``$XDG_STATE_HOME/npmguard`` on Linux."""
    override = os.environ.get("NPMGUARD_STATE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_state_dir(APP, appauthor=False))


def data_dir() -> Path:
    """Generated token-helper scripts: ``$XDG_DATA_HOME/npmguard`` on Linux."""
    override = os.environ.get("NPMGUARD_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def journal_dir() -> Path:
    return state_dir() / "journal"


def index_path() -> Path:
    return state_dir() / "credentials.json"


def created_files_path() -> Path:
    """Files npmguard created (a user config made only for helper lines)."""
    return state_dir() / "created.json"
