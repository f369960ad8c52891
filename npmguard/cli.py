"""Command-line entry point: parse arguments, dispatch, map errors to exit codes.

Exit codes: 0 success (for ``scan``: no plaintext found), 1 plaintext found
by ``scan``, 2 a user-facing error, 3 an unexpected error (the traceback
goes to the crash log), 130 interrupted. ``exec`` exits with its command's
code.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported, so that
``npmguard token``, which pnpm runs for every install, starts fast.
"""

from __future__ import annotations

import sys

from npmguard import __version__

# Not typing.TYPE_CHECKING: importing typing costs about 2 ms per run.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("npmguard.commands.scan", "report credentials in npm config files"),
    "secure": ("npmguard.commands.secure", "move plaintext credentials into the vault"),
    "restore": ("npmguard.commands.restore", "put vault values back into the files"),
    "exec": (
        "npmguard.commands.exec_",
        "run a command with registry credentials in its environment",
    ),
    "token": ("npmguard.commands.token", "print one registry credential (helper)"),
    "daemon": ("npmguard.commands.daemon", "run the watcher, socket server and tray"),
    "status": ("npmguard.commands.status", "show what the daemon is doing"),
    "doctor": ("npmguard.commands.doctor", "check what works and what to fix"),
    "service": ("npmguard.commands.service", "install or remove the user service"),
    "unlock": ("npmguard.commands.unlock", "unlock the encrypted file vault"),
    "lock": ("npmguard.commands.lock", "forget the file vault's key in the daemon"),
    "login": ("npmguard.commands.login", "log in; the token goes only to the vault"),
    "rotate": ("npmguard.commands.rotate", "replace stored tokens, revoke old ones"),
    "audit": ("npmguard.commands.audit", "show the audit trail; --verify checks it"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """Build the parser; only ``command``'s own arguments are loaded."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="npmguard",
        description="Keep npm registry credentials in the OS keychain, not in files.",
    )
    parser.add_argument(
        "--version", action="version", version=f"npmguard {__version__}"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to stderr (-v: INFO, -vv: DEBUG); values are never logged",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["token"]:
        # pnpm runs `npmguard token` for every request through its token
        # helper: let the daemon reply before argparse and logging load.
        from npmguard.daemon.client import fast_token

        code = fast_token(arguments)
        if code is not None:
            return code
    import importlib
    import logging

    from npmguard.errors import NpmguardError

    command = _chosen_command(arguments)
    args = build_parser(command).parse_args(arguments)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="npmguard: %(levelname)s: %(message)s")
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args))
    except NpmguardError as err:
        print(f"npmguard: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("npmguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as err:
        # A full disk, a read-only state directory and the like: the
        # environment, not a bug, so one line and no crash log.
        where = f"{err.filename}: " if err.filename else ""
        reason = err.strerror or type(err).__name__
        print(f"npmguard: {where}{reason}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - last-resort handler
        from npmguard.crashlog import write_crash_log

        where = write_crash_log(err)
        print(
            f"npmguard: unexpected error ({type(err).__name__}); details in {where}",
            file=sys.stderr,
        )
        return 3
