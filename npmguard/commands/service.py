"""``npmguard service install|uninstall|status``: the daemon as a user service.

install writes the unit for this OS (see ``npmguard.service``) with the path
of this npmguard, then enables and starts it. It exits 0 once the unit is
written, even when the service manager cannot start it (no systemd user
instance in a container). It then reports that on stderr, with the command
to run instead. Exit codes of status: 0 running, 3 installed but not
running (or the service manager could not be queried), 4 not installed,
like ``systemctl status``.
"""

from __future__ import annotations

import argparse
import json
import sys

from npmguard.service import ActionReport, Backend, backend_for_platform

EXIT_NOT_RUNNING = 3
EXIT_NOT_INSTALLED = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install",
        help="write, enable and start the user service",
        description="Write the user service unit for this npmguard, enable it "
        "and start it.",
    )
    install.add_argument(
        "--dry-run", action="store_true", help="print the unit and the commands only"
    )
    uninstall = actions.add_parser(
        "uninstall",
        help="stop the user service and remove its unit",
        description="Stop and disable the user service and remove its unit.",
    )
    uninstall.add_argument(
        "--dry-run", action="store_true", help="print what would be done only"
    )
    status = actions.add_parser(
        "status",
        help="say whether the service is installed and running",
        description="Say whether the user service is installed and running "
        "(exit 0 running, 3 not running, 4 not installed).",
    )
    status.add_argument("--json", action="store_true", help="print a JSON object")


def backend(dry_run: bool = False) -> Backend:
    """The backend for this platform; tests may replace it."""
    return backend_for_platform(dry_run=dry_run)


def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _status(args.json)
    chosen = backend(dry_run=args.dry_run)
    report = chosen.install() if args.action == "install" else chosen.uninstall()
    _print_report(report)
    return 0


def _print_report(report: ActionReport) -> None:
    for note in report.notes:
        print(note)
    for warning in report.warnings:
        print(f"npmguard: {warning}", file=sys.stderr)


def _status(as_json: bool) -> int:
    status = backend().status()
    if status.running:
        code = 0
    elif status.installed:
        code = EXIT_NOT_RUNNING
    else:
        code = EXIT_NOT_INSTALLED
    if as_json:
        print(json.dumps(status.to_json(), indent=2))
        return code
    if not status.installed:
        state = "not installed"
    elif status.running is None:
        state = "installed; running: unknown"
    else:
        state = "installed and running" if status.running else "installed, not running"
    print(f"{status.manager}: {state}")
    print(f"  unit: {status.unit_path}")
    if status.enabled is not None:
        print(f"  enabled: {'yes' if status.enabled else 'no'}")
    print(f"  state: {status.detail}")
    if status.problem:
        print(f"  problem: {status.problem}")
    if not status.installed:
        print("  install it with: npmguard service install")
    elif not status.running:
        print(f"  start it with: {status.start_hint}")
    return code
