"""``npmguard status``: show what the daemon is doing.

Exit codes follow ``systemctl status``: 0 when the daemon replied, 3 when
it is not running or not responding, 2 when it replied with an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NOT_RUNNING = 3


def run(args: argparse.Namespace) -> int:
    from npmguard.daemon import protocol
    from npmguard.daemon.client import DaemonUnavailable, reply_error, request

    path = protocol.socket_path()
    try:
        reply = request({"op": "status"}, path=path, timeout=5.0)
    except DaemonUnavailable as err:
        if args.json:
            _print_json({"running": False, "socket": path, "reason": str(err)})
        else:
            state = "not running" if err.quiet else f"not responding ({err})"
            print(f"npmguard daemon: {state}; socket {path}")
        return NOT_RUNNING
    if not reply.get("ok"):
        print(f"npmguard: {reply_error(reply)}", file=sys.stderr)
        return 2
    reply.pop("ok", None)
    if args.json:
        _print_json({"running": True, **reply})
    else:
        print(_summary(reply))
    return 0


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _summary(reply: dict[str, Any]) -> str:
    from npmguard.commands.common import display_path

    uptime = _duration(float(reply.get("uptime_seconds") or 0))
    lines = [
        f"npmguard daemon: running (pid {reply.get('pid')}, version "
        f"{reply.get('version')}, up {uptime})",
        f"status: {reply.get('status')}",
    ]
    if reply.get("paused"):
        lines.append("paused: config file changes are held until resumed")
    if reply.get("vault_locked"):
        lines.append("vault: locked; token requests fail until it is unlocked "
                     "(`npmguard unlock` for the file vault)")
    if reply.get("error"):
        lines.append(f"error: {reply['error']}")
    exposures = reply.get("exposures") or []
    lines.append(f"exposed tokens: {len(exposures)}")
    for item in exposures:
        where = f"{display_path(Path(str(item.get('path'))))}:{item.get('line')}"
        lines.append(
            f"  {where}  {item.get('registry') or '-'}  {item.get('kind')}  "
            f"fp {item.get('fingerprint') or '-'}  policy {item.get('policy')}"
        )
    lines.append(f"secured since start: {reply.get('secured_count', 0)}")
    parts = reply.get("parts")
    if parts:
        lines.append(f"running parts: {', '.join(map(str, parts))}")
    if reply.get("log"):
        lines.append(f"log: {display_path(Path(str(reply['log'])))}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print stable JSON")
