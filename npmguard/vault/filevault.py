"""An encrypted credential file for machines that have no OS keychain.

``vault.bin`` in npmguard's data directory holds every value, encrypted with
AES-256-GCM under a key derived from a passphrase. The file's layout::

    magic    b"npmguard-vault\\n"                    15 bytes
    version  FORMAT_VERSION                          1 byte
    length   of the header, big-endian               2 bytes
    header   JSON: cipher, KDF name, KDF parameters, salt, key check
    nonce    random, new for every write             12 bytes
    body     AES-256-GCM ciphertext and tag of the entries (JSON)
    digest   SHA-256 of everything before it         32 bytes

Everything from the magic to the end of the header is the cipher's
associated data, so a changed KDF parameter or salt fails authentication.
The header names the KDF and its parameters, so a later version can use
stronger ones while files written before still open. The digest is no
protection against an attacker, since anyone can recompute it (the GCM tag
protects the content). It only tells a damaged or truncated file apart from
a wrong passphrase. The key check is an HKDF output of the derived key, so
a wrong passphrase is reported as such before any decryption.

KDF cost, measured with cryptography 50.0.2 on the project's development
machine (2-core Intel Xeon, 24 GiB): Argon2id with 64 MiB, 3 passes and 4
lanes (the second recommended setting of RFC 9106) took 0.22-0.24 s with
the machine otherwise quiet, and a median of 0.49-0.51 s (nine runs) at a
load average of 6.5. The scrypt fallback with n=2**16, r=8, p=1 (64 MiB)
took 0.29 s quiet and 0.42-0.50 s loaded. Unlocking derives the key once;
the store keeps the derived key, never the passphrase, until ``lock``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard import files, paths
from npmguard.errors import VaultError, VaultLockedError
from npmguard.secret import Secret
from npmguard.vault.base import (
    VaultCorruptError,
    VaultMissingError,
    WrongPassphraseError,
)

log = logging.getLogger(__name__)

VAULT_NAME = "vault.bin"
LOCK_NAME = "vault.lock"
MAGIC = b"npmguard-vault\n"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
NONCE_BYTES = 12
SALT_BYTES = 16
KEY_BYTES = 32
CHECK_BYTES = 16
DIGEST_BYTES = 32
TAG_BYTES = 16
# The plaintext is padded to a multiple of this, so the file size reveals
# little about how many values it holds or how long they are.
PAD_BYTES = 256
# Shortest passphrase accepted for a new vault or a passphrase change.
MIN_PASSPHRASE_CHARS = 8

ARGON2ID = "argon2id"
SCRYPT = "scrypt"
ARGON2ID_DEFAULTS = {"memory_kib": 64 * 1024, "iterations": 3, "lanes": 4}
SCRYPT_DEFAULTS = {"n": 2**16, "r": 8, "p": 1}

# Bounds for parameters read from a file. A header is not trusted until the
# tag checks out, and a crafted one must not make the KDF use unbounded
# memory or time before that.
_MAX_MEMORY_BYTES = 4 * 1024**3
_ARGON2ID_BOUNDS = {"memory_kib": (8, 4 * 1024**2), "iterations": (1, 64),
                    "lanes": (1, 64)}
_SCRYPT_BOUNDS = {"n": (2, 2**22), "r": (1, 64), "p": (1, 64)}
_ENCRYPTION_INFO = b"npmguard vault v1 encryption key"
_CHECK_INFO = b"npmguard vault v1 passphrase check"
_PREFIX = struct.Struct(">BH")
_MIN_SIZE = len(MAGIC) + _PREFIX.size + 2 + NONCE_BYTES + TAG_BYTES + DIGEST_BYTES


def vault_path() -> Path:
    """Return the vault file's path: ``vault.bin`` in the user data dir."""
    return paths.data_dir() / VAULT_NAME


# --- key derivation ------------------------------------------------------------


@dataclass(frozen=True)
class Kdf:
    """A passphrase KDF with its parameters, as stored in the vault header."""

    name: str
    params: Mapping[str, int] = field(default_factory=dict)

    def derive(self, passphrase: Secret, salt: bytes) -> bytes:
        """Return ``KEY_BYTES`` of key material for ``passphrase`` and ``salt``."""
        secret = passphrase.reveal().encode("utf-8")
        if self.name == ARGON2ID:
            from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

            return Argon2id(
                salt=salt,
                length=KEY_BYTES,
                iterations=self.params["iterations"],
                lanes=self.params["lanes"],
                memory_cost=self.params["memory_kib"],
            ).derive(secret)
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(
            salt=salt, length=KEY_BYTES, n=self.params["n"], r=self.params["r"],
            p=self.params["p"],
        ).derive(secret)

    def describe(self) -> str:
        if self.name == ARGON2ID:
            p = self.params
            return (f"Argon2id, {p['memory_kib'] // 1024} MiB, "
                    f"{p['iterations']} passes, {p['lanes']} lanes")
        p = self.params
        return f"scrypt, n={p['n']}, r={p['r']}, p={p['p']}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.params)}

    @classmethod
    def from_json(cls, data: object, path: Path) -> Kdf:
        """Read and bound-check the KDF of a header; raise ``VaultCorruptError``."""
        if not isinstance(data, dict):
            raise VaultCorruptError("the header's kdf is not an object", path=path)
        name = data.get("name")
        if name == ARGON2ID:
            bounds = _ARGON2ID_BOUNDS
        elif name == SCRYPT:
            bounds = _SCRYPT_BOUNDS
        else:
            raise VaultCorruptError(
                f"the header names an unknown KDF {name!r}; a newer npmguard "
                "may have written it",
                path=path,
            )
        params: dict[str, int] = {}
        for key, (low, high) in bounds.items():
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise VaultCorruptError(
                    f"the header's {name} parameter {key} is missing or not a "
                    "number",
                    path=path,
                )
            if not low <= value <= high:
                raise VaultCorruptError(
                    f"the header's {name} parameter {key}={value} is outside "
                    f"{low}..{high}",
                    path=path,
                )
            params[key] = value
        kdf = cls(name, params)
        kdf._check_memory(path)
        return kdf

    def _check_memory(self, path: Path) -> None:
        if self.name == ARGON2ID:
            if self.params["memory_kib"] < 8 * self.params["lanes"]:
                raise VaultCorruptError(
                    "the header's argon2id memory_kib is below 8 per lane", path=path
                )
            return
        n, r = self.params["n"], self.params["r"]
        if n & (n - 1):
            raise VaultCorruptError(
                f"the header's scrypt parameter n={n} is not a power of 2", path=path
            )
        if 128 * n * r > _MAX_MEMORY_BYTES:
            raise VaultCorruptError(
                "the header's scrypt parameters need more than 4 GiB", path=path
            )


def default_kdf() -> Kdf:
    """Return the KDF for new vaults: Argon2id when available, else scrypt."""
    if argon2id_available():
        return Kdf(ARGON2ID, dict(ARGON2ID_DEFAULTS))
    return Kdf(SCRYPT, dict(SCRYPT_DEFAULTS))


_argon2id_ok: bool | None = None


def argon2id_available() -> bool:
    """Tell whether this cryptography build can run Argon2id.

    The class exists from cryptography 44 on, and even then a build linked
    against an OpenSSL without Argon2 raises ``UnsupportedAlgorithm``.
    """
    global _argon2id_ok
    if _argon2id_ok is None:
        try:
            from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

            Argon2id(salt=bytes(8), length=KEY_BYTES, iterations=1, lanes=1,
                     memory_cost=8).derive(b"probe")
            _argon2id_ok = True
        except Exception:  # noqa: BLE001 - ImportError or UnsupportedAlgorithm
            _argon2id_ok = False
    return _argon2id_ok


def _subkeys(master: bytes) -> tuple[bytes, bytes]:
    """Split the KDF output into the encryption key and the passphrase check."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    encryption = HKDFExpand(hashes.SHA256(), KEY_BYTES, _ENCRYPTION_INFO).derive(
        master
    )
    check = HKDFExpand(hashes.SHA256(), CHECK_BYTES, _CHECK_INFO).derive(master)
    return encryption, check


# --- the file format -----------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The public part of a vault file: what is needed to derive its key."""

    kdf: Kdf
    salt: bytes
    check: bytes
    cipher: str = CIPHER

    def encode(self) -> bytes:
        data = {
            "format": FORMAT_VERSION,
            "cipher": self.cipher,
            "kdf": self.kdf.to_json(),
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "check": base64.b64encode(self.check).decode("ascii"),
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Parsed:
    header: Header
    associated_data: bytes
    nonce: bytes
    body: bytes


def _assemble(header: bytes, nonce: bytes, body: bytes) -> bytes:
    prefix = MAGIC + _PREFIX.pack(FORMAT_VERSION, len(header)) + header
    data = prefix + nonce + body
    return data + hashlib.sha256(data).digest()


def _associated_data(header: bytes) -> bytes:
    return MAGIC + _PREFIX.pack(FORMAT_VERSION, len(header)) + header


def parse_vault(data: bytes, path: Path) -> _Parsed:
    """Split a vault file into its parts; raise ``VaultCorruptError`` if it is bad."""
    if not (data.startswith(MAGIC) or MAGIC.startswith(data)):
        raise VaultCorruptError("not an npmguard file vault (wrong magic)", path=path)
    if len(data) < len(MAGIC) + _PREFIX.size:
        raise VaultCorruptError(
            f"the file vault is truncated ({len(data)} bytes)", path=path
        )

    version, header_length = _PREFIX.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise VaultCorruptError(
            f"the file vault has format {version}, which this npmguard cannot "
            f"read (it reads format {FORMAT_VERSION}); upgrade npmguard",
            path=path,
        )
    if len(data) < _MIN_SIZE:
        raise VaultCorruptError(
            f"the file vault is truncated ({len(data)} bytes)", path=path
        )

    content, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if not hmac.compare_digest(hashlib.sha256(content).digest(), digest):
        raise VaultCorruptError(
            "the file vault is damaged or truncated (its checksum does not "
            "match); restore it from a backup",
            path=path,
        )

    header_start = len(MAGIC) + _PREFIX.size
    header_end = header_start + header_length
    if header_end + NONCE_BYTES + TAG_BYTES > len(content):
        raise VaultCorruptError("the file vault's header length is invalid",
                                path=path)
    header = _parse_header(content[header_start:header_end], path)
    return _Parsed(
        header=header,
        associated_data=content[:header_end],
        nonce=content[header_end : header_end + NONCE_BYTES],
        body=content[header_end + NONCE_BYTES :],
    )


def _parse_header(raw: bytes, path: Path) -> Header:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise VaultCorruptError("the file vault's header is not valid JSON",
                                path=path) from None
    if not isinstance(data, dict):
        raise VaultCorruptError("the file vault's header is not an object", path=path)
    if data.get("cipher") != CIPHER:
        raise VaultCorruptError(
            f"the file vault uses the cipher {data.get('cipher')!r}; this "
            f"npmguard supports {CIPHER} only",
            path=path,
        )
    kdf = Kdf.from_json(data.get("kdf"), path)
    salt = _b64_field(data, "salt", path)
    check = _b64_field(data, "check", path)
    if not 16 <= len(salt) <= 64:
        raise VaultCorruptError("the file vault's salt has an invalid length",
                                path=path)
    if len(check) != CHECK_BYTES:
        raise VaultCorruptError("the file vault's key check has an invalid length",
                                path=path)
    return Header(kdf=kdf, salt=salt, check=check)


def _b64_field(data: dict[str, Any], key: str, path: Path) -> bytes:
    value = data.get(key)
    try:
        if not isinstance(value, str):
            raise ValueError(key)
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise VaultCorruptError(f"the file vault's {key} is missing or invalid",
                                path=path) from None


def read_header(path: Path | None = None) -> Header | None:
    """Return the header of the vault file, or None when there is no file.

    It needs no passphrase; ``npmguard doctor`` shows the KDF with it.
    Raise ``VaultCorruptError`` for a bad file.
    """
    path = path or vault_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise VaultError(f"cannot read the file vault: {err.strerror}",
                         path=path) from err
    return parse_vault(data, path).header


# --- the store -------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """The derived key and the header it belongs to; never the passphrase."""

    encryption: bytes
    header: Header = field(repr=False)

    def __repr__(self) -> str:
        return "_Key(<hidden>)"


class FileVault:
    """A ``CredentialStore`` in one encrypted file, opened with a passphrase.

    ``create`` or ``unlock`` derives the key once and keeps it in memory;
    ``lock`` drops it. Each read decrypts the file again, so changes made by
    another process (the daemon, a second command) are seen at once. Writes
    hold a lock file, so two processes never lose each other's change.
    Safe to share between threads.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or vault_path()
        self.description = f"file vault ({self.path})"
        self._key: _Key | None = None
        self._lock = threading.RLock()

    # --- state -------------------------------------------------------------

    @property
    def unlocked(self) -> bool:
        return self._key is not None

    def exists(self) -> bool:
        return self.path.exists()

    def header(self) -> Header | None:
        return read_header(self.path)

    # --- unlock, create, lock ------------------------------------------------

    def unlock(self, passphrase: Secret) -> None:
        """Derive the key from ``passphrase`` and check it against the file.

        Raise ``VaultMissingError`` when there is no vault yet,
        ``WrongPassphraseError`` for a wrong passphrase and
        ``VaultCorruptError`` for a damaged or altered file. The vault stays
        as it was (locked or unlocked with the earlier key) on any error.
        """
        with self._lock:
            parsed = self._read_parsed()
            key = self._derive(passphrase, parsed.header)
            self._decrypt(parsed, key)
            self._key = key
        log.info("unlocked the file vault %s", self.path)

    def create(self, passphrase: Secret, *, kdf: Kdf | None = None) -> None:
        """Create an empty vault under ``passphrase`` and keep it unlocked.

        Raise ``VaultError`` when a vault file exists already.
        """
        check_new_passphrase(passphrase)
        kdf = kdf or default_kdf()
        with self._lock, self._write_lock():
            if self.path.exists():
                raise VaultError(
                    "a file vault exists already; unlock it instead", path=self.path
                )
            key = self._new_key(passphrase, kdf)
            self._write({}, key, create=True)
            self._key = key
        log.info("created the file vault %s (%s)", self.path, kdf.describe())

    def lock(self) -> None:
        """Forget the key; later reads and writes raise ``VaultLockedError``.

        NOTE: Python gives no way to wipe the bytes objects that held the
        key, so they stay in freed memory until it is reused.
        """
        with self._lock:
            was_unlocked = self._key is not None
            self._key = None
        if was_unlocked:
            log.info("locked the file vault %s", self.path)

    def change_passphrase(
        self, old: Secret, new: Secret, *, kdf: Kdf | None = None
    ) -> None:
        """Re-encrypt the vault under ``new``, with a new salt and ``kdf``.

        ``kdf`` defaults to the current default, so changing the passphrase
        also moves an old file to the current KDF parameters. The vault is
        unlocked with the new key afterwards.
        """
        check_new_passphrase(new)
        kdf = kdf or default_kdf()
        with self._lock, self._write_lock():
            parsed = self._read_parsed()
            old_key = self._derive(old, parsed.header)
            entries = self._decrypt(parsed, old_key)
            new_key = self._new_key(new, kdf)
            self._write(entries, new_key)
            self._key = new_key
        log.info("changed the passphrase of the file vault %s (%s)", self.path,
                 kdf.describe())

    # --- CredentialStore -------------------------------------------------------

    def get(self, name: str) -> Secret | None:
        with self._lock:
            value = self._entries().get(name)
        return Secret(value) if value is not None else None

    def set(self, name: str, value: Secret) -> None:
        with self._lock, self._write_lock():
            entries = self._entries()
            entries[name] = value.reveal()
            self._write(entries, self._require_key())
        log.debug("stored %s in the file vault (fp %s)", name, value.fingerprint)

    def delete(self, name: str) -> None:
        with self._lock, self._write_lock():
            entries = self._entries()
            if entries.pop(name, None) is None:
                return
            self._write(entries, self._require_key())
        log.debug("deleted %s from the file vault", name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries())

    # --- internals ---------------------------------------------------------------

    def _require_key(self) -> _Key:
        key = self._key
        if key is None:
            raise VaultLockedError(
                "the file vault is locked; run `npmguard unlock`", path=self.path
            )
        return key

    def _entries(self) -> dict[str, str]:
        """Decrypt the file's entries with the kept key."""
        key = self._require_key()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            # Removed while unlocked: empty, and the next write makes it
            # again under the same key.
            return {}
        except OSError as err:
            raise VaultError(f"cannot read the file vault: {err.strerror}",
                             path=self.path) from err
        parsed = parse_vault(data, self.path)
        if parsed.header != key.header:
            # Another process changed the passphrase (new salt, new check):
            # the kept key no longer opens the file.
            self._key = None
            raise VaultLockedError(
                "the file vault's passphrase was changed since it was "
                "unlocked; run `npmguard unlock` again",
                path=self.path,
            )
        return self._decrypt(parsed, key)

    def _read_parsed(self) -> _Parsed:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise VaultMissingError(
                "there is no file vault yet; `npmguard unlock` creates one",
                path=self.path,
            ) from None
        except OSError as err:
            raise VaultError(f"cannot read the file vault: {err.strerror}",
                             path=self.path) from err
        return parse_vault(data, self.path)

    def _derive(self, passphrase: Secret, header: Header) -> _Key:
        master = header.kdf.derive(passphrase, header.salt)
        encryption, check = _subkeys(master)
        if not hmac.compare_digest(check, header.check):
            raise WrongPassphraseError(
                "wrong passphrase for the file vault", path=self.path
            )
        return _Key(encryption, header)

    def _new_key(self, passphrase: Secret, kdf: Kdf) -> _Key:
        salt = os.urandom(SALT_BYTES)
        encryption, check = _subkeys(kdf.derive(passphrase, salt))
        return _Key(encryption, Header(kdf=kdf, salt=salt, check=check))

    def _decrypt(self, parsed: _Parsed, key: _Key) -> dict[str, str]:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            plain = AESGCM(key.encryption).decrypt(
                parsed.nonce, parsed.body, parsed.associated_data
            )
        except InvalidTag:
            raise VaultCorruptError(
                "the file vault failed authentication: it was altered after "
                "npmguard wrote it; restore it from a backup",
                path=self.path,
            ) from None
        try:
            data = json.loads(plain.decode("utf-8"))
            entries = data["entries"]
            valid = isinstance(entries, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in entries.items()
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise VaultCorruptError(
                "the file vault decrypted to something that is not a list of "
                "entries",
                path=self.path,
            )
        return dict(entries)

    def _write(self, entries: dict[str, str], key: _Key, *, create: bool = False
               ) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        plain = json.dumps({"entries": entries}, ensure_ascii=False).encode("utf-8")
        plain += b" " * (-len(plain) % PAD_BYTES)
        header = key.header.encode()
        nonce = os.urandom(NONCE_BYTES)
        body = AESGCM(key.encryption).encrypt(nonce, plain, _associated_data(header))
        data = _assemble(header, nonce, body)
        self._sweep_temp_files()
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                files.create_file(self.path, data, f"create{os.getpid()}")
            else:
                files.write_private(self.path, data)
        except OSError as err:
            raise VaultError(f"cannot write the file vault: {err.strerror}",
                             path=self.path) from err

    def _sweep_temp_files(self) -> None:
        """Remove temp files of writes that were killed; they hold ciphertext.

        Called with the write lock held, so no live writer owns one.
        """
        pattern = f".{self.path.name}.*{files.TEMP_SUFFIX}"
        with contextlib.suppress(OSError):
            for leftover in self.path.parent.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Hold the vault's lock file, so writers in other processes wait."""
        lock_path = self.path.with_name(LOCK_NAME)
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise VaultError(f"cannot open the vault's lock file: {err.strerror}",
                             path=lock_path) from err
        try:
            _lock_fd(fd)
            try:
                yield
            finally:
                _unlock_fd(fd)
        finally:
            os.close(fd)


def check_new_passphrase(passphrase: Secret) -> None:
    """Raise ``VaultError`` unless ``passphrase`` is acceptable for a new vault."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise VaultError(
            f"the passphrase is too short; use at least {MIN_PASSPHRASE_CHARS} "
            "characters"
        )


# The one place that picks a cross-process file lock per platform.
try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]


def _lock_fd(fd: int) -> None:
    if _fcntl is None:  # pragma: no cover - Windows
        # NOTE: not run in this project's tests, which run on Linux.
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        return
    _fcntl.flock(fd, _fcntl.LOCK_EX)


def _unlock_fd(fd: int) -> None:
    if _fcntl is None:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    _fcntl.flock(fd, _fcntl.LOCK_UN)
