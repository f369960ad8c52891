"""Where npm looks for config files, and a walk that finds project ones."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SKIPPED_DIRS = frozenset({"node_modules", ".git"})
CONFIG_NAME = ".npmrc"


@dataclass(frozen=True)
class Located:
    """A config file path and the level npm reads it at."""

    path: Path
    level: str  # "project", "user" or "global"


def npm_env(env: Mapping[str, str], name: str) -> str | None:
    """Return npm's ``npm_config_NAME`` setting; npm matches the prefix in any case."""
    wanted = "npm_config_" + name
    found = None
    for key, value in env.items():
        if key.lower() == wanted and value:
            found = value
    return found


def user_config_path(env: Mapping[str, str]) -> Path:
    configured = npm_env(env, "userconfig")
    if configured:
        return Path(os.path.expanduser(configured))
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / CONFIG_NAME


def global_config_path(env: Mapping[str, str]) -> Path | None:
    """Return ``$PREFIX/etc/npmrc`` the way npm 11 derives it, or None.

    npm takes the prefix from ``npm_config_prefix`` or ``PREFIX``, else from
    where ``node`` is installed (two levels above the binary on POSIX).
    """
    configured = npm_env(env, "globalconfig")
    if configured:
        return Path(os.path.expanduser(configured))
    prefix = npm_env(env, "prefix") or env.get("PREFIX")
    if not prefix:
        node = shutil.which("node", path=env.get("PATH"))
        if node is None:
            return None
        node_dir = Path(os.path.realpath(node)).parent
        prefix = str(node_dir if os.name == "nt" else node_dir.parent)
    return Path(os.path.expanduser(prefix)) / "etc" / "npmrc"


def project_root(start: Path) -> Path | None:
    """Return the nearest directory at or above ``start`` that npm treats as
    the project: one with ``package.json`` or ``node_modules``."""
    current = start.resolve()
    for directory in (current, *current.parents):
        if (directory / "package.json").exists() or (
            directory / "node_modules"
        ).is_dir():
            return directory
    return None


def walk_project_configs(
    roots: list[Path], errors: list[tuple[Path, str]]
) -> Iterator[Path]:
    """Yield every ``.npmrc`` under ``roots``, skipping node_modules and .git.

    Directory symlinks are followed once each; a link back into a tree
    already being walked is skipped. Unreadable directories and broken
    links are appended to ``errors`` and the walk goes on.
    """
    seen_links: set[str] = set()
    walked_roots: list[str] = []
    for root in roots:
        try:
            real_root = os.path.realpath(root, strict=True)
        except OSError as err:
            errors.append((root, _reason(err)))
            continue
        if os.path.isfile(real_root):
            yield root
            continue
        walked_roots.append(real_root.rstrip(os.sep) + os.sep)
        stack = [str(root)]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        name = entry.name
                        if name == CONFIG_NAME:
                            if entry.is_symlink() or entry.is_file():
                                yield Path(entry.path)
                            continue
                        if name in SKIPPED_DIRS:
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_symlink():
                            target = _follow_dir_link(
                                entry.path, seen_links, walked_roots, errors
                            )
                            if target is not None:
                                stack.append(entry.path)
            except OSError as err:
                errors.append((Path(directory), _reason(err)))


def _follow_dir_link(
    link: str,
    seen: set[str],
    walked_roots: list[str],
    errors: list[tuple[Path, str]],
) -> str | None:
    try:
        target = os.path.realpath(link, strict=True)
    except OSError as err:
        if getattr(err, "errno", None) is not None and "loop" in _reason(err):
            errors.append((Path(link), _reason(err)))
        return None  # A dangling link is common and harmless.
    if not os.path.isdir(target):
        return None
    prefix = target.rstrip(os.sep) + os.sep
    if target in seen or any(prefix.startswith(root) for root in walked_roots):
        return None
    seen.add(target)
    return target


def _reason(err: OSError) -> str:
    import errno

    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOENT:
        return "not found"
    return err.strerror or type(err).__name__


def standard_configs(env: Mapping[str, str], cwd: Path) -> list[Located]:
    """Return the project, user and global config paths npm would read from cwd.

    Files that do not exist are left out, except the user config, which is
    where npmguard adds pnpm token helpers.
    """
    found: list[Located] = []
    root = project_root(cwd)
    if root is not None and (root / CONFIG_NAME).exists():
        found.append(Located(root / CONFIG_NAME, "project"))
    found.append(Located(user_config_path(env), "user"))
    global_path = global_config_path(env)
    if global_path is not None and global_path.exists():
        found.append(Located(global_path, "global"))
    return found
