"""Which stored tokens count as leaked, and why.

Moving a token into the vault does not undo where it has been. A stored
token counts as exposed when:

- the daemon or ``secure`` saw it in plaintext again after it was secured
  (the index entry's ``exposed`` field);
- a config file npm reads, or one under the watched roots, contains it
  in plaintext now;
- the file it was secured from was readable by other users or kept in a
  synced folder (it was there in plaintext before);
- any commit on any ref of that file's git repository added it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from npmguard.lifecycle import Managed
from npmguard.npmrc.credentials import synced_folder
from npmguard.vault.base import CredentialStore


def exposed(
    entries: list[Managed], store: CredentialStore, roots: list[str]
) -> dict[str, str]:
    """Return the reason each exposed entry is exposed, by vault name."""
    from npmguard.commands.common import display_path
    from npmguard.commands.scan import build_report

    reasons: dict[str, str] = {}
    for entry in entries:
        if entry.meta.get("exposed"):
            reasons[entry.name] = str(entry.meta["exposed"])

    by_fingerprint = {e.fingerprint: e for e in entries if e.fingerprint}
    for credential in build_report(roots)["credentials"]:
        entry = by_fingerprint.get(str(credential.get("fingerprint")))
        if entry is not None and credential["state"] == "plaintext":
            reasons.setdefault(
                entry.name,
                f"in plaintext at {display_path(Path(credential['path']))}:"
                f"{credential['line']}",
            )

    for entry in entries:
        if entry.name in reasons:
            continue
        source = entry.meta.get("target") or entry.meta.get("path")
        if not isinstance(source, str):
            continue
        reason = _source_exposure(Path(source), entry, store)
        if reason:
            reasons[entry.name] = reason
    return reasons


def _source_exposure(path: Path, entry: Managed, store: CredentialStore) -> str:
    """Say how the file a token was secured from exposed it, or return ""."""
    from npmguard.commands.common import display_path
    from npmguard.commands.scan import _committed_lines, _git_root

    if entry.meta.get("origin") == "login" or entry.rotated is not None:
        # This value came from the registry and never was in the file.
        return ""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        who = "all users" if mode & stat.S_IROTH else "its group"
        return f"{display_path(path)} is readable by {who}"
    synced = synced_folder(path)
    if synced:
        return f"{display_path(path)} is in a {synced} folder"
    repo = _git_root(path.parent)
    if repo is None:
        return ""
    value = store.get(entry.name)
    if value is None:
        return ""
    relative = os.path.relpath(path, repo)
    added = _committed_lines(repo, [relative]).get(relative, [])
    if any(value.reveal() in line for line in added):
        return f"committed to the git repository at {display_path(repo)}"
    return ""
