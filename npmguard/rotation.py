"""Replacing a stored token with a new one, in an order that survives a crash.

The vault entry's name does not change, so the config files need no edit;
only the value behind the marker does. The order:

1. journal ``creating``: the entry, the old token's fingerprint, no values;
2. ask the registry for a new token with the old one's scope; store it
   as ``NAME#next`` and read it back; journal ``created``;
3. verify the new token (whoami gives the same user);
4. keep the old value as ``NAME#old``, store the new one as ``NAME``;
   journal ``stored``;
5. drop cached copies (the daemon's value cache, minted tokens);
6. revoke the old token, with a few tries; journal ``revoked``;
7. update the credential index, delete ``#next`` and ``#old``, drop the
   journal entry.

Until step 4 the old token stays in force and in use: a failure undoes the
new one (revoked where possible, deleted from the vault). From step 4 on the
new token is in use, and a failure to revoke leaves the journal entry so
that the next run (``npmguard rotate`` or the daemon) tries again.
``recover`` finishes or undoes entries left by a killed run.

GitLab's self-rotation revokes the old token when it creates the new one,
so for it steps 3 to 6 cannot undo anything: the new token must be kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npmguard import audit, paths
from npmguard.errors import JournalError, NpmguardError
from npmguard.files import write_private
from npmguard.lifecycle import Managed, managed, update
from npmguard.migrate import (
    NEXT_SUFFIX,
    OLD_SUFFIX,
    _store_verified,
    load_index,
    save_index,
    state_lock,
)
from npmguard.registry.base import (
    PUBLISH,
    READ_ONLY,
    Auth,
    IssuedToken,
    NotSupportedError,
    OtpRequiredError,
    PasswordRequiredError,
    Provider,
    RegistryError,
    TokenInfo,
    TokenRejectedError,
)
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore, require

log = logging.getLogger(__name__)

REVOKE_TRIES = 3
REVOKE_PAUSE_SECONDS = 1.0
_TXID = re.compile(r"[0-9a-f]{16}")

# (what, registry) -> the answer typed by the user, or None when nobody can
# be asked (the daemon, a script without a terminal).
Asker = Callable[[str, str], "str | None"]
ProviderFactory = Callable[[Managed], Provider]


class RotationError(NpmguardError):
    """A rotation did not finish; the message names the token in force."""


class RotationBusyError(RotationError):
    """Another npmguard process is rotating a token right now."""


@dataclass
class Outcome:
    """The result of one rotation, for the command's output and the audit trail."""

    name: str
    registry: str
    old_fingerprint: str
    new_fingerprint: str
    revoked: bool  # the old token no longer works at the registry
    message: str
    expires: float | None = None


def rotation_dir() -> Path:
    return paths.state_dir() / "rotation"


def pending_rotations() -> list[Path]:
    try:
        return sorted(rotation_dir().glob("*.json"))
    except OSError:
        return []


@contextlib.contextmanager
def rotation_lock() -> Iterator[None]:
    """Hold the lock that keeps two rotations from running at once."""
    import fcntl

    directory = rotation_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationBusyError(
                "another npmguard process is rotating a token; try again when "
                "it has finished"
            ) from None
        yield
    finally:
        os.close(fd)


class Rotator:
    """Runs rotations and their recovery against one vault."""

    def __init__(
        self,
        store: CredentialStore,
        provider_for: ProviderFactory,
        *,
        ask: Asker | None = None,
        invalidate: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.provider_for = provider_for
        self.ask = ask
        self.invalidate = invalidate
        self.sleep = sleep
        self._otp: str | None = None

    def set_otp(self, otp: str | None) -> None:
        self._otp = otp

    # --- one rotation ------------------------------------------------------

    def rotate(self, entry: Managed, *, reason: str) -> Outcome:
        """Replace ``entry``'s token; see the module docstring for the order."""
        provider = self.provider_for(entry)
        capabilities = provider.capabilities
        if not capabilities.rotate:
            raise NotSupportedError(
                f"{entry.registry} cannot rotate tokens: {capabilities.note}"
            )
        with rotation_lock():
            if _journal_for(entry.name) is not None:
                raise RotationError(
                    f"an earlier rotation of {entry.registry} did not finish; run "
                    "`npmguard rotate` with no options to finish it first"
                )
            old = require(self.store, entry.name)
            record: dict[str, Any] = {
                "txid": secrets.token_hex(8),
                "name": entry.name,
                "registry": entry.registry,
                "provider": capabilities.provider,
                "reason": reason,
                "old_fingerprint": old.fingerprint,
                "old_key": entry.meta.get("token_key"),
                "phase": "creating",
                "created": time.time(),
            }
            _write(record)
            log.info("rotating the token for %s (fingerprint %s): %s",
                     entry.registry, old.fingerprint, reason)
            try:
                issued = self._with_answers(
                    entry, lambda auth: provider.replace(auth, ttl_seconds=None), old
                )
            except BaseException as err:
                _drop(record)
                self._failed(entry, old.fingerprint, "creating the new token", err)
                raise
            return self._after_create(entry, provider, record, old, issued)

    def _after_create(
        self,
        entry: Managed,
        provider: Provider,
        record: dict[str, Any],
        old: Secret,
        issued: IssuedToken,
    ) -> Outcome:
        try:
            _store_verified(self.store, entry.name + NEXT_SUFFIX, issued.value)
        except BaseException as err:
            self._undo_new(entry, provider, issued.value, issued.info, old, record)
            self._failed(entry, old.fingerprint, "storing the new token", err)
            raise
        record.update(
            phase="created",
            new_fingerprint=issued.value.fingerprint,
            new_key=issued.info.key,
            expires=issued.info.expires,
            issued=issued.info.created or time.time(),
            read_only=issued.info.read_only,
            old_revoked=issued.old_revoked,
        )
        _write(record)
        audit.note("minted", registry=entry.registry, provider=record["provider"],
                   fingerprint=issued.value.fingerprint, reason="rotation",
                   expires=issued.info.expires)
        return self._verify_and_swap(entry, provider, record, old, issued.value)

    def _verify_and_swap(
        self,
        entry: Managed,
        provider: Provider,
        record: dict[str, Any],
        old: Secret,
        new: Secret,
    ) -> Outcome:
        info = TokenInfo(key=record.get("new_key"))
        try:
            user = provider.whoami(new)
        except TokenRejectedError as err:
            if record.get("old_revoked"):
                raise self._keep_only_copy(entry, record, err) from err
            self._undo_new(entry, provider, new, info, old, record)
            self._failed(entry, old.fingerprint, "verifying the new token", err)
            raise RotationError(
                f"the new token for {entry.registry} failed verification "
                f"({err}); it was revoked and the old token stays in use"
            ) from err
        expected = entry.meta.get("username")
        if isinstance(expected, str) and expected and user != expected:
            error = RegistryError(f"it belongs to {user!r}, not {expected!r}")
            if record.get("old_revoked"):
                raise self._keep_only_copy(entry, record, error)
            self._undo_new(entry, provider, new, info, old, record)
            self._failed(entry, old.fingerprint, "verifying the new token", error)
            raise RotationError(
                f"the new token for {entry.registry} belongs to {user!r}, not "
                f"{expected!r}; it was revoked and the old token stays in use"
            )
        record["username"] = user

        with state_lock():
            _store_verified(self.store, entry.name + OLD_SUFFIX, old)
            _store_verified(self.store, entry.name, new)
            record["phase"] = "stored"
            _write(record)
        log.info("stored the new token for %s (fingerprint %s)",
                 entry.registry, new.fingerprint)
        return self._finish(entry, provider, record, old, new)

    def _finish(
        self,
        entry: Managed,
        provider: Provider,
        record: dict[str, Any],
        old: Secret,
        new: Secret,
    ) -> Outcome:
        self._invalidate()
        revoked, note = self._revoke_old(entry, provider, record, old, new)
        if not revoked and note is None:
            _write(record)
            message = (
                f"rotated the token for {entry.registry} (fingerprint "
                f"{record['old_fingerprint']} -> {new.fingerprint}), but revoking "
                "the old one failed; it still works until a later `npmguard "
                "rotate` revokes it"
            )
            self._failed(entry, record["old_fingerprint"], "revoking the old token",
                         RegistryError(str(record.get("revoke_error"))))
            raise RotationError(message)

        with state_lock():
            index = load_index()
            # Other entries that hold the same token (secured again from a
            # second file) would keep a revoked value: give them the new one.
            for name, other in index.items():
                if name == entry.name:
                    continue
                same = other.get("fingerprint") == record["old_fingerprint"]
                if same and self.store.get(name) == old:
                    _store_verified(self.store, name, new)
                    other.update(fingerprint=new.fingerprint, rotated=time.time())
                    log.info("gave the new token to %s too (it held the same token)",
                             name)
            meta = index.get(entry.name)
            if meta is not None:
                meta.update(
                    fingerprint=new.fingerprint,
                    issued=record.get("issued") or time.time(),
                    rotated=time.time(),
                    token_key=record.get("new_key"),
                    expires=record.get("expires"),
                    username=record.get("username"),
                    provider=record.get("provider"),
                )
                if record.get("read_only") is not None:
                    meta["read_only"] = record["read_only"]
                for key in [k for k, v in meta.items() if v is None]:
                    del meta[key]
                meta.pop("exposed", None)
                save_index(index)
            for suffix in (NEXT_SUFFIX, OLD_SUFFIX):
                self.store.delete(entry.name + suffix)
            _drop(record)
        # Once more now that the index names the new token, so that the
        # daemon's state (exposures, failures) is refreshed from it.
        self._invalidate()
        audit.note("rotated", registry=entry.registry, provider=record["provider"],
                   fingerprint=new.fingerprint,
                   reason=str(record.get("reason") or ""),
                   old_fingerprint=record["old_fingerprint"])
        message = (
            f"rotated the token for {entry.registry}: fingerprint "
            f"{record['old_fingerprint']} -> {new.fingerprint}; "
            + (note or "the old token is revoked")
        )
        log.info("%s", message)
        return Outcome(entry.name, entry.registry, record["old_fingerprint"],
                       new.fingerprint, revoked, message, record.get("expires"))

    # --- revoking ----------------------------------------------------------

    def _revoke_old(
        self,
        entry: Managed,
        provider: Provider,
        record: dict[str, Any],
        old: Secret,
        new: Secret,
    ) -> tuple[bool, str | None]:
        """Revoke the old token; return (revoked, note when it cannot be)."""
        if record.get("revoked_by"):
            return True, f"the old token was revoked by {record['revoked_by']}"
        if record.get("old_revoked"):
            audit.note("revoked", registry=entry.registry,
                       fingerprint=record["old_fingerprint"],
                       reason="the registry revoked it when rotating")
            return True, "the registry revoked the old token itself"
        info = TokenInfo(key=record.get("old_key"))
        for attempt in range(1, REVOKE_TRIES + 1):
            try:
                self._with_answers(
                    entry, lambda auth: provider.revoke(auth, old, info), new
                )
            except NotSupportedError as err:
                audit.note("refused", registry=entry.registry,
                           fingerprint=record["old_fingerprint"],
                           reason=f"revoke not possible: {err}")
                log.warning("cannot revoke the old token for %s: %s",
                            entry.registry, err)
                return False, (
                    f"the old token could not be revoked ({err}); revoke it on "
                    "the registry's website"
                )
            except (RegistryError, OSError) as err:
                record["revoke_error"] = str(err)
                record["revoke_tries"] = int(record.get("revoke_tries") or 0) + 1
                log.warning("revoking the old token for %s failed (try %d of %d): %s",
                            entry.registry, attempt, REVOKE_TRIES, err)
                if attempt < REVOKE_TRIES:
                    self.sleep(REVOKE_PAUSE_SECONDS * attempt)
                continue
            record["phase"] = "revoked"
            _write(record)
            audit.note("revoked", registry=entry.registry,
                       fingerprint=record["old_fingerprint"], reason="rotation")
            return True, None
        return False, None

    def _undo_new(
        self,
        entry: Managed,
        provider: Provider,
        new: Secret,
        info: TokenInfo,
        old: Secret,
        record: dict[str, Any],
    ) -> None:
        """Revoke a new token that will not be used and forget it; keep the old."""
        try:
            provider.revoke(self._auth(entry, old), new, info)
            audit.note("revoked", registry=entry.registry,
                       fingerprint=new.fingerprint, reason="rotation undone")
        except (RegistryError, OSError) as err:
            log.warning("could not revoke the unused new token for %s "
                        "(fingerprint %s): %s", entry.registry, new.fingerprint, err)
        with contextlib.suppress(NpmguardError):
            self.store.delete(entry.name + NEXT_SUFFIX)
        _drop(record)

    def _keep_only_copy(
        self, entry: Managed, record: dict[str, Any], err: Exception
    ) -> RotationError:
        """Keep the new token, whatever it is: the registry revoked the old one."""
        new = require(self.store, entry.name + NEXT_SUFFIX)
        with state_lock():
            _store_verified(self.store, entry.name, new)
            self.store.delete(entry.name + NEXT_SUFFIX)
            update(entry.name, fingerprint=new.fingerprint, rotated=time.time())
            _drop(record)
        self._invalidate()
        self._failed(entry, record["old_fingerprint"], "verifying the new token", err)
        return RotationError(
            f"{entry.registry} revoked the old token and the new one failed "
            f"verification ({err}); the new one is stored, check it with "
            "`npmguard exec -- npm whoami`"
        )

    # --- recovery ----------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo every rotation a killed run left; return what was done."""
        if not pending_rotations():
            return []
        messages: list[str] = []
        with rotation_lock():
            for path in pending_rotations():
                record = _load(path)
                try:
                    messages.append(self._recover_one(record))
                except (NpmguardError, OSError) as err:
                    messages.append(
                        f"could not finish the rotation of {record['registry']} "
                        f"yet: {err}"
                    )
        for message in messages:
            log.info("rotation recovery: %s", message)
        return messages

    def _recover_one(self, record: dict[str, Any]) -> str:
        name = str(record["name"])
        meta = load_index().get(name)
        if meta is None:
            self._forget_copies(name)
            _drop(record)
            return (f"dropped an interrupted rotation of {record['registry']}: its "
                    "credential is no longer stored")
        entry = next((m for m in managed() if m.name == name), Managed(name, meta))
        provider = self.provider_for(entry)
        phase = record["phase"]
        pending = self.store.get(name + NEXT_SUFFIX)
        current = require(self.store, name)

        if phase == "creating" and pending is None:
            _drop(record)
            audit.note("failed", registry=entry.registry,
                       fingerprint=record["old_fingerprint"],
                       reason="rotation killed while creating the new token")
            return (
                f"a rotation of {entry.registry} was killed while the registry "
                "created a new token; the old token is still in use. If the "
                "registry lists a token you do not know, revoke it there"
            )
        if phase in ("creating", "created"):
            if pending is None:
                _drop(record)
                return f"undid an interrupted rotation of {entry.registry}"
            record.setdefault("new_fingerprint", pending.fingerprint)
            if current == pending:
                # Killed between storing the new value and the journal write.
                old = self.store.get(name + OLD_SUFFIX)
                if old is None:
                    raise JournalError(
                        f"the rotation of {entry.registry} lost the old token's "
                        "copy; the new token is in use", path=_path(record)
                    )
                record["phase"] = "stored"
                self._finish(entry, provider, record, old, pending)
                return f"finished an interrupted rotation of {entry.registry}"
            self._verify_and_swap(entry, provider, record, current, pending)
            return f"finished an interrupted rotation of {entry.registry}"

        # stored or revoked: the new token is in use.
        old = self.store.get(name + OLD_SUFFIX)
        if phase == "revoked" or old is None:
            # Revoked before the kill, or the copies were already cleaned up.
            record["revoked_by"] = "an earlier run"
            old = old or current
        self._finish(entry, provider, record, old, current)
        return f"finished an interrupted rotation of {entry.registry}"

    def _forget_copies(self, name: str) -> None:
        for suffix in (NEXT_SUFFIX, OLD_SUFFIX):
            with contextlib.suppress(NpmguardError):
                self.store.delete(name + suffix)

    # --- helpers -----------------------------------------------------------

    def _auth(self, entry: Managed, token: Secret) -> Auth:
        password = None
        if entry.password_name:
            password = self.store.get(entry.password_name)
        return Auth(token=token, password=password, otp=self._otp)

    def _with_answers(
        self, entry: Managed, call: Callable[[Auth], Any], token: Secret
    ) -> Any:
        """Run ``call``, asking for a password or one-time code when it needs one."""
        auth = self._auth(entry, token)
        for _ in range(3):
            try:
                return call(auth)
            except PasswordRequiredError as err:
                if auth.password is not None:
                    raise
                if self.ask is not None:
                    answer = self.ask("password", entry.registry)
                    if not answer:
                        raise
                    auth = Auth(auth.token, Secret(answer), auth.otp)
                    continue
                raise PasswordRequiredError(
                    f"{err}; run `npmguard rotate --registry {entry.url()}` in "
                    "a terminal to type it, or log in again with `npmguard "
                    "login --store-password`"
                ) from err
            except OtpRequiredError:
                answer = self.ask("otp", entry.registry) if self.ask else None
                if not answer or answer == auth.otp:
                    raise
                self._otp = answer
                auth = Auth(auth.token, auth.password, answer)
        return call(auth)

    def _invalidate(self) -> None:
        try:
            self.invalidate()
        except Exception as err:  # noqa: BLE001 - a cache is not worth a rotation
            log.warning("could not drop cached token copies: %s", err)

    def _failed(
        self, entry: Managed, fingerprint: str, step: str, err: BaseException
    ) -> None:
        reason = f"{step}: {err}" if str(err) else step
        audit.note("failed", registry=entry.registry, fingerprint=fingerprint,
                   reason=f"rotation, {reason}"[:300])
        # INFO: the caller reports the error itself (stderr, a notification).
        log.info("rotation of %s failed while %s", entry.registry, reason)


def scope_of(entry: Managed) -> str:
    return READ_ONLY if entry.meta.get("read_only") else PUBLISH


def _path(record: dict[str, Any]) -> Path:
    return rotation_dir() / f"{record['txid']}.json"


def _write(record: dict[str, Any]) -> None:
    write_private(_path(record), json.dumps(record, sort_keys=True).encode())


def _drop(record: dict[str, Any]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(record))


def _journal_for(name: str) -> dict[str, Any] | None:
    for path in pending_rotations():
        with contextlib.suppress(JournalError):
            record = _load(path)
            if record["name"] == name:
                return record
    return None


def pending_names() -> dict[str, str]:
    """Map the vault name of each unfinished rotation to its registry.

    Unreadable journal entries are left out; ``Rotator.recover`` reports them.
    """
    names: dict[str, str] = {}
    for path in pending_rotations():
        with contextlib.suppress(JournalError):
            record = _load(path)
            names[str(record["name"])] = str(record.get("registry") or "")
    return names


def _load(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_bytes())
        valid = (
            isinstance(record, dict)
            and _TXID.fullmatch(str(record.get("txid"))) is not None
            and path.name == f"{record['txid']}.json"
            and isinstance(record.get("name"), str)
            and record.get("phase") in ("creating", "created", "stored", "revoked")
            and isinstance(record.get("old_fingerprint"), str)
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _journal_error(path) from err
    if not valid:
        raise _journal_error(path)
    return record  # type: ignore[no-any-return]


def _journal_error(path: Path) -> JournalError:
    return JournalError(
        "cannot read an interrupted rotation's journal entry; inspect it, then "
        "delete it", path=path,
    )


# A token that expires is replaced when this share of its life is left.
EXPIRY_SHARE = 0.2


def due(entries: list[Managed], rotate_days: Callable[[Managed], float],
        now: float | None = None) -> list[Managed]:
    """Return the entries whose scheduled rotation is due or that expire soon."""
    now = now or time.time()
    result = []
    for entry in entries:
        days = rotate_days(entry)
        last = entry.rotated or entry.issued
        scheduled = days > 0 and last is not None and now - last >= days * 86400
        if scheduled or expires_soon(entry, now):
            result.append(entry)
    return result


def expires_soon(entry: Managed, now: float) -> bool:
    """Tell whether less than ``EXPIRY_SHARE`` of the token's life is left."""
    if entry.expires is None:
        return False
    start = entry.rotated or entry.issued or entry.expires
    life = max(entry.expires - start, 0.0)
    return now >= entry.expires - EXPIRY_SHARE * life


def next_rotation(entry: Managed, rotate_days: float) -> float | None:
    """Return when the token is next replaced: by schedule or before it expires."""
    last = entry.rotated or entry.issued
    times = []
    if rotate_days > 0 and last is not None:
        times.append(last + rotate_days * 86400)
    if entry.expires is not None:
        start = last or entry.expires
        times.append(entry.expires - EXPIRY_SHARE * max(entry.expires - start, 0.0))
    return min(times) if times else None

