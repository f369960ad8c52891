"""``npmguard scan``: report every credential in the npm config files."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

from npmguard.commands.common import discover, display_path
from npmguard.errors import ConfigFileError
from npmguard.files import ConfigFile, read_config
from npmguard.npmrc.credentials import (
    SECRET_KINDS,
    Finding,
    find_credentials,
    is_reference,
    synced_folder,
)
from npmguard.npmrc.ini import JS_WHITESPACE, Line, _parse_entry
from npmguard.npmrc.nerf import split_credential_key

SCHEMA_VERSION = 1


def run(args: argparse.Namespace) -> int:
    report = build_report(args.paths)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print_table(report)
    for error in report["errors"]:
        where = error["path"] + (f":{error['line']}" if error["line"] else "")
        print(f"npmguard: {where}: {error['message']}", file=sys.stderr)
    if report["errors"]:
        return 2
    return 1 if report["summary"]["plaintext"] else 0


def build_report(paths: list[str]) -> dict:  # type: ignore[type-arg]
    discovery = discover(paths)
    files: list[dict[str, object]] = []
    credentials: list[dict[str, object]] = []
    errors: list[dict[str, object]] = [
        {"path": str(path), "line": None, "message": message}
        for path, message in discovery.errors
    ]
    read: list[tuple[str, ConfigFile, list[Finding]]] = []
    for located in discovery.files:
        try:
            config = read_config(located.path)
        except ConfigFileError as err:
            # args[0] is the message without the "path:line: " prefix.
            errors.append({"path": str(located.path), "line": err.line,
                           "message": str(err.args[0])})
            continue
        read.append((located.level, config, find_credentials(located.path,
                                                             config.document)))
    git = _git_facts([(config, findings) for _, config, findings in read])
    for level, config, findings in read:
        flags = file_flags(config, findings, git)
        for finding in findings:
            finding.flags = list(flags)
            credentials.append(finding.to_json())
        files.append({"path": str(config.path), "level": level,
                      "credentials": len(findings), "flags": flags})
    plaintext = sum(1 for c in credentials if c["state"] == "plaintext")
    return {
        "version": SCHEMA_VERSION,
        "files": files,
        "credentials": credentials,
        "errors": errors,
        "summary": {
            "files": len(files),
            "credentials": len(credentials),
            "plaintext": plaintext,
            "errors": len(errors),
        },
    }


def file_flags(
    config: ConfigFile,
    findings: list[Finding],
    git: dict[Path, set[str]] | None = None,
) -> list[str]:
    """Return the risk flags of a file: who can read it and where it is kept.

    ``git`` maps real file paths to their git flags (``_git_facts``); when
    it is None this file's repository is asked on its own.
    """
    flags: list[str] = []
    try:
        if os.stat(config.target).st_nlink > 1:
            # An atomic rewrite replaces one name only; other links keep
            # the old content.
            flags.append("hard-linked")
    except OSError:
        pass
    if config.mode & stat.S_IROTH:
        flags.append("world-readable")
    elif config.mode & stat.S_IRGRP:
        flags.append("group-readable")
    if config.path.is_symlink():
        flags.append("symlink")
    synced = synced_folder(config.target)
    if synced:
        flags.append(f"synced:{synced}")
    if git is None:
        git = _git_facts([(config, findings)])
    found = git.get(config.target, set())
    flags.extend(flag for flag in ("git-tracked", "git-history") if flag in found)
    return flags


def _git_root(directory: Path, cache: dict[Path, Path | None] | None = None) -> (
    Path | None
):
    """Return the nearest directory at or above ``directory`` with a ``.git``."""
    cache = {} if cache is None else cache
    walked: list[Path] = []
    found: Path | None = None
    for candidate in (directory, *directory.parents):
        if candidate in cache:
            found = cache[candidate]
            break
        walked.append(candidate)
        if (candidate / ".git").exists():
            found = candidate
            break
    for candidate in walked:
        cache[candidate] = found
    return found


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    # Imported here: most scans meet no repository, and the import costs
    # a few milliseconds of every run.
    import subprocess

    # The repository may be anyone's: keep its fsmonitor hook from running,
    # and keep paths unquoted so that they can be matched.
    command = ["git", "-C", str(repo), "-c", "core.fsmonitor=false",
               "-c", "core.quotePath=false", *args]
    try:
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            timeout=60, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_facts(
    configs: list[tuple[ConfigFile, list[Finding]]],
) -> dict[Path, set[str]]:
    """Return ``git-tracked``/``git-history`` flags by real path, one repo at a time.

    Each repository is asked twice in all, whatever the number of files:
    ``ls-files`` for what is tracked and ``log -p`` for what was committed.
    The git processes run a few at a time, as they mostly wait on disk.
    """
    by_repo: dict[Path, list[tuple[ConfigFile, list[Finding]]]] = {}
    roots: dict[Path, Path | None] = {}
    for config, findings in configs:
        repo = _git_root(config.target.parent, roots)
        if repo is not None:
            by_repo.setdefault(repo, []).append((config, findings))
    if not by_repo:
        return {}
    # Imported here for the same reason as subprocess in _git.
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (repo, {os.path.relpath(c.target, repo): (c, f) for c, f in members})
        for repo, members in by_repo.items()
    ]
    with ThreadPoolExecutor(max_workers=min(8, 2 * len(jobs))) as pool:
        tracked_jobs = [pool.submit(_git_tracked, r, list(n)) for r, n in jobs]
        added_jobs = [pool.submit(_committed_lines, r, list(n)) for r, n in jobs]
    facts: dict[Path, set[str]] = {}
    for (_, relative), tracked_job, added_job in zip(
        jobs, tracked_jobs, added_jobs, strict=True
    ):
        tracked = tracked_job.result()
        added = added_job.result()
        for name, (config, findings) in relative.items():
            flags = facts.setdefault(config.target, set())
            if name in tracked:
                flags.add("git-tracked")
            values = [f.value.reveal() for f in findings if f.value is not None]
            if _has_secret(added.get(name, []), values):
                flags.add("git-history")
    return facts


def _git_tracked(repo: Path, names: list[str]) -> set[str]:
    result = _git(repo, "ls-files", "-z", "--", *names)
    if result is None or result.returncode != 0:
        return set()
    return set(result.stdout.decode("utf-8", "replace").split("\0")) - {""}


def _committed_lines(repo: Path, names: list[str]) -> dict[str, list[str]]:
    """Return, per file, every line any commit on any ref added to it.

    The values are searched for in git's output here, never passed to git,
    so that they stay out of every process's argv.
    """
    result = _git(repo, "log", "--all", "--format=", "-p", "--no-ext-diff",
                  "--no-textconv", "--no-color", "--", *names)
    if result is None or result.returncode != 0:
        return {}
    added: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("+++ "):
            target = line[4:]
            current = (
                added.setdefault(target[2:], []) if target.startswith("b/") else None
            )
        elif line.startswith("diff --git "):
            current = None
        elif current is not None and line.startswith("+"):
            current.append(line[1:])
    return added


def _has_secret(lines: list[str], values: list[str]) -> bool:
    """Return True when committed ``lines`` hold a secret, now or in the past.

    A line counts when it sets a secret kind to a value that is not empty
    and not only environment references, or contains a value in ``values``.
    """
    for text in lines:
        if any(value in text for value in values):
            return True
        stripped = text.lstrip(JS_WHITESPACE)
        if not stripped or stripped[0] in ";#[":
            continue
        entry = _parse_entry(text, Line(0, 0, len(text), ""), None)
        if entry is None or not isinstance(entry.value, str):
            continue
        kind = split_credential_key(entry.key)[1]
        value = entry.value.strip(JS_WHITESPACE)
        if kind in SECRET_KINDS and value and not is_reference(value):
            return True
    return False


def print_table(report: dict) -> None:  # type: ignore[type-arg]
    rows = [("FILE:LINE", "REGISTRY", "KIND", "STATE", "FINGERPRINT", "FLAGS")]
    for cred in report["credentials"]:
        state = cred["state"] + (" (shadowed)" if cred["shadowed"] else "")
        if cred["section"] is not None:
            state += f" [in section {cred['section']}]"
        rows.append((
            f"{display_path(Path(cred['path']))}:{cred['line']}",
            cred["registry"] or "-",
            cred["kind"],
            state,
            cred["fingerprint"] or "-",
            ",".join(cred["flags"]) or "-",
        ))
    summary = report["summary"]
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = zip(row, widths, strict=True)
            print("  ".join(cell.ljust(width) for cell, width in cells).rstrip())
        print()
    # A file can hold no credential now and still have one in its history.
    for entry in report["files"]:
        if "git-history" in entry["flags"] and not entry["credentials"]:
            print(f"{display_path(Path(entry['path']))}: a credential is in its "
                  "git history; rotate it, since removing it from the file "
                  "does not remove it from the commits")
    print(
        f"{summary['files']} config file(s) read, {summary['credentials']} "
        f"credential line(s), {summary['plaintext']} in plaintext."
    )
    if summary["plaintext"]:
        print("Run `npmguard secure` to move the plaintext values into the keychain.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="directories to search for project .npmrc files")
    parser.add_argument("--json", action="store_true", help="print stable JSON")
