"""``npmguard status``: what the daemon is doing, and every stored credential.

The first part is the daemon's status, when one runs: its state, exposed
tokens, leaked stored tokens and failed rotations. The second part, the inventory,
works without it: it reads the credential index, the config files that
hold the markers, ``config.toml``, the rotation journal and the tail of the
audit trail. It opens no keychain and makes no network request; what a
registry allows comes from the provider's static ``capabilities``.

For each stored credential the inventory shows its registry and kind,
and where it is used (the file and line of its marker). It shows its age,
expiry and last use (the newest ``handed-out`` or ``minted`` audit record
for it), its last and next rotation, and what the registry allows. The
flags are exposed (with the reason), old (a token that cannot rotate,
older than ``remind_days``), rotation pending (a journal entry) and marker
missing.

Exit codes follow ``systemctl status``: 0 when the daemon replied, 3 when
it is not running or not responding, 2 when it replied with an error or
the inventory could not be read. The inventory is printed in every case.
``--json`` prints one object: the daemon's fields (``running`` and, when
it runs, its status), ``credentials`` and ``inventory_errors``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOT_RUNNING = 3
# The version of the inventory's JSON layout. It changes when a field
# changes meaning.
INVENTORY_FORMAT = 1
# The audit trail is read backwards from its end, at most this many bytes
# (about 25,000 records), to find each credential's last use.
AUDIT_TAIL_BYTES = 8 * 1024 * 1024
_AUDIT_CHUNK = 64 * 1024
_USE_EVENTS = (b'"event":"handed-out"', b'"event":"minted"')
DAY = 86400.0


def run(args: argparse.Namespace) -> int:
    daemon, code = _daemon_part()
    inventory, errors = inventory_of_credentials()
    if errors and code != 2:
        code = 2
    if args.json:
        _print_json({**daemon, "credentials": inventory,
                     "inventory_format": INVENTORY_FORMAT,
                     "inventory_errors": errors})
    else:
        print(_summary(daemon))
        print()
        print(_inventory_text(inventory))
        for error in errors:
            print(f"npmguard: {error}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------
# The daemon's part


def _daemon_part() -> tuple[dict[str, Any], int]:
    from npmguard.daemon import protocol
    from npmguard.daemon.client import DaemonUnavailable, reply_error, request

    path = protocol.socket_path()
    try:
        reply = request({"op": "status"}, path=path, timeout=5.0)
    except DaemonUnavailable as err:
        return ({"running": False, "socket": path, "reason": str(err),
                 "quiet": err.quiet}, NOT_RUNNING)
    if not reply.get("ok"):
        return ({"running": True, "socket": path, "error": reply_error(reply),
                 "replied_error": True}, 2)
    reply.pop("ok", None)
    return {"running": True, **reply}, 0


def _print_json(data: dict[str, Any]) -> None:
    data.pop("quiet", None)
    data.pop("replied_error", None)
    print(json.dumps(data, indent=2, sort_keys=True))


def _summary(reply: dict[str, Any]) -> str:
    from npmguard.commands.common import display_path

    path = reply.get("socket")
    if not reply.get("running"):
        state = "not running" if reply.get("quiet") else (
            f"not responding ({reply.get('reason')})")
        return f"npmguard daemon: {state}; socket {path}"
    if reply.get("replied_error"):
        return f"npmguard daemon: replied with an error: {reply.get('error')}"
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
    for leak in reply.get("leaks") or []:
        lines.append(
            f"leaked stored token: {leak.get('registry')} fp "
            f"{leak.get('fingerprint')}: {leak.get('reason')}; run `npmguard "
            "rotate --exposed`"
        )
    for failure in reply.get("rotation_failures") or []:
        retry = failure.get("retry_at")
        when = f"; next try {_when(float(retry))}" if retry else ""
        lines.append(
            f"rotation failed: {failure.get('registry')} fp "
            f"{failure.get('fingerprint')}: {failure.get('message')}{when}"
        )
    lines.append(f"secured since start: {reply.get('secured_count', 0)}")
    parts = reply.get("parts")
    if parts:
        lines.append(f"running parts: {', '.join(map(str, parts))}")
    if reply.get("log"):
        lines.append(f"log: {display_path(Path(str(reply['log'])))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The inventory


@dataclass
class _Use:
    time: str
    event: str


def inventory_of_credentials() -> tuple[list[dict[str, Any]], list[str]]:
    """Return one dict per stored credential, and the problems met on the way.

    Reads files only: no keychain, no network.
    """
    from npmguard import lifecycle
    from npmguard.config import Settings, load_settings
    from npmguard.errors import NpmguardError

    errors: list[str] = []
    try:
        settings = load_settings()
    except NpmguardError as err:
        errors.append(f"{err} (using the default settings)")
        settings = Settings()
    try:
        entries = lifecycle.managed()
    except NpmguardError as err:
        return [], [*errors, str(err)]
    if not entries:
        return [], errors
    from npmguard.rotation import pending_names

    urls = lifecycle.configured_urls(os.environ, Path.cwd())
    pending = pending_names()
    markers = _markers({str(e.meta.get("path") or "") for e in entries}, errors)
    uses = last_uses(entries, errors)
    now = time.time()
    return [
        _describe_entry(entry, settings, urls, pending, markers, uses, now)
        for entry in entries
    ], errors


def _describe_entry(
    entry: Any,
    settings: Any,
    urls: dict[str, str],
    pending: dict[str, str],
    markers: dict[str, list[tuple[str, int]]],
    uses: dict[str, _Use],
    now: float,
) -> dict[str, Any]:
    from npmguard.rotation import next_rotation

    token = settings.for_registry(entry.registry) if entry.registry else (
        settings.tokens)
    url = entry.url(urls) if entry.registry else ""
    caps = _capabilities(entry, settings, urls)
    password = entry.password_name is not None
    rotation, mint = _effective(entry, caps, password, token.mint)
    can_rotate = caps is not None and caps["rotate"]
    age = entry.age_days(now)
    next_at = next_rotation(entry, token.rotate_days) if can_rotate else None
    used_at = [{"path": path, "line": line}
               for path, line in markers.get(entry.name, [])]
    old = (not can_rotate and entry.is_token and token.remind_days > 0
           and age is not None and age >= token.remind_days)
    use = uses.get(entry.name)
    return {
        "name": entry.name,
        "registry": entry.registry,
        "url": url,
        "kind": entry.kind,
        "fingerprint": entry.fingerprint,
        "origin": str(entry.meta.get("origin") or "secure"),
        "username": entry.meta.get("username"),
        "used_at": used_at,
        "issued": entry.issued,
        "age_days": None if age is None else round(age, 2),
        "expires": entry.expires,
        "last_used": None if use is None else {"time": use.time, "event": use.event},
        "rotated": entry.rotated,
        "rotate_days": token.rotate_days,
        "next_rotation": next_at,
        "rotation_due": next_at is not None and next_at <= now,
        "remind_days": token.remind_days,
        "password_stored": password,
        "registry_allows": caps,
        "rotation": rotation,
        "mint": mint,
        "flags": {
            "exposed": entry.meta.get("exposed") or None,
            "old": bool(old),
            "rotation_pending": entry.name in pending,
            "marker_missing": not used_at,
        },
    }


def _capabilities(entry: Any, settings: Any, urls: dict[str, str]
                  ) -> dict[str, Any] | None:
    """Return what the registry's token API allows, from the provider's static
    table."""
    if not entry.is_token:
        return None
    from npmguard.commands.rotate import provider_for_entry
    from npmguard.errors import NpmguardError

    try:
        caps = provider_for_entry(entry, settings, urls).capabilities
    except (NpmguardError, ValueError) as err:
        return {"provider": "unknown", "rotate": False, "unattended": False,
                "mint": False, "expiry": False, "revoke": False,
                "read_only": False, "needs_password": False, "note": str(err)}
    return {
        "provider": caps.provider,
        "rotate": caps.rotate,
        "unattended": caps.unattended,
        "mint": caps.mint,
        "expiry": caps.expiry,
        "revoke": caps.revoke,
        "read_only": caps.read_only,
        "needs_password": caps.needs_password,
        "note": caps.note,
    }


def _effective(entry: Any, caps: dict[str, Any] | None, password: bool,
               mint_setting: bool) -> tuple[str, str]:
    """Return what rotating and minting take for this credential, in words.

    Rotation: "unattended", "with the stored password", "needs your
    password", "needs you" (a one-time code) or "not possible". Minting:
    "yes", "with the stored password", "needs your password", "off" (the
    ``mint`` setting) or "no".
    """
    if caps is None:
        return "not possible", "no"
    if not caps["rotate"]:
        rotation = "not possible"
    elif caps["unattended"]:
        rotation = "unattended"
    elif caps["needs_password"]:
        rotation = "with the stored password" if password else "needs your password"
    else:
        rotation = "needs you"
    # The same order of checks as the daemon's minting (inject/mint.py).
    if not mint_setting:
        mint = "off"
    elif not caps["mint"]:
        mint = "no"
    elif caps["needs_password"]:
        mint = "with the stored password" if password else "needs your password"
    else:
        mint = "yes"
    return rotation, mint


def _markers(paths: Iterable[str], errors: list[str]
             ) -> dict[str, list[tuple[str, int]]]:
    """Map vault names to the (file, line) of their markers in ``paths``."""
    from npmguard.errors import NpmguardError
    from npmguard.files import read_config
    from npmguard.npmrc.credentials import find_credentials

    found: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(p for p in paths if p):
        try:
            config = read_config(Path(path))
        except NpmguardError as err:
            if Path(path).exists():
                errors.append(str(err))
            continue
        for finding in find_credentials(Path(path), config.document):
            if finding.vault_name:
                found.setdefault(finding.vault_name, []).append((path, finding.line))
    return found


def last_uses(entries: list[Any], errors: list[str] | None = None
              ) -> dict[str, _Use]:
    """Return each entry's newest ``handed-out`` or ``minted`` audit record.

    The log is read backwards from its end in blocks, and only lines that
    name one of those events are parsed, so the cost follows the records
    read, not the size of the log. Reading stops when every entry has a
    use, or after ``AUDIT_TAIL_BYTES``.
    """
    from npmguard.audit import audit_path

    wanted = {e.name: e for e in entries if e.registry}
    uses: dict[str, _Use] = {}
    if not wanted:
        return uses
    try:
        handle = open(audit_path(), "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return uses
    except OSError as err:
        if errors is not None:
            errors.append(f"{audit_path()}: cannot read the audit trail: "
                          f"{err.strerror}")
        return uses
    with handle:
        end = os.fstat(handle.fileno()).st_size
        start = max(0, end - AUDIT_TAIL_BYTES)
        for line in _lines_backwards(handle, start, end):
            if not any(marker in line for marker in _USE_EVENTS):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            for name, entry in wanted.items():
                if name not in uses and _is_use_of(record, entry):
                    uses[name] = _Use(str(record.get("time") or ""),
                                      str(record.get("event")))
            if len(uses) == len(wanted):
                break
    return uses


def _lines_backwards(handle: Any, start: int, end: int) -> Iterable[bytes]:
    """Yield the complete lines of ``handle[start:end]``, last line first."""
    position = end
    rest = b""
    while position > start:
        size = min(_AUDIT_CHUNK, position - start)
        position -= size
        handle.seek(position)
        block = handle.read(size) + rest
        lines = block.split(b"\n")
        # The first piece may be the end of a line that starts further back.
        rest = lines.pop(0) if position > start else b""
        for line in reversed(lines):
            if line:
                yield line
    if rest and start == 0:
        yield rest


def _is_use_of(record: dict[str, Any], entry: Any) -> bool:
    """Tell whether an audit record is a use of the stored credential ``entry``.

    A ``handed-out`` record names the value handed out: the stored one, or
    a token minted from it, which also names the stored token
    (``stored_fingerprint``), as ``minted`` records do. The token a rotation
    creates is not a use.
    """
    event = record.get("event")
    if event == "minted" and record.get("reason") == "rotation":
        return False
    fingerprints = [
        value for key, value in record.items()
        if key == "fingerprint" or key.endswith("_fingerprint")
    ]
    listed = record.get("fingerprints")
    if isinstance(listed, list):
        fingerprints += listed
    if entry.fingerprint and entry.fingerprint in fingerprints:
        return True
    registry = record.get("registry")
    if not isinstance(registry, str) or not _same_registry(registry, entry.registry):
        return False
    if "stored_fingerprint" in record:
        # Made from another stored token of the same registry.
        return False
    return not fingerprints


def _same_registry(recorded: str, key: str) -> bool:
    if recorded == key:
        return True
    from npmguard.npmrc.nerf import InvalidRegistryError, nerf_dart

    try:
        return nerf_dart(recorded) == key
    except InvalidRegistryError:
        return False


# --------------------------------------------------------------------------
# Text


def _inventory_text(items: list[dict[str, Any]]) -> str:
    from npmguard.commands.common import display_path

    if not items:
        return ("stored credentials: none (`npmguard secure` moves plaintext ones "
                "into the vault, `npmguard login` adds one)")
    lines = [f"stored credentials: {len(items)}"]
    for item in items:
        lines.append("")
        lines.append(f"{item['registry'] or '-'}  {item['kind']}  fp "
                     f"{item['fingerprint'] or '-'}"
                     + (f"  user {item['username']}" if item["username"] else ""))
        where = ", ".join(f"{display_path(Path(u['path']))}:{u['line']}"
                          for u in item["used_at"]) or "no marker found"
        rows: list[tuple[str, str]] = [("used at", where)]
        rows.append(("age", _age(item)))
        rows.append(("expires", _when(item["expires"]) if item["expires"]
                     else "not known"))
        use = item["last_used"]
        rows.append(("last use", f"{_iso(use['time'])} ({use['event']})" if use
                     else "none recorded"))
        rows.append(("last rotated", _when(item["rotated"]) if item["rotated"]
                     else "never"))
        rows.append(("next rotation", _next_rotation(item)))
        allows = item["registry_allows"]
        if allows is not None:
            rows.append(("registry", f"{allows['provider']}: rotate "
                         f"{item['rotation']}; mint {item['mint']}; expiry "
                         f"{_yes(allows['expiry'])}; revoke {_yes(allows['revoke'])}"))
            if allows["note"]:
                rows.append(("note", str(allows["note"])))
        else:
            rows.append(("registry", f"{item['kind']} is not a token: change it "
                         "on the registry's website"))
        flags = _flags(item)
        rows.append(("flags", ", ".join(flags) if flags else "-"))
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def _flags(item: dict[str, Any]) -> list[str]:
    flags = item["flags"]
    words = []
    if flags["exposed"]:
        words.append(f"exposed ({flags['exposed']}): run `npmguard rotate "
                     "--exposed`")
    if flags["old"]:
        words.append(f"old (over {item['remind_days']:g} days and it cannot rotate)")
    if flags["rotation_pending"]:
        words.append("rotation pending: run `npmguard rotate` to finish it")
    if flags["marker_missing"]:
        words.append("marker missing")
    return words


def _next_rotation(item: dict[str, Any]) -> str:
    allows = item["registry_allows"]
    if allows is None or not allows["rotate"]:
        return "not possible"
    if not item["rotate_days"]:
        return "off (set rotate_days in config.toml)"
    every = f"every {item['rotate_days']:g} days"
    if item["next_rotation"] is None:
        return f"{every}; issue date not known"
    if item["rotation_due"]:
        if item["rotation"] in ("needs your password", "needs you"):
            return (f"due now ({every}); run `npmguard rotate --registry "
                    f"{item['url']}`")
        return f"due now ({every}); the daemon rotates it"
    return f"{_when(item['next_rotation'])} ({every})"


def _age(item: dict[str, Any]) -> str:
    days = item["age_days"]
    if days is None:
        return "not known"
    if item["issued"]:
        # The JSON rounds age_days to 0.01 day (14 min); the text need not.
        seconds = max(0.0, time.time() - float(item["issued"]))
        return f"{_duration(seconds)} (since {_when(item['issued'])})"
    return _duration(days * DAY)


def _yes(value: object) -> str:
    return "yes" if value else "no"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _iso(stamp: str) -> str:
    """Show an audit record's UTC time (``...Z``) in local time."""
    import calendar

    try:
        parsed = time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return stamp
    return _when(calendar.timegm(parsed))


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} day{'s' if days != 1 else ''}"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print stable JSON")
