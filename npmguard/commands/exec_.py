"""``npmguard exec -- CMD``: run CMD with registry credentials in its environment.

The credentials go into the child's environment as npm's own
``npm_config_//host/:_authToken`` settings, never into argv. If any needed
value cannot be read, the command is not started.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from npmguard.errors import NpmguardError, UsageError


def run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(
            "no command given; usage: npmguard exec [--registry URL] -- CMD ..."
        )

    variables = _variables_from_daemon(args.registry)
    if variables is None:
        variables = _variables_direct(args.registry)

    env = dict(os.environ)
    env.update(variables)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        try:
            os.execvpe(argv[0], argv, env)
        except FileNotFoundError:
            print(f"npmguard: command not found: {argv[0]}", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"npmguard: permission denied: {argv[0]}", file=sys.stderr)
            return 126
    try:
        return subprocess.call(argv, env=env)
    except FileNotFoundError:
        print(f"npmguard: command not found: {argv[0]}", file=sys.stderr)
        return 127


def _variables_from_daemon(registry: str | None) -> dict[str, str] | None:
    """Return the variables the daemon hands out, or None when none is running."""
    from npmguard.daemon import client

    reply = client.ask(client.credential_request("env", registry))
    if reply is None:
        return None
    if not reply.get("ok"):
        raise DaemonError(client.reply_error(reply))
    for warning in reply.get("warnings") or []:
        print(f"npmguard: {warning}", file=sys.stderr)
    variables = reply.get("variables") or {}
    return {str(k): str(v) for k, v in variables.items()}


def _variables_direct(registry: str | None) -> dict[str, str]:
    """Resolve the variables in this process, reading the vault directly."""
    from npmguard.inject.resolve import Effective, exec_environment
    from npmguard.migrate import pending_journal, recover
    from npmguard.vault import open_default_store

    effective = Effective(os.environ, Path.cwd())
    for error in effective.errors:
        print(f"npmguard: {error}", file=sys.stderr)
    if not (effective.secured() or pending_journal()):
        return {}
    store = open_default_store()
    if pending_journal():
        recover(lambda: store)
        effective = Effective(os.environ, Path.cwd())
    return exec_environment(effective, store, registry)


class DaemonError(NpmguardError):
    """The daemon replied with an error; the command is not run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="URL",
                        help="inject only this registry's credential")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
