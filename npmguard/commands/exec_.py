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

from npmguard.errors import UsageError
from npmguard.inject.resolve import Effective, exec_environment
from npmguard.migrate import pending_journal, recover
from npmguard.vault import open_default_store


def run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no command given; usage: npmguard exec [--registry URL] -- CMD ...")

    effective = Effective(os.environ, Path.cwd())
    for error in effective.errors:
        print(f"npmguard: {error}", file=sys.stderr)
    store = open_default_store() if (effective.secured() or pending_journal()) else None
    if pending_journal():
        recover(lambda: store)
        effective = Effective(os.environ, Path.cwd())
    variables = exec_environment(effective, store, args.registry) if store else {}  # type: ignore[arg-type]

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
