"""``npmguard restore``: write keychain values back into the config files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from npmguard import audit
from npmguard.commands.common import (
    discover,
    display_path,
    per_file,
    print_messages,
)
from npmguard.commands.secure import secured_registries
from npmguard.inject.helpers import sync_token_helpers
from npmguard.migrate import (
    load_index,
    recover,
    restore_file,
    restore_orphans,
    state_lock,
)
from npmguard.npmrc.locate import user_config_path
from npmguard.vault import open_default_store


def run(args: argparse.Namespace) -> int:
    failed = False
    with state_lock():
        store = open_default_store()
        for message in recover(lambda: store):
            print(message)
        targets = _targets(args.paths)
        restored = 0
        for path in targets:
            result = per_file(restore_file, path, store, dry_run=args.dry_run)
            if result is None:
                failed = True
                continue
            for finding in result.moved:
                if not args.dry_run:
                    audit.note("restored", registry=finding.registry or "-",
                               kind=finding.kind, fingerprint=finding.fingerprint,
                               source=os.path.abspath(finding.path))
                verb = "would restore" if args.dry_run else "restored"
                print(f"{verb} {finding.kind} for {finding.registry or '-'} at "
                      f"{display_path(finding.path)}:{finding.line}")
            restored += len(result.moved)
        if not args.paths:
            done, warnings = restore_orphans(store, dry_run=args.dry_run)
            for message in done:
                print(message)
            for message in warnings:
                print(f"npmguard: {message}", file=sys.stderr)
            restored += len(done)
        if not args.dry_run:
            user = user_config_path(os.environ)
            if user.exists() and not print_messages(
                lambda: sync_token_helpers(user, secured_registries(), add=False)
            ):
                failed = True
    if restored == 0 and not failed:
        print("Nothing to restore.")
    return 2 if failed else 0


def _targets(paths: list[str]) -> list[Path]:
    """Return the files to restore: the given ones, else every secured file."""
    seen: set[str] = set()
    result: list[Path] = []

    def add(path: Path) -> None:
        key = os.path.realpath(path)
        if key not in seen and path.exists():
            seen.add(key)
            result.append(path)

    if paths:
        for text in paths:
            path = Path(text)
            if path.is_dir():
                for located in discover([text]).files:
                    if located.level == "project":
                        add(located.path)
            else:
                add(path)
        return result
    for meta in load_index().values():
        add(Path(str(meta["path"])))
    for located in discover([]).files:
        add(located.path)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="config files or directories to restore (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would be restored; change nothing")
