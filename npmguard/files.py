"""Reading config files defensively and replacing them atomically."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from npmguard.errors import ConfigFileError, FileChangedError
from npmguard.npmrc.ini import Document

# npm config files are a few hundred bytes; anything this large is not one.
MAX_CONFIG_BYTES = 1024 * 1024
TEMP_SUFFIX = ".npmguard-tmp"


@dataclass(frozen=True)
class ConfigFile:
    """A config file as read from disk.

    ``path`` is the name the user gave or npm uses. ``target`` is the
    regular file behind it after following symlinks. The target is what
    gets rewritten, so a symlinked ``~/.npmrc`` stays a symlink.
    """

    path: Path
    target: Path
    data: bytes
    document: Document
    mode: int
    uid: int
    gid: int


def read_config(path: Path) -> ConfigFile:
    """Read and parse one config file, or raise a one-line ``ConfigFileError``."""
    try:
        target = Path(os.path.realpath(path, strict=True))
        info = os.stat(target)
    except OSError as err:
        raise ConfigFileError(_os_reason(err), path=path) from err
    if not stat.S_ISREG(info.st_mode):
        raise ConfigFileError("not a regular file", path=path)
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigFileError(
            f"file is {info.st_size} bytes, over the {MAX_CONFIG_BYTES}-byte "
            "limit for a config file; not read",
            path=path,
        )
    try:
        with open(target, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigFileError(_os_reason(err), path=path) from err
    return ConfigFile(
        path=path,
        target=target,
        data=data,
        document=parse_bytes(data, path),
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
    )


def parse_bytes(data: bytes, path: Path) -> Document:
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise ConfigFileError(
            "binary data (NUL byte); not scanned or changed, check this file by hand",
            path=path,
            line=line,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigFileError(
            f"not valid UTF-8 (byte 0x{data[err.start]:02x}); not scanned or "
            "changed, check this file by hand or save it as UTF-8",
            path=path,
            line=line,
        ) from err
    return Document.from_text(text)


def _os_reason(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno == errno.ENOENT:
        return "file not found"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return err.strerror or type(err).__name__


def temp_path_for(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}{TEMP_SUFFIX}")


def check_writable(original: ConfigFile) -> None:
    """Raise ``ConfigFileError`` unless the file can be replaced in place.

    A file with no write bit at all counts as read-only even for root, who
    could write it anyway: the owner made it read-only on purpose.
    """
    target = original.target
    if not os.access(target, os.W_OK) or not original.mode & 0o222:
        raise ConfigFileError(
            f"file is read-only (mode {original.mode:04o}); not changed. Make "
            "it writable (chmod u+w) and run the command again",
            path=original.path,
        )
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ConfigFileError(
            "its directory is not writable, so no temp file can be made next "
            "to it; not changed",
            path=original.path,
        )


def replace_file(original: ConfigFile, new_data: bytes, tag: str) -> None:
    """Replace ``original.target`` with ``new_data`` atomically.

    The order keeps the old content recoverable until the new one is
    durable: write a temp file in the same directory with the same mode
    and owner, fsync it, check the file still contains what was read, rename
    over it, then fsync the directory. Raises ``FileChangedError`` (and
    leaves the file alone) when the content, mode or owner changed since
    it was read. The rename is the last step that can fail, so on any
    exception the file still has its old content.
    """
    check_writable(original)
    target = original.target
    temp = temp_path_for(target, tag)
    _unlink_quietly(temp)
    try:
        # 0600 until the owner and mode are set, because the temp file of a
        # restore contains plaintext values.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise ConfigFileError(
            f"cannot create a temp file next to it: {_os_reason(err)}",
            path=original.path,
        ) from err
    try:
        try:
            _set_owner_and_mode(fd, original)
            _write_all(fd, new_data)
            os.fsync(fd)
        finally:
            os.close(fd)
        ensure_unchanged(original)
        try:
            os.replace(temp, target)
        except OSError as err:
            raise ConfigFileError(
                f"cannot replace it: {_os_reason(err)}; not changed",
                path=original.path,
            ) from err
    except BaseException:
        _unlink_quietly(temp)
        raise
    fsync_dir(target.parent)


def _set_owner_and_mode(fd: int, original: ConfigFile) -> None:
    # chown first: Linux clears the setuid and setgid bits on chown.
    if (original.uid, original.gid) != (os.getuid(), os.getgid()):
        try:
            os.fchown(fd, original.uid, original.gid)
        except OSError as err:
            raise ConfigFileError(
                f"cannot keep its owner {original.uid}:{original.gid} "
                f"({_os_reason(err)}); not changed",
                path=original.path,
            ) from err
    os.fchmod(fd, original.mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def ensure_unchanged(original: ConfigFile) -> None:
    """Raise ``FileChangedError`` unless the file still is what was read."""
    try:
        with open(original.target, "rb") as handle:
            info = os.fstat(handle.fileno())
            current = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise FileChangedError(
            f"file changed while npmguard worked on it ({_os_reason(err)}); "
            "nothing written, run the command again",
            path=original.path,
        ) from err
    if current != original.data:
        raise FileChangedError(
            "file changed while npmguard worked on it; nothing written, "
            "run the command again",
            path=original.path,
        )
    if (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) != (
        original.mode,
        original.uid,
        original.gid,
    ):
        raise FileChangedError(
            "file mode or owner changed while npmguard worked on it; nothing "
            "written, run the command again",
            path=original.path,
        )


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # Some platforms cannot open directories; rename is still atomic.
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_synced(temp: Path, data: bytes, mode: int) -> None:
    """Write ``temp`` with ``data`` and exactly ``mode``, flushed to disk."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # The umask may have narrowed the mode os.open set.
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write npmguard's own state file atomically with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = _private_temp(path)
    try:
        _write_synced(temp, data, mode)
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise
    fsync_dir(path.parent)


def create_file(path: Path, data: bytes, tag: str, mode: int = 0o600) -> None:
    """Create ``path`` with ``data``; raise ``FileChangedError`` if it exists.

    The content is written to a temp file (named with ``tag``, as in
    ``replace_file``) and hard-linked into place, so the file never appears
    half written and a file that someone else made in the meantime is never
    overwritten.
    """
    temp = temp_path_for(path, tag)
    try:
        _write_synced(temp, data, mode)
        os.link(temp, path)
    except FileExistsError as err:
        raise FileChangedError(
            "file appeared while npmguard worked on it; nothing written, "
            "run the command again",
            path=path,
        ) from err
    except OSError as err:
        reason = _os_reason(err)
        raise ConfigFileError(f"cannot create it: {reason}", path=path) from err
    finally:
        _unlink_quietly(temp)
    fsync_dir(path.parent)


def _private_temp(path: Path) -> Path:
    # The process id keeps two writers (a crash log and a state file, say)
    # off each other's temp file.
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def sweep_temp_files(directory: Path) -> None:
    """Remove temp files that a killed ``write_private`` left in ``directory``."""
    try:
        leftovers = list(directory.glob(f".*{TEMP_SUFFIX}"))
    except OSError:
        return
    for leftover in leftovers:
        _unlink_quietly(leftover)
