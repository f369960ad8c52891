"""``npmguard scan``: report every credential in the npm config files."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from npmguard.commands.common import discover, display_path
from npmguard.errors import ConfigFileError
from npmguard.files import ConfigFile, read_config
from npmguard.npmrc.credentials import Finding, find_credentials, synced_folder

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
    for located in discovery.files:
        try:
            config = read_config(located.path)
        except ConfigFileError as err:
            errors.append({"path": str(located.path), "line": err.line,
                           "message": str(err).split(": ", 1)[-1]})
            continue
        findings = find_credentials(located.path, config.document)
        flags = file_flags(config, findings)
        for finding in findings:
            finding.flags = list(flags)
            credentials.append(finding.to_json())
        files.append({"path": str(located.path), "level": located.level,
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


def file_flags(config: ConfigFile, findings: list[Finding]) -> list[str]:
    """Return the risk flags of a file: who can read it and where it is kept."""
    flags: list[str] = []
    if config.mode & stat.S_IROTH:
        flags.append("world-readable")
    elif config.mode & stat.S_IRGRP:
        flags.append("group-readable")
    if config.path.is_symlink():
        flags.append("symlink")
    synced = synced_folder(config.target)
    if synced:
        flags.append(f"synced:{synced}")
    repo = _git_root(config.target.parent)
    if repo is not None:
        if _git_tracked(repo, config.target):
            flags.append("git-tracked")
        values = [f.value.reveal() for f in findings if f.value is not None]
        if values and _in_git_history(repo, config.target, values):
            flags.append("git-history")
    return flags


def _git_root(directory: Path) -> Path | None:
    for candidate in (directory, *directory.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_tracked(repo: Path, path: Path) -> bool:
    result = _git(repo, "ls-files", "--error-unmatch", "--", os.path.relpath(path, repo))
    return result is not None and result.returncode == 0


def _in_git_history(repo: Path, path: Path, values: list[str]) -> bool:
    """Return True when any value appears in a committed version of ``path``.

    The values are searched for in git's output here, never passed to git,
    so that they stay out of every process's argv.
    """
    result = _git(repo, "log", "--all", "--format=", "-p", "--no-ext-diff",
                  "--no-textconv", "--", os.path.relpath(path, repo))
    if result is None or result.returncode != 0:
        return False
    history = result.stdout.decode("utf-8", "replace")
    return any(value in history for value in values)


def print_table(report: dict) -> None:  # type: ignore[type-arg]
    rows = [("FILE:LINE", "REGISTRY", "KIND", "STATE", "FINGERPRINT", "FLAGS")]
    for cred in report["credentials"]:
        state = cred["state"] + (" (shadowed)" if cred["shadowed"] else "")
        if cred["section"]:
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
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        print()
    print(
        f"{summary['files']} config file(s) read, {summary['credentials']} "
        f"credential line(s), {summary['plaintext']} in plaintext."
    )
    if summary["plaintext"]:
        print("Run `npmguard secure` to move the plaintext values into the keychain.")
