"""The Secret Service over one long-lived D-Bus connection.

keyring's SecretService backend opens a new connection for every call, and
the first message on it is a property read. gnome-keyring 42 sometimes
aborts on such a first message, which takes the user's keyring daemon down,
and each new connection also costs several milliseconds. This client keeps
one connection, starts it with a method call (``ReadAlias``) and reuses its
session for secrets.

Items stay interchangeable with keyring's backend: the same attributes
(keyring's scheme plus its ``application``), label, collection choice and
unlocking rules. Failures raise the keyring errors that keyring itself would,
so the caller maps both paths the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import keyring.errors
import secretstorage
from jeepney import MatchRule, MessageType  # type: ignore[import-untyped]
from secretstorage.collection import Collection, create_collection
from secretstorage.defines import SS_PATH, SS_PREFIX
from secretstorage.dhcrypto import Session
from secretstorage.exceptions import SecretStorageException
from secretstorage.util import DBusAddressWrapper, open_session

T = TypeVar("T")

# Max seconds to wait for a person to answer the desktop's unlock prompt. The
# store's lock is held meanwhile, so other callers in the process wait too.
# NOTE: an estimate of how long typing a password takes. Tests run with no
# prompter, so the timeout and Dismiss path has not run here.
UNLOCK_PROMPT_SECONDS = 30.0
_PROMPT_IFACE = SS_PREFIX + "Prompt"


class SecretServiceClient:
    """get/set/delete like keyring's SecretService backend, on one connection.

    Safe to share between threads: one lock serialises use of the connection,
    which jeepney's blocking connection requires.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._preferred: str | None = getattr(backend, "preferred_collection", None)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._session: Session | None = None
        self._collection: Collection | None = None

    def get_password(self, service: str, username: str) -> str | None:
        def op() -> str | None:
            collection = self._unlocked_collection()
            for item in collection.search_items(self._query(service, username)):
                if item.is_locked():
                    self._unlock(item.item_path)
                    if item.is_locked():
                        raise keyring.errors.KeyringLocked("Failed to unlock the item!")
                return item.get_secret().decode("utf-8")
            return None

        return self._run(op)

    def set_password(self, service: str, username: str, password: str) -> None:
        attributes = self._query(service, username, application=self._backend.appid)
        label = f"Password for '{username}' on '{service}'"

        def op() -> None:
            collection = self._unlocked_collection()
            secret = password.encode("utf-8")
            collection.create_item(label, attributes, secret, replace=True)

        self._run(op)

    def delete_password(self, service: str, username: str) -> None:
        def op() -> None:
            collection = self._unlocked_collection()
            for item in collection.search_items(self._query(service, username)):
                item.delete()
                return
            raise keyring.errors.PasswordDeleteError("No such password!")

        self._run(op)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --- internals, called with self._lock held -----------------------------

    def _query(self, service: str, username: str, **base: str) -> dict[str, str]:
        # keyring's own query builder, so a configured scheme is honoured.
        query: dict[str, str] = self._backend._query(service, username, **base)
        return query

    def _run(self, op: Callable[[], T]) -> T:
        with self._lock:
            try:
                return op()
            except keyring.errors.KeyringError:
                # Locked, missing or no collection. A new connection would
                # raise the same error.
                raise
            except Exception:  # noqa: BLE001 - jeepney and D-Bus errors vary
                # The daemon may have restarted, which invalidates the session
                # and maybe the socket, so retry once on a new connection.
                self._drop()
            return op()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._session = None
        self._collection = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def _connect(self) -> Collection:
        conn = secretstorage.dbus_init()
        try:
            service = DBusAddressWrapper(SS_PATH, SS_PREFIX + "Service", conn)
            # A method call first: gnome-keyring 42 can abort when a new
            # connection's first message is a property read. A second read
            # covers an alias that may not be set yet while the daemon starts.
            (path,) = service.call("ReadAlias", "s", "default")
            if len(path) <= 1:
                (path,) = service.call("ReadAlias", "s", "default")
            session = open_session(conn)
            try:
                if self._preferred:
                    collection = Collection(conn, self._preferred, session)
                elif len(path) > 1:
                    collection = Collection(conn, path, session)
                else:
                    collection = create_collection(conn, "Default", "default", session)
                    collection.session = session
            except SecretStorageException as err:
                raise keyring.errors.InitError(
                    f"Failed to create the collection: {err}."
                ) from err
        except BaseException:
            conn.close()
            raise
        self._conn, self._session, self._collection = conn, session, collection
        return collection

    def _unlocked_collection(self) -> Collection:
        collection = self._collection or self._connect()
        if collection.is_locked():
            self._unlock(collection.collection_path)
            if collection.is_locked():  # the prompt was dismissed or timed out
                raise keyring.errors.KeyringLocked("Failed to unlock the collection!")
        return collection

    def _unlock(self, path: str) -> None:
        """Request unlocking ``path`` and wait a bounded time for its prompt."""
        conn = self._conn
        service = DBusAddressWrapper(SS_PATH, SS_PREFIX + "Service", conn)
        _unlocked, prompt_path = service.call("Unlock", "ao", [path])
        if len(prompt_path) <= 1:
            return
        prompt = DBusAddressWrapper(prompt_path, _PROMPT_IFACE, conn)
        rule = MatchRule(
            path=prompt_path,
            interface=_PROMPT_IFACE,
            member="Completed",
            type=MessageType.signal,
        )
        with conn.filter(rule) as signals:
            prompt.call("Prompt", "s", "")
            try:
                conn.recv_until_filtered(signals, timeout=UNLOCK_PROMPT_SECONDS)
            except TimeoutError:
                # Take the prompt down so it does not linger on the screen.
                # The prompt may be gone already.
                with contextlib.suppress(Exception):
                    prompt.call("Dismiss", "")
