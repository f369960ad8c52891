"""pnpm token helpers: small scripts that print a registry's auth header.

pnpm 10 runs ``//host/:tokenHelper=/abs/path`` from the user's ``~/.npmrc``
only (it ignores the setting in project files), with no arguments, and sends
the script's stdout as the whole Authorization header. One script per
registry therefore names its registry itself.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from pathlib import Path

from npmguard import paths
from npmguard.errors import ConfigFileError
from npmguard.files import ConfigFile, read_config, replace_file, write_private
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
    )
    write_private(path, script.encode(), mode=0o700)
    return path


def _helper_pairs(document: Document) -> dict[str, tuple[int, int]]:
    """Return registry -> (marker line, helper line) for npmguard's helper lines."""
    pairs: dict[str, tuple[int, int]] = {}
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
    return pairs


def _foreign_helpers(document: Document, ours: dict[str, tuple[int, int]]) -> set[str]:
    own_lines = {n for pair in ours.values() for n in pair}
    found = set()
    for entry in document.entries:
        registry, kind = split_credential_key(entry.key)
        if kind == "tokenHelper" and registry and entry.line.number not in own_lines:
            found.add(registry)
    return found


def sync_token_helpers(user_config: Path, registries: set[str]) -> list[str]:
    """Make the user config's npmguard helper lines cover exactly ``registries``.

    New lines go at the top of the file so that no ``[section]`` captures
    them. A registry the user already gave a helper of their own is left
    alone. Returns a description of each change.
    """
    from npmguard.migrate import _rebuild

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
    to_add = sorted(wanted - set(ours))
    to_remove = sorted(set(ours) - wanted)
    if not to_add and not to_remove:
        for registry in wanted:
            write_helper_script(registry)
        return []

    newline = document.newline_style()
    removals: dict[int, str | None] = {}
    for registry in to_remove:
        for number in ours[registry]:
            removals[number] = None
        try:
            os.unlink(helper_script_path(registry))
        except FileNotFoundError:
            pass
    header = "".join(
        f"{HELPER_MARKER}{newline}{registry}:tokenHelper={write_helper_script(registry)}"
        f"{newline}"
        for registry in to_add
    )
    for registry in wanted:
        write_helper_script(registry)
    body = _rebuild(document, removals).decode("utf-8")
    if body.startswith("\ufeff"):
        new_text = "\ufeff" + header + body[1:]
    else:
        new_text = header + body
    if config is None:
        write_private(user_config, new_text.encode("utf-8"))
    else:
        replace_file(config, new_text.encode("utf-8"), "helpers")
    return [f"added pnpm token helper for {r} to {user_config}" for r in to_add] + [
        f"removed pnpm token helper for {r} from {user_config}" for r in to_remove
    ]
