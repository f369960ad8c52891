"""``npmguard audit``: show the audit trail, or check its hash chain.

Exit codes: 0 when records were shown, there are none yet, or the chain is
intact. 1 when ``--verify`` found problems. 2 when the log cannot be read,
or when a line is not an audit record and ``--verify`` was not given (with
it, such a line is one of the problems).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from npmguard import audit

DEFAULT_LIMIT = 50
DETAILS_WIDTH = 72
# Fields shown in their own columns or not at all.
_OWN_COLUMNS = frozenset({"seq", "time", "event", "registry", "fingerprint"})
_CHAIN_FIELDS = frozenset({"prev", "hash"})
# The order of the details column; other fields follow alphabetically.
_DETAIL_ORDER = (
    "problem", "kind", "scope", "command", "peer", "path", "line", "source",
    "provider", "expires", "reason",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the whole log's hash chain and head; exit 1 if anything is wrong",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the records as a JSON array"
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show the last N matching records (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--all", action="store_true", help="show every matching record"
    )
    parser.add_argument(
        "--registry",
        metavar="URL",
        help="only records for this registry (a URL or a //host/ key)",
    )
    parser.add_argument(
        "--event",
        choices=audit.EVENTS,
        metavar="NAME",
        help=f"only records of this event: {', '.join(audit.EVENTS)}",
    )


def run(args: argparse.Namespace) -> int:
    path = audit.audit_path()
    if args.verify:
        return _verify(path, as_json=args.json)
    if not path.exists():
        _raise_if_deleted(path)
        if args.json:
            print("[]")
        else:
            print("no audit records yet")
        return 0
    records = _filtered(audit.read(path), args.registry, args.event)
    if not args.all:
        records = records[-args.limit :]
    if args.json:
        print(json.dumps(records, indent=2, sort_keys=True))
    elif records:
        print(_table(records))
    else:
        print("no matching audit records")
    return 0


def _verify(path: Path, *, as_json: bool) -> int:
    result = audit.verify(path)
    if as_json:
        print(json.dumps(_result_json(result), indent=2, sort_keys=True))
        return 0 if result.ok else 1
    for note in result.notes:
        print(f"note: {note}")
    if result.ok:
        if result.count == 0 and not path.exists():
            print("no audit records yet")
        else:
            print(f"audit trail intact: {result.count} records")
        return 0
    for problem in result.problems:
        print(problem)
    return 1


def _result_json(result: audit.VerifyResult) -> dict[str, Any]:
    def item(problem: audit.Problem) -> dict[str, Any]:
        return {
            "path": str(problem.path),
            "line": problem.line,
            "kind": problem.kind,
            "message": problem.message,
        }

    return {
        "path": str(result.path),
        "ok": result.ok,
        "count": result.count,
        "problems": [item(p) for p in result.problems],
        "notes": [item(p) for p in result.notes],
    }


def _raise_if_deleted(path: Path) -> None:
    head = audit.head_path(path)
    if head.exists():
        raise audit.AuditError(
            f"missing, but {head.name} shows that records were written; the "
            "log was deleted or moved (`npmguard audit --verify` for details)",
            path=path,
        )


def _filtered(
    records: list[dict[str, Any]], registry: str | None, event: str | None
) -> list[dict[str, Any]]:
    if event is not None:
        records = [r for r in records if r.get("event") == event]
    if registry is not None:
        expected_key = _registry_key(registry)
        records = [
            r
            for r in records
            if isinstance(r.get("registry"), str)
            and _registry_key(r["registry"]) == expected_key
        ]
    return records


def _registry_key(url: str) -> str:
    from npmguard.npmrc.nerf import InvalidRegistryError, nerf_dart

    try:
        return nerf_dart(url)
    except InvalidRegistryError:
        return url


def _table(records: list[dict[str, Any]]) -> str:
    header = ("TIME (UTC)", "EVENT", "REGISTRY", "FINGERPRINT", "DETAILS")
    rows = [header]
    for record in records:
        rows.append(
            (
                _short_time(record.get("time")),
                str(record.get("event", "-")),
                str(record.get("registry") or "-"),
                str(record.get("fingerprint") or "-"),
                _details(record),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _short_time(value: object) -> str:
    # "2024-12-04T18:06:00.123Z" -> "2024-12-04 18:06:00"
    if not isinstance(value, str) or len(value) < 19:
        return "-"
    return value[:19].replace("T", " ")


def _details(record: dict[str, Any]) -> str:
    names = [
        name
        for name in record
        if name not in _OWN_COLUMNS and name not in _CHAIN_FIELDS
    ]
    order = {name: index for index, name in enumerate(_DETAIL_ORDER)}
    names.sort(key=lambda name: (order.get(name, len(order)), name))
    parts = [f"{name}={_detail_value(name, record[name])}" for name in names]
    text = " ".join(parts) or "-"
    if len(text) > DETAILS_WIDTH:
        text = text[: DETAILS_WIDTH - 1] + "…"
    return text


def _detail_value(name: str, value: object) -> str:
    from npmguard.commands.common import display_path

    if name == "peer" and isinstance(value, dict):
        text = f"pid {value.get('pid', '?')}"
        exe = value.get("exe") or value.get("name")
        if exe:
            text += f" {Path(str(exe)).name}"
        parents = value.get("parents")
        if isinstance(parents, list) and parents:
            text += " < " + " < ".join(map(str, parents))
        return f"({text})"
    if name == "expires" and isinstance(value, int | float):
        import time

        return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(value))
    if name in ("source", "path") and isinstance(value, str) and "/" in value:
        return display_path(Path(value))
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{key}:{item}" for key, item in value.items())
    text = str(value)
    return f'"{text}"' if " " in text else text


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number
