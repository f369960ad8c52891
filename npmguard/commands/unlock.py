"""``npmguard unlock``: unlock the encrypted file vault in the daemon.

The passphrase is asked for once (twice when the vault is created) and
sent to the running daemon, which derives the key and keeps it in memory
until it stops or ``npmguard lock``. ``--change-passphrase`` re-encrypts
the vault under a new passphrase and hands that to the daemon.
"""

from __future__ import annotations

import argparse
import sys

from npmguard.errors import NpmguardError, VaultError
from npmguard.secret import Secret


class DaemonNotAvailableError(NpmguardError):
    """No daemon runs, or it does not serve the file vault."""


def run(args: argparse.Namespace) -> int:
    from npmguard.vault import remote, select

    selection = select.choose_backend()
    if selection.backend != select.FILE:
        raise VaultError(
            f"npmguard uses the OS keychain here ({selection.reason}), so "
            "there is no file vault to unlock; set backend = \"file\" in the "
            "[vault] table of the settings to use one"
        )
    if args.change_passphrase:
        return _change_passphrase(args)

    status = _daemon_status()
    if status.get("unlocked"):
        print(f"The file vault {status.get('path')} is unlocked already.")
        return 0
    create = not status.get("exists")
    if create:
        print(f"There is no file vault yet; creating {status.get('path')}.",
              file=sys.stderr)
        passphrase = _read_new(args, "Passphrase for the new file vault")
    else:
        passphrase = _read_one(
            args, f"Passphrase for the file vault {status.get('path')}: "
        )
    reply = remote.unlock(passphrase, create=create)
    verb = "Created and unlocked" if reply.get("created") else "Unlocked"
    print(f"{verb} the file vault {reply.get('path')}; the daemon keeps its "
          "key until it stops or `npmguard lock`.")
    return 0


def _daemon_status() -> dict[str, object]:
    from npmguard.vault import remote

    try:
        status = remote.vault_status(raise_unsupported=True)
    except remote.VaultNotServed:
        raise DaemonNotAvailableError(
            f"the npmguard daemon at {remote.socket_path()} does not serve the "
            "file vault; restart it with this version of npmguard"
        ) from None
    if status is None:
        raise DaemonNotAvailableError(
            "no npmguard daemon is running to keep the key; start it with "
            "`npmguard daemon` (or `npmguard service install`) and run "
            "`npmguard unlock` again"
        )
    return status


def _change_passphrase(args: argparse.Namespace) -> int:
    from npmguard.vault import remote
    from npmguard.vault.filevault import FileVault

    vault = FileVault()
    if not vault.exists():
        raise VaultError(
            "there is no file vault yet; `npmguard unlock` creates one",
            path=vault.path,
        )
    if args.passphrase_stdin:
        from npmguard.vault.select import read_passphrase_lines

        old, new = read_passphrase_lines(sys.stdin, 2)
    else:
        _require_terminal()
        old = _prompt(f"Current passphrase for the file vault {vault.path}: ")
        new = _prompt_new("New passphrase")
    vault.change_passphrase(old, new)
    vault.lock()
    print(f"Changed the passphrase of the file vault {vault.path}.")
    try:
        status = remote.vault_status()
    except VaultError as err:
        print(f"npmguard: {err}; unlock the daemon with `npmguard unlock`",
              file=sys.stderr)
        return 0
    if status is not None:
        remote.unlock(new)
        print("The daemon now holds the new key.")
    return 0


def _read_one(args: argparse.Namespace, prompt: str) -> Secret:
    if args.passphrase_stdin:
        from npmguard.vault.select import read_passphrase_lines

        return read_passphrase_lines(sys.stdin, 1)[0]
    _require_terminal()
    return _prompt(prompt)


def _read_new(args: argparse.Namespace, what: str) -> Secret:
    if args.passphrase_stdin:
        from npmguard.vault.filevault import check_new_passphrase
        from npmguard.vault.select import read_passphrase_lines

        passphrase = read_passphrase_lines(sys.stdin, 1)[0]
        check_new_passphrase(passphrase)
        return passphrase
    _require_terminal()
    return _prompt_new(what)


def _prompt(prompt: str) -> Secret:
    from npmguard.vault.select import prompt_passphrase

    return prompt_passphrase(prompt)


def _prompt_new(what: str) -> Secret:
    from npmguard.vault.select import prompt_new_passphrase

    return prompt_new_passphrase(what)


def _require_terminal() -> None:
    from npmguard.vault.select import interactive

    if not interactive():
        raise VaultError(
            "stdin is not a terminal, so the passphrase cannot be asked for; "
            "pass --passphrase-stdin to read it from stdin"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-stdin", action="store_true",
        help="read the passphrase from the first line of stdin instead of the "
        "terminal (with --change-passphrase: the current one, then the new one)",
    )
    parser.add_argument(
        "--change-passphrase", action="store_true",
        help="re-encrypt the file vault under a new passphrase and hand it to "
        "the daemon",
    )
