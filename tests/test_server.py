"""The socket server on a real Unix socket: modes, locking, bad input, load, peers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from npmguard.daemon import protocol
from npmguard.daemon.client import DaemonUnavailable, request
from npmguard.daemon.server import (
    DaemonRunningError,
    Peer,
    SocketPathError,
    SocketServer,
)

NOBODY = 65534


def _status_handler(message: dict[str, Any], peer: Peer) -> dict[str, Any]:
    if message["op"] == "token":
        return {"ok": True, "value": f"value-for-{message.get('registry')}",
                "peer_pid": peer.pid}
    return {"ok": True, "op": message["op"], "peer_uid": peer.uid}


@pytest.fixture
def sock_path(home: Path) -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "npmguard" / "daemon.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[SocketServer]:
    instance = SocketServer(sock_path, _status_handler)
    instance.bind()
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
        instance.join()
        instance.close()


def _raw_exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, then read reply lines until the server closes or idles."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(os.fspath(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _server_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith("npmguard-server") and t.is_alive()]


# --- files and lifecycle -------------------------------------------------------


def test_socket_mode_0600(server: SocketServer, sock_path: Path) -> None:
    assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o600


def test_socket_dir_mode_0700(server: SocketServer, sock_path: Path) -> None:
    assert stat.S_IMODE(sock_path.parent.lstat().st_mode) == 0o700


def test_loose_dir_tightened(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True)
    os.chmod(sock_path.parent, 0o755)
    instance = SocketServer(sock_path, _status_handler)
    instance.bind()
    try:
        assert stat.S_IMODE(sock_path.parent.lstat().st_mode) == 0o700
    finally:
        instance.close()


def test_status_roundtrip(server: SocketServer, sock_path: Path) -> None:
    reply = request({"op": "status"}, path=os.fspath(sock_path))
    assert reply == {"ok": True, "op": "status", "peer_uid": os.getuid()}


def test_stop_removes_socket(sock_path: Path) -> None:
    instance = SocketServer(sock_path, _status_handler)
    instance.bind()
    instance.start()
    instance.stop()
    assert instance.join(1.0)
    instance.close()
    assert not sock_path.exists()


def test_stop_leaves_no_threads(sock_path: Path) -> None:
    instance = SocketServer(sock_path, _status_handler)
    instance.bind()
    instance.start()
    request({"op": "status"}, path=os.fspath(sock_path))
    instance.stop()
    instance.join(1.0)
    instance.close()
    assert _server_threads() == []


def test_stale_socket_replaced(sock_path: Path) -> None:
    # A socket file whose server is gone, as a killed daemon leaves it.
    sock_path.parent.mkdir(parents=True, mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(sock_path))
    dead.close()
    instance = SocketServer(sock_path, _status_handler)
    instance.bind()
    instance.start()
    try:
        assert request({"op": "status"}, path=os.fspath(sock_path))["ok"] is True
    finally:
        instance.stop()
        instance.join()
        instance.close()


def test_second_server_rejected(server: SocketServer, sock_path: Path) -> None:
    second = SocketServer(sock_path, _status_handler)
    with pytest.raises(DaemonRunningError) as caught:
        second.bind()
    assert f"pid {os.getpid()}" in str(caught.value)


def test_second_server_keeps_first(server: SocketServer, sock_path: Path) -> None:
    second = SocketServer(sock_path, _status_handler)
    with pytest.raises(DaemonRunningError):
        second.bind()
    assert request({"op": "status"}, path=os.fspath(sock_path))["ok"] is True


def test_regular_file_not_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True, mode=0o700)
    sock_path.write_text("not a socket")
    with pytest.raises(SocketPathError, match="not a socket"):
        SocketServer(sock_path, _status_handler).bind()
    assert sock_path.read_text() == "not a socket"


def test_long_path_rejected(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "daemon.sock"
    with pytest.raises(SocketPathError, match="NPMGUARD_SOCKET"):
        SocketServer(path, _status_handler).bind()


def test_path_from_runtime_dir(home: Path) -> None:
    expected = Path(os.environ["XDG_RUNTIME_DIR"]) / "npmguard" / "daemon.sock"
    assert protocol.socket_path() == os.fspath(expected)


def test_path_from_env_override(tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPMGUARD_SOCKET", os.fspath(tmp_path / "s.sock"))
    assert protocol.socket_path() == os.fspath(tmp_path / "s.sock")


def test_path_without_runtime_dir(home: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    path = Path(protocol.socket_path())
    instance = SocketServer(path, _status_handler)
    instance.bind()
    try:
        assert path.parent == Path(os.environ["XDG_STATE_HOME"]) / "npmguard" / "run"
        assert stat.S_IMODE(path.parent.lstat().st_mode) == 0o700
    finally:
        instance.close()


def test_client_no_socket_quiet(sock_path: Path) -> None:
    with pytest.raises(DaemonUnavailable) as caught:
        request({"op": "status"}, path=os.fspath(sock_path))
    assert caught.value.quiet


def test_client_refused_quiet(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True, mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(sock_path))
    dead.close()
    with pytest.raises(DaemonUnavailable) as caught:
        request({"op": "status"}, path=os.fspath(sock_path))
    assert caught.value.quiet


# --- malformed input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json\n", "not valid JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"op": "launch"}\n', "unknown op"),
        (b"\xff\xfe\n", "not valid JSON"),
        (b"\n", "not valid JSON"),
        (b'{"op": "token", "registry": "//h/"}\n', "cwd"),
        (b'{"op": "token", "cwd": "relative"}\n', "absolute"),
        (b'{"op": "token", "cwd": "/", "header": "yes"}\n', "header"),
        (b'{"op": "env", "cwd": "/", "env": {"A": 1}}\n', "env"),
    ],
    ids=["text", "array", "op", "binary", "empty", "nocwd", "relcwd", "header",
         "envtype"],
)
def test_malformed_gets_error(
    server: SocketServer, sock_path: Path, payload: bytes, expected: str
) -> None:
    replies = _raw_exchange(sock_path, payload)
    assert len(replies) == 1
    assert replies[0]["ok"] is False
    assert expected in replies[0]["error"]


def test_malformed_then_valid(server: SocketServer, sock_path: Path) -> None:
    replies = _raw_exchange(sock_path, b"garbage\n" + protocol.encode({"op": "status"}))
    assert [r["ok"] for r in replies] == [False, True]


def test_overlong_line_closed(server: SocketServer, sock_path: Path) -> None:
    replies = _raw_exchange(sock_path, b"x" * (protocol.MAX_LINE + 100))
    assert len(replies) == 1
    assert "longer than" in replies[0]["error"]


def test_server_survives_garbage(server: SocketServer, sock_path: Path) -> None:
    for payload in (b"\x00" * 5000 + b"\n", b"{" * 1000 + b"\n", b"\xff" * 70000):
        _raw_exchange(sock_path, payload)
    assert request({"op": "status"}, path=os.fspath(sock_path))["ok"] is True


def test_half_line_then_close(server: SocketServer, sock_path: Path) -> None:
    assert _raw_exchange(sock_path, b'{"op": "sta') == []
    assert request({"op": "status"}, path=os.fspath(sock_path))["ok"] is True


def test_handler_error_reply(sock_path: Path) -> None:
    def failing(message: dict[str, Any], peer: Peer) -> dict[str, Any]:
        raise RuntimeError("handler bug")

    instance = SocketServer(sock_path, failing)
    instance.bind()
    instance.start()
    try:
        first = request({"op": "status"}, path=os.fspath(sock_path))
        second = request({"op": "status"}, path=os.fspath(sock_path))
    finally:
        instance.stop()
        instance.join()
        instance.close()
    assert "internal error" in first["error"]
    assert second["ok"] is False


def test_pipelined_requests(server: SocketServer, sock_path: Path) -> None:
    payload = b"".join(protocol.encode({"op": op}) for op in ("status", "pause",
                                                               "resume"))
    replies = _raw_exchange(sock_path, payload)
    assert [r["op"] for r in replies] == ["status", "pause", "resume"]


# --- load ------------------------------------------------------------------------


async def _one_request(path: str, index: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    message = {"op": "token", "registry": f"//r{index}/", "cwd": "/"}
    writer.write(protocol.encode(message))
    await writer.drain()
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return json.loads(line)


async def _many_requests(path: str, count: int) -> list[dict[str, Any]]:
    return await asyncio.gather(*(_one_request(path, i) for i in range(count)))


def test_thousand_concurrent_answered(server: SocketServer, sock_path: Path) -> None:
    replies = asyncio.run(_many_requests(os.fspath(sock_path), 1000))
    values = sorted(r["value"] for r in replies)
    assert values == sorted(f"value-for-//r{i}/" for i in range(1000))


def test_connection_limit_queues(sock_path: Path) -> None:
    instance = SocketServer(sock_path, _status_handler, max_connections=3)
    instance.bind()
    instance.start()
    try:
        replies = asyncio.run(_many_requests(os.fspath(sock_path), 50))
    finally:
        instance.stop()
        instance.join()
        instance.close()
    assert len([r for r in replies if r["ok"]]) == 50


def test_idle_clients_do_not_block(sock_path: Path) -> None:
    instance = SocketServer(sock_path, _status_handler, threads=2)
    instance.bind()
    instance.start()
    idle = []
    try:
        # More silent clients than pool threads: none of them occupies a thread.
        for _ in range(10):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(os.fspath(sock_path))
            idle.append(sock)
        reply = request({"op": "status"}, path=os.fspath(sock_path), timeout=2)
    finally:
        for sock in idle:
            sock.close()
        instance.stop()
        instance.join()
        instance.close()
    assert reply["ok"] is True


# --- other users ------------------------------------------------------------------

_PEER_CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
try:
    sock.connect(sys.argv[1])
except OSError as err:
    print(json.dumps({"connect_error": err.errno}))
    sys.exit(0)
sock.sendall(b'{"op": "status"}\n')
data = b""
try:
    while chunk := sock.recv(4096):
        data += chunk
except OSError as err:
    print(json.dumps({"recv_error": err.errno}))
    sys.exit(0)
print(data.decode().strip() or json.dumps({"closed": True}))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that uid 65534 can enter; pytest's own tmp dirs are 0700."""
    if os.getuid() != 0:
        pytest.skip("running a client as another uid needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    path = Path(tempfile.mkdtemp(prefix="npmguard-peer-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run_as_nobody(sock: Path, cwd: Path) -> dict[str, Any]:
    script = cwd / "client.py"
    script.write_text(_PEER_CLIENT)
    os.chmod(script, 0o644)
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", _python_for_nobody(),
         os.fspath(script), os.fspath(sock)],
        cwd=cwd, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _python_for_nobody() -> str:
    # The venv's interpreter may sit under a directory uid 65534 cannot
    # enter; the system's python3 is enough for the raw socket client.
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system python3 for the other-uid client")


def test_other_uid_cannot_connect(shared_dir: Path) -> None:
    sock = shared_dir / "run" / "daemon.sock"
    instance = SocketServer(sock, _status_handler)
    instance.bind()
    instance.start()
    try:
        outcome = _run_as_nobody(sock, shared_dir)
    finally:
        instance.stop()
        instance.join()
        instance.close()
    assert outcome == {"connect_error": 13}  # EACCES: the 0700 directory


def test_other_uid_rejected_by_peercred(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock = shared_dir / "run" / "daemon.sock"
    instance = SocketServer(sock, _status_handler)
    instance.bind()
    # Fault injection: loosen the modes, as a careless chmod would, so that
    # only the SO_PEERCRED check is left between the other user and the daemon.
    os.chmod(sock.parent, 0o755)
    os.chmod(sock, 0o666)
    instance.start()
    try:
        outcome = _run_as_nobody(sock, shared_dir)
    finally:
        instance.stop()
        instance.join()
        instance.close()
    assert outcome.get("ok") is False
    assert "rejected" in outcome.get("error", "")
    assert any("uid 65534" in r.getMessage() for r in caplog.records)
