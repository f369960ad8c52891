"""Acting on config files that contain plaintext credentials.

The watcher hands the guardian the paths of changed config files. For each
one the guardian reads and parses the file, works out its place (the user
config, the global config, or a project file under a root) and so its
policy, and then:

- ``auto``: secures the file at once, as ``npmguard secure`` would, and
  keeps the pnpm token helpers in the user config in step;
- ``ask``: records an ``Exposure`` in the ``DaemonState``, which the tray
  and the notifications show, until "Secure now" (``secure_now``) or
  ``npmguard secure`` moves the value;
- ``off``: leaves the file alone and records nothing.

While ``state.snapshot.paused`` is set, ``auto`` acts like ``ask``. A full
scan after resuming secures what was found meanwhile.

``state.exposures`` lists the plaintext credentials on disk as last read.
An exposure goes away when its file no longer contains the value, is
deleted, or is missing from a ``Rescan``. An auto file that could not be
secured (a locked keychain, a read-only file) is listed too.

A plaintext value whose fingerprint is a stored token's was secured
before and is back on disk: the guardian marks that token as exposed in
the credential index (``lifecycle.mark_exposed``) and publishes the state's
``leaks``, which the tray and the notifications offer to rotate and revoke.
Each newly seen plaintext value gets an audit ``found`` record and each
value moved an audit ``secured`` record (fingerprints, never values).

Errors never stop the guardian. Each one is logged once per file and
cause, not once per event, and again only after the file was clean in
between. A locked keychain sets ``vault_locked`` in the state, and the
next file that is secured clears it. A missing vault backend sets
``error``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npmguard.config import Settings
from npmguard.daemon.state import DaemonState, Exposure
from npmguard.daemon.watcher import Rescan, known_configs
from npmguard.errors import (
    ConfigFileError,
    FileChangedError,
    NpmguardError,
    VaultLockedError,
    VaultUnavailableError,
)
from npmguard.files import read_config
from npmguard.migrate import pending_journal, recover, secure_file, state_lock
from npmguard.npmrc.credentials import Finding, find_credentials
from npmguard.vault.base import CredentialStore

log = logging.getLogger(__name__)

# The log-once key of errors that belong to the vault, not to one file.
_VAULT = Path("<vault>")


class Guardian:
    """The policy engine: it checks changed config files and keeps the
    exposures in the state current.

    ``handle`` and ``full_scan`` return the paths to offer again shortly,
    because another npmguard run held the state lock or the file changed
    while it was secured. All methods are safe to call from any thread.
    """

    def __init__(
        self,
        settings: Settings,
        state: DaemonState,
        store_factory: Callable[[], CredentialStore],
        *,
        user_config: Path,
        global_config: Path | None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.store_factory = store_factory
        self.user_config = _key(user_config)
        self.global_config = _key(global_config) if global_config is not None else None
        self._lock = threading.RLock()
        self._exposures: dict[Path, tuple[Exposure, ...]] = {}
        self._logged: dict[Path, set[str]] = {}
        self._error: str | None = None

    # -- entry points ------------------------------------------------------

    def full_scan(self) -> set[Path]:
        """Check every config file that exists now."""
        errors: list[tuple[Path, str]] = []
        found = known_configs(
            self.settings, self.user_config, self.global_config, errors
        )
        for path, reason in errors:
            self._once(path, reason, logging.WARNING, "cannot scan %s: %s", path,
                       reason)
        return self.handle(found)

    def handle(self, paths: set[Path]) -> set[Path]:
        """Check each changed path. For a ``Rescan``, also drop the exposures
        of paths that are missing from it."""
        retry: set[Path] = set()
        with self._lock:
            keys = {_key(p) for p in paths}
            for key in sorted(keys):
                try:
                    if not self._check(key):
                        retry.add(key)
                except Exception as err:  # noqa: BLE001 - one file must not stop the rest
                    self._once(key, f"bug: {type(err).__name__}", logging.ERROR,
                               "checking %s failed", key, exc_info=True)
            if isinstance(paths, Rescan):
                for gone in set(self._exposures) - keys:
                    self._forget(gone)
            self._publish()
        return retry

    def secure_now(self) -> int:
        """Secure every recorded exposure, whatever its policy, and return
        how many values moved into the vault."""
        moved = 0
        with self._lock:
            for key in sorted(self._exposures):
                count = self._secure(key)
                if count is None:
                    log.info("not securing %s now: another npmguard run has "
                             "the state lock; try again when it is done", key)
                    continue
                moved += count
                findings = self._read(key)
                if findings is not None:
                    policy = self.place(key)[1]
                    self._record(key, [f for f in findings if f.is_exposed], policy)
            self._publish()
        return moved

    def place(self, path: Path) -> tuple[str, str]:
        """Return where ``path`` is (user, global or project) and its policy."""
        key = _key(path)
        real = os.path.realpath(key)
        if key == self.user_config or real == os.path.realpath(self.user_config):
            return "user", self.settings.user_policy
        if self.global_config is not None and (
            key == self.global_config or real == os.path.realpath(self.global_config)
        ):
            return "global", self.settings.global_policy
        best: tuple[int, str] | None = None
        for root in self.settings.roots:
            for base in {_key(root.path), Path(os.path.realpath(root.path))}:
                inside = key.is_relative_to(base) or Path(real).is_relative_to(base)
                if inside and (best is None or len(base.parts) > best[0]):
                    best = (len(base.parts), root.policy)
        return "project", best[1] if best else self.settings.project_policy

    # -- one file ----------------------------------------------------------

    def _check(self, key: Path) -> bool:
        """Apply the policy to one file. Return False to be called again
        soon for it."""
        policy = self.place(key)[1]
        if policy == "off":
            self._forget(key)
            return True
        findings = self._read(key)
        if findings is None:
            return True
        exposed = [f for f in findings if f.is_exposed]
        paused = self.state.snapshot.paused
        new = self._log_new(key, exposed, policy, paused)
        self._check_leaks(key, new)
        if exposed and policy == "auto" and not paused:
            if self._secure(key) is None:
                self._record(key, exposed, policy)
                return False
            findings = self._read(key)
            if findings is None:
                return True
            exposed = [f for f in findings if f.is_exposed]
        self._record(key, exposed, policy)
        return True

    def _read(self, key: Path) -> list[Finding] | None:
        """Return the file's credentials, or None when it is deleted (its
        exposures are dropped) or invalid (the error is logged)."""
        try:
            config = read_config(key)
        except ConfigFileError as err:
            if not (key.exists() or key.is_symlink()):
                self._forget(key)
                return None
            # What was recorded for the file stays, because nothing newer
            # is known.
            self._once(key, str(err), logging.WARNING, "cannot check %s", err)
            return None
        return find_credentials(key, config.document)

    def _secure(self, key: Path) -> int | None:
        """Move the file's plaintext values into the vault and return how
        many moved, or None when the move should be tried again soon."""
        try:
            with state_lock(wait=False) as held:
                if not held:
                    log.debug("state lock busy; trying %s again soon", key)
                    return None
                if pending_journal():
                    for message in recover(self.store_factory):
                        log.info("recovery: %s", message)
                result = secure_file(key, self.store_factory())
                if result.changed:
                    self._sync_helpers()
        except FileChangedError as err:
            log.info("%s", err)
            return None
        except VaultLockedError as err:
            self.state.update(vault_locked=True)
            self._once(_VAULT, "locked", logging.WARNING,
                       "%s; %s keeps its plaintext credential for now", err, key)
            return 0
        except VaultUnavailableError as err:
            self._error = f"no vault: {err}"
            self.state.update(error=self._error)
            self._once(_VAULT, "unavailable", logging.ERROR, "%s", err)
            return 0
        except NpmguardError as err:
            self._once(key, str(err), logging.WARNING, "could not secure: %s", err)
            return 0
        if not result.changed:
            return 0
        for finding in result.moved:
            _audit("secured", registry=finding.registry, kind=finding.kind,
                   fingerprint=finding.fingerprint, path=str(key),
                   line=finding.line, source="daemon")
        self._logged.pop(_VAULT, None)
        changes: dict[str, Any] = {
            "vault_locked": False,
            "secured_count": self.state.snapshot.secured_count + len(result.moved),
        }
        if self._error is not None and self.state.snapshot.error == self._error:
            changes["error"] = None
        self._error = None
        self.state.update(**changes)
        return len(result.moved)

    def _sync_helpers(self) -> None:
        """Keep pnpm's token helper lines in step, as ``npmguard secure`` does."""
        if shutil.which("pnpm") is None:
            return
        from npmguard.commands.secure import secured_registries
        from npmguard.inject.helpers import sync_token_helpers

        try:
            messages = sync_token_helpers(self.user_config, secured_registries())
        except NpmguardError as err:
            self._once(self.user_config, f"helpers: {err}", logging.WARNING,
                       "could not update the pnpm token helpers: %s", err)
            return
        for message in messages:
            log.info("%s", message)

    # -- bookkeeping -------------------------------------------------------

    def _log_new(
        self, key: Path, exposed: list[Finding], policy: str, paused: bool
    ) -> list[Finding]:
        """Log and audit the plaintext values not seen in ``key`` before, and
        return them."""
        known = {(e.line, e.fingerprint) for e in self._exposures.get(key, ())}
        new: list[Finding] = []
        if policy == "auto" and not paused:
            action = "securing it"
        elif policy == "auto":
            action = "not securing it while paused"
        else:
            action = "waiting for Secure now"
        for finding in exposed:
            if (finding.line, finding.fingerprint) in known:
                continue
            new.append(finding)
            log.info(
                "found plaintext %s for %s at %s:%d (fingerprint %s); policy %s, %s",
                finding.kind, finding.registry or "-", key, finding.line,
                finding.fingerprint, policy, action,
            )
            _audit("found", registry=finding.registry, kind=finding.kind,
                   fingerprint=finding.fingerprint, path=str(key),
                   line=finding.line, policy=policy)
        return new

    def _check_leaks(self, key: Path, found: list[Finding]) -> None:
        """Mark stored tokens that are back in plaintext as exposed."""
        fingerprints = {f.fingerprint for f in found if f.fingerprint}
        if not fingerprints:
            return
        from npmguard.commands.common import display_path
        from npmguard.lifecycle import managed, mark_exposed

        try:
            stored = {m.fingerprint for m in managed(tokens_only=True)}
            marked: list[str] = []
            for finding in found:
                if finding.fingerprint not in stored:
                    continue
                reason = (f"in plaintext again at {display_path(key)}:"
                          f"{finding.line}")
                names = mark_exposed(finding.fingerprint, reason)
                if names:
                    log.warning(
                        "the stored token for %s (fingerprint %s) is in plaintext "
                        "again at %s:%d; it counts as exposed until it is rotated "
                        "(`npmguard rotate --exposed`)", finding.registry or "-",
                        finding.fingerprint, key, finding.line,
                    )
                marked += names
        except NpmguardError as err:
            self._once(key, f"leaks: {err}", logging.WARNING,
                       "could not check %s against the stored tokens: %s", key, err)
            return
        if marked:
            self.state.refresh_leaks()

    def _record(self, key: Path, exposed: list[Finding], policy: str) -> None:
        if not exposed:
            self._forget(key)
            return
        self._exposures[key] = tuple(
            Exposure(str(key), f.line, f.registry, f.kind, f.fingerprint, policy)
            for f in exposed
        )

    def _forget(self, key: Path) -> None:
        """Drop the exposures and logged errors of a clean or deleted file."""
        self._exposures.pop(key, None)
        self._logged.pop(key, None)

    def _publish(self) -> None:
        exposures = tuple(
            sorted(
                (e for found in self._exposures.values() for e in found),
                key=lambda e: (e.path, e.line),
            )
        )
        if exposures != self.state.snapshot.exposures:
            self.state.update(exposures=exposures)

    def _once(
        self, key: Path, cause: str, level: int, message: str, *args: object,
        exc_info: bool = False,
    ) -> None:
        causes = self._logged.setdefault(key, set())
        if cause in causes:
            return
        causes.add(cause)
        log.log(level, message, *args, exc_info=exc_info)


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _audit(event: str, **fields: object) -> None:
    from npmguard import audit

    # note() logs a failure instead of raising, because a full disk must not
    # stop the guardian from securing files.
    audit.note(event, **fields)
