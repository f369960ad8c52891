"""The client side of the daemon socket, used by ``token``, ``exec`` and ``status``.

``npmguard token`` runs for every request pnpm makes through its token
helper, so this module is built to be imported before argparse and logging:
it loads only ``_socket``, ``json`` and the protocol module. When no daemon
is listening (no socket, or connection refused) the callers fall back to
reading the vault themselves, silently. A reply with an error is final:
it is printed and the command exits 2, so a locked keychain is reported
instead of being hidden behind a second attempt. ``NPMGUARD_NO_DAEMON=1``
skips the daemon, for benchmarks and for debugging the direct path.
"""

from __future__ import annotations

# _socket is the C module behind socket. The socket module adds about 2.5 ms
# of imports (selectors, enum classes) that a single blocking request does
# not need.
import _socket
import os
import sys

from npmguard.daemon import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Long enough for a keychain read behind a slow D-Bus, short enough that a
# hung daemon does not stall an install for long before the fallback.
TIMEOUT_SECONDS = 10.0

# Set once this process learns that the daemon cannot serve it, so that the
# command's slow path does not ask a second time.
_skip_daemon = False


class DaemonUnavailable(Exception):
    """No daemon served the request; ``quiet`` is True when none is running."""

    def __init__(self, reason: str, *, quiet: bool) -> None:
        super().__init__(reason)
        self.quiet = quiet


def request(
    message: dict[str, Any], *, path: str | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Send one request and return the daemon's reply.

    Raise ``DaemonUnavailable`` when no daemon is listening or it did not
    reply in time; an error reply is returned like any other.
    """
    family = getattr(_socket, "AF_UNIX", None)
    if family is None:
        # NOTE: CPython on Windows has no AF_UNIX, so there the commands
        # always read the vault directly.
        raise DaemonUnavailable("no Unix sockets on this platform", quiet=True)
    address = path or protocol.socket_path()
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonUnavailable("the daemon is not running", quiet=True) from None
        except OSError as err:
            raise DaemonUnavailable(
                f"cannot connect to {address}: {err.strerror or err}", quiet=False
            ) from None
        try:
            sock.sendall(protocol.encode(message))
            line = protocol.read_line(sock)
        except TimeoutError:
            raise DaemonUnavailable(
                f"the daemon did not reply within {timeout:g} s", quiet=False
            ) from None
        except OSError as err:
            raise DaemonUnavailable(
                f"the connection to the daemon failed: {err.strerror or err}",
                quiet=False,
            ) from None
    finally:
        sock.close()
    try:
        return protocol.decode(line)
    except protocol.ProtocolError as err:
        raise DaemonUnavailable(f"invalid reply from the daemon: {err}",
                                quiet=False) from None


def credential_request(op: str, registry: str | None, *, header: bool = False
                       ) -> dict[str, Any]:
    """Build a ``token`` or ``env`` request for this process's cwd and config."""
    message: dict[str, Any] = {
        "op": op,
        "registry": registry,
        "cwd": os.getcwd(),
        "env": protocol.location_env(os.environ),
    }
    if op == "token":
        message["header"] = header
    return message


def ask(message: dict[str, Any]) -> dict[str, Any] | None:
    """Return the daemon's reply, or None when the caller should read the vault.

    None means no daemon is running, it failed to reply (a warning goes to
    stderr), or it sent ``"local": true``. An error reply is returned for the
    caller to report.
    """
    global _skip_daemon
    if _skip_daemon or os.environ.get("NPMGUARD_NO_DAEMON"):
        return None
    try:
        reply = request(message)
    except DaemonUnavailable as err:
        _skip_daemon = True
        if not err.quiet:
            sys.stderr.write(f"npmguard: {err}; reading the vault directly\n")
        return None
    if not reply.get("ok") and reply.get("local"):
        _skip_daemon = True
        return None
    return reply


def reply_error(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    return error if isinstance(error, str) and error else "the daemon failed"


def fast_token(argv: list[str]) -> int | None:
    """Serve ``npmguard token`` from the daemon before the CLI builds its parser.

    Return the exit code, or None when the daemon did not serve it and the
    normal command should run. Only the plain forms ``token``,
    ``--registry URL``, ``--registry=URL`` and ``--header`` are handled here.
    Anything else goes through argparse.
    """
    parsed = _parse_token_argv(argv)
    if parsed is None:
        return None
    registry, header = parsed
    reply = ask(credential_request("token", registry, header=header))
    if reply is None:
        return None
    return print_token(reply)


def print_token(reply: dict[str, Any]) -> int:
    """Print a token reply's value, or its error; return the exit code."""
    if not reply.get("ok"):
        sys.stderr.write(f"npmguard: {reply_error(reply)}\n")
        return 2
    value = reply.get("value")
    if not isinstance(value, str):
        sys.stderr.write("npmguard: the daemon's reply has no value\n")
        return 2
    sys.stdout.write(value + "\n")
    sys.stdout.flush()
    return 0


def _parse_token_argv(argv: list[str]) -> tuple[str | None, bool] | None:
    if not argv or argv[0] != "token":
        return None
    registry: str | None = None
    header = False
    rest = argv[1:]
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg == "--header":
            header = True
        elif arg == "--registry" and index + 1 < len(rest):
            registry = rest[index + 1]
            index += 1
        elif arg.startswith("--registry="):
            registry = arg[len("--registry="):]
        else:
            return None
        index += 1
    return registry, header
