"""Where npm looks for config files, and a walk that finds project ones."""

from __future__ import annotations

import errno
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
        # npm resolves a relative setting against the working directory;
        # keep it absolute so that later runs elsewhere find the same file.
        return Path(os.path.abspath(os.path.expanduser(configured)))
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / CONFIG_NAME


def global_config_path(env: Mapping[str, str]) -> Path | None:
    """Return ``$PREFIX/etc/npmrc`` the way npm 11 derives it, or None.

    npm takes the prefix from ``npm_config_prefix`` or ``PREFIX``, else from
    where ``node`` is installed (two levels above the binary on POSIX).
    """
    configured = npm_env(env, "globalconfig")
    if configured:
        return Path(os.path.abspath(os.path.expanduser(configured)))
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
    the project: one with ``package.json`` or ``node_modules``.

    NOTE: npm 11 then goes on up to a ``package.json`` whose ``workspaces``
    include that directory and uses the workspace root instead; that step
    is not copied, so inside a workspace the member's own ``.npmrc`` is
    named where npm reads the root's.
    """
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
    """Yield every ``.npmrc`` file under ``roots``, skipping node_modules and .git.

    Directory symlinks are followed once each; a link into a tree already
    being walked is skipped. A ``.npmrc`` that is a directory is walked like
    any other, and a ``.npmrc`` symlink is yielded even when it is broken so
    that reading it reports why. Unreadable directories and symlink loops
    are appended to ``errors`` and the walk goes on.
    """
    seen_links: set[str] = set()
    walked: list[str] = []
    for root in roots:
        try:
            real_root = os.path.realpath(root, strict=True)
        except OSError as err:
            errors.append((root, _reason(err)))
            continue
        if not os.path.isdir(real_root):
            yield root
            continue
        walked.append(real_root.rstrip(os.sep) + os.sep)
        stack = [os.fspath(root)]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        name = entry.name
                        if name in SKIPPED_DIRS:
                            continue
                        # d_type answers these two without a stat call.
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_symlink():
                            if _follow_dir_link(entry.path, seen_links, walked, errors):
                                stack.append(entry.path)
                            elif name == CONFIG_NAME and not os.path.isdir(entry.path):
                                yield Path(entry.path)
                        elif name == CONFIG_NAME:
                            yield Path(entry.path)
            except OSError as err:
                errors.append((Path(directory), _reason(err)))


def _follow_dir_link(
    link: str,
    seen: set[str],
    walked: list[str],
    errors: list[tuple[Path, str]],
) -> bool:
    """Return True when the walk should enter the directory behind ``link``."""
    try:
        target = os.path.realpath(link, strict=True)
    except OSError as err:
        if err.errno == errno.ELOOP and os.path.basename(link) != CONFIG_NAME:
            errors.append((Path(link), _reason(err)))
        return False  # A dangling link is common and harmless.
    if not os.path.isdir(target):
        return False
    prefix = target.rstrip(os.sep) + os.sep
    if target in seen or any(prefix.startswith(root) for root in walked):
        return False
    seen.add(target)
    # The tree behind the link counts as walked, so later links into it
    # are not entered a second time.
    walked.append(prefix)
    return True


def _reason(err: OSError) -> str:
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
    where npmguard adds pnpm token helpers. Outside any project npm uses
    ``cwd`` itself as the project, and it skips a project file that is the
    user config (as in a home directory with ``node_modules``).
    """
    found: list[Located] = []
    root = project_root(cwd) or cwd
    user = user_config_path(env)
    project = root / CONFIG_NAME
    if os.path.abspath(project) != os.path.abspath(user) and (
        project.exists() or project.is_symlink()
    ):
        found.append(Located(project, "project"))
    found.append(Located(user, "user"))
    global_path = global_config_path(env)
    if global_path is not None and global_path.exists():
        found.append(Located(global_path, "global"))
    return found
