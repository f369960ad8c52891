"""pnpm token helpers: small scripts that print a registry's auth header.

pnpm 10 runs ``//host/:tokenHelper=/abs/path`` from the user's ``~/.npmrc``
only (it ignores the setting in project files), with no arguments, and sends
the script's stdout as the whole Authorization header. One script per
registry therefore names its registry itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from npmguard import paths
from npmguard.errors import ConfigFileError
from npmguard.files import (
    ConfigFile,
    ensure_unchanged,
    fsync_dir,
    read_config,
    write_private,
)
from npmguard.npmrc.credentials import HELPER_MARKER
from npmguard.npmrc.ini import Document, _parse_entry
from npmguard.npmrc.nerf import split_credential_key


def helper_script_path(registry: str) -> Path:
    digest = hashlib.sha256(registry.encode()).hexdigest()[:12]
    return paths.data_dir() / "bin" / f"token-helper-{digest}"


def write_helper_script(registry: str) -> Path:
    """Write (or refresh) the helper script for ``registry``; return its path."""
    path = helper_script_path(registry)
    command = [sys.executable, "-m", "npmguard", "token", "--registry", registry,
               "--header"]
    script = (
        "#!/bin/sh\n"
        f"# pnpm token helper for {registry}, written by npmguard.\n"
        f"exec {shlex.join(command)}\n"
    ).encode()
    try:
        unchanged = path.read_bytes() == script and path.stat().st_mode & 0o777 == 0o700
    except OSError:
        unchanged = False
    if not unchanged:
        write_private(path, script, mode=0o700)
    return path


def _helper_pairs(document: Document) -> dict[str, tuple[int, ...]]:
    """Return registry -> line numbers of npmguard's helper lines (and marker)."""
    pairs: dict[str, tuple[int, ...]] = {}
    lines = document.lines
    for i, line in enumerate(lines[:-1]):
        if document.line_text(line) != HELPER_MARKER:
            continue
        entry = _parse_entry(document.line_text(lines[i + 1]), lines[i + 1], None)
        if entry is None:
            continue
        registry, kind = split_credential_key(entry.key)
        if kind == "tokenHelper" and registry:
            pairs[registry] = (line.number, lines[i + 1].number)
    # npm's own writer (``npm config set``, ``npm login``) drops comments but
    # keeps the helper line; it is still ours when it names our script.
    own_lines = {n for pair in pairs.values() for n in pair}
    for entry in document.entries:
        registry, kind = split_credential_key(entry.key)
        if (
            kind == "tokenHelper"
            and registry
            and registry not in pairs
            and entry.line.number not in own_lines
            and entry.section is None
            and entry.value == str(helper_script_path(registry))
        ):
            pairs[registry] = (entry.line.number,)
    return pairs


def _foreign_helpers(
    document: Document, ours: dict[str, tuple[int, ...]]
) -> set[str]:
    own_lines = {n for pair in ours.values() for n in pair}
    found = set()
    for entry in document.entries:
        registry, kind = split_credential_key(entry.key)
        if kind == "tokenHelper" and registry and entry.line.number not in own_lines:
            found.add(registry)
    return found


def sync_token_helpers(
    user_config: Path, registries: set[str], *, add: bool = True
) -> list[str]:
    """Make the user config's npmguard helper lines cover exactly ``registries``.

    With ``add=False`` lines are only removed, never added: ``restore`` uses
    that so that a ``secure --token-helper never`` run stays without them.

    New lines go at the top of the file so that no ``[section]`` captures
    them. A registry the user already gave a helper of their own is left
    alone. A user config that npmguard created for its lines is removed
    again once it has none. Returns a description of each change.
    """
    from npmguard.migrate import (
        _rebuild,
        create_journaled,
        replace_journaled,
        state_lock,
    )

    with state_lock():
        try:
            config: ConfigFile | None = read_config(user_config)
        except ConfigFileError:
            if user_config.exists() or user_config.is_symlink():
                raise
            config = None
        document = config.document if config else Document("")
        ours = _helper_pairs(document)
        foreign = _foreign_helpers(document, ours)
        wanted = {r for r in registries if r not in foreign}
        if not add:
            wanted &= set(ours)
        to_add = sorted(wanted - set(ours))
        to_remove = sorted(set(ours) - wanted)
        # Scripts first: a config line must never name a missing script.
        scripts = {registry: write_helper_script(registry) for registry in wanted}
        if not to_add and not to_remove:
            return []

        newline = document.newline_style()
        removals: dict[int, str | None] = {
            number: None for registry in to_remove for number in ours[registry]
        }
        header = "".join(
            f"{HELPER_MARKER}{newline}{registry}:tokenHelper={scripts[registry]}"
            f"{newline}"
            for registry in to_add
        )
        body = _rebuild(document, removals).decode("utf-8")
        if body.startswith("\ufeff"):
            new_text = "\ufeff" + header + body[1:]
        else:
            new_text = header + body

        created = _was_created(user_config) and not user_config.is_symlink()
        # Whatever the file holds besides npmguard's helper lines is the user's.
        user_part = _rebuild(document, {n: None for p in ours.values() for n in p})
        if config is None:
            _remember_created(user_config)
            create_journaled(user_config, new_text.encode("utf-8"))
        elif not new_text and created:
            ensure_unchanged(config)
            os.unlink(config.target)
            fsync_dir(config.target.parent)
            _forget_created(user_config)
        else:
            if created and user_part:
                # The user wrote to the file that npmguard made: it is theirs now.
                _forget_created(user_config)
            replace_journaled(config, new_text.encode("utf-8"))

        for registry in to_remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(helper_script_path(registry))
    return [f"added pnpm token helper for {r} to {user_config}" for r in to_add] + [
        f"removed pnpm token helper for {r} from {user_config}" for r in to_remove
    ]


def _created_files() -> list[str]:
    try:
        data = json.loads(paths.created_files_path().read_bytes())
    except (OSError, ValueError):
        return []
    return [str(item) for item in data] if isinstance(data, list) else []


def _was_created(path: Path) -> bool:
    return str(path) in _created_files()


def _remember_created(path: Path) -> None:
    # Written before the file exists: a crash in between leaves a record of
    # a file never made, which only matters if the user later makes it empty.
    created = _created_files()
    if str(path) not in created:
        created.append(str(path))
        write_private(paths.created_files_path(), json.dumps(created).encode())


def _forget_created(path: Path) -> None:
    created = [item for item in _created_files() if item != str(path)]
    write_private(paths.created_files_path(), json.dumps(created).encode())
