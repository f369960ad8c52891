"""The daemon's wire protocol: one JSON object per line over a Unix socket.

Requests::

    {"op": "token", "registry": "//host/" | null, "cwd": "/abs", "header": false,
     "env": {"HOME": "...", ...}}
    {"op": "env", "registry": "//host/" | null, "cwd": "/abs", "env": {...}}
    {"op": "status"}
    {"op": "pause"}
    {"op": "resume"}

``token`` returns what ``npmguard token`` prints, and ``env`` returns the
variables ``npmguard exec`` puts into its child's environment. ``env`` in
a request holds only the variables that decide where npm's config files
are (``LOCATION_VARIABLES``), never a credential.

Other modules may register more ops with the daemon: the file vault serves
``vault.unlock``, ``vault.get`` and others (``npmguard.vault.daemon_ops``).

Replies are ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``.
An error reply with ``"local": true`` tells the client to resolve the value
itself: the daemon does this for a ``${VAR}`` reference, whose value lives
in the client's environment.

This module is imported on the client's fast path, so it uses only modules
that Python has loaded at startup, plus ``json``.
"""

from __future__ import annotations

import json
import os

# Not ``typing.TYPE_CHECKING``: importing typing costs about 2 ms, a tenth
# of a token request through the daemon.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Collection, Mapping
    from typing import Any

# A request is a few hundred bytes; the bound stops a client that never
# sends a newline from growing the daemon's buffer without limit.
MAX_LINE = 64 * 1024

OPS = ("token", "env", "status", "pause", "resume")

# The variables npm reads to find the user and global config files, from
# npmguard.npmrc.locate. npm matches the npm_config_ prefix in any case.
LOCATION_VARIABLES = ("HOME", "PATH", "PREFIX")
LOCATION_NPM_SETTINGS = ("npm_config_userconfig", "npm_config_globalconfig",
                         "npm_config_prefix")

SOCKET_ENV = "NPMGUARD_SOCKET"
SOCKET_NAME = "daemon.sock"


class ProtocolError(ValueError):
    """A line that is not a valid request or reply."""


def socket_path() -> str:
    """Return the daemon's socket path.

    ``$NPMGUARD_SOCKET`` wins, then ``$XDG_RUNTIME_DIR/npmguard/daemon.sock``,
    then ``run/daemon.sock`` in npmguard's state directory. The runtime dir
    is preferred because it is private to the user, in memory, and emptied
    at logout, so a socket never outlives the session.
    """
    override = os.environ.get(SOCKET_ENV)
    if override:
        return os.path.abspath(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "npmguard", SOCKET_NAME)
    # Imported here: it pulls in platformdirs unless NPMGUARD_STATE_DIR is set.
    from npmguard.paths import state_dir

    return os.path.join(str(state_dir()), "run", SOCKET_NAME)


def location_env(env: Mapping[str, str]) -> dict[str, str]:
    """Return the variables of ``env`` that decide where npm's config files are."""
    picked = {name: env[name] for name in LOCATION_VARIABLES if name in env}
    for name, value in env.items():
        if name.lower() in LOCATION_NPM_SETTINGS:
            picked[name] = value
    return picked


def encode(message: dict[str, Any]) -> bytes:
    """Encode one message as a line; ASCII-only, so a line is never split oddly."""
    return json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Decode one line into a JSON object, or raise ``ProtocolError``."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line is longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"not valid JSON: {_first_line(err)}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def read_line(sock: _socket.socket) -> bytes:
    """Read one reply line from ``sock`` and return it without its newline.

    A reply longer than ``MAX_LINE`` is cut off as a broken connection, so a
    runaway daemon cannot grow the client's buffer without limit.
    """
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(0, "the daemon closed the connection")
        data += chunk
        if len(data) > MAX_LINE:
            raise ConnectionResetError(0, "the daemon's reply is too long")
    return data.split(b"\n", 1)[0]


def check_request(
    message: dict[str, Any], ops: Collection[str] = OPS
) -> dict[str, Any]:
    """Check a request's op and field types; return it or raise ``ProtocolError``.

    ``ops`` adds the ops that other modules serve through the daemon (the
    file vault's ``vault.*``); their fields are checked by their handlers.
    """
    op = message.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError(f"unknown op {op!r}; known: {', '.join(sorted(ops))}")
    if op in ("token", "env"):
        registry = message.get("registry")
        if registry is not None and not isinstance(registry, str):
            raise ProtocolError("registry must be a string or null")
        cwd = message.get("cwd")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ProtocolError("cwd must be an absolute path")
        env = message.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ProtocolError("env must be an object of strings")
        if not isinstance(message.get("header", False), bool):
            raise ProtocolError("header must be true or false")
    return message


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": _one_line(message)}


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
