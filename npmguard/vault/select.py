"""Pick the credential store for this process: the OS keychain or the file vault.

``[vault] backend`` in the settings decides: ``keychain`` and ``file`` force
one, and ``auto`` (the default) uses the keychain when keyring has a usable
backend and, for the Secret Service, a provider is running or activatable
on the session bus, and the encrypted file vault otherwise.

The file vault needs its passphrase. In order, ``open_store`` uses:

1. the vault this process serves, when it is the daemon (``daemon_ops``);
2. the daemon's unlocked vault, over its socket (``remote.DaemonStore``);
3. a passphrase typed for this one command, when stdin is a terminal.

Otherwise it raises one line that says to run ``npmguard unlock``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npmguard.errors import NpmguardError, VaultLockedError
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore, Passphrase

if TYPE_CHECKING:
    from npmguard.config import Settings
    from npmguard.vault.filevault import FileVault

log = logging.getLogger(__name__)

KEYCHAIN = "keychain"
FILE = "file"
SECRETS_NAME = "org.freedesktop.secrets"
# Seconds the Secret Service check may take before auto picks the file vault.
BUS_TIMEOUT = 2.0

# The store of the file vault that this process serves to others, set by
# ``daemon_ops.register`` in the daemon. Kept here, not in daemon_ops, so
# that every command can check it without importing cryptography.
_hosted: CredentialStore | None = None


def set_hosted_store(store: CredentialStore | None) -> None:
    """Make ``open_store`` return ``store`` for the file vault in this process."""
    global _hosted
    _hosted = store


@dataclass(frozen=True)
class Selection:
    """The store ``open_store`` uses, and the reason for the choice."""

    backend: str
    configured: str
    reason: str


def choose_backend(settings: Settings | None = None) -> Selection:
    """Decide between the keychain and the file vault; never opens either."""
    if settings is None:
        from npmguard.config import load_settings

        settings = load_settings()
    configured = settings.vault_backend
    if configured in (KEYCHAIN, FILE):
        return Selection(configured, configured,
                         f"[vault] backend is {configured!r} in the settings")
    usable, reason = keychain_usable()
    return Selection(KEYCHAIN if usable else FILE, configured, reason)


def keychain_usable(timeout: float = BUS_TIMEOUT) -> tuple[bool, str]:
    """Tell whether the OS keychain can be used here, and why (one line)."""
    try:
        import keyring
    except ImportError as err:  # pragma: no cover - keyring is a dependency
        return False, f"keyring is not installed ({err})"
    try:
        backend = keyring.get_keyring()
    except Exception as err:  # noqa: BLE001 - backends fail in their own ways
        return False, f"keyring has no usable backend ({_first_line(err)})"
    inner = effective_backend(backend)
    if inner is None:
        return False, "keyring found no usable backend"
    name = backend_name(inner)
    if type(inner).__module__.startswith("keyrings.alt"):
        # keyrings.alt keeps values in a plain or weakly encrypted file in
        # the home directory: that is no keychain, and the file vault is
        # the better choice.
        return False, f"keyring backend {name} is a file, not a keychain"
    if type(inner).__module__ != "keyring.backends.SecretService":
        return True, f"keyring backend {name}"
    reachable, detail = secret_service_reachable(timeout)
    if not reachable:
        return False, f"no Secret Service on the session bus ({detail})"
    return True, f"keyring backend {name} ({detail})"


def effective_backend(backend: Any) -> Any | None:
    """Return the backend that would serve requests: a chainer's first one.

    None for keyring's fail backend or an empty chainer.
    """
    module = type(backend).__module__
    if module == "keyring.backends.fail":
        return None
    if module == "keyring.backends.chainer":
        inner = list(getattr(backend, "backends", []) or [])
        return inner[0] if inner else None
    return backend


def backend_name(backend: Any) -> str:
    """Return a keyring backend's module and class, as reports show it."""
    return f"{type(backend).__module__}.{type(backend).__name__}"


def secret_service_reachable(timeout: float = BUS_TIMEOUT) -> tuple[bool, str]:
    """Tell whether a Secret Service provider owns its name or can be activated.

    The same test as keyring's own, with a timeout: a hung bus must not hang
    every command.
    """
    try:
        from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
        from jeepney.io.blocking import (  # type: ignore[import-untyped]
            open_dbus_connection,
        )
    except ImportError as err:
        return False, f"jeepney is not installed ({err})"
    try:
        conn = open_dbus_connection(bus="SESSION", auth_timeout=timeout)
    except KeyError:
        return False, "DBUS_SESSION_BUS_ADDRESS is not set"
    except Exception as err:  # noqa: BLE001 - no bus, refused, bad address
        return False, f"cannot connect to the session bus: {_first_line(err)}"
    try:
        reply = conn.send_and_get_reply(
            message_bus.NameHasOwner(SECRETS_NAME), timeout=timeout
        )
        if reply.body and reply.body[0]:
            return True, f"{SECRETS_NAME} is running"
        reply = conn.send_and_get_reply(
            message_bus.ListActivatableNames(), timeout=timeout
        )
        if reply.body and SECRETS_NAME in reply.body[0]:
            return True, f"{SECRETS_NAME} can be activated"
        return False, f"nothing provides {SECRETS_NAME}"
    except Exception as err:  # noqa: BLE001 - timeouts, a bus that went away
        return False, f"the session bus did not answer: {_first_line(err)}"
    finally:
        conn.close()


# --- opening a store -------------------------------------------------------------


def open_store(settings: Settings | None = None) -> CredentialStore:
    """Open the store the settings select, or raise a one-line ``VaultError``."""
    selection = choose_backend(settings)
    log.debug("credential store: %s (%s)", selection.backend, selection.reason)
    if selection.backend == KEYCHAIN:
        from npmguard.vault import keychain

        return keychain.KeychainStore()
    return open_file_store(selection)


def open_default_store() -> CredentialStore:
    """Open the store the user's settings select (keychain or file vault)."""
    return open_store()


def open_file_store(selection: Selection | None = None) -> CredentialStore:
    """Return an unlocked file vault: hosted, the daemon's, or unlocked here."""
    if _hosted is not None:
        return _hosted
    from npmguard.vault import remote

    status = remote.vault_status()
    if status is not None and status.get("unlocked"):
        return remote.DaemonStore()
    if interactive():
        return unlock_here()
    raise VaultLockedError(_locked_message(selection, status))


def _locked_message(selection: Selection | None, status: dict[str, Any] | None
                    ) -> str:
    why = ""
    if selection is not None and selection.configured != FILE:
        why = f"no OS keychain is usable ({selection.reason}), so "
    where = ("the npmguard daemon has not unlocked it" if status is not None
             else "no npmguard daemon is running to keep its key")
    return (f"{why}npmguard uses the encrypted file vault, which is locked: "
            f"{where}; run `npmguard unlock` (start the daemon first with "
            "`npmguard daemon`), or run this command in a terminal to type "
            "the passphrase")


def interactive() -> bool:
    """Tell whether a passphrase can be asked for: stdin is a terminal."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:  # stdin closed
        return False


def unlock_here() -> FileVault:
    """Ask for the passphrase and unlock the file vault for this process only.

    With no vault yet, ask for a new passphrase twice and create it.
    """
    from npmguard.vault.filevault import FileVault

    vault = FileVault()
    if vault.exists():
        vault.unlock(prompt_passphrase(f"Passphrase for the file vault {vault.path}: "))
    else:
        print(f"npmguard: there is no file vault yet; creating {vault.path}",
              file=sys.stderr)
        vault.create(prompt_new_passphrase())
    return vault


# --- passphrases -------------------------------------------------------------------


def prompt_passphrase(prompt: str) -> Secret:
    """Read a passphrase from the terminal without echo."""
    import getpass

    try:
        value = getpass.getpass(prompt)
    except EOFError:
        raise VaultLockedError("no passphrase was entered") from None
    if not value:
        raise VaultLockedError("no passphrase was entered")
    return Passphrase(value)


def prompt_new_passphrase(what: str = "New passphrase for the file vault") -> Secret:
    """Ask for a new passphrase twice; raise ``VaultError`` when they differ."""
    from npmguard.errors import VaultError
    from npmguard.vault.filevault import check_new_passphrase

    first = prompt_passphrase(f"{what}: ")
    check_new_passphrase(first)
    second = prompt_passphrase("Repeat it: ")
    if first != second:
        raise VaultError("the two passphrases differ; nothing was changed")
    return first


def read_passphrase_lines(stream: Any, count: int) -> list[Secret]:
    """Read ``count`` passphrases, one per line, from ``stream`` (for scripts).

    The line ending is removed and nothing else, so spaces are kept.
    """
    values = []
    for index in range(count):
        line = stream.readline()
        value = line[:-1] if line.endswith("\n") else line
        value = value[:-1] if value.endswith("\r") else value
        if not value:
            which = "" if count == 1 else f" {index + 1} of {count}"
            raise VaultLockedError(
                f"no passphrase on stdin (line{which} is missing or empty)"
            )
        values.append(Passphrase(value))
    return values


# --- description for ``npmguard doctor`` ---------------------------------------


def describe_vault(settings: Settings | None = None) -> dict[str, Any]:
    """Return which store is in use and whether it is unlocked; never raises.

    Keys: ``backend`` (``keychain``, ``file`` or None on error), ``configured``
    (the setting), ``reason``, ``unlocked`` (True, False, or None when it
    cannot be told), ``detail`` (one line) and ``error`` (one line or None).
    For the file vault also ``path``, ``exists``, ``kdf``, ``daemon``
    (``running``, ``not running`` or ``no vault support``) and
    ``unlocked_in`` (``daemon``, ``this process`` or None). It never asks
    for a passphrase and never stores anything.
    """
    info: dict[str, Any] = {"backend": None, "configured": None, "reason": "",
                            "unlocked": None, "detail": "", "error": None}
    try:
        selection = choose_backend(settings)
    except NpmguardError as err:
        info["error"] = str(err)
        return info
    info.update(backend=selection.backend, configured=selection.configured,
                reason=selection.reason)
    try:
        if selection.backend == KEYCHAIN:
            _describe_keychain(info)
        else:
            _describe_file_vault(info)
    except Exception as err:  # noqa: BLE001 - doctor reports, never crashes
        info["error"] = _first_line(err)
    return info


def _describe_keychain(info: dict[str, Any]) -> None:
    from npmguard.vault.probe import probe_keychain

    probe = probe_keychain()
    info["detail"] = probe.backend or ""
    if probe.locked is not None:
        info["unlocked"] = not probe.locked
    if probe.error:
        info["error"] = probe.error


def _describe_file_vault(info: dict[str, Any]) -> None:
    from npmguard.vault import remote
    from npmguard.vault.filevault import read_header, vault_path

    path = vault_path()
    info.update(path=str(path), exists=path.exists(), kdf=None, daemon=None,
                unlocked_in=None)
    try:
        header = read_header(path)
    except NpmguardError as err:
        info["error"] = str(err)
        header = None
    if header is not None:
        info["kdf"] = header.kdf.describe()
    if _hosted is not None:
        info.update(daemon="running", unlocked_in="this process")
        info["unlocked"] = bool(getattr(_hosted, "unlocked", False))
        return
    try:
        status = remote.vault_status(raise_unsupported=True)
    except remote.VaultNotServed:
        info.update(daemon="no vault support", unlocked=False,
                    detail="the running daemon does not serve the file vault")
        return
    if status is None:
        info.update(daemon="not running", unlocked=False)
        return
    info["daemon"] = "running"
    info["unlocked"] = bool(status.get("unlocked"))
    if info["unlocked"]:
        info["unlocked_in"] = "daemon"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else "no detail"
    return f"{type(err).__name__}: {first}"
