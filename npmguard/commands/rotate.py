"""``npmguard rotate``: replace stored tokens with new ones and revoke the old.

First every rotation a killed run left is finished or undone. Then the
chosen tokens are rotated: all stored tokens by default, one registry's
with ``--registry``, only leaked ones with ``--exposed``, or only those
whose scheduled rotation is due with ``--due``. A registry that cannot
rotate is named with what to do instead.

Exit codes: 0 every chosen token was rotated (or none needed it), 2 one
failed or a registry asked for by name cannot rotate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from npmguard.errors import NpmguardError, UsageError


def run(args: argparse.Namespace) -> int:
    from npmguard import lifecycle, rotation
    from npmguard.config import load_settings
    from npmguard.migrate import load_index, pending_journal, recover
    from npmguard.npmrc.nerf import InvalidRegistryError
    from npmguard.vault import open_default_store

    settings = load_settings()
    store = open_default_store()
    if pending_journal():
        for message in recover(lambda: store):
            print(message)
    urls = lifecycle.configured_urls(os.environ, Path.cwd())
    rotator = rotation.Rotator(
        store,
        lambda entry: provider_for_entry(entry, settings, urls),
        ask=_ask if _interactive() else None,
        invalidate=invalidate_daemon,
    )
    rotator.set_otp(args.otp)
    results: list[dict[str, Any]] = []
    failed = False
    for message in rotator.recover():
        _say(args, message)
        failed = failed or message.startswith("could not")

    try:
        entries = lifecycle.find(args.registry)
    except InvalidRegistryError as err:
        raise UsageError(f"--registry: {err}") from None
    if args.registry and not entries:
        raise NpmguardError(
            f"no stored token for {args.registry}; `npmguard scan` lists what is "
            "stored, `npmguard login` adds one"
        )
    reasons: dict[str, str] = {}
    if args.exposed:
        from npmguard.exposure import exposed

        roots = [str(root.path) for root in settings.roots]
        reasons = exposed(entries, store, roots)
        entries = [e for e in entries if e.name in reasons]
        if not entries:
            _say(args, "no stored token is known to be exposed")
    if args.due:
        entries = rotation.due(
            entries, lambda e: settings.for_registry(e.registry).rotate_days
        )
        if not entries:
            _say(args, "no scheduled rotation is due")

    for entry in entries:
        if load_index().get(entry.name, {}).get("fingerprint") != entry.fingerprint:
            # Rotated already in this run, as a copy of an earlier entry.
            continue
        if entry.name in reasons:
            _say(args, f"{entry.registry} (fingerprint {entry.fingerprint}) is "
                       f"exposed: {reasons[entry.name]}")
        reason = reasons.get(entry.name) or ("scheduled" if args.due else "on demand")
        result: dict[str, Any] = {"registry": entry.registry,
                                  "old_fingerprint": entry.fingerprint}
        try:
            outcome = rotator.rotate(entry, reason=f"exposed: {reason}"
                                     if entry.name in reasons else reason)
        except NpmguardError as err:
            from npmguard.registry.base import NotSupportedError

            unsupported = isinstance(err, NotSupportedError)
            result.update(ok=False, error=str(err), unsupported=unsupported)
            if unsupported and not (args.registry or args.exposed):
                _say(args, f"skipped {entry.registry}: {err}")
            else:
                failed = True
                if not args.json:
                    print(f"npmguard: {err}", file=sys.stderr)
        else:
            result.update(ok=True, new_fingerprint=outcome.new_fingerprint,
                          revoked=outcome.revoked, expires=outcome.expires)
            _say(args, outcome.message)
        results.append(result)
    if args.json:
        print(json.dumps({"rotations": results}, indent=2, sort_keys=True))
    return 2 if failed else 0


def provider_for_entry(entry: Any, settings: Any, urls: dict[str, str]) -> Any:
    """Return the provider for a stored entry, honouring the registry's settings."""
    from npmguard.registry import detect

    chosen = settings.for_registry(entry.registry)
    return detect.provider_for(
        entry.url(urls),
        kind=None if chosen.provider == "auto" else chosen.provider,
        api=chosen.api,
    )


def invalidate_daemon() -> None:
    """Tell a running daemon to drop cached values and minted tokens."""
    from npmguard.daemon import client

    reply = client.ask({"op": "invalidate"})
    if reply is not None and not reply.get("ok"):
        raise NpmguardError(client.reply_error(reply))


def _say(args: argparse.Namespace, message: str) -> None:
    print(message, file=sys.stderr if args.json else sys.stdout)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _ask(what: str, registry: str) -> str | None:
    import getpass

    if what == "password":
        return getpass.getpass(f"Password for {registry} (not stored): ") or None
    sys.stderr.write(f"One-time code for {registry}: ")
    sys.stderr.flush()
    return sys.stdin.readline().strip() or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="URL",
                        help="rotate only this registry's token")
    parser.add_argument("--exposed", action="store_true",
                        help="rotate only tokens found exposed (committed, readable, "
                             "in plaintext after securing)")
    parser.add_argument("--due", action="store_true",
                        help="rotate only tokens whose scheduled rotation is due")
    parser.add_argument("--otp", metavar="CODE",
                        help="one-time code, for registries that ask for one")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
