"""Config-file discovery and error reporting shared by scan, secure and restore."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from npmguard.errors import NpmguardError, VaultLockedError, VaultUnavailableError
from npmguard.npmrc.locate import (
    Located,
    global_config_path,
    standard_configs,
    user_config_path,
    walk_project_configs,
)


@dataclass
class Discovery:
    files: list[Located] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)


def discover(paths: list[str]) -> Discovery:
    """Return the user and global configs plus project configs under ``paths``.

    With no paths, the project config npm would read from the current
    directory is included instead. Each file appears once, by real path.
    """
    env = os.environ
    found = Discovery()
    seen: set[str] = set()

    def add(path: Path, level: str) -> None:
        key = os.path.realpath(path)
        if key in seen:
            return
        seen.add(key)
        found.files.append(Located(path, level))

    user = user_config_path(env)
    if user.exists() or user.is_symlink():
        add(user, "user")
    global_path = global_config_path(env)
    if global_path is not None and global_path.exists():
        add(global_path, "global")
    if paths:
        roots = [Path(p) for p in paths]
        for path in walk_project_configs(roots, found.errors):
            add(path, "project")
    else:
        for located in standard_configs(env, Path.cwd()):
            if located.level == "project":
                add(located.path, "project")
    return found


def display_path(path: Path) -> str:
    """Show paths under HOME with ``~`` so tables stay narrow."""
    home = os.environ.get("HOME")
    text = str(path)
    if home and (text == home or text.startswith(home.rstrip("/") + "/")):
        return "~" + text[len(home.rstrip("/")):]
    return text


_P = ParamSpec("_P")
_T = TypeVar("_T")


def per_file(
    step: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T | None:
    """Run one file's ``step``; print its error and return None if it fails.

    A locked or unavailable vault is re-raised instead, because every other
    file would fail the same way and one message is enough.
    """
    try:
        return step(*args, **kwargs)
    except (VaultLockedError, VaultUnavailableError):
        raise
    except NpmguardError as err:
        print(f"npmguard: {err}", file=sys.stderr)
        return None


def print_messages(produce: Callable[[], Iterable[str]]) -> bool:
    """Print each message from ``produce``; return False if it raises.

    The error goes to stderr, after any messages printed before it.
    """
    try:
        for message in produce():
            print(message)
    except NpmguardError as err:
        print(f"npmguard: {err}", file=sys.stderr)
        return False
    return True
