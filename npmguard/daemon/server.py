"""The daemon's local socket server.

One thread runs a ``selectors`` loop that accepts connections, checks the
peer's uid, and reads request lines without blocking. A complete line goes
to a small fixed pool of threads, which calls the handler and writes the
reply, then hands the connection back to the loop for the next line. So a
slow or idle client costs a buffer, not a thread, and a thousand clients
at once wait in the kernel's listen queue and the loop instead of being
turned away.

The socket file is 0600 in a 0700 directory, and a peer whose uid differs
from the daemon's gets an error reply and is disconnected (SO_PEERCRED on
Linux, LOCAL_PEERCRED on macOS). A lock file next to the socket makes a
second daemon fail with a clear message, and lets a new daemon replace a
socket left by one that died.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard.daemon import protocol
from npmguard.daemon.worker import Worker
from npmguard.errors import NpmguardError

log = logging.getLogger(__name__)

# The kernel caps this at net.core.somaxconn (4096 on Linux 5.4 and later).
LISTEN_BACKLOG = 1024
# Linux's sun_path has room for 108 bytes and macOS's for 104, NUL included.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
# A client that sends nothing for this long is disconnected.
IDLE_SECONDS = 30.0
# Time a rejected peer gets to read its error reply and hang up.
REJECTED_LINGER = 2.0
# Time a client gets to read its reply before the connection is dropped.
SEND_TIMEOUT = 5.0
# How long accepting pauses after the process ran out of file descriptors.
ACCEPT_BACKOFF = 0.1

Handler = Callable[[dict[str, Any], "Peer"], dict[str, Any]]


class DaemonRunningError(NpmguardError):
    """Another daemon already serves the socket."""


class SocketPathError(NpmguardError):
    """The socket path or its directory cannot be used safely."""


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int | None
    uid: int | None
    gid: int | None

    def describe(self) -> str:
        return describe_process(self.pid)


def peer_credentials(sock: socket.socket) -> Peer:
    """Return the connecting process's pid, uid and gid; None where unknown."""
    if sys.platform.startswith("linux"):
        size = struct.calcsize("3i")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
        pid, uid, gid = struct.unpack("3i", raw)
        return Peer(pid, uid, gid)
    if sys.platform == "darwin":
        # NOTE: not run in this project's tests, which run on Linux. The
        # values are from <sys/un.h> and <sys/ucred.h>: SOL_LOCAL 0,
        # LOCAL_PEERCRED 1 (a struct xucred), LOCAL_PEERPID 2.
        xucred = struct.Struct("IIh16I")
        raw = sock.getsockopt(0, 1, xucred.size)
        fields = xucred.unpack(raw)
        pid_raw = sock.getsockopt(0, 2, struct.calcsize("i"))
        return Peer(struct.unpack("i", pid_raw)[0], fields[1], fields[3])
    # Elsewhere only the directory's 0700 mode keeps other users out.
    return Peer(None, None, None)


def describe_process(pid: int | None, *, depth: int = 3) -> str:
    """Describe a process for the log: pid, executable, and its nearest parents."""
    if pid is None:
        return "an unknown process"
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        process = psutil.Process(pid)
        parts = [f"pid {pid} ({_exe(process)})"]
        chain = []
        current = process
        # Parent by parent rather than Process.parents(), which walks the
        # whole chain up to pid 1 and costs more than the rest of a request.
        for _ in range(depth):
            current = current.parent()
            if current is None:
                break
            chain.append(f"{current.pid} {_name(current)}")
        if chain:
            parts.append("parents " + " < ".join(chain))
        return ", ".join(parts)
    except psutil.Error:
        return f"pid {pid} (exited)"


def _exe(process: Any) -> str:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        return str(process.exe()) or _name(process)
    except psutil.Error:
        return _name(process)


def _name(process: Any) -> str:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        return str(process.name())
    except psutil.Error:
        return "?"


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    buffer: bytes = b""
    last_active: float = field(default_factory=time.monotonic)
    busy: bool = False
    # A rejected peer's input is discarded until it hangs up. Closing at
    # once, with its request unread, would reset the connection and could
    # destroy the error reply before the peer reads it.
    rejected: bool = False


class SocketServer(Worker):
    """Serve the line protocol on a Unix socket with a fixed pool of threads.

    ``bind`` takes the lock and creates the socket (call it first, to fail
    before starting anything else). ``start`` serves, ``stop`` and ``join``
    end the loop and the pool, and ``close`` removes the socket.
    """

    name = "server"

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        *,
        private_dir: bool = True,
        threads: int = 8,
        max_connections: int = 1024,
        idle_seconds: float = IDLE_SECONDS,
        on_reject: Callable[[Peer, int], None] | None = None,
    ) -> None:
        super().__init__()
        # Called with the peer and how many were refused from its uid so far.
        self.on_reject = on_reject
        self.path = Path(path)
        self.handler = handler
        self.private_dir = private_dir
        self.threads = threads
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self._uid = os.getuid()
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self._wake_read, self._wake_write = -1, -1
        self._jobs: queue.SimpleQueue[tuple[_Connection, bytes] | None] = (
            queue.SimpleQueue()
        )
        self._returned: queue.SimpleQueue[tuple[_Connection, bool]] = (
            queue.SimpleQueue()
        )
        self._pool: list[threading.Thread] = []
        self._connections: set[_Connection] = set()
        self._rejected: dict[int | None, int] = {}
        # The ops ``check_request`` accepts; the daemon adds registered ones.
        self.ops: set[str] = set(protocol.OPS)
        self._emfile_logged = False

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # --- setup and teardown ----------------------------------------------

    def bind(self) -> None:
        """Take the daemon lock and listen on the socket path.

        Raise ``DaemonRunningError`` when another daemon holds the lock, and
        ``SocketPathError`` when the path cannot be used.
        """
        encoded = os.fsencode(self.path)
        if len(encoded) > MAX_SOCKET_PATH:
            raise SocketPathError(
                f"socket path is {len(encoded)} bytes, over the {MAX_SOCKET_PATH}"
                f"-byte limit of Unix sockets; set {protocol.SOCKET_ENV} to a "
                "shorter path",
                path=self.path,
            )
        self._prepare_dir()
        self._take_lock()
        try:
            self._remove_stale_socket()
            self._listen()
        except BaseException:
            self._release_lock()
            raise
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.lstat()
        except OSError as err:
            raise SocketPathError(
                f"cannot create the socket directory: {err.strerror}", path=directory
            ) from err
        if not stat.S_ISDIR(info.st_mode):
            raise SocketPathError("is not a directory", path=directory)
        if not self.private_dir:
            # A directory named through NPMGUARD_SOCKET may be shared, such
            # as /tmp; its mode is the user's choice. The socket stays 0600.
            return
        if info.st_uid != self._uid:
            raise SocketPathError(
                f"is owned by uid {info.st_uid}, not by this user; remove it",
                path=directory,
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            log.warning(
                "socket directory %s had mode %o; setting it to 700",
                directory, stat.S_IMODE(info.st_mode),
            )
            os.chmod(directory, 0o700)

    def _take_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise DaemonRunningError(
                f"another npmguard daemon{who} is running on {self.path}; "
                "`npmguard status` shows it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _remove_stale_socket(self) -> None:
        # The lock is held, so no live daemon owns a socket at this path.
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketPathError(
                "exists and is not a socket; move it away", path=self.path
            )
        log.info("removing the socket %s left by a daemon that stopped", self.path)
        self.path.unlink()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as err:
            listener.close()
            raise SocketPathError(
                f"cannot listen: {err.strerror}", path=self.path
            ) from err
        info = self.path.lstat()
        self._socket_id = (info.st_dev, info.st_ino)
        self._listener = listener

    def stop(self) -> None:
        super().stop()
        self._wake()

    def close(self) -> None:
        """Remove the socket (if it is still this server's) and release the lock."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._socket_id is not None:
            with contextlib.suppress(OSError):
                info = self.path.lstat()
                if (info.st_dev, info.st_ino) == self._socket_id:
                    self.path.unlink()
            self._socket_id = None
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read, self._wake_write = -1, -1
        self._release_lock()

    def _wake(self) -> None:
        if self._wake_write >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_write, b"x")

    # --- the event loop ----------------------------------------------------

    def run(self) -> None:
        if self._listener is None:
            raise RuntimeError("bind() must be called before start()")
        selector = selectors.DefaultSelector()
        self._start_pool()
        try:
            selector.register(self._listener, selectors.EVENT_READ, "listen")
            selector.register(self._wake_read, selectors.EVENT_READ, "wake")
            self._loop(selector)
        finally:
            self._stop_pool()
            for connection in list(self._connections):
                self._close(connection, selector)
            selector.close()

    def _loop(self, selector: selectors.BaseSelector) -> None:
        listener = self._listener
        assert listener is not None
        listening = True
        resume_accept = 0.0
        last_sweep = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if not listening and now >= resume_accept and (
                len(self._connections) < self.max_connections
            ):
                selector.register(listener, selectors.EVENT_READ, "listen")
                listening = True
            # With no client connected the loop sleeps until woken, so an
            # idle daemon uses no CPU.
            timeout: float | None = None
            if self._connections:
                timeout = 1.0
            if not listening and resume_accept > now:
                # Accepting resumes after a file descriptor shortage. At the
                # connection limit it resumes when a connection closes, which
                # is an event that ends the select anyway.
                timeout = min(1.0, resume_accept - now)
            for key, _ in selector.select(timeout):
                if key.data == "listen":
                    paused = self._accept(selector)
                    if paused:
                        selector.unregister(listener)
                        listening = False
                        resume_accept = time.monotonic() + ACCEPT_BACKOFF
                elif key.data == "wake":
                    self._drain_wake()
                    self._take_back(selector)
                else:
                    self._read(key.data, selector)
            if listening and len(self._connections) >= self.max_connections:
                selector.unregister(listener)
                listening = False
            now = time.monotonic()
            if now - last_sweep >= 1.0:
                self._close_idle(selector, now)
                last_sweep = now

    def _accept(self, selector: selectors.BaseSelector) -> bool:
        """Accept waiting connections; return True to pause accepting for a bit."""
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                 errno.ENOMEM):
                    if not self._emfile_logged:
                        log.warning(
                            "cannot accept more connections (%s); new clients "
                            "wait until others finish", err.strerror,
                        )
                        self._emfile_logged = True
                    return True
                log.warning("accepting a connection failed: %s", err)
                return False
            self._admit(sock, selector)
        return False

    def _admit(self, sock: socket.socket, selector: selectors.BaseSelector) -> None:
        sock.setblocking(False)
        try:
            peer = peer_credentials(sock)
        except OSError as err:
            log.warning("could not read a client's credentials (%s); closing it", err)
            sock.close()
            return
        connection = _Connection(sock, peer)
        if peer.uid is not None and peer.uid != self._uid:
            self._reject(sock, peer)
            connection.rejected = True
        self._connections.add(connection)
        selector.register(sock, selectors.EVENT_READ, connection)

    def _reject(self, sock: socket.socket, peer: Peer) -> None:
        count = self._rejected.get(peer.uid, 0) + 1
        self._rejected[peer.uid] = count
        # The first few per uid, then one in a thousand: a flood of
        # connections must not flood the log too.
        if count <= 5 or count % 1000 == 0:
            log.warning(
                "rejected a connection from uid %s, %s (the daemon serves uid %d "
                "only; %d rejected from this uid)",
                peer.uid, peer.describe(), self._uid, count,
            )
        reply = protocol.encode(
            protocol.error_reply("rejected: the daemon serves only its own user")
        )
        with contextlib.suppress(OSError):
            sock.send(reply)
            sock.shutdown(socket.SHUT_WR)
        if self.on_reject is not None and (count <= 5 or count % 1000 == 0):
            try:
                self.on_reject(peer, count)
            except Exception:  # noqa: BLE001 - a hook must not stop the server
                log.exception("the refused-peer hook failed")

    def _read(self, connection: _Connection, selector: selectors.BaseSelector) -> None:
        try:
            data = connection.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection, selector)
            return
        if connection.rejected:
            return
        connection.buffer += data
        connection.last_active = time.monotonic()
        self._dispatch(connection, selector)

    def _dispatch(
        self, connection: _Connection, selector: selectors.BaseSelector
    ) -> None:
        """Hand the next complete line to the pool, or keep reading."""
        end = connection.buffer.find(b"\n")
        if end < 0 and len(connection.buffer) <= protocol.MAX_LINE:
            return
        if end < 0 or end > protocol.MAX_LINE:
            # No way to find the next request's start: reply and hang up.
            reply = protocol.error_reply(
                f"invalid request: line is longer than {protocol.MAX_LINE} bytes"
            )
            with contextlib.suppress(OSError):
                connection.sock.send(protocol.encode(reply))
            self._close(connection, selector)
            return
        line = connection.buffer[:end]
        connection.buffer = connection.buffer[end + 1 :]
        selector.unregister(connection.sock)
        connection.busy = True
        self._jobs.put((connection, line))

    def _take_back(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                connection, healthy = self._returned.get_nowait()
            except queue.Empty:
                return
            connection.busy = False
            connection.last_active = time.monotonic()
            if not healthy or self.stopping.is_set():
                self._close(connection, selector)
                continue
            selector.register(connection.sock, selectors.EVENT_READ, connection)
            if b"\n" in connection.buffer:
                self._dispatch(connection, selector)

    def _close_idle(self, selector: selectors.BaseSelector, now: float) -> None:
        for connection in list(self._connections):
            limit = REJECTED_LINGER if connection.rejected else self.idle_seconds
            if not connection.busy and now - connection.last_active > limit:
                self._close(connection, selector)

    def _close(self, connection: _Connection, selector: selectors.BaseSelector) -> None:
        if not connection.busy:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(connection.sock)
        connection.sock.close()
        self._connections.discard(connection)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_read, 4096):
                pass

    # --- the pool ------------------------------------------------------------

    def _start_pool(self) -> None:
        for index in range(self.threads):
            thread = threading.Thread(
                target=self._pool_main, name=f"npmguard-server-{index}", daemon=True
            )
            thread.start()
            self._pool.append(thread)

    def _stop_pool(self, timeout: float = 0.5) -> None:
        for _ in self._pool:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._pool:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s is still busy with a request at shutdown", thread.name)
        self._pool = []

    def _pool_main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            connection, line = job
            try:
                healthy = self._serve(connection, line)
            except Exception:  # noqa: BLE001 - one request must not end the thread
                log.exception("serving a request failed")
                healthy = False
            self._returned.put((connection, healthy))
            self._wake()

    def _serve(self, connection: _Connection, line: bytes) -> bool:
        """Serve one request line; return False when the connection broke."""
        try:
            request = protocol.check_request(protocol.decode(line), self.ops)
        except protocol.ProtocolError as err:
            reply = protocol.error_reply(f"invalid request: {err}")
        else:
            try:
                reply = self.handler(request, connection.peer)
            except Exception as err:  # noqa: BLE001 - the client gets a reply
                log.exception("the %r request failed", request.get("op"))
                reply = protocol.error_reply(
                    f"internal error in the daemon ({type(err).__name__}); "
                    "see its log"
                )
        try:
            data = protocol.encode(reply)
        except (TypeError, ValueError) as err:
            log.error("a reply could not be encoded: %s", err)
            data = protocol.encode(protocol.error_reply("internal error in the daemon"))
        try:
            connection.sock.settimeout(SEND_TIMEOUT)
            connection.sock.sendall(data)
            connection.sock.setblocking(False)
        except OSError:
            return False
        return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
