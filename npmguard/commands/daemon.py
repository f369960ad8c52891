"""``npmguard daemon``: run the watcher, the socket server and the tray.

It runs in the foreground until SIGTERM, SIGINT or the tray's Quit; the
user service (systemd, launchd, a scheduled task) starts it this way.
"""

from __future__ import annotations

import argparse
import logging


def run(args: argparse.Namespace) -> int:
    from npmguard.config import load_settings
    from npmguard.daemon.core import Daemon
    from npmguard.logsetup import setup_logging, teardown_logging

    settings = load_settings()
    level = settings.log_level
    if getattr(args, "verbose", 0) >= 2:
        level = "DEBUG"
    log_file = setup_logging(level)
    try:
        daemon = Daemon(settings, tray=not args.no_tray, log_path=log_file)
        return daemon.run()
    finally:
        logging.shutdown()
        teardown_logging()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--foreground", action="store_true", default=True,
        help="stay in the foreground (the default and only mode; a service "
        "manager keeps it running)",
    )
    parser.add_argument("--no-tray", action="store_true",
                        help="do not show a tray icon")
