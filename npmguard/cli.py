"""Command-line entry point: parse arguments, dispatch, map errors to exit codes.

Exit codes: 0 success (for ``scan``: no plaintext found), 1 plaintext found
by ``scan``, 2 a user-facing error, 3 an unexpected error (the traceback
goes to the crash log), 130 interrupted. ``exec`` exits with its command's
code. Command modules are imported only when chosen so that ``npmguard
token``, which pnpm runs on every request, starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from npmguard import __version__
from npmguard.errors import NpmguardError

COMMANDS = {
    "scan": "npmguard.commands.scan",
    "secure": "npmguard.commands.secure",
    "restore": "npmguard.commands.restore",
    "exec": "npmguard.commands.exec_",
    "token": "npmguard.commands.token",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npmguard",
        description="Keep npm registry credentials in the OS keychain, not in files.",
    )
    parser.add_argument("--version", action="version", version=f"npmguard {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log more to stderr (-v: INFO, -vv: DEBUG); values are never logged",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    scan = sub.add_parser("scan", help="report credentials in npm config files")
    scan.add_argument("paths", nargs="*", metavar="PATH",
                      help="directories to search for project .npmrc files")
    scan.add_argument("--json", action="store_true", help="print stable JSON")

    secure = sub.add_parser("secure", help="move plaintext credentials into the keychain")
    secure.add_argument("paths", nargs="*", metavar="PATH",
                        help="directories to search for project .npmrc files")
    secure.add_argument("--dry-run", action="store_true",
                        help="show what would move; change nothing")
    secure.add_argument(
        "--token-helper", choices=("auto", "always", "never"), default="auto",
        help="add pnpm token helpers to the user config (auto: when pnpm is on PATH)",
    )

    restore = sub.add_parser("restore", help="put keychain values back into the files")
    restore.add_argument("paths", nargs="*", metavar="PATH",
                         help="config files or directories to restore (default: all)")
    restore.add_argument("--dry-run", action="store_true",
                         help="show what would be restored; change nothing")

    exec_ = sub.add_parser(
        "exec", help="run a command with registry credentials in its environment"
    )
    exec_.add_argument("--registry", metavar="URL",
                       help="inject only this registry's credential")
    exec_.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    token = sub.add_parser("token", help="print one registry token (credential helper)")
    token.add_argument("--registry", metavar="URL",
                       help="registry URL or //host/path/ key (default: npm's registry)")
    token.add_argument("--header", action="store_true",
                       help="print the whole Authorization header, as pnpm expects")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="npmguard: %(levelname)s: %(message)s")
    try:
        module = importlib.import_module(COMMANDS[args.command])
        return int(module.run(args))
    except NpmguardError as err:
        print(f"npmguard: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("npmguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as err:  # noqa: BLE001 - last-resort handler
        from npmguard.crashlog import write_crash_log

        where = write_crash_log(err)
        print(
            f"npmguard: unexpected error ({type(err).__name__}); details in {where}",
            file=sys.stderr,
        )
        return 3
