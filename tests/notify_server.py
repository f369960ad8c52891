"""A small ``org.freedesktop.Notifications`` server for tests, over jeepney.

As a program, on ``$DBUS_SESSION_BUS_ADDRESS``::

    python notify_server.py OUT.jsonl [--silent]

it owns the name, appends one JSON object per ``Notify`` call to OUT
(``app_name``, ``summary``, ``body``, ``urgency``, ``hints``...) and answers
with a notification id. With ``--silent`` it owns the name but never answers,
like a server that hangs. SIGTERM stops it.

``NotificationServer.start`` runs it as a child process of the test through
``realparts.spawn`` and waits until it owns the name; ``stop`` ends it by PID.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

BUS_NAME = "org.freedesktop.Notifications"
OBJECT_PATH = "/org/freedesktop/Notifications"
# RequestName flag: fail instead of queueing behind another owner.
DO_NOT_QUEUE = 4
PRIMARY_OWNER = 1


def _plain(value: Any) -> Any:
    """jeepney gives variants as (signature, value); keep the value."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return _plain(value[1])
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(out_path: Path, *, silent: bool) -> int:
    from jeepney import HeaderFields, MessageType, new_error, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    signal.signal(signal.SIGTERM, _stop)
    conn = open_dbus_connection(bus="SESSION")
    reply = conn.send_and_get_reply(
        message_bus.RequestName(BUS_NAME, DO_NOT_QUEUE), timeout=5
    )
    if reply.body[0] != PRIMARY_OWNER:
        print(f"could not own {BUS_NAME}: {reply.body}", file=sys.stderr, flush=True)
        return 1
    print("ready", flush=True)
    next_id = 0
    with open(out_path, "a", buffering=1) as out:
        while True:
            msg = conn.receive()
            if msg.header.message_type != MessageType.method_call:
                continue
            fields = msg.header.fields
            if fields.get(HeaderFields.path) != OBJECT_PATH:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownObject"))
                continue
            member = fields.get(HeaderFields.member)
            if silent:
                continue
            if member == "Notify":
                app, replaces, icon, summary, body, actions, hints, expire = msg.body
                next_id += 1
                record = {
                    "id": next_id,
                    "app_name": app,
                    "replaces_id": replaces,
                    "app_icon": icon,
                    "summary": summary,
                    "body": body,
                    "actions": list(actions),
                    "hints": _plain(hints),
                    "urgency": _plain(hints.get("urgency", ("y", 1))),
                    "expire_timeout": expire,
                    "time": time.time(),
                }
                out.write(json.dumps(record) + "\n")
                conn.send(new_method_return(msg, "u", (next_id,)))
            elif member == "GetCapabilities":
                conn.send(new_method_return(msg, "as", (["body"],)))
            elif member == "GetServerInformation":
                info = ("npmguard-test-notify", "npmguard", "1.0", "1.2")
                conn.send(new_method_return(msg, "ssss", info))
            elif member == "CloseNotification":
                conn.send(new_method_return(msg))
            else:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))


@dataclass
class NotificationServer:
    """A running test server and the file it records to."""

    process: Any  # realparts.ManagedProcess
    out_path: Path

    @classmethod
    def start(
        cls, bus: Any, state_dir: Path, *, silent: bool = False
    ) -> NotificationServer:
        """Start on ``bus`` (a ``realparts.SessionBus``) and wait for its name."""
        import realparts

        state_dir.mkdir(parents=True, exist_ok=True)
        out_path = state_dir / "notifications.jsonl"
        out_path.touch()
        argv = [sys.executable, str(Path(__file__).resolve()), str(out_path)]
        if silent:
            argv.append("--silent")
        env = realparts.isolated_env(
            state_dir / "home", DBUS_SESSION_BUS_ADDRESS=bus.address
        )
        proc = realparts.spawn(
            "notify-server", argv, log_path=state_dir / "notify-server.log", env=env
        )
        server = cls(process=proc, out_path=out_path)
        try:
            realparts.wait_until(
                lambda: bus.name_has_owner(BUS_NAME),
                timeout=10,
                what=f"{BUS_NAME} on the private bus",
                proc=proc,
            )
        except BaseException:
            server.stop()
            raise
        return server

    def notifications(self) -> list[dict[str, Any]]:
        lines = self.out_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` notifications arrived; return all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.notifications()
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def raw_text(self) -> str:
        return self.out_path.read_text()

    def stop(self) -> None:
        self.process.stop()


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), silent="--silent" in sys.argv[2:]))
