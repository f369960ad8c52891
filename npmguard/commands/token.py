"""``npmguard token``: print one registry credential for a helper or script.

pnpm runs this through the token helper for every install, so it first
asks the daemon, which has the keychain open, and imports the config
parser and the vault only when no daemon is running.

Through the daemon, a job gets a token minted for it where the registry
can mint (``npmguard.inject.mint``): the daemon works out the job's scope
from the helper's parent processes (pnpm and its command line), so this
client sends nothing more than before. With no daemon running the stored
token is handed out: a one-off process could not revoke a minted token
when the job ends, and a token the registry never expires would outlive it.
"""

from __future__ import annotations

import argparse
import os
import sys


def run(args: argparse.Namespace) -> int:
    from npmguard.daemon import client

    reply = client.ask(
        client.credential_request("token", args.registry, header=args.header)
    )
    if reply is not None:
        return client.print_token(reply)
    return _run_direct(args)


def _run_direct(args: argparse.Namespace) -> int:
    """Resolve the credential in this process, reading the vault directly."""
    from pathlib import Path

    from npmguard.inject.resolve import Effective, resolve
    from npmguard.migrate import pending_journal, recover
    from npmguard.vault import open_default_store
    from npmguard.vault.base import LazyStore

    effective = Effective(os.environ, Path.cwd())
    if pending_journal():
        recover(open_default_store)
    registry = args.registry or effective.default_registry()
    # The keychain opens only when a secured value is actually needed.
    store = LazyStore(open_default_store)
    credential = resolve(registry, effective, store, os.environ)
    if credential.kind == "_authToken":
        import logging

        logging.getLogger(__name__).info(
            "%s: handing out the stored token (fingerprint %s): no daemon is "
            "running to mint one for the job and revoke it afterwards",
            credential.registry, credential.value.fingerprint,
        )
    value = credential.auth_header() if args.header else credential.value
    from npmguard import audit

    audit.note("handed-out", registry=credential.registry,
               fingerprint=credential.value.fingerprint, minted=False,
               command="npmguard token")
    sys.stdout.write(value.reveal() + "\n")
    sys.stdout.flush()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", metavar="URL",
        help="registry URL or //host/path/ key (default: npm's registry setting)",
    )
    parser.add_argument("--header", action="store_true",
                        help="print the whole Authorization header, as pnpm expects")
