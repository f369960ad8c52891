"""``npmguard secure``: move plaintext credentials into the keychain."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from npmguard import audit
from npmguard.commands.common import (
    discover,
    display_path,
    per_file,
    print_messages,
)
from npmguard.errors import NpmguardError
from npmguard.files import read_config
from npmguard.inject.helpers import sync_token_helpers
from npmguard.migrate import load_index, recover, secure_file, state_lock
from npmguard.npmrc.credentials import find_credentials
from npmguard.npmrc.locate import user_config_path
from npmguard.vault import open_default_store

# pnpm's token helper can hand out these kinds as an Authorization header.
HELPER_KINDS = ("_authToken", "_auth", "_password")


def run(args: argparse.Namespace) -> int:
    discovery = discover(args.paths)
    failed = False
    for path, message in discovery.errors:
        print(f"npmguard: {path}: {message}", file=sys.stderr)
        failed = True

    with state_lock():
        store = None if args.dry_run else open_default_store()
        if store is not None:
            for message in recover(lambda: store):
                print(message)
        moved = 0
        for located in discovery.files:
            result = per_file(
                secure_file,
                located.path,
                store,  # type: ignore[arg-type]
                dry_run=args.dry_run,
            )
            if result is None:
                failed = True
                continue
            for finding in result.moved:
                if not args.dry_run:
                    audit.note("secured", registry=finding.registry or "-",
                               kind=finding.kind, fingerprint=finding.fingerprint,
                               source=os.path.abspath(finding.path))
                verb = "would secure" if args.dry_run else "secured"
                print(
                    f"{verb} {finding.kind} for {finding.registry or '-'} at "
                    f"{display_path(finding.path)}:{finding.line} "
                    f"(fingerprint {finding.fingerprint})"
                )
            moved += len(result.moved)
            _warn_unmovable(located.path, bool(result.moved))

        if (
            not args.dry_run
            and _want_helpers(args.token_helper)
            and not print_messages(
                lambda: sync_token_helpers(
                    user_config_path(os.environ), secured_registries()
                )
            )
        ):
            failed = True

    if moved == 0 and not failed:
        print("No plaintext credentials found; nothing to do.")
    return 2 if failed else 0


def _warn_unmovable(path: Path, changed: bool) -> None:
    """Say what ``secure`` could not fix in ``path``: URL passwords, hard links."""
    try:
        config = read_config(path)
    except NpmguardError:
        return
    for finding in find_credentials(path, config.document):
        if finding.is_exposed and not finding.is_movable:
            print(
                f"npmguard: {display_path(path)}:{finding.line}: {finding.detail}",
                file=sys.stderr,
            )
    links = os.stat(config.target).st_nlink
    if changed and links > 1:
        print(
            f"npmguard: {display_path(path)}: the file had {links} hard links; "
            "the other names still point at the old content with the plaintext, "
            "so delete or replace them",
            file=sys.stderr,
        )


def _want_helpers(mode: str) -> bool:
    if mode == "never":
        return False
    return mode == "always" or shutil.which("pnpm") is not None


def secured_registries() -> set[str]:
    return {
        str(meta["registry"])
        for meta in load_index().values()
        if str(meta.get("registry", "")).startswith("//")
        and meta.get("kind") in HELPER_KINDS
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="directories to search for project .npmrc files")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would move; change nothing")
    parser.add_argument(
        "--token-helper", choices=("auto", "always", "never"), default="auto",
        help="add pnpm token helpers to the user config (auto: when pnpm is on PATH)",
    )
